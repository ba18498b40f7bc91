"""Model-parameter randomisation test (Adebayo et al. 2018, "Sanity checks for saliency maps").

The layers that hold parameters are re-initialised one group after another from the head down
to the input (a cascade: each stage keeps the previous stages' random layers), on a deep copy
of the model, and each stage's map is explained with the same engine, layer and target class
as the original map. A method whose maps depend on what the model learnt decorrelates as the
cascade proceeds (rank correlation near 0); one that still draws the same map after the
weights are gone is showing the image, not the model.

Re-initialisation uses each layer's own ``reset_parameters`` (PyTorch's default init for
convolutions, linear layers, norms: norms become identity and forget their running
statistics), else a normal init (standard deviation 1 / sqrt(fan-in) for weights, 0.02 for
vectors). The random generator is seeded per stage from ``seed``, in a forked RNG state: the
user's random state is left as it was, and every batch of images sees the same random
weights (a stack gives what its images give one by one).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..explain_arrays import Progress, Runner, run_generator
from ..models import ModelSpec
from ._common import (
    Model,
    check_targets,
    class_label,
    index_of,
    tolist,
)


def parameter_layers(module: nn.Module) -> list[str]:
    """Names of the modules that own parameters, from the output back to the input (the
    reverse of their registration order, the order of the forward pass in most models)."""
    return [name for name, m in module.named_modules()
            if next(m.parameters(recurse=False), None) is not None][::-1]


def stage_groups(layers: list[str], stages) -> list[list[str]]:
    """The layers each stage adds to the cascade: one layer per stage (None), ``stages``
    groups of consecutive layers (an int), or down to and including each named layer (a
    sequence of names, in cascade order)."""
    if stages is None:
        return [[name] for name in layers]
    if isinstance(stages, (int, np.integer)) and not isinstance(stages, bool):
        if not 1 <= stages <= len(layers):
            raise ValueError(f"stages={stages}: give 1 to {len(layers)} (the model has "
                             f"{len(layers)} layers with parameters), or None for one per "
                             "layer.")
        bounds = np.linspace(0, len(layers), int(stages) + 1).round().astype(int)
        return [layers[a:b] for a, b in itertools.pairwise(bounds)]
    if isinstance(stages, str):
        stages = [stages]
    try:
        names = [str(s) for s in stages]
    except TypeError:
        raise TypeError(f"stages={stages!r}: give None, a number of stages, or layer "
                        "names.") from None
    where = {name: i for i, name in enumerate(layers)}
    missing = [s for s in names if s not in where]
    if missing or not names:
        raise ValueError(f"stages names {missing or names}, which hold no parameters of this "
                         f"model; give layer names among {layers[:8]}"
                         f"{' ...' if len(layers) > 8 else ''} (head first).")
    ends = [where[s] + 1 for s in names]
    if any(b <= a for a, b in itertools.pairwise(ends)):
        raise ValueError(f"stages {names} are not in cascade order; name them from the head "
                         "towards the input.")
    return [layers[a:b] for a, b in zip([0] + ends[:-1], ends)]


def reinitialise(module: nn.Module) -> None:
    """The module's own parameters re-initialised (its ``reset_parameters``, else normal)."""
    reset = getattr(module, "reset_parameters", None)
    with torch.no_grad():
        if callable(reset):
            reset()
            return
        for p in module.parameters(recurse=False):
            if p.ndim >= 2:
                nn.init.normal_(p, 0.0, 1.0 / math.sqrt(max(1, p[0].numel())))
            else:
                nn.init.normal_(p, 0.0, 0.02)


