"""The batch run's explain job: the command's options as one :class:`ExplainJob`."""

from __future__ import annotations

import logging
import weakref

import numpy as np

from ..job import ExplainJob
from .settings import Options

log = logging.getLogger(__name__)


def make_job(spec, opts: Options) -> ExplainJob:
    """The job a run (or a dask worker) explains its batches with: every target of a batch,
    "found" included, from one forward pass. Regions are cut on one thread per unit (the
    writer threads already write several units at once). A bad method, target, device or
    region option raises here, before anything is read; a model whose output will be NaN is
    named once. Tile and overlap are the job's: bad ones (or tiles for a 3D model) raise here
    too."""
    job = ExplainJob(spec, opts.method, opts.target, device=opts.device,
                     batch_size=opts.batch_size, tile=getattr(opts, "tile", "auto"),
                     overlap=getattr(opts, "overlap", 64),
                     regions={"threshold": opts.threshold, "min_area": opts.min_area,
                              "simplify": opts.simplify, "threshold_mode": opts.threshold_mode,
                              "workers": 1})
    cause = nan_cause(spec)
    if cause and spec.module not in _NAN_WARNED:
        _NAN_WARNED.add(spec.module)
        log.warning("the model %s: its output will be NaN, so every image will fail; "
                    "fix the model file", cause)
    return job


_NAN_WARNED: weakref.WeakSet = weakref.WeakSet()  # models nan_cause reported: warned once


def is_segmentation_job(job: ExplainJob) -> bool:
    """Whether the job's model returns a map of class scores per pixel (a segmentation
    model) rather than one score per class and image."""
    seg = getattr(job, "segmentation", None)
    if seg is None:  # a job without the probe: ask the model
        from ..job import is_segmentation

        seg = is_segmentation(job.spec)
    return bool(seg)


def check_segmentation_options(job: ExplainJob, target_mask: bool,
                               write_segmentation: bool) -> None:
    """Refuse, before any image is read, target masks or label maps asked of a classifier:
    a classifier scores whole images, so it has no per-pixel class to explain inside a region
    and no segmentation to write."""
    if not (target_mask or write_segmentation) or is_segmentation_job(job):
        return
    flag = "--target-mask" if target_mask else "--write-segmentation"
    why = ("it has no region whose class could be explained" if target_mask else
           "it has no segmentation to write")
    raise ValueError(f"{flag}: the model {getattr(job.spec, 'name', 'model')!r} is a "
                     "classifier (one score per class for a whole image, not a map of class "
                     f"scores per pixel), so {why}; leave {flag} out, or give a segmentation "
                     "model (output (N, classes, *spatial)).")


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
