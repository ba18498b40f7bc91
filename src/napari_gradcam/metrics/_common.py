"""What the model-based metrics share: images read and preprocessed exactly as ``explain`` does,
forward passes in device-sized parts, targets, scores as probabilities, heatmaps brought into
the model's input space, baselines and the Gaussian canvas."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..cam._state import explaining
from ..cam.engine import _model_output, size_errors
from ..explain_arrays import (
    Layout,
    Progress,
    Runner,
    _is_oom,
    check_channels,
    layout,
    preprocess,
    read_ahead,
    resolve_target,
)
from ..job import probabilities
from ..models import ModelSpec


class Model:
    """A classifier and its preprocessing, as ``explain`` feeds it: the same :class:`Runner`
    (device, automatic batch size, the model moved there once), the same layout guess and
    :func:`preprocess`. Forward passes run in eval mode without gradients, in parts of the
    batch size; an out-of-memory error halves it and retries the part."""

    def __init__(self, spec: ModelSpec, device="auto", batch_size: int | None = None, *,
                 method: str = "gradcam", target_layer=None):
        self.runner = Runner(spec, method, None, device, batch_size, target_layer=target_layer)
        self.spec = spec
        self.device = self.runner.device
        self.classes: int | None = len(spec.class_names) or None

    def layout(self, images, channel_axis=None):
        """The array (anything array-like made one), its layout for this model and its number
        of images; channels checked against the model's."""
        if not hasattr(images, "shape") or not hasattr(images, "__getitem__"):
            images = np.asarray(images)
        lay = layout(images.shape, channel_axis, self.runner.dims,
                     in_channels=self.spec.in_channels)
        check_channels(lay.channels, self.spec.in_channels)
        return images, lay, lay.count if lay.lead else 1

    def batches(self, images, lay: Layout, prepare: bool = False
                ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, the model's input on the device) batch by batch, the next batch read
        on a helper thread (closing the iterator stops reading). ``prepare``: through the
        runner's ``prepare``, which also resolves the CAM target layer (for explaining)."""
        with contextlib.closing(read_ahead(images, lay, self.runner)) as parts:
            for start, stop, raw in parts:
                check_finite(raw, start)
                x = self.runner.prepare(raw) if prepare else preprocess(raw, self.spec,
                                                                        self.device)
                yield start, stop, x

    def input_size(self, lay: Layout) -> tuple[int, ...]:
        return tuple(self.spec.input_size or lay.spatial)

    def batch_size(self, lay: Layout, count: int) -> int:
        return self.runner.size_for(lay.spatial, count)

    def logits(self, total: int, build: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """(total, classes) float32 logits on the CPU of the inputs ``build(start, stop)``
        makes on the device, in parts of the batch size (halved on out-of-memory errors)."""
        module = self.spec.module
        out, pos = [], 0
        size = max(1, int(self.runner.batch_size or 1))
        while pos < total:
            n = min(size, total - pos)
            try:
                with torch.inference_mode(), explaining(module):
                    x = build(pos, pos + n)
                    # an image smaller than the model can take: its smallest size, as explain
                    with size_errors(module, x[:1]):
                        logits = _model_output(module(x))
            except Exception as err:
                if not _is_oom(err) or n == 1:
                    raise
                del err
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                size = self.runner.batch_size = max(1, n // 2)
                continue
            out.append(self._check(logits, n))
            pos += n
        return torch.cat(out)

    def _check(self, logits, n: int) -> torch.Tensor:
        if logits is None:
            raise TypeError("the model returns no tensor of class scores; these metrics "
                            "need a classifier whose output is (N, classes) logits.")
        if logits.ndim == 1:  # one logit per image
            logits = logits[:, None]
        if logits.ndim != 2 or logits.shape[0] != n:
            raise ValueError(f"the model returns an output of shape {tuple(logits.shape)}; "
                             "these metrics score classifiers ((N, classes) logits), so use a "
                             "classification model (a segmentation map has no single score "
                             "to perturb).")
        if self.classes is None:
            self.classes = int(logits.shape[1])
        return logits.detach().float().cpu()

    def scores(self, logits: torch.Tensor, targets: np.ndarray) -> tuple[np.ndarray,
                                                                           np.ndarray]:
        """The targets' probabilities (softmax or sigmoid, as everywhere in the library) and
        logits; ``logits`` (..., classes), ``targets`` broadcastable to its leading shape."""
        x = logits.numpy().astype(np.float64)
        targets = np.broadcast_to(np.asarray(targets), x.shape[:-1])
        if targets.size and int(targets.max()) >= x.shape[-1]:
            raise ValueError(f"class index {int(targets.max())} is out of range: the model has "
                             f"{x.shape[-1]} classes (0 to {x.shape[-1] - 1}); give a class "
                             "it has.")
        probs = probabilities(self.spec, x)
        pick = targets[..., None].astype(np.int64)
        return (np.take_along_axis(probs, pick, -1)[..., 0].astype(np.float64),
                np.take_along_axis(x, pick, -1)[..., 0])


def check_finite(raw: np.ndarray, start: int = 0) -> None:
    """Refuse images with NaN or infinite pixels before they reach the model: a NaN pixel
    makes every score NaN, and a deleted or imputed NaN would read as a real change of
    confidence (images ``start``, ``start + 1``, ... of the batch ``raw``)."""
    raw = np.asarray(raw)
    if raw.dtype.kind not in "fc" or np.isfinite(raw).all():
        return
    bad = start + int(np.argmax(~np.isfinite(raw).reshape(raw.shape[0], -1).all(1)))
    raise ValueError(f"image {bad} holds NaN or infinite values; give finite pixels (replace "
                     "NaN with 0, e.g. numpy.nan_to_num, or leave that image out).")


def check_targets(targets, spec: ModelSpec, lead: tuple, n: int):
    """None (each image's predicted class), one class (index or name) for every image, or one
    per image (the images' leading shape, or n of them) -> None, an int, or an int64 (n,)."""
    if targets is None:
        return None
    if isinstance(targets, (str, int, np.integer)):
        t = resolve_target(targets, spec.class_names)
        if t < 0:
            raise ValueError(f"class index {t} is negative; give a class index >= 0 or a "
                             "class name.")
        return t
    arr = np.asarray(targets, dtype=object)
    if arr.shape not in (tuple(lead), (n,)) or arr.size != n:
        raise ValueError(f"targets has shape {arr.shape}; give one class (index or name) for "
                         f"all images, or one per image: shape {tuple(lead) or (1,)}.")
    out = np.array([resolve_target(t if isinstance(t, str) else int(t), spec.class_names)
                    for t in arr.ravel()], np.int64)
    if (out < 0).any():
        raise ValueError("targets holds a negative class index; give class indices >= 0 or "
                         "class names.")
    return out


def chosen_targets(targets, start: int, stop: int, predicted: torch.Tensor) -> np.ndarray:
    """The batch's targets: the predictions (``predicted``, (n,)) when ``targets`` is None."""
    if targets is None:
        return predicted.numpy().astype(np.int64)
    if np.ndim(targets) == 0:
        return np.full(stop - start, int(targets), np.int64)
    return np.asarray(targets[start:stop], np.int64)


class Heatmaps:
    """Heatmaps checked against the images: the images' leading + spatial shape (as
    ``explain(...).heatmaps``), n maps of the spatial shape, or one spatial map for all; read
    batch by batch (a lazy array is never loaded whole)."""

    def __init__(self, heatmaps, lay: Layout, n: int, what: str = "heatmaps"):
        if not hasattr(heatmaps, "shape") or not hasattr(heatmaps, "__getitem__"):
            heatmaps = np.asarray(heatmaps)
        if isinstance(heatmaps, torch.Tensor):
            heatmaps = heatmaps.detach().cpu().numpy()
        shape = tuple(int(s) for s in heatmaps.shape)
        full, spatial = tuple(lay.lead) + tuple(lay.spatial), tuple(lay.spatial)
        if shape not in (full, (n, *spatial), spatial):
            raise ValueError(f"the {what} have shape {shape} but the images' pixels are "
                             f"{full}; give one map per image with the images' leading and "
                             "spatial shape (as explain(...).heatmaps), without a channel "
                             "axis.")
        kind = np.dtype(heatmaps.dtype).kind
        if kind not in "biuf":
            raise TypeError(f"the {what} have dtype {heatmaps.dtype}; give numbers (float "
                            "heat, e.g. in [0, 1]).")
        self.data, self.what = heatmaps, what
        self.shared = shape == spatial and shape != full
        self.flat = None if self.shared else (heatmaps if shape == (n, *spatial)
                                              else heatmaps.reshape((n, *spatial)))
        self.spatial = spatial

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.shared:
            maps = np.broadcast_to(np.asarray(self.data, np.float32),
                                   (stop - start, *self.spatial))
        else:
            maps = np.asarray(self.flat[start:stop], np.float32)
        if not np.isfinite(maps).all():
            bad = start + int(np.argmax(~np.isfinite(maps).reshape(stop - start, -1).all(1)))
            raise ValueError(f"the {self.what} of image {bad} hold NaN or infinite values; "
                             "give finite heat (recompute the map, or replace NaN with 0).")
        return maps

    def on_input(self, start: int, stop: int, size, device) -> torch.Tensor:
        """Maps ``start:stop`` on the device at the model's input size (bilinear when the
        model resizes its input, as the image itself was)."""
        maps = torch.from_numpy(np.ascontiguousarray(self.rows(start, stop))).to(device)
        return resize_maps(maps, size)


def resize_maps(maps: torch.Tensor, size) -> torch.Tensor:
    """(n, *spatial) maps at ``size``, resized exactly as :func:`preprocess` resizes the
    images (bilinear with antialiasing in 2D, trilinear in 3D), so a map's pixels stay over
    the input pixels they described."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[1:]) == size:
        return maps
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(maps[:, None], size=size, mode=mode, align_corners=False,
                         antialias=len(size) == 2)[:, 0]


def baseline_input(baseline, spec: ModelSpec, x: torch.Tensor, sigma: float,
                   what: str = "baseline") -> torch.Tensor:
    """What replaces a pixel, in the model's input space, broadcastable to ``x``:

    - ``"black"``: the preprocessed value of zero intensity, (0 - mean) / std per channel
      (every intensity mode maps a raw 0 of an image whose minimum is 0 there);
    - ``"mean"``: 0 in input space, the training mean of the mean / std normalisation;
    - ``"blur"``: the image blurred by a Gaussian of ``sigma`` input pixels;
    - a number: that value in input space.
    """
    if isinstance(baseline, str):
        kind = baseline.strip().lower()
        if kind == "black":
            c = x.shape[1]
            mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).expand(c) \
                if len(spec.mean) == 1 else torch.tensor(spec.mean, dtype=x.dtype,
                                                         device=x.device)
            std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).expand(c) \
                if len(spec.std) == 1 else torch.tensor(spec.std, dtype=x.dtype,
                                                        device=x.device)
            return (-mean / std).view(1, c, *([1] * (x.ndim - 2)))
        if kind == "mean":
            return torch.zeros((1,) * x.ndim, dtype=x.dtype, device=x.device)
        if kind == "blur":
            return gaussian_blur(x, sigma)
    elif isinstance(baseline, (int, float, np.integer, np.floating)) and \
            not isinstance(baseline, bool) and math.isfinite(float(baseline)):
        return torch.full((1,) * x.ndim, float(baseline), dtype=x.dtype, device=x.device)
    raise ValueError(f"{what}={baseline!r}: give 'black' (zero intensity), 'mean' (0 after "
                     "normalisation), 'blur' (a Gaussian-blurred copy) or a finite number in "
                     "the model's input space.")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, *spatial) blurred along every spatial axis by a Gaussian of ``sigma`` pixels,
    truncated at 4 sigma and mirrored at the edges: scipy.ndimage.gaussian_filter's
    ``mode="mirror"`` (the radius is capped at the side minus 1, which mirroring needs)."""
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        sigma = float("nan")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"blur_sigma={sigma!r}: give a finite blur width in pixels >= 0.")
    if sigma == 0:
        return x
    out = x
    for axis in range(2, x.ndim):
        side = out.shape[axis]
        radius = min(int(4.0 * sigma + 0.5), side - 1)
        if radius < 1:
            continue
        t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
        kernel = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = (kernel / kernel.sum()).to(x.dtype).view(1, 1, -1)
        moved = out.movedim(axis, -1)
        flat = moved.reshape(-1, 1, side)
        flat = F.conv1d(F.pad(flat, (radius, radius), mode="reflect"), kernel)
        out = flat.reshape(moved.shape).movedim(-1, axis)
    return out.contiguous()


def index_of(k: int, lead: tuple) -> list[int]:
    """Image ``k`` (flat) as its index in the leading axes."""
    return [int(i) for i in np.unravel_index(k, lead)] if lead else []


def class_label(spec_names, cid: int) -> str:
    """A class's name for a row, its id where the model names no such class."""
    from ..annotations import class_name

    return class_name(list(spec_names or []), cid, str(cid))


def progress(done: int, total: int, what: str, model: Model | None) -> Progress:
    return Progress(done, total, what, int(model.runner.batch_size or 0) if model else 0)


def tolist(v):
    """NumPy values -> plain Python (for JSON / CSV rows)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v