def spearman(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank correlation of the absolute values of pairs of maps (n, *spatial), over their
    pixels (average ranks for ties), and whether either map of a pair was constant: its
    correlation is undefined and reported as 0 (no rank agreement), never NaN."""
    return _spearman_flat(np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64)))


def _spearman_flat(a: np.ndarray, b: np.ndarray):
    from scipy.stats import rankdata  # ~1 s to import: only when a check runs

    ra = rankdata(a.reshape(a.shape[0], -1), axis=1)
    rb = rankdata(b.reshape(b.shape[0], -1), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    constant = den == 0
    rho = np.divide((ra * rb).sum(1), den, out=np.zeros(len(den)), where=~constant)
    return np.clip(rho, -1, 1), constant


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM (scikit-image, data range 1) of each pair of maps (n, *spatial): 2D images or
    volumes; the window shrinks to the maps' smallest side (odd, at least 3) for small maps
    (smaller maps: 1 when equal, else 0)."""
    from skimage.metrics import structural_similarity

    side = min(a.shape[1:])
    win = min(7, side if side % 2 else side - 1)
    out = np.zeros(a.shape[0])
    if win < 3:
        return np.array([1.0 if np.array_equal(x, y) else 0.0 for x, y in zip(a, b)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, (x, y) in enumerate(zip(a, b)):
            out[i] = structural_similarity(x.astype(np.float64), y.astype(np.float64),
                                           data_range=1.0, win_size=win)
    return np.nan_to_num(out, nan=0.0)


@dataclass
class SanityCheck:
    """The maps of each stage of the cascade and their similarity to the original map.

    ``stages`` (K,): the last layer each stage re-initialised (its name);
    ``layers``: the layers each stage added. ``original`` (*lead, *spatial): the trained
    model's maps; ``maps`` (*lead, K, *spatial): each stage's. ``spearman`` / ``ssim``
    (*lead, K): rank correlation (of absolute maps) and SSIM (data range 1) with the original;
    ``constant`` (*lead, K): the stage's (or the original) map was flat, so its correlation is
    reported as 0. ``class_ids`` (*lead): the class explained at every stage.
    """

    method: str
    stages: list
    layers: list
    original: np.ndarray
    maps: np.ndarray
    spearman: np.ndarray
    ssim: np.ndarray
    constant: np.ndarray
    class_ids: np.ndarray
    class_names: list
    settings: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per image and stage: index, class, class_id, stage (its number from 1),
        layer, spearman, ssim, constant."""
        lead = self.class_ids.shape
        out = []
        for k in range(int(np.prod(lead, dtype=np.int64))):
            idx = np.unravel_index(k, lead) if lead else ()
            cid = int(self.class_ids[idx])
            for s, name in enumerate(self.stages):
                out.append({"index": index_of(k, lead),
                            "class": class_label(self.class_names, cid), "class_id": cid,
                            "stage": s + 1, "layer": name,
                            "spearman": float(self.spearman[idx][s]),
                            "ssim": float(self.ssim[idx][s]),
                            "constant": bool(self.constant[idx][s])})
        return out

    def summary(self) -> dict:
        """Mean Spearman and SSIM per stage, and after the full cascade (with the number of
        images whose map went flat there)."""
        k = len(self.stages)
        rho = self.spearman.reshape(-1, k)
        sim = self.ssim.reshape(-1, k)
        return {"images": int(rho.shape[0]), "method": self.method,
                "stages": list(self.stages),
                "spearman": rho.mean(0).tolist(), "ssim": sim.mean(0).tolist(),
                "final_spearman": float(rho[:, -1].mean()),
                "final_ssim": float(sim[:, -1].mean()),
                # images whose map went flat after the full cascade (Spearman reported as 0)
                "final_constant": int(self.constant.reshape(-1, k)[:, -1].sum())}

    def as_dict(self) -> dict:
        return {k: tolist(v) for k, v in self.__dict__.items()}


def iter_sanity_check(images, spec: ModelSpec, method: str = "gradcam", targets=None,
                      stages=None, seed: int = 0, *, device="auto",
                      batch_size: int | None = None, channel_axis=None, target_layer=None):
    """:func:`sanity_check` as a generator: a :class:`Progress` per batch of images and
    stage; returns the :class:`SanityCheck`."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec (from load_model), not "
                        f"{type(spec).__name__}.")
    layers = parameter_layers(spec.module)
    if not layers:
        raise ValueError("the model has no parameters, so there are no weights to randomise; "
                         "the sanity check needs a trained model with learnt layers.")
    groups = stage_groups(layers, stages)
    model = Model(spec, device, batch_size, method=method, target_layer=target_layer)
    runner = model.runner
    images, lay, n = model.layout(images, channel_axis)
    fixed = check_targets(targets, spec, lay.lead, n)
    K = len(groups)
    original = np.zeros((n, *lay.spatial), np.float32)
    maps = np.zeros((n, K, *lay.spatial), np.float32)
    ids = np.zeros(n, np.int64)
    runner.size_for(lay.spatial, n)
    for start, stop, batch in model.batches(images, lay, prepare=True):
        tg = None if fixed is None else (np.full(stop - start, fixed, np.int64)
                                         if np.ndim(fixed) == 0 else fixed[start:stop])
        heat, chosen, _scores = runner.explain(batch, lay.spatial, method,
                                               targets=None if tg is None else torch.as_tensor(tg))
        if model.classes is not None and int(chosen.max()) >= model.classes:
            raise ValueError(f"class index {int(chosen.max())} is out of range: the model has "
                             f"{model.classes} classes (0 to {model.classes - 1}).")
        original[start:stop] = heat
        ids[start:stop] = chosen
        twin = dataclasses.replace(spec, module=copy.deepcopy(spec.module))
        twin_runner = Runner(twin, method, None, model.device, runner.batch_size,
                             target_layer=runner.layer_name)
        twin_runner.layer_name = runner.layer_name
        for s, group in enumerate(groups):
            with torch.random.fork_rng(devices=_devices(model.device)):
                torch.manual_seed(int(seed) * 100_003 + s)
                for name in group:
                    reinitialise(twin.module.get_submodule(name))
            heat_s, _, _ = twin_runner.explain(batch, lay.spatial, method,
                                               targets=torch.as_tensor(chosen))
            maps[start:stop, s] = heat_s
            yield Progress(start + (stop - start) * (s + 1) // K, n,
                           f"sanity check {s + 1}/{K}", int(runner.batch_size or 0))
        del twin, twin_runner
    flat_o = np.repeat(original[:, None], K, 1).reshape(n * K, *lay.spatial)
    flat_m = maps.reshape(n * K, *lay.spatial)
    rho, constant = _spearman_flat(np.abs(flat_o), np.abs(flat_m))
    sim = ssim(flat_o, flat_m)
    lead = lay.lead
    return SanityCheck(
        method=method, stages=[g[-1] for g in groups], layers=groups,
        original=original.reshape(*lead, *lay.spatial),
        maps=maps.reshape(*lead, K, *lay.spatial), spearman=rho.reshape(*lead, K),
        ssim=sim.reshape(*lead, K), constant=constant.reshape(*lead, K),
        class_ids=ids.reshape(lead), class_names=list(spec.class_names),
        settings={"seed": int(seed), "target_layer": runner.layer_name,
                  "device": str(model.device)})


def _devices(device: torch.device) -> list:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def sanity_check(images, spec: ModelSpec, method: str = "gradcam", targets=None, stages=None,
                 seed: int = 0, *, device="auto", batch_size: int | None = None,
                 channel_axis=None, target_layer=None,
                 progress: Callable[[Progress], None] | None = None) -> SanityCheck:
    """Cascading model-parameter randomisation: ``method``'s maps of the trained model and of
    copies whose layers are re-initialised from the head down, and their Spearman rank
    correlation and SSIM with the original maps, per image and stage.

    ``targets``: None (each image's predicted class, which every stage then explains too), a
    class index or name, or one per image. ``stages``: None (one stage per layer with
    parameters), a number of stages (consecutive layers grouped), or layer names (each stage
    re-initialises down to and including that layer). ``seed`` fixes the random weights.
    The user's model is never changed (every stage works on a deep copy). Other parameters as
    for :func:`napari_gradcam.explain`.

    Raises ValueError for a model without parameters (nothing to randomise).
    """
    return run_generator(iter_sanity_check(
        images, spec, method, targets, stages, seed, device=device, batch_size=batch_size,
        channel_axis=channel_axis, target_layer=target_layer), progress)
