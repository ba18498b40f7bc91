"""Segmentation targets (Seg-Grad-CAM): a class *and a region* of a per-pixel output.

A segmentation network returns (N, classes, *spatial) logits. Its explained score for class c of
sample n is ``sum(logits[n, c] * W)`` over the output's spatial axes, W being that target's region
weights: a caller's mask, or the model's own predicted region of the class. Pooled that way the
network is a classifier with one score per target, so every CAM method applies unchanged: the
gradient methods differentiate the pooled score, Score-CAM pools its masked forwards with the
same fixed W, and Eigen-CAM ignores the class anyway.

Everything here is a handful of tensor operations on the output: cheap next to the network.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F


class EmptyTargetWarning(UserWarning):
    """A segmentation target's region is empty (its weights sum to 0): its map is zero and its
    score 0.0."""


def is_segmentation_output(output, batch) -> bool:
    """Whether a model's output for ``batch`` is a per-pixel map (N, classes, *spatial): it has
    the batch's rank and more than one pixel (a convolutional classifier head that keeps its
    1 x 1 map is still a classifier). ``output`` may be the tensor or the model's raw output (tuple, dict with
    ``"logits"``, an object with ``.logits``), unwrapped by the engine's rule."""
    if not isinstance(output, torch.Tensor):
        from .engine import _model_output  # the engine imports this module

        output = _model_output(output)
    if output is None:
        return False
    shape = tuple(batch.shape)
    return (output.ndim == len(shape) and output.shape[0] == shape[0]
            and any(s > 1 for s in output.shape[2:]))


# model -> whether its output was a per-pixel map the last time it was explained: callers that
# must know (which targets make sense) ask here before paying for a forward of their own
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember_output(module, segmentation: bool) -> None:
    _SEEN[module] = bool(segmentation)


def known_output(module) -> bool | None:
    """True / False when ``module`` was explained (or probed) before, else None."""
    return _SEEN.get(module)


def top_class(logits: torch.Tensor) -> torch.Tensor:
    """The argmax over the class axis of (N, classes, *spatial), the first on ties.
    ``max(1).indices`` gives the same as ``argmax(1)`` at a tenth of its cost on CPU tensors of
    this layout (argmax reduces a strided axis slowly), which matters next to a U-Net's head."""
    return logits.max(1).indices


def resolve_multilabel(logits: torch.Tensor, multilabel) -> bool:
    """None means: a single output channel is multi-label (sigmoid), several are softmax."""
    return logits.shape[1] == 1 if multilabel is None else bool(multilabel)


def segmentation_labels(logits: torch.Tensor, multilabel: bool | None = None) -> torch.Tensor:
    """Label image int64 (N, *spatial) of segmentation logits (N, classes, *spatial).

    Softmax outputs: the argmax class (0, the background, shows as transparent in a Labels
    layer). Multi-label outputs: 0 where no class has sigmoid > 0.5, else c + 1 for the most
    confident such class, so that "nothing" stays 0 there too.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim < 3:
        shape = tuple(getattr(logits, "shape", ()))
        raise ValueError(f"segmentation logits have shape {shape}; give (N, classes, *spatial).")
    if not resolve_multilabel(logits, multilabel):
        return top_class(logits)
    top, idx = logits.max(1)
    return torch.where(top > 0, idx + 1, torch.zeros_like(idx))  # sigmoid(x) > 0.5 <=> x > 0


def _slot_index(class_ids: torch.Tensor, spatial) -> torch.Tensor:
    """(N, K) class ids as a gather index (N, K, *spatial), without a copy."""
    n, k = class_ids.shape
    return class_ids.view(n, k, *([1] * len(spatial))).expand(n, k, *spatial)


def predicted_regions(logits: torch.Tensor, class_ids: torch.Tensor,
                      multilabel: bool) -> torch.Tensor:
    """Boolean (N, K, *spatial): where the model predicts each slot's class (argmax == c, or
    sigmoid > 0.5 when multi-label). ``class_ids`` (N, K), >= 0."""
    spatial = logits.shape[2:]
    if multilabel:
        return logits.gather(1, _slot_index(class_ids, spatial)) > 0
    return top_class(logits)[:, None] == class_ids.view(*class_ids.shape,
                                                             *([1] * len(spatial)))


def _class_sums(logits: torch.Tensor, multilabel: bool, values: torch.Tensor | None,
                weights: torch.Tensor | None) -> torch.Tensor:
    """(N, classes): per class, ``values`` (None: 1, i.e. the area) summed over the class's
    predicted region, each pixel weighted by ``weights`` (N, *spatial) when given."""
    n, c = logits.shape[:2]
    if multilabel:
        inside = (logits > 0).float()
        if weights is not None:
            inside = inside * weights[:, None]
        if values is not None:
            inside = inside * values
        return inside.flatten(2).sum(-1)
    label = top_class(logits).flatten(1)  # (N, P)
    add = torch.ones_like(label, dtype=torch.float32) if values is None else (
        values.gather(1, label.view(n, 1, *logits.shape[2:])).flatten(1))
    if weights is not None:
        add = add * weights.flatten(1)
    return torch.zeros(n, c, device=logits.device, dtype=torch.float32).scatter_add_(
        1, label, add)


def pooled_class_scores(logits: torch.Tensor, multilabel: bool,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """(N, classes): each class's logits summed over its own predicted region (times the one
    region ``weights`` (N, *spatial) of each sample, when given), 0 where the region is empty.
    What a callable target picks from."""
    return _class_sums(logits, multilabel, logits.float(), weights)


def default_targets(logits: torch.Tensor, multilabel: bool,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) per sample the class with the largest predicted region (inside ``weights`` when
    given). A softmax output's class 0 is the background: skipped unless nothing else is
    predicted."""
    area = _class_sums(logits, multilabel, None, weights)
    if not multilabel and area.shape[1] > 1:
        fg = area[:, 1:]
        return torch.where(fg.amax(1) > 0, fg.argmax(1) + 1, torch.zeros_like(fg[:, 0],
                                                                               dtype=torch.long))
    return area.argmax(1)


