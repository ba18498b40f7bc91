"""What each model-description value may be: one table, used for sidecar JSON files and for the
keyword arguments of ``load_model`` alike.

A sidecar is untrusted input: a wrong type or an absurd value must be refused when the model is
loaded, naming the field and what it must be, instead of surfacing later as a crash deep inside
PyTorch or as memory that grows without bound.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from typing import Any

from .spec import INTENSITY, normalise_intensity

MAX_CHANNELS = 4096  # hyperspectral stacks have a few hundred bands
# the model's input is allocated at this size for every image of a batch (float32, channels,
# activations and gradients on top): larger sides exhaust memory long before they help
MAX_SIDE = 8192
MAX_PIXELS = 2 ** 27  # 8192 x 8192 in 2-D, 512^3 in 3-D
MAX_CLASSES = 1_000_000
MAX_SIDECAR_BYTES = 16 * 2 ** 20  # a description, not data: a few KiB in practice
_MAX_DEPTH = 8  # nesting of factory arguments
# factory arguments that would make the factory read or fetch another file (timm's
# checkpoint_path unpickles it): the weights come from the weights file, so a file may not ask
_FILE_ARGUMENTS = re.compile(r"checkpoint|pretrained|weights|path|file|url|cache|dir",
                             re.IGNORECASE)
# argument values that name a file, a folder or a download, whatever the argument is called
# (MONAI's HoVerNet takes pretrained_url, Transchex a path_or_repo_id "org/name"): a separator,
# a URL scheme, a home or relative prefix, or the suffix of a weights or archive file
_FILE_VALUE = re.compile(r"[/\\]|://|^~|^\.\.?$|\.(safetensors|pt2?|pth|bin|ckpt|pkl|pickle|npz|"
                         r"h5|hdf5|onnx|json|zip|tar|gz|tgz|yaml|yml)$", re.IGNORECASE)


class Invalid(ValueError):
    """A value that doesn't fit its field; ``str()`` is ``"<field> ... must be ..."``."""


