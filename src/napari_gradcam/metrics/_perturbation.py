"""Faithfulness by perturbation: deletion and insertion curves (Petsiuk et al. 2018, RISE) and
average drop / increase in confidence (Chattopadhyay et al. 2018, Grad-CAM++).

Everything happens in the model's input space, after preprocessing (intensity scaling,
mean / std, channel handling, the resize to a fixed input size): heatmaps are resized to the
input size the same way as the image (bilinear), pixels are removed by replacing their input
values. Every step of every image is built on the device from one ordering of the pixels per
image (an index mask per step: no loop over pixels), and all of them go through the model in
batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..explain_arrays import Progress, run_generator
from ..models import ModelSpec
from ._common import (
    Heatmaps,
    Model,
    baseline_input,
    check_targets,
    chosen_targets,
    class_label,
    index_of,
    progress,
    tolist,
)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """A 4D input in channels-last memory, as preprocess hands it to the model (faster
    convolutions; built explicitly because one channel keeps NCHW strides otherwise)."""
    if x.ndim != 4:
        return x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return out.copy_(x)


def auc(curves: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under curves (..., steps + 1) over x = ``fractions`` in [0, 1] (trapezoids)."""
    curves = np.asarray(curves, np.float64)
    dx = np.diff(np.asarray(fractions, np.float64))
    return ((curves[..., 1:] + curves[..., :-1]) / 2 * dx).sum(-1)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(n, *spatial) maps -> (n, pixels) rank of each pixel, 0 = hottest. Ties are broken by
    the pixel's position (row-major: the earlier pixel first), so every run orders alike."""
    n = maps.shape[0]
    flat = maps.reshape(n, -1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand(n, -1))
    return ranks


def step_counts(pixels: int, steps: int) -> np.ndarray:
    """How many pixels are removed (revealed) at each of the steps + 1 points: round(k * pixels
    / steps), from none to all."""
    return np.rint(np.arange(steps + 1) * pixels / steps).astype(np.int64)


@dataclass
class DeletionInsertion:
    """Deletion and insertion curves of every image.

    ``fractions`` (steps + 1,): the share of pixels removed (deletion) or revealed (insertion)
    at each point. ``deletion`` / ``insertion`` (*lead, steps + 1): the target class's
    probability (softmax or sigmoid, as the model's head decides) at each point;
    ``*_logits`` the same for the logit. ``deletion_auc`` / ``insertion_auc`` (*lead): the
    areas under the probability curves (trapezoids over ``fractions``); a faithful map gives a
    low deletion and a high insertion area. ``class_ids`` (*lead): the class scored.
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_logits: np.ndarray
    insertion_logits: np.ndarray
    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    class_ids: np.ndarray
    class_names: list
    settings: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per image: index, class, class_id, probability (of the unperturbed image),
        deletion_auc, insertion_auc."""
        lead = self.class_ids.shape
        out = []
        for k in range(int(np.prod(lead, dtype=np.int64))):
            idx = np.unravel_index(k, lead) if lead else ()
            cid = int(self.class_ids[idx])
            out.append({"index": index_of(k, lead), "class": class_label(self.class_names, cid),
                        "class_id": cid, "probability": float(self.deletion[idx][0]),
                        "deletion_auc": float(self.deletion_auc[idx]),
                        "insertion_auc": float(self.insertion_auc[idx])})
        return out

    def summary(self) -> dict:
        """Means over the images: deletion_auc, insertion_auc, and their count."""
        return {"images": int(self.deletion_auc.size),
                "deletion_auc": float(np.mean(self.deletion_auc)),
                "insertion_auc": float(np.mean(self.insertion_auc))}

    def as_dict(self) -> dict:
        """Everything as plain Python (lists and numbers), e.g. for JSON."""
        return {k: tolist(v) for k, v in self.__dict__.items()}


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r}: give a whole number of steps >= 1 (e.g. 50).")
    return int(steps)