def slot_scores(logits: torch.Tensor, class_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """Float32 (N, K): slot k's class logits times its region weights (N, K, *spatial), summed
    over space; differentiable when ``logits`` is."""
    picked = logits.gather(1, _slot_index(class_ids, logits.shape[2:])).float()
    return (picked * weights).flatten(2).sum(-1)


MAX_WEIGHT = 1e30  # larger region weights overflow float32 scores (logits times weights, summed)


def region_weights(target_masks, n: int, k: int | None, in_spatial, out_spatial,
                   device) -> torch.Tensor:
    """Caller's target masks as float weights at the output's resolution, (N, 1 or K, *S_out).

    Accepted: (N, *S) (one region per sample, used for every slot) or, for (N, K) targets,
    (N, K, *S); S the batch's spatial shape or the output's; bool or non-negative weights.
    Resizing to the output keeps each region's share of the output: area averaging when it
    shrinks, nearest when it grows.
    """
    dims = len(in_spatial)
    try:
        m = torch.as_tensor(target_masks)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"target_masks must be a tensor or array of region weights, not "
            f"{type(target_masks).__name__}; give a boolean or non-negative float array."
        ) from err
    if m.is_complex():
        raise TypeError(f"target_masks has dtype {m.dtype}; give booleans or non-negative "
                        "float weights.")
    shapes = [tuple(in_spatial)] + ([tuple(out_spatial)]
                                     if tuple(out_spatial) != tuple(in_spatial) else [])
    lead = [(n,)] + ([(n, k)] if k is not None else [])
    seen = tuple(m.shape)
    if not any(seen == l + s for l in lead for s in shapes):
        expected = " or ".join(str(l + s) for l in lead for s in shapes)
        why = ("; (N, K, *spatial) masks need (N, K) targets"
               if k is None and m.ndim == dims + 2 else "")
        raise ValueError(
            f"target_masks has shape {seen}, expected {expected} (the batch's or the model "
            f"output's spatial shape{', per sample and target' if k is not None else ''})"
            f"{why}; give one region per sample of that shape."
        )
    m = m.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"target_masks of shape {seen} contains NaN or infinite values; give "
                         "finite, "
                         "non-negative weights (or booleans).")
    if bool((m < 0).any()):
        raise ValueError(f"target_masks of shape {seen} has negative weights (min "
                         f"{float(m.min()):g}); give non-negative weights (or booleans).")
    if bool((m > MAX_WEIGHT).any()):
        # the score explained is the raw weighted sum of the logits, which float32 can't hold
        # for such weights (inf, then NaN), so they are refused rather than silently rescaled
        raise ValueError(f"target_masks of shape {seen} has weights up to {float(m.max()):g}, "
                         "so the weighted sums of the logits would overflow; scale the weights "
                         f"down to at most {MAX_WEIGHT:g} (e.g. divide them by their maximum).")
    if m.ndim == dims + 1:
        m = m[:, None]
    if tuple(m.shape[2:]) != tuple(out_spatial):
        m = _resize(m, tuple(int(s) for s in out_spatial))
    return m


def _resize(m: torch.Tensor, size) -> torch.Tensor:
    """(N, K, *S) -> (N, K, *size): nearest on growing axes, then area averaging on shrinking
    ones (so a shrunk region keeps its share of each output pixel)."""
    n, k = m.shape[:2]
    flat = m.flatten(0, 1)[:, None]
    grown = tuple(max(a, b) for a, b in zip(m.shape[2:], size))
    if grown != tuple(m.shape[2:]):
        flat = F.interpolate(flat, size=grown, mode="nearest")
    if grown != tuple(size):
        flat = F.interpolate(flat, size=size, mode="area")
    return flat[:, 0].view(n, k, *size)


def warn_empty(class_ids: torch.Tensor, empty: torch.Tensor, given: bool) -> None:
    """One :class:`EmptyTargetWarning` per class whose region is empty somewhere."""
    if not bool(empty.any()):
        return
    samples, slots = torch.nonzero(empty, as_tuple=True)
    by_class: dict[int, list[int]] = {}
    for s, c in sorted(zip(samples.tolist(), class_ids[samples, slots].tolist())):
        if s not in by_class.setdefault(c, []):
            by_class[c].append(s)
    for c, where_samples in sorted(by_class.items()):
        where = ", ".join(map(str, where_samples))
        if given:
            msg = (f"class {c} has a target region of zero weight in sample(s) {where}, so its "
                   "map is zero; give a target mask that covers some of the image.")
        else:
            msg = (f"class {c} has no predicted pixels in sample(s) {where}, so its map is "
                   "zero; explain a class the model predicts there, or give a target mask.")
        warnings.warn(msg, EmptyTargetWarning, stacklevel=4)
