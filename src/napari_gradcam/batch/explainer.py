"""The model over raw batches for the batch run: one target, or every class found."""

from __future__ import annotations

import logging
import weakref

import numpy as np

from ..explain_arrays import Runner
from .settings import FOUND, Options

log = logging.getLogger(__name__)


class Explainer:
    """The model over raw batches for one target, or for every class (``target="found"``):
    returns heatmaps (n, K, *spatial), class ids (n, K) and scores (n, K); K = 1 for one
    target."""

    def __init__(self, spec, opts: Options):
        self.found = isinstance(opts.target, str) and opts.target.lower() == FOUND
        if self.found and not spec.class_names:
            raise ValueError("target 'found' explains every class, and this model has no class "
                             "names; give class_names, or a class or none as the target.")
        targets = range(len(spec.class_names)) if self.found else [opts.target]
        self.runners = [Runner(spec, opts.method, t, opts.device, opts.batch_size)
                        for t in targets]
        self.dims = self.runners[0].dims
        cause = nan_cause(spec)
        if cause and spec.module not in _NAN_WARNED:
            _NAN_WARNED.add(spec.module)
            log.warning("the model %s: its output will be NaN, so every image will fail; "
                        "fix the model file", cause)

    def size_for(self, spatial, count: int) -> int:
        size = self.runners[0].size_for(spatial, count)
        for r in self.runners[1:]:
            r.batch_size = size
        return size

    def __call__(self, raw: np.ndarray):
        outs = [r(raw) for r in self.runners]
        return tuple(np.stack([o[j] for o in outs], 1) for j in range(3))


_NAN_WARNED: weakref.WeakSet = weakref.WeakSet()  # models nan_cause reported: warned once


def nan_cause(spec) -> str:
    """Where a model's NaN output would come from, found without running it: non-finite
    mean/std or weights (a sidecar can't be trusted to have been validated: a spec may be built
    directly). '' when both are finite."""
    for field_name in ("mean", "std"):
        values = np.asarray(getattr(spec, field_name), dtype=np.float64)
        if not np.all(np.isfinite(values)):
            return f"has a non-finite {field_name} {getattr(spec, field_name)!r}"
    import torch

    bad = []
    with torch.no_grad():
        for name, t in spec.module.state_dict().items():
            if torch.is_tensor(t) and t.is_floating_point():
                n = t.numel() - int(torch.isfinite(t).sum())
                if n:
                    bad.append(f"{name} ({n})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"has NaN/inf weights in {', '.join(bad[:3])}{more}"
    return ""