def iter_deletion_insertion(images, spec: ModelSpec, heatmaps, targets=None, steps: int = 50,
                            *, baseline="black", canvas="blur", blur_sigma: float = 5.0,
                            device="auto", batch_size: int | None = None, channel_axis=None):
    """:func:`deletion_insertion` as a generator: yields a :class:`Progress` after every batch
    of images and returns the :class:`DeletionInsertion`; closing it stops after the batch."""
    steps = _check_steps(steps)
    model = Model(spec, device, batch_size)
    images, lay, n = model.layout(images, channel_axis)
    heat = Heatmaps(heatmaps, lay, n)
    fixed = check_targets(targets, spec, lay.lead, n)
    size = model.input_size(lay)
    pixels = math.prod(size)
    if pixels < 1:
        raise ValueError("the model's input has no pixels; give images with pixels.")
    counts_np = step_counts(pixels, steps)
    T = steps + 1
    curves = np.zeros((n, 2, T))
    logit_curves = np.zeros((n, 2, T))
    ids = np.zeros(n, np.int64)
    model.batch_size(lay, n * 2 * T)  # perturbed inputs per forward
    baseline_input(baseline, spec, torch.zeros((1, 1, 1, 1)), 0.0)  # bad settings fail now
    baseline_input(canvas, spec, torch.zeros((1, 1, 1, 1)), 0.0, "canvas")
    for start, stop, x in model.batches(images, lay):
        m = stop - start
        maps = heat.on_input(start, stop, size, x.device)
        counts = torch.as_tensor(counts_np, device=x.device)
        # (m, steps + 1, pixels): the pixels gone at each step, from one ordering per image
        hidden = (pixel_ranks(maps)[:, None, :] < counts[None, :, None]).view(
            m, T, 1, *x.shape[2:])
        removed = baseline_input(baseline, spec, x, blur_sigma).expand_as(x)
        shown = baseline_input(canvas, spec, x, blur_sigma, "canvas").expand_as(x)
        fills = torch.stack([removed, shown], 1)  # (m, 2, C, *spatial): deletion, insertion

        def build(a: int, b: int, x=x, hidden=hidden, fills=fills):
            j = torch.arange(a, b, device=x.device)
            i, kind, s = j // (2 * T), (j // T) % 2, j % T
            # deletion keeps what is not hidden yet, insertion what is revealed already
            keep = hidden[i, s] ^ (kind == 0).view(-1, *[1] * (x.ndim - 1))
            out = torch.empty((b - a, *x.shape[1:]), dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last if x.ndim == 4 else
                              torch.contiguous_format)
            return torch.where(keep, x[i], fills[i, kind], out=out)

        logits = model.logits(m * 2 * T, build).view(m, 2, T, -1)
        chosen = chosen_targets(fixed, start, stop, logits[:, 0, 0].argmax(-1))
        curves[start:stop], logit_curves[start:stop] = model.scores(logits, chosen[:, None,
                                                                                   None])
        ids[start:stop] = chosen
        yield progress(stop, n, "deletion/insertion", model)
    fractions = counts_np / pixels
    lead = lay.lead
    return DeletionInsertion(
        fractions=fractions,
        deletion=curves[:, 0].reshape(*lead, T), insertion=curves[:, 1].reshape(*lead, T),
        deletion_logits=logit_curves[:, 0].reshape(*lead, T),
        insertion_logits=logit_curves[:, 1].reshape(*lead, T),
        deletion_auc=auc(curves[:, 0], fractions).reshape(lead),
        insertion_auc=auc(curves[:, 1], fractions).reshape(lead),
        class_ids=ids.reshape(lead), class_names=list(spec.class_names),
        settings={"steps": steps, "baseline": baseline, "canvas": canvas,
                  "blur_sigma": float(blur_sigma), "device": str(model.device),
                  "batch_size": int(model.runner.batch_size or 0)})


