"""``ModelSpec``: a model and how to feed it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# how raw pixels become the model's [0, 1] input, before mean / std:
#   dtype  - integer images divided by their dtype's maximum (uint8 / 255, uint16 / 65535),
#            float images used as they are (the default)
#   minmax - each image scaled by its own minimum and maximum
#   none   - pixel values used as they are
INTENSITY = ("dtype", "minmax", "none")
_ALIASES = {"minmax-dtype": "dtype", "dtype-range": "dtype", "per-image": "minmax"}


def normalise_intensity(value: str) -> str:
    v = _ALIASES.get(str(value).lower(), str(value).lower())
    if v not in INTENSITY:
        raise ValueError(f"intensity={value!r}: use one of {', '.join(INTENSITY)} (dtype: "
                         "integers divided by their type's maximum; minmax: each image by its "
                         "own range; none: as they are).")
    return v


@dataclass
class ModelSpec:
    """A model and what it expects.

    ``intensity``: see :data:`INTENSITY`. ``input_size``: None for fully convolutional models
    that take any size; otherwise images are resized to it and heatmaps resized back.
    ``extra`` holds loader details (architecture, fixed batch size of exported programs, ...).
    ``output``: how the head's scores turn into a decision: ``"softmax"`` (one class per image
    or pixel: the largest logit), ``"multilabel"`` (each class on its own: sigmoid > 0.5), or
    None to decide from the head (one output channel: multilabel; several: softmax).
    """

    module: nn.Module
    class_names: list[str]
    in_channels: int = 1
    input_size: tuple[int, ...] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    target_layer: str | None = None  # None: found automatically
    intensity: str = "dtype"
    name: str = "model"
    extra: dict = field(default_factory=dict)
    output: str | None = None


def first_conv(module: nn.Module) -> tuple[str, nn.Module] | tuple[None, None]:
    """The first 2D / 3D convolution (its dotted name and module): it says how many channels
    and spatial axes the model takes."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return name, m
    return None, None


def check_input_size(module: nn.Module, input_size) -> None:
    """Raise a ValueError when ``input_size`` has not one value per spatial axis of the model
    (three for a model whose first convolution is 3D, two for a 2D one): the resize would fail
    deep inside PyTorch, or a volume would be squeezed into a 2D model's image."""
    if input_size is None:
        return
    _name, conv = first_conv(module)
    if conv is None:
        return
    dims = 3 if isinstance(conv, nn.Conv3d) else 2
    if len(input_size) == dims:
        return
    if dims == 3:
        raise ValueError(f"input_size={tuple(input_size)} has {len(input_size)} values but the "
                         "model is 3D (its first convolution is Conv3d); give three, (D, H, W) "
                         "in voxels, or none to use each volume's own size.")
    raise ValueError(f"input_size={tuple(input_size)} has {len(input_size)} values but the "
                     "model is 2D (its first convolution is Conv2d) and explains a volume "
                     "slice by slice; give two, (H, W) in pixels, or none.")


def refuse_torchscript(module) -> None:
    """Raise a TypeError for a TorchScript module: CAM reads layers through Python hooks,
    which scripted modules don't call."""
    if isinstance(module, torch.jit.ScriptModule):
        raise TypeError("TorchScript models can't be hooked from Python, so CAM can't read "
                        "their layers; load the architecture in Python with a state dict, or "
                        "export it with torch.export (.pt2).")
