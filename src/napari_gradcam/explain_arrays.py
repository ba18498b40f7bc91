"""``explain``: CAM over whole arrays (NumPy, dask, zarr) in device-sized batches.

Every leading index of the array is one image; the model's preprocessing (:class:`ModelSpec`:
intensity scaling, channel adaptation, mean / std, optional resize to a fixed input size) is
applied batch by batch on the device, so a lazy array is read one batch at a time and never
loaded whole. The next batch is read on a helper thread while the current one runs.

:func:`iter_explain` is the same computation as a generator that yields a :class:`Progress`
after every batch and returns the :class:`Explanation`: GUIs drive it from a worker thread and
cancel by closing it (the work stops at the next batch boundary); :func:`explain` just runs it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._device import describe_device, resolve_device
from .cam import explain_batch, get_method, resolve_target_layer
from .cam._state import explaining
from .cam.engine import _model_output, size_errors
from .cam.segmentation import known_output, remember_output, segmentation_labels
from .models import ModelSpec, normalise_intensity
from .models.spec import check_input_size, first_conv, refuse_torchscript

log = logging.getLogger(__name__)


class Progress(NamedTuple):
    done: int  # images finished
    total: int
    method: str
    batch_size: int  # the batch size in use (it halves when the GPU runs out of memory)


@dataclass
class Explanation:
    """CAM results for every image of an array.

    ``heatmaps`` has the images' shape without the channel axis, float32 in [0, 1];
    ``class_ids`` (int64) and ``scores`` (float32, the model's logit for the explained class)
    have the leading shape (``()`` for a single image).
    """

    heatmaps: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray
    class_names: list[str]
    method: str
    target_layer: str | None
    device: str = "cpu"
    batch_size: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def class_labels(self) -> np.ndarray:
        """The explained class's name per image (leading shape)."""
        ids = np.asarray(self.class_ids)
        if not self.class_names:
            return np.full(ids.shape, "", object)
        names = np.array(list(self.class_names), dtype=object)
        return names[np.clip(ids.ravel(), 0, len(names) - 1)].reshape(ids.shape)


# ---- layout: which axes are images, channels, pixels -------------------------------------------

@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]  # the array's shape
    channel_axis: int | None  # normalised (>= 0) or None
    spatial_dims: int  # 2 or 3 (for 3D models)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape without the channel axis."""
        return tuple(s for i, s in enumerate(self.shape) if i != self.channel_axis)

    @property
    def lead(self) -> tuple[int, ...]:
        return self.image_shape[: len(self.image_shape) - self.spatial_dims]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.image_shape[len(self.image_shape) - self.spatial_dims:]

    @property
    def channels(self) -> int:
        return 1 if self.channel_axis is None else self.shape[self.channel_axis]

    @property
    def count(self) -> int:
        return math.prod(self.lead)


def model_spatial_dims(module: nn.Module) -> int:
    """3 for a model whose first convolution is 3D, else 2."""
    return 3 if isinstance(first_conv(module)[1], nn.Conv3d) else 2