def deletion_insertion(images, spec: ModelSpec, heatmaps, targets=None, steps: int = 50,
                       *, baseline="black", canvas="blur", blur_sigma: float = 5.0,
                       device="auto", batch_size: int | None = None, channel_axis=None,
                       progress: Callable[[Progress], None] | None = None) -> DeletionInsertion:
    """Deletion and insertion curves (Petsiuk et al. 2018): the target's probability as the
    hottest pixels are removed, or revealed, step by step.

    Parameters
    ----------
    images : as :func:`napari_gradcam.explain` takes them ((H, W), (H, W, C), (N, H, W), ...;
        NumPy, dask or zarr), preprocessed exactly as ``explain`` does.
    spec : the classifier's :class:`ModelSpec`.
    heatmaps : the maps to test, the images' leading + spatial shape (``explain(...).heatmaps``),
        or one spatial map for every image.
    targets : None (each image's predicted class), a class index or name, or one per image.
    steps : the number of steps; each removes (reveals) about pixels / steps pixels, so the
        curves have steps + 1 points, from the whole image to none of it (deletion) and from
        the canvas to the whole image (insertion).
    baseline : what a deleted pixel becomes in the model's input space: ``"black"`` (default:
        the preprocessed value of zero intensity), ``"mean"`` (0 after mean / std), ``"blur"``
        or a number.
    canvas : what insertion starts from: ``"blur"`` (default: the input blurred by a Gaussian
        of ``blur_sigma`` input pixels, as the RISE paper), ``"black"``, ``"mean"`` or a
        number.
    device, batch_size, channel_axis : as for :func:`napari_gradcam.explain`; ``batch_size``
        counts perturbed inputs per forward pass.
    progress : called with a :class:`Progress` after every batch of images.

    Pixels are ordered once per image by heat, hottest first, ties broken by position
    (row-major), so the result does not depend on the batch or the device's sort.

    The baseline matters: a model that recognises shapes by their edges still sees an object
    in a black hole of the object's shape, so deletion to black can favour maps that scatter
    the removal over the image (random noise) over maps that cover the object. On the demo
    model Grad-CAM deletes worse than random maps to black and better to ``"blur"``;
    :func:`road` (imputation from the neighbours) was designed against this.
    """
    return run_generator(iter_deletion_insertion(
        images, spec, heatmaps, targets, steps, baseline=baseline, canvas=canvas,
        blur_sigma=blur_sigma, device=device, batch_size=batch_size,
        channel_axis=channel_axis), progress)


# ---- average drop / increase in confidence ----------------------------------------------------

@dataclass
class AverageDrop:
    """Average drop and increase in confidence (Chattopadhyay et al. 2018).

    Per image (*lead): ``original`` (Y) and ``explained`` (O), the target's probability for
    the image and for the image multiplied by its map; ``drop`` = max(0, Y - O) / Y * 100;
    ``increase`` = O > Y; ``*_logits`` the logits. ``average_drop`` (the mean drop, %) and
    ``increase_in_confidence`` (the share of images whose confidence rose, %).
    """

    original: np.ndarray
    explained: np.ndarray
    original_logits: np.ndarray
    explained_logits: np.ndarray
    drop: np.ndarray
    increase: np.ndarray
    class_ids: np.ndarray
    class_names: list
    settings: dict = field(default_factory=dict)

    @property
    def average_drop(self) -> float:
        return float(np.mean(self.drop))

    @property
    def increase_in_confidence(self) -> float:
        return float(np.mean(self.increase) * 100)

    def rows(self) -> list[dict]:
        """One row per image: index, class, class_id, probability, explained_probability,
        drop (%), increase (bool)."""
        lead = self.class_ids.shape
        out = []
        for k in range(int(np.prod(lead, dtype=np.int64))):
            idx = np.unravel_index(k, lead) if lead else ()
            cid = int(self.class_ids[idx])
            out.append({"index": index_of(k, lead), "class": class_label(self.class_names, cid),
                        "class_id": cid, "probability": float(self.original[idx]),
                        "explained_probability": float(self.explained[idx]),
                        "drop": float(self.drop[idx]), "increase": bool(self.increase[idx])})
        return out

    def summary(self) -> dict:
        return {"images": int(self.drop.size), "average_drop": self.average_drop,
                "increase_in_confidence": self.increase_in_confidence}

    def as_dict(self) -> dict:
        return {**{k: tolist(v) for k, v in self.__dict__.items()}, **self.summary()}


