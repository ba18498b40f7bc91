"""How much memory an image will need, read from its header before anything is decoded, and how
much the machine has, so that an image that cannot fit is refused with the numbers instead of
growing the process until the system kills it.

The estimate is deliberately rough (it is compared with what is available, not used to plan):

* the decoded pixels (every image of the input, at their own dtype);
* float32 working copies of a batch of them (conversion, scaling and normalisation keep about
  three alive at once) and the float32 heatmaps of every image (plus one copy for the regions);
* the model's input at its ``input_size`` (or the image's size for fully convolutional models),
  twice (resized and channels-last), and the activations and gradients that CAM keeps: about
  128 bytes per input pixel, measured on the demo model and ResNet-18 with Grad-CAM (140 to 190
  bytes per pixel at the peak, copies included).

On a CUDA device the model's part is compared with the GPU's free memory, the rest with the
host's.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .explain_arrays import CPU_BATCH_PIXELS  # auto_batch_size's pixel budget on the CPU

ACTIVATION_BYTES_PER_PIXEL = 128  # activations + gradients kept by CAM, per model-input pixel
FLOAT_COPIES = 3  # float32 copies of a batch alive at once while preprocessing


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_host_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable (or free pages), capped
    by a container's cgroup limit; None where neither can be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    # a container's limit is invisible in /proc/meminfo (cgroup v2, then v1)
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, used = _read_int(limit_file), _read_int(used_file)
        if limit is not None and used is not None and limit < 1 << 60:
            room = max(0, limit - used)
            avail = room if avail is None else min(avail, room)
            break
    return avail


def available_device_memory(device) -> int | None:
    """Free bytes on a CUDA device (PyTorch's cached but unused blocks included); None for
    other devices (their memory is the host's, or unknown)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


# ---- headers ---------------------------------------------------------------------------------

_PIL_MODES = {  # mode -> (channels after decoding, dtype)
    "1": (1, np.bool_), "L": (1, np.uint8), "P": (4, np.uint8), "LA": (2, np.uint8),
    "RGB": (3, np.uint8), "RGBA": (4, np.uint8), "CMYK": (4, np.uint8), "YCbCr": (3, np.uint8),
    "I": (1, np.int32), "I;16": (1, np.uint16), "I;16B": (1, np.uint16), "F": (1, np.float32),
}


def _png_header(path: Path) -> tuple[tuple, np.dtype] | None:
    """Width, height, bit depth and colour type from the IHDR chunk (Pillow refuses to even
    open a PNG above its decompression-bomb limit, which is exactly the case that matters)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    depth, colour = head[24], head[25]
    channels = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}.get(colour, 4)  # palette: decoded to RGB(A)
    dtype = np.uint16 if depth == 16 else np.uint8
    shape = (height, width) if channels == 1 else (height, width, channels)
    return shape, np.dtype(dtype)


def image_header(path) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) of what reading ``path`` will decode (a TIFF's first series), from its
    header only; None when the header can't be read (reading it fails later with its reason)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                series = tif.series[0]
                return tuple(int(s) for s in series.shape), np.dtype(series.dtype)
        if path.suffix.lower() == ".png":
            return _png_header(path)
        from PIL import Image

        with Image.open(path) as im:
            channels, dtype = _PIL_MODES.get(im.mode, (4, np.uint8))
            frames = int(getattr(im, "n_frames", 1) or 1)
            shape = (im.height, im.width) if channels == 1 else (im.height, im.width, channels)
            return ((frames, *shape) if frames > 1 else shape), np.dtype(dtype)
    except Exception:  # noqa: BLE001 - not readable as a header: the decoder says why later
        return None


# ---- the estimate ----------------------------------------------------------------------------

def gb(n: float) -> str:
    """Bytes as a short human number: '9.6 GB', '380 MB'."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB"


@dataclass
class Need:
    """Bytes one input needs: on the host, and for the model (on the device, or the host)."""

    decoded: int  # the decoded pixels (0 when they are already in memory)
    working: int  # float32 copies and heatmaps
    model: int  # model input and activations for one batch
    what: str  # the decoded array in words: "20000 x 20000 x 3 uint8"
    model_size: tuple  # the model's input size per image
    resized: bool = False  # the model has an input_size (else it runs at the image's size)

    @property
    def total(self) -> int:
        return self.decoded + self.working + self.model


def estimate(shape, dtype, lay, in_channels: int, input_size=None, *, already_decoded=False,
             targets: int = 1) -> Need:
    """What an input of ``shape``/``dtype`` (with its
    :func:`~napari_gradcam.explain_arrays.layout` ``lay``) needs on its way through the
    pipeline, batches of at most ``CPU_BATCH_PIXELS`` model pixels."""
    dtype = np.dtype(dtype)
    n = max(1, lay.count)
    pixels = max(1, math.prod(lay.spatial))
    channels = max(lay.channels, in_channels)
    model_size = tuple(input_size) if input_size else tuple(lay.spatial)
    model_pixels = max(1, math.prod(model_size))
    batch = max(1, min(n, CPU_BATCH_PIXELS // model_pixels))
    decoded = 0 if already_decoded else math.prod(shape) * dtype.itemsize
    working = (FLOAT_COPIES * batch * pixels * channels * 4  # preprocessing a batch
               + 2 * n * max(1, targets) * pixels * 4)  # heatmaps and their regions
    model = batch * model_pixels * (2 * in_channels * 4 + ACTIVATION_BYTES_PER_PIXEL)
    what = " x ".join(str(int(s)) for s in shape) + f" {dtype.name}"
    return Need(decoded, working, model, what, model_size, bool(input_size))


def refusal(need: Need, host: int | None, device: int | None = None,
            device_name: str = "the GPU") -> str | None:
    """None when ``need`` fits; else one sentence with the numbers and what to change.
    ``device``: free bytes of a CUDA device that holds the model's part (None: the host does)."""
    host_need = need.decoded + need.working + (need.model if device is None else 0)
    model_heavy = need.model > need.decoded + need.working
    size = " x ".join(map(str, need.model_size))
    if model_heavy and need.resized:
        fix = (f"use a model with a smaller input_size (the model runs at {size} pixels per "
               "image), or downscale the image")
    else:
        fix = "downscale it or cut it into tiles before the run"
    if device is not None and need.model > device:
        return (f"it needs about {gb(need.model)} of GPU memory for the model at {size} pixels "
                f"per image, and {device_name} has {gb(device)} free; {fix}, or run on "
                "--device cpu")
    if host is not None and host_need > host:
        parts = [f"{need.what} decoded: {gb(need.decoded)}" if need.decoded else None,
                 f"float32 working copies and heatmaps: {gb(need.working)}",
                 f"model input and activations at {size}: {gb(need.model)}"
                 if device is None else None]
        return (f"it needs about {gb(host_need)} of memory "
                f"({', '.join(p for p in parts if p)}) and {gb(host)} is available; {fix}")
    return None


__all__ = ["Need", "available_device_memory", "available_host_memory", "estimate", "gb",
           "image_header", "refusal"]