def layout(shape, channel_axis=None, spatial_dims: int = 2,
           in_channels: int | None = None) -> Layout:
    """Work out the axes of an image array.

    ``channel_axis``: an axis index; ``None`` guesses; ``False`` says there is no channel axis.

    The guess, for an array with more than ``spatial_dims`` axes: a last axis of 3 or 4 entries
    is RGB / RGBA. Any other last axis that is small (at most a quarter of each axis before it
    that would be its neighbour in the image) may hold channels: it does when it has 1 entry or
    exactly the model's ``in_channels``; otherwise, when ``in_channels`` is given, the array is
    ambiguous (an (H, W, 5) array could be 5 channels or H images 5 pixels
    wide) and a ValueError says how to pass ``channel_axis``. Without ``in_channels`` such an
    axis stays a pixel axis, as before.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if channel_axis is False:
        ca = None
    elif channel_axis is None:
        ca = _guess_channel_axis(shape, spatial_dims, in_channels)
    else:
        if not -ndim <= int(channel_axis) < ndim:
            raise ValueError(f"channel_axis={channel_axis} is outside an array of shape {shape}.")
        ca = int(channel_axis) % ndim
    lay = Layout(shape, ca, spatial_dims)
    if len(lay.image_shape) < spatial_dims:
        what = "(H, W)" if spatial_dims == 2 else "(D, H, W)"
        raise ValueError(f"the image has shape {shape}; this model needs at least {what} "
                         "pixels (plus leading axes for a stack).")
    if 0 in shape:
        raise ValueError(f"the image is empty (shape {shape}); load an image with pixels.")
    return lay


def _guess_channel_axis(shape: tuple[int, ...], spatial_dims: int,
                        in_channels: int | None) -> int | None:
    ndim = len(shape)
    if ndim <= spatial_dims or 0 in shape:
        return None
    last = shape[-1]
    if last in (3, 4):
        return ndim - 1
    neighbours = shape[-1 - spatial_dims:-1]
    if not all(4 * last <= s for s in neighbours):
        return None  # a long last axis is the image's width
    if last == 1 or last == in_channels:
        return ndim - 1
    if in_channels is None:
        return None
    raise ValueError(
        f"the array has shape {shape}: its last axis ({last} entries) could hold {last} "
        f"channels or be the images' width; pass channel_axis=-1 if the last axis holds "
        f"channels (this model takes {in_channels}), or channel_axis=False if it is the width."
    )


def mask_rows(mask, lead, spatial, start: int, stop: int, what: str = "mask") -> np.ndarray:
    """Images ``start:stop`` of a per-image mask given as the images' spatial shape (the same
    for every image) or as their leading shape plus it: (stop - start, *spatial)."""
    mask = np.asarray(mask)
    spatial, lead = tuple(spatial), tuple(lead)
    if mask.shape == spatial:
        return np.broadcast_to(mask, (stop - start, *spatial))
    if mask.shape == lead + spatial:
        return mask.reshape(-1, *spatial)[start:stop]
    raise ValueError(f"the {what} has shape {mask.shape}; give the images' spatial shape "
                     f"{spatial}" + (f" or their whole shape {lead + spatial}" if lead else "")
                     + ".")


def read_batch(images, lay: Layout, start: int, stop: int) -> np.ndarray:
    """Images ``start:stop`` (flat leading order) as a NumPy array (n, *spatial, channels),
    reading runs along the last leading axis as one slice (one read per run for lazy arrays)."""
    lead = lay.lead
    ca = lay.channel_axis
    if not lead:
        reads = [(np.asarray(images), ca)]
    else:
        reads = []
        flat = start
        while flat < stop:
            idx = np.unravel_index(flat, lead)
            run = min(stop - flat, lead[-1] - int(idx[-1]))
            key = [int(i) for i in idx[:-1]] + [slice(int(idx[-1]), int(idx[-1]) + run)]
            if ca is not None and ca < len(key):
                key.insert(ca, slice(None))
            # the channel axis moves left by the number of integer-indexed axes before it
            pos = None if ca is None else ca - min(ca, len(lead) - 1)
            reads.append((np.asarray(images[tuple(key)]), pos))
            flat += run
    pieces = []
    for a, pos in reads:
        a = a[..., None] if pos is None else np.moveaxis(a, pos, -1)
        pieces.append(a.reshape((-1, *lay.spatial, a.shape[-1])))
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


# ---- preprocessing ------------------------------------------------------------------------------

def check_channels(channels: int, in_channels: int) -> None:
    """Raise a ValueError that says what to do when an image's channels can't feed the model."""
    if channels == in_channels or (channels == 1 and in_channels > 1):
        return
    if channels == 4 and in_channels == 3:
        return
    if channels == 3 and in_channels == 1:
        return  # accepted when the three channels are equal (a grey image stored as RGB)
    kind = {3: "RGB", 4: "RGBA"}.get(channels, f"{channels}-channel")
    raise ValueError(
        f"the model takes {in_channels} input channel(s) but the image is {kind} "
        f"({channels} channels); "
        + ("convert it to greyscale first, or choose a model trained on colour images."
           if in_channels == 1 else
           f"choose an image with {in_channels} channel(s) (or one grey channel), or a model "
           "that fits this image.")
    )


def is_grey_rgb(pixels, axis: int = -1) -> bool:
    """True when the three channels along ``axis`` (NumPy or torch) are equal: a grey image
    stored as RGB, which feeds a 1-channel model."""
    if isinstance(pixels, torch.Tensor):
        r, g, b = pixels.unbind(axis)[:3]
        return bool(torch.equal(r, g) and torch.equal(r, b))
    r, g, b = (np.take(pixels, i, axis=axis) for i in range(3))
    return bool(np.array_equal(r, g) and np.array_equal(r, b))


def colour_for_grey_model() -> ValueError:
    """The error for a colour RGB image given to a 1-channel model (grey stored as RGB, with
    equal channels, is accepted)."""
    return ValueError(
        "the model takes 1 input channel but the image is colour RGB (its channels differ); "
        "convert it to greyscale first, or choose a model trained on colour images."
    )


def _scale_range(dtype: np.dtype) -> float | None:
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    if dtype == np.bool_:
        return 1.0
    return None


def preprocess(raw: np.ndarray, spec: ModelSpec, device: torch.device,
               limits: tuple[float, float] | None = None) -> torch.Tensor:
    """(n, *spatial, channels) pixels -> the model's (n, C, *size) float32 input on ``device``.
    ``limits``: (low, high) that intensity "minmax" scales by instead of each image's own
    range (the tiles of one image share the image's range, or they would not be comparable)."""
    intensity = normalise_intensity(spec.intensity)
    dtype = raw.dtype
    if dtype == np.bool_:
        raw = raw.astype(np.uint8)
    elif not (np.issubdtype(dtype, np.number)):
        raise TypeError(f"the image has dtype {dtype}; give numbers (integers or floats).")
    x = torch.from_numpy(np.ascontiguousarray(raw))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    x = x.float()
    n_sp = x.ndim - 2
    x = x.permute(0, x.ndim - 1, *range(1, 1 + n_sp))  # channels first
    c, m = x.shape[1], spec.in_channels
    if c == 3 and m == 1:
        if not is_grey_rgb(x, axis=1):
            raise colour_for_grey_model()
        x = x[:, :1]
    elif c == 4 and m == 3:
        x = x[:, :3]
    elif c == 1 and m > 1:
        x = x.expand(-1, m, *x.shape[2:])
    if intensity == "dtype":
        top = _scale_range(dtype)
        if top is not None:
            x = x / top
    elif intensity == "minmax":
        if limits is None:
            flat = x.flatten(1)
            lo = flat.amin(1).view(-1, *[1] * (x.ndim - 1))
            hi = flat.amax(1).view(-1, *[1] * (x.ndim - 1))
        else:
            lo, hi = (torch.tensor(float(v), device=x.device) for v in limits)
        x = (x - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device)
    if mean.numel() not in (1, m) or std.numel() not in (1, m):
        raise ValueError(f"mean/std have {mean.numel()}/{std.numel()} values for a model with "
                         f"{m} channels; give one value or one per channel.")
    shape = (1, -1) + (1,) * n_sp
    x = (x - mean.view(shape)) / std.view(shape)
    if spec.input_size is not None and tuple(x.shape[2:]) != tuple(spec.input_size):
        mode = "bilinear" if n_sp == 2 else "trilinear"
        x = F.interpolate(x, size=tuple(spec.input_size), mode=mode, align_corners=False,
                          antialias=n_sp == 2)
    if x.ndim == 4:  # NHWC: oneDNN and cuDNN convolutions run faster (CPU: 1.2-1.5x here).
        # Built explicitly: for one channel, .contiguous(channels_last) keeps NCHW strides
        # (size-1 dims make both layouts "contiguous") and convolutions stay on NCHW kernels.
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
        return out.copy_(x)
    return x.contiguous()


def resolve_target(target, class_names) -> int | None:
    """None, a class index or a class name -> an index (validated against the names)."""
    if target is None:
        return None
    if isinstance(target, str):
        if target.strip().lstrip("-").isdigit():
            target = int(target)
        else:
            names = list(class_names or [])
            if target not in names:
                low = {n.lower(): i for i, n in enumerate(names)}
                if target.lower() in low:
                    return low[target.lower()]
                raise ValueError(f"the model has no class {target!r}; its classes are "
                                 f"{', '.join(map(repr, names)) or '(unnamed)'}.")
            return names.index(target)
    target = int(target)
    if class_names and not 0 <= target < len(class_names):
        raise ValueError(f"class index {target} is out of range: the model has "
                         f"{len(class_names)} classes (0 to {len(class_names) - 1}).")
    return target


# The automatic batch size's pixel budget on the CPU (memory.estimate sizes its batches the same
# way). Larger CPU batches fall out of the caches: measured on 2 cores, the demo model ran 29
# img/s at 384^2 in batches of 1-4 and 15 img/s in batches of 8-32; ResNet-50 at 224^2 peaked at
# 8 images (12 img/s vs 9 alone). Half a megapixel fits both.
CPU_BATCH_PIXELS = 1 << 19


def auto_batch_size(spatial, device: torch.device, count: int) -> int:
    """Images per batch: a pixel budget (0.5 MPix on the CPU, free memory / 4 KiB on CUDA);
    out-of-memory errors halve it later."""
    pixels = max(1, math.prod(spatial))
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = free // 4096
    else:
        budget = CPU_BATCH_PIXELS  # see its comment: larger batches fall out of the caches
    return int(max(1, min(count, 256, budget // pixels)))


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


# ---- the loop -------------------------------------------------------------------------------------

_OWN = object()  # Runner calls without targets: the runner's own target


class Runner:
    """The engine over batches of raw pixels (n, *spatial, channels): preprocessing on the
    device, the target layer resolved once, out-of-memory errors halving the batch size (kept
    small afterwards), static-batch torch.export programs padded; returns NumPy maps at the
    images' own size. Shared by :func:`iter_explain` and the batch pipeline."""

    def __init__(self, spec: ModelSpec, method: str = "gradcam", target=None,
                 device="auto", batch_size: int | None = None, *, target_layer=None,
                 amp=None):
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a ModelSpec (from load_model), not "
                            f"{type(spec).__name__}.")
        get_method(method)  # unknown names fail before any work
        refuse_torchscript(spec.module)
        check_input_size(spec.module, spec.input_size)  # a spec built by hand, not load_model
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size}: give a positive number, or None for "
                             "auto.")
        self.spec, self.method, self.amp = spec, method, amp
        self.device = resolve_device(device)
        self.class_id = resolve_target(target, spec.class_names)
        self.dims = model_spatial_dims(spec.module)
        self.batch_size = int(batch_size) if batch_size else None
        self.fixed = spec.extra.get("fixed_batch")  # exported with a static batch
        if self.fixed:
            self.batch_size = int(self.fixed)
        self._layer = target_layer if target_layer is not None else spec.target_layer
        self.layer_name: str | None = None
        # sides must be multiples of this (a U-Net's skip connections): found on the first
        # input that breaks them, then inputs are padded to it and results cropped back
        self.multiple = 1
        # how a segmentation model's outputs become its predicted regions (None: from the head)
        self.multilabel = {"multilabel": True, "softmax": False}.get(spec.output)
        spec.module.to(self.device)
        self._crop = _CropOutput(spec.module)  # used once padding is needed

    def size_for(self, spatial, count: int) -> int:
        """The batch size (chosen on first use from the image size and device memory)."""
        if self.batch_size is None:
            self.batch_size = auto_batch_size(self.spec.input_size or spatial, self.device,
                                              count)
        return self.batch_size

    def prepare(self, raw: np.ndarray, limits: tuple[float, float] | None = None) -> torch.Tensor:
        """Raw pixels -> the model's input on the device (several methods can share it);
        resolves the target layer on first use. ``limits``: see :func:`preprocess`."""
        batch = preprocess(raw, self.spec, self.device, limits)
        if self.layer_name is None:
            with size_errors(self.spec.module, batch[:1]):  # the first forward runs here
                try:
                    self.layer_name, _ = resolve_target_layer(self.spec.module, self._layer,
                                                              batch[:1])
                except RuntimeError as err:
                    if not self._learn_multiple(err, batch[:1]):
                        raise
                    self.layer_name, _ = resolve_target_layer(
                        self.spec.module, self._layer, pad_sides(batch[:1], self.multiple))
        return batch

    def _learn_multiple(self, err: BaseException, sample: torch.Tensor) -> bool:
        """After a failed forward: whether the failure was a U-Net's skip connection meeting
        a map of another size, and padding to a multiple fixes it (then remembered)."""
        if self.multiple > 1 or not _SKIP_SIZES.search(str(err)):
            return False
        multiple = size_multiple(self.spec.module, sample)
        if multiple is None:
            return False
        log.info("input sides padded to multiples of %d", multiple)
        self.multiple = multiple
        return True

    def explain(self, batch: torch.Tensor, spatial, method: str | None = None, targets=_OWN,
                target_masks=None, normalize: bool = True, as_tensor: bool = False):
        """The engine over a prepared batch, in parts that fit the device, maps resized back
        to ``spatial``. ``method`` overrides the runner's; ``targets`` overrides its target
        with any form :func:`explain_batch` takes (per-sample arrays are split with the
        batch). ``target_masks``: a segmentation model's regions to explain, (n, *spatial) at
        the images' size (resized to the model's input here). ``normalize=False``: maps not
        scaled to [0, 1] (tiles blended before one scaling over the image); ``as_tensor``: the
        maps stay on the device (a torch tensor) for a caller that blends them there."""
        method = method or self.method
        targets = self.class_id if targets is _OWN else targets
        masks = None if target_masks is None else self._fit_masks(target_masks, batch)
        per_sample = not (targets is None or callable(targets) or np.ndim(targets) == 0)

        def work(pos: int, n: int):
            tgt = torch.as_tensor(targets)[pos:pos + n] if per_sample else targets
            weights = None if masks is None else masks[pos:pos + n]
            if self.fixed and n < self.fixed:  # pad with copies, drop their results
                tgt = _pad(tgt, self.fixed) if per_sample else tgt
                weights = None if weights is None else _pad(weights, self.fixed)
            part, module, layer = self._input(batch[pos:pos + n])
            res = explain_batch(module, part, method, target_layer=layer, targets=tgt,
                                target_masks=weights, multilabel=self.multilabel,
                                amp=self.amp, normalize=normalize)
            self._seen(module)
            return type(res)(crop_sides(res.heatmaps[:n], batch.shape[2:], normalize),
                             *(t[:n] for t in res[1:]))

        parts = self._each_part(batch, self.size_for(spatial, batch.shape[0]), work)
        maps = torch.cat([p.heatmaps for p in parts])
        if tuple(maps.shape[-self.dims:]) != tuple(spatial):  # resized input: back to the image
            mode = "bilinear" if self.dims == 2 else "trilinear"
            lead = maps.shape[:-self.dims]
            maps = F.interpolate(maps.reshape(-1, 1, *maps.shape[-self.dims:]), size=spatial,
                                 mode=mode, align_corners=False)
            maps = (maps.clamp_(0, 1) if normalize else maps.clamp_(min=0)).view(*lead, *spatial)
        return (maps if as_tensor else maps.cpu().numpy(), torch.cat([p.class_ids for p in parts]).cpu().numpy(),
                torch.cat([p.scores for p in parts]).cpu().numpy())

    def segment(self, batch: torch.Tensor, spatial) -> np.ndarray:
        """A segmentation model's predicted labels (n, *spatial) for a prepared batch (see
        :func:`napari_gradcam.cam.segmentation_labels`), back at the images' size."""

        def work(pos: int, n: int):
            part, module, _layer = self._input(batch[pos:pos + n])
            with torch.inference_mode(), explaining(module):
                logits = _model_output(module(part))
            if logits is None or logits.ndim != batch.ndim:
                raise ValueError("this model returns no segmentation map (N, classes, "
                                 "*spatial), so it has no predicted labels to show.")
            labels = segmentation_labels(logits[:n], self.multilabel)
            if tuple(labels.shape[1:]) != tuple(spatial):
                labels = F.interpolate(labels[:, None].float(), size=tuple(spatial),
                                       mode="nearest")[:, 0].long()
            return labels.cpu().numpy().astype(np.int32)

        return np.concatenate(self._each_part(batch, self.size_for(spatial, batch.shape[0]),
                                              work))

    def _input(self, part: torch.Tensor):
        """What the model is called with for ``part``: (input, module, target layer). A
        static-batch program gets the part padded with copies; a model that needs sides of a
        multiple gets the padded input through :class:`_CropOutput`, which cuts its output
        back to the image, so that predicted regions and pooled scores see no padding."""
        if self.fixed and part.shape[0] < self.fixed:
            part = _pad(part, self.fixed)
        if self.multiple == 1:
            return part, self.spec.module, self.layer_name
        self._crop.sides = tuple(part.shape[2:])
        layer = None if self.layer_name is None else self.spec.module.get_submodule(
            self.layer_name)
        return pad_sides(part, self.multiple), self._crop, layer

    def _seen(self, module) -> None:
        """Pass on what the engine learnt about a wrapped model's output to the model."""
        if module is not self.spec.module:
            seen = known_output(module)
            if seen is not None:
                remember_output(self.spec.module, seen)

    def _each_part(self, batch: torch.Tensor, size: int, work) -> list:
        """``work(pos, n)`` over the batch in parts of ``size``: an out-of-memory error halves
        the size (kept small afterwards), a U-Net's skip-size error teaches the padding
        multiple; both retry the part."""
        results, pos = [], 0
        while pos < batch.shape[0]:
            n = min(size, batch.shape[0] - pos)
            try:
                results.append(work(pos, n))
            except Exception as err:
                if self._learn_multiple(err, batch[pos:pos + 1]):
                    continue
                if not _is_oom(err):
                    raise
                del err
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if n == 1 or self.fixed:
                    raise MemoryError(
                        f"{describe_device(self.device)} ran out of memory on a single image of "
                        f"{tuple(batch.shape[2:])} pixels; use device='cpu', a smaller "
                        "input_size, or a smaller image."
                    ) from None
                size = self.batch_size = max(1, n // 2)
                log.warning("out of memory: batch size reduced to %d", size)
                continue
            pos += n
        return results

    def _fit_masks(self, masks, batch: torch.Tensor) -> torch.Tensor:
        """Target masks (n, *spatial) as weights at the model input's size on its device:
        bool / integer masks count where > 0, float ones are weights."""
        m = check_weights(masks, "target mask")
        if m.ndim != batch.ndim - 1 or m.shape[0] != batch.shape[0]:
            raise ValueError(f"target masks have shape {tuple(m.shape)}; give one per image, "
                             f"({batch.shape[0]}, *spatial).")
        m = torch.as_tensor(m, device=batch.device)
        size = tuple(batch.shape[2:])
        if tuple(m.shape[1:]) != size:  # a fixed input size: the masks follow the resize
            shrink = all(a >= b for a, b in zip(m.shape[1:], size))
            m = F.interpolate(m[:, None], size=size, mode="area" if shrink else "nearest")[:, 0]
        return m


class _CropOutput(nn.Module):
    """A model that needs sides of a multiple, called on a padded input: a segmentation
    output is cut back to the part covering the image (``sides``, the unpadded input size;
    a lower-resolution output keeps the same fraction), so the padding adds no pixels to a
    class's region. Classifier outputs pass unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.sides: tuple = ()

    def forward(self, x):
        out = self.model(x)
        logits = _model_output(out)
        if logits is None or logits.ndim != x.ndim or not self.sides:
            return out
        keep = [math.ceil(o * s / p) for o, s, p in zip(logits.shape[2:], self.sides,
                                                          x.shape[2:])]
        return logits[(..., *(slice(0, k) for k in keep))]


def check_weights(mask, what: str = "target mask") -> np.ndarray:
    """A region mask as float32 weights: booleans / integers count where > 0 (any integer
    type, also unsigned label images), floats are weights that must be finite and >= 0 (and
    are scaled to at most 1: a region's weights only matter relative to each other)."""
    m = np.asarray(mask)
    if m.dtype.kind in "biu":
        return (m > 0).astype(np.float32)
    if m.dtype.kind != "f":
        raise TypeError(f"the {what} has dtype {m.dtype}; give booleans, integers (> 0 = "
                        "inside) or non-negative float weights.")
    if not np.isfinite(m).all() or (m < 0).any():
        raise ValueError(f"the {what} holds NaN, infinite or negative values; give weights "
                         ">= 0 (or a boolean mask).")
    top = float(m.max()) if m.size else 0.0
    return (m / top if top > 1 else m).astype(np.float32)


# what PyTorch says when a U-Net's upsampled map meets a skip connection of another size
_SKIP_SIZES = re.compile(r"Sizes of tensors must match|must match the size of tensor"
                         r"|divisible by", re.IGNORECASE)


def size_multiple(module: nn.Module, sample: torch.Tensor) -> int | None:
    """The smallest power of two (up to 256) such that the model runs on ``sample`` padded to
    multiples of it, or None."""
    for multiple in (2, 4, 8, 16, 32, 64, 128, 256):
        try:
            with torch.inference_mode(), explaining(module):
                module(pad_sides(sample, multiple))
        except RuntimeError:
            continue
        return multiple
    return None


def pad_sides(t: torch.Tensor, multiple: int, value: float | None = None) -> torch.Tensor:
    """(N, C, *spatial) padded at the end of each spatial axis to a multiple of ``multiple``:
    edge values repeated (``value`` None) or a constant."""
    extra = [(-s) % multiple for s in t.shape[2:]]
    if not any(extra):
        return t
    pads = [p for e in reversed(extra) for p in (0, e)]
    if value is not None:
        return F.pad(t, pads, value=value)
    return F.pad(t, pads, mode="replicate")


def crop_sides(maps: torch.Tensor, sides, normalize: bool = True) -> torch.Tensor:
    """Heatmaps (N[, K], *spatial) of a padded input cut back to ``sides`` and scaled to reach
    1 again (the padding may have held the hottest pixel); unscaled maps (``normalize``
    False) are only cut."""
    sides = tuple(int(s) for s in sides)
    if tuple(maps.shape[-len(sides):]) == sides:
        return maps
    maps = maps[(..., *(slice(0, s) for s in sides))]
    if not normalize:
        return maps
    top = maps.flatten(-len(sides)).amax(-1).clamp(min=1e-12)
    return maps / top.view(*top.shape, *([1] * len(sides)))


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` grown to ``size`` along the first axis with copies of its last entry."""
    return torch.cat([t, t[-1:].expand(size - t.shape[0], *t.shape[1:])])


def read_ahead(images, lay: Layout, runner: Runner) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, raw pixels) batch by batch, in the runner's current batch size (it may
    shrink after an out-of-memory error), the next batch read on a helper thread while the
    caller works on this one. Close it (``contextlib.closing``) to stop reading."""
    n = lay.count if lay.lead else 1
    pool = ThreadPoolExecutor(1, thread_name_prefix="napari-gradcam-read")
    try:
        start = 0
        pending = pool.submit(read_batch, images, lay, 0, min(runner.size_for(lay.spatial, n), n))
        while start < n:
            raw = pending.result()
            stop = start + raw.shape[0]
            if stop < n:
                pending = pool.submit(read_batch, images, lay, stop,
                                      min(stop + runner.batch_size, n))
            yield start, stop, raw
            start = stop
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def iter_explain(
    images,
    spec: ModelSpec,
    method: str = "gradcam",
    target=None,
    batch_size: int | None = None,
    device="auto",
    channel_axis=None,
    *,
    target_layer=None,
    amp=None,
    out=None,
    target_mask=None,
    tile="auto",
    overlap=64,
    resume_key=None,
) -> Iterator[Progress]:
    """:func:`explain` as a generator: yields :class:`Progress` after each batch, returns the
    :class:`Explanation` (``StopIteration.value``). Closing it stops after the current batch."""
    from .tiles import check_tile_option, resolve_tiling

    runner = Runner(spec, method, target, device, batch_size, target_layer=target_layer,
                    amp=amp)
    check_tile_option(tile, overlap, runner.dims)
    if not hasattr(images, "shape") or not hasattr(images, "__getitem__"):
        images = np.asarray(images)
    lay = layout(images.shape, channel_axis, runner.dims, in_channels=spec.in_channels)
    check_channels(lay.channels, spec.in_channels)
    n = lay.count if lay.lead else 1
    tiling = None if runner.dims != 2 else resolve_tiling(
        tile, overlap, lay.spatial, lay.channels, np.dtype(getattr(images, "dtype", np.float32)),
        spec, runner.device)
    if tiling is not None:
        return (yield from _iter_explain_tiled(runner, method, images, lay, tiling, out,
                                               target_mask, resume_key))
    heat = out if out is not None else np.zeros((n, *lay.spatial), np.float32)
    if out is not None:
        if tuple(out.shape) != (*lay.lead, *lay.spatial):
            raise ValueError(f"out has shape {tuple(out.shape)}; it must be "
                             f"{(*lay.lead, *lay.spatial)}.")
        heat = out.reshape((n, *lay.spatial)) if isinstance(out, np.ndarray) else out
    class_ids = np.zeros(n, np.int64)
    scores = np.zeros(n, np.float32)

    with contextlib.closing(read_ahead(images, lay, runner)) as batches:
        for start, stop, raw in batches:
            rows = None if target_mask is None else mask_rows(target_mask, lay.lead, lay.spatial,
                                                              start, stop, "target mask")
            maps, class_ids[start:stop], scores[start:stop] = runner.explain(
                runner.prepare(raw), lay.spatial, target_masks=rows)
            if isinstance(heat, np.ndarray):
                heat[start:stop] = maps
            else:  # zarr / memmap with the leading shape: write image by image
                for k in range(start, stop):
                    heat[np.unravel_index(k, lay.lead) if lay.lead else ()] = maps[k - start]
            yield Progress(stop, n, method, runner.batch_size)
    if out is None:
        heat = heat.reshape((*lay.lead, *lay.spatial))
    return Explanation(heat, class_ids.reshape(lay.lead), scores.reshape(lay.lead),
                       list(spec.class_names), method, runner.layer_name, str(runner.device),
                       runner.batch_size)


def _iter_explain_tiled(runner, method, images, lay, tiling, out, target_mask, resume_key):
    """:func:`iter_explain` for images explained in tiles: the job's tiled path
    (:func:`napari_gradcam.tiles.iter_tiled`), one method."""
    from .job import is_segmentation
    from .tiles import check_tile_mask, iter_tiled, open_outputs

    shape = (*lay.lead, *lay.spatial)
    outs, group, keep = open_outputs(out, [method], shape, tiling.tile[0])
    mask = None if target_mask is None else check_weights(target_mask)
    check_tile_mask(mask, tuple(lay.lead), tuple(lay.spatial))
    done = yield from iter_tiled(runner, [method], images, lay, tiling, outs,
                                 target=runner.class_id,
                                 segmentation=bool(is_segmentation(runner.spec)),
                                 target_mask=mask, resume_key=resume_key, store=group)
    lead = tuple(lay.lead)
    extra = {"tiling": tiling}
    if keep is not None:
        extra["storage"] = keep  # the temporary folder of the heat lives with the result
    return Explanation(outs[method], np.array([d.class_id for d in done], np.int64).reshape(lead),
                       np.array([d.score for d in done], np.float32).reshape(lead),
                       list(runner.spec.class_names), method, runner.layer_name,
                       str(runner.device), int(runner.batch_size or 1), extra)


def run_generator(gen, progress: Callable[[Progress], None] | None = None):
    """Drive a generator to its end, handing each yielded item to ``progress``; returns its
    return value."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(item)


def explain(
    images,
    spec: ModelSpec,
    method: str = "gradcam",
    target=None,
    batch_size: int | None = None,
    device="auto",
    channel_axis=None,
    progress: Callable[[Progress], None] | None = None,
    *,
    target_layer=None,
    amp=None,
    out=None,
    target_mask=None,
    tile="auto",
    overlap=64,
    resume_key=None,
) -> Explanation:
    """Class activation maps for every image of an array.

    Parameters
    ----------
    images : NumPy, dask or zarr array: (H, W), (H, W, C), (..., H, W) or (..., H, W, C); for a
        3D model (D, H, W) volumes with leading axes. Every leading index is one image. Lazy
        arrays are read one batch at a time.
    spec : a :class:`ModelSpec` (``load_model(...)``): the model and its preprocessing.
    method : a CAM method (``available_methods()``).
    target : None (each image's predicted class), a class index, or a class name. For a
        segmentation model (output (N, classes, *spatial)) the class is explained over a
        region: its predicted pixels, or ``target_mask``; None = the class predicted over the
        largest area (background excluded).
    batch_size : images per forward pass; None picks one from the image size and the device's
        memory. On out-of-memory errors the batch is halved and retried.
    device : "auto" (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:N", "mps". The model is
        moved there.
    channel_axis : None guesses (a last axis of 3 or 4 = RGB / RGBA; a small last axis of the
        model's ``in_channels``, e.g. (H, W, 5) for a 5-channel model; an ambiguous one is an
        error that asks for channel_axis, see :func:`layout`), an int names it, False says
        there is none. Grey images feed 3-channel models by repetition, RGBA loses alpha,
        grey stored as RGB feeds 1-channel models.
    progress : called with a :class:`Progress` after every batch.
    target_layer : overrides ``spec.target_layer`` (dotted name, module, None = auto).
    amp : autocast dtype for the model ("bf16", "fp16", True), CAM math stays float32.
    out : optional array (NumPy, zarr, memmap) of the heatmaps' shape to write into, so that
        results for a large lazy stack need not fit in memory.
    target_mask : segmentation models: the pixels whose class logits are explained, the
        images' spatial shape (all images) or their whole shape; > 0 inside, or float weights.
    tile : "auto" (default: images that would not fit in memory whole are tiled), None (never
        tile), or a tile size in pixels (int or (rows, cols)): images larger than a tile are
        explained tile by tile, the maps blended with a Gaussian window and scaled to [0, 1]
        once per image, written into ``out`` as they go (see :mod:`napari_gradcam.tiles`;
        every tile is explained for one class: ``target``, else the class predicted over the
        whole image, which costs a forward-only pass over the tiles first). 2D models only;
        a model with a fixed input size sees every tile resized to it.
    overlap : pixels shared by neighbouring tiles, below the tile (default 64).
    resume_key : with tiles and a zarr ``out``: a string describing the settings; a rerun
        with the same key continues an interrupted run.

    Returns
    -------
    :class:`Explanation`
    """
    return run_generator(
        iter_explain(images, spec, method, target, batch_size, device, channel_axis,
                     target_layer=target_layer, amp=amp, out=out, target_mask=target_mask,
                     tile=tile, overlap=overlap, resume_key=resume_key),
        progress,
    )


__all__ = ["Explanation", "Progress", "Runner", "explain", "iter_explain", "layout", "preprocess",
           "resolve_target"]