def iter_average_drop_increase(images, spec: ModelSpec, heatmaps, targets=None, *,
                               baseline="black", blur_sigma: float = 5.0, device="auto",
                               batch_size: int | None = None, channel_axis=None):
    """:func:`average_drop_increase` as a generator of :class:`Progress` (one per batch)."""
    model = Model(spec, device, batch_size)
    images, lay, n = model.layout(images, channel_axis)
    heat = Heatmaps(heatmaps, lay, n)
    fixed = check_targets(targets, spec, lay.lead, n)
    size = model.input_size(lay)
    model.batch_size(lay, 2 * n)
    baseline_input(baseline, spec, torch.zeros((1, 1, 1, 1)), 0.0)
    probs = np.zeros((n, 2))
    logits_out = np.zeros((n, 2))
    ids = np.zeros(n, np.int64)
    for start, stop, x in model.batches(images, lay):
        m = stop - start
        maps = heat.on_input(start, stop, size, x.device).clamp(0, 1)[:, None]
        base = baseline_input(baseline, spec, x, blur_sigma).expand_as(x)
        masked = base + (x - base) * maps

        def build(a: int, b: int, x=x, masked=masked, m=m):
            both = torch.cat([x, masked])
            return _nhwc(both[a:b])

        logits = model.logits(2 * m, build).view(2, m, -1).transpose(0, 1)
        chosen = chosen_targets(fixed, start, stop, logits[:, 0].argmax(-1))
        probs[start:stop], logits_out[start:stop] = model.scores(logits, chosen[:, None])
        ids[start:stop] = chosen
        yield progress(stop, n, "average drop", model)
    y, o = probs[:, 0], probs[:, 1]
    drop = np.divide(np.maximum(0.0, y - o), y, out=np.zeros(n), where=y > 0) * 100
    lead = lay.lead
    return AverageDrop(y.reshape(lead), o.reshape(lead), logits_out[:, 0].reshape(lead),
                       logits_out[:, 1].reshape(lead), drop.reshape(lead),
                       (o > y).reshape(lead), ids.reshape(lead), list(spec.class_names),
                       {"baseline": baseline, "device": str(model.device)})


def average_drop_increase(images, spec: ModelSpec, heatmaps, targets=None, *, baseline="black",
                          blur_sigma: float = 5.0, device="auto",
                          batch_size: int | None = None, channel_axis=None,
                          progress: Callable[[Progress], None] | None = None) -> AverageDrop:
    """Average drop and increase in confidence (Grad-CAM++ paper): the target's probability
    for each image (Y) and for the image multiplied by its explanation map (O).

    "Multiplied by its map" is done in the model's input space, relative to ``baseline`` (by
    default black, the preprocessed value of zero intensity): ``baseline + (x - baseline) *
    map``, x the preprocessed image and the map (clipped to [0, 1]) resized to the input size.
    For the usual linear preprocessing this is exactly the preprocessed ``image * map``: where
    the map is 0 the pixel is black, where it is 1 it is unchanged.

    Other parameters as for :func:`deletion_insertion`.
    """
    return run_generator(iter_average_drop_increase(
        images, spec, heatmaps, targets, baseline=baseline, blur_sigma=blur_sigma,
        device=device, batch_size=batch_size, channel_axis=channel_axis), progress)