def _whole(value, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise Invalid(f"must be a whole number ({what}), not {_show(value)}")
    if not low <= int(value) <= high:
        raise Invalid(f"must be from {low} to {high} ({what}), not {int(value)}")
    return int(value)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sequence(value) -> list:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise Invalid(f"must be a list, not {_show(value)}")


def _string(value, what: str = "a string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be {what}, not {_show(value)}")
    return value


def _in_channels(value) -> int:
    return _whole(value, 1, MAX_CHANNELS, "the model's input channels")


def _input_size(value) -> tuple[int, ...]:
    try:
        sides = _sequence(value)
    except Invalid:
        raise Invalid(f"must be [H, W] (or [D, H, W]) in pixels, not {_show(value)}") from None
    if len(sides) not in (2, 3):
        raise Invalid(f"must be [H, W] (or [D, H, W]) in pixels, not {len(sides)} values")
    size = tuple(_whole(s, 1, MAX_SIDE, "pixels per side; larger inputs exhaust memory")
                 for s in sides)
    if math.prod(size) > MAX_PIXELS:
        raise Invalid(f"must hold at most {MAX_PIXELS} pixels in all (larger inputs exhaust "
                      f"memory), not {math.prod(size)}")
    return size


def _class_names(value) -> list[str]:
    if isinstance(value, str):
        raise Invalid(f"must be a list of names, one per output, not the string {_show(value)}")
    names = _sequence(value)
    if not 1 <= len(names) <= MAX_CLASSES:
        raise Invalid(f"must be a list of 1 to {MAX_CLASSES} names, not {len(names)}")
    for n in names:
        if not isinstance(n, str):
            raise Invalid(f"must hold only strings, not {_show(n)}")
    seen: set[str] = set()
    dupes = sorted({n for n in names if n in seen or seen.add(n)})
    if dupes:
        raise Invalid(f"must name each class once; {', '.join(map(repr, dupes[:5]))} repeat")
    return names


def _numbers(value, positive: bool) -> tuple[float, ...]:
    values = value if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    values = [values] if values is not None else _sequence(value)
    if not 1 <= len(values) <= MAX_CHANNELS:
        raise Invalid(f"must be one number or one per channel, not {len(values)} values")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise Invalid(f"must hold numbers, not {_show(v)}")
        v = float(v)
        if not math.isfinite(v):
            raise Invalid(f"must hold finite numbers, not {v}")
        if positive and v <= 0:
            raise Invalid(f"must hold numbers above 0 (they divide the pixels), not {v}")
        out.append(v)
    return tuple(out)


def _intensity(value) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be one of {', '.join(INTENSITY)}, not {_show(value)}")
    try:
        return normalise_intensity(value)
    except ValueError:
        raise Invalid(f"must be one of {', '.join(INTENSITY)}, not {_show(value)}") from None


def _plain(value, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise Invalid(f"must not nest deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Real):
        if not math.isfinite(float(value)):
            raise Invalid(f"must hold finite numbers, not {value}")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {_key(k): _plain(v, depth + 1) for k, v in value.items()}
    raise Invalid(f"must hold only plain values (numbers, strings, true/false, null, lists, "
                  f"objects), not {_show(value)}")


def _key(k) -> str:
    if not isinstance(k, str):
        raise Invalid(f"must have string keys, not {_show(k)}")
    return k


# how a head's scores become a decision; the aliases are the activations that imply them
OUTPUTS = ("softmax", "multilabel")
_OUTPUT_ALIASES = {"multi-label": "multilabel", "sigmoid": "multilabel", "argmax": "softmax"}


def _output(value) -> str:
    if isinstance(value, str):
        v = value.strip().lower()
        v = _OUTPUT_ALIASES.get(v, v)
        if v in OUTPUTS:
            return v
    raise Invalid(f"must be 'softmax' (one class per image or pixel: the largest score) or "
                  f"'multilabel' (each class on its own: sigmoid > 0.5), not {_show(value)}")


def _arguments(value) -> dict:
    if not isinstance(value, dict):
        raise Invalid(f"must be a JSON object of keyword arguments, not {_show(value)}")
    return _plain(value)


# field -> (check returning the normalised value, what the README says it is)
FIELDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "architecture": (lambda v: _string(v, "an architecture name"),
                     ("torchvision / timm name, 'monai:NetworkClass', 'smp:Unet' "
                      "(segmentation_models_pytorch) or 'package.module:factory'")),
    "weights": (lambda v: _string(v, "a file name (relative to the JSON)"),
                "weights file, relative to the JSON (when the JSON itself is opened)"),
    "arguments": (_arguments, "keyword arguments for the architecture's factory"),
    "class_names": (_class_names, "one name per output"),
    "in_channels": (_in_channels, "input channels"),
    "input_size": (_input_size, ("[H, W] (3D models: [D, H, W]) the model needs (images "
                                 "are resized to it), or null")),
    "mean": (lambda v: _numbers(v, positive=False),
             "per-channel mean subtracted after intensity scaling"),
    "std": (lambda v: _numbers(v, positive=True), "per-channel std divided by"),
    "target_layer": (lambda v: _string(v, "a layer name (dotted, e.g. 'layer4')"),
                     "default layer to explain (dotted name)"),
    "intensity": (_intensity, f"how pixels become [0, 1]: {', '.join(INTENSITY)}"),
    "name": (lambda v: _string(v, "a display name"), "display name"),
    "output": (_output, ("how the scores become a decision: 'softmax' (one class per image or "
                         "pixel) or 'multilabel' (each class on its own, sigmoid > 0.5); "
                         "default: multilabel for one output, else softmax")),
}


def check_value(field: str, value, where: str) -> Any:
    """``value`` normalised for ``field``; ValueError naming ``where``, the field and what it
    must be. None means "not given" and passes through."""
    if value is None:
        return None
    try:
        return FIELDS[field][0](value)
    except Invalid as err:
        raise ValueError(f"{where}: {field} {err}.") from None


def check_fields(values: dict, where: str) -> dict:
    """Every known field of ``values`` checked and normalised (unknown fields are the caller's
    business)."""
    return {k: check_value(k, v, where) if k in FIELDS else v for k, v in values.items()}


def _names_file(value) -> bool:
    if isinstance(value, str):
        return bool(_FILE_VALUE.search(value.strip()))
    if isinstance(value, (list, tuple)):
        return any(_names_file(v) for v in value)
    if isinstance(value, dict):
        return any(_FILE_ARGUMENTS.search(str(k)) or _names_file(v) for k, v in value.items())
    return False


# (argument, value) pairs whose name sounds like a download but whose value asks for none:
# segmentation_models_pytorch's encoder_weights=None is its spelling of "random encoder"
_NO_FILE = {("encoder_weights", None)}


def file_argument_names(arguments: dict) -> list[str]:
    """Factory arguments that would make a factory load another file: by their name
    (``checkpoint_path``, ``pretrained``) or by a value that names a file, a folder or a URL,
    also inside nested lists and objects."""
    return sorted(k for k, v in arguments.items()
                  if (_FILE_ARGUMENTS.search(k) and not _no_file(k, v)) or _names_file(v))


def _no_file(key: str, value) -> bool:
    return any(key == k and value is v for k, v in _NO_FILE)
