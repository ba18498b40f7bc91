"""``load_model``: the models users have, loaded safely.

Sources: ``"demo"``; an ``nn.Module``; a :class:`ModelSpec`; a torchvision or timm architecture
name, a MONAI network (``"monai:DenseNet121"``), a segmentation_models_pytorch architecture
(``"smp:Unet"``) or ``"package.module:factory"`` plus a weights file; a weights file (or its
sidecar JSON) alone, the sidecar naming the architecture; a ``torch.export`` program (``.pt2``).

Model files are untrusted input, and nothing in them runs unless the user passes
``trust_code=True`` (CLI ``--trust-code``, the widget's 'trust code in model files'):

- state dicts load with ``torch.load(weights_only=True)`` or safetensors; a file holding pickled
  Python objects (a whole ``torch.save(model)``) is refused;
- a sidecar may name only architectures of the known families (:data:`KNOWN_FAMILIES`); a
  ``"package.module:factory"`` in a file is refused before anything is imported, while the same
  string typed by the user as ``source`` is the user's own code and stays allowed;
- a ``.pt2`` archive is inspected (``_pt2``) before ``torch.export.load``, which would unpickle
  some of its members and evaluate its shape expressions;
- sidecar values and the keywords of ``load_model`` are checked against one table (``schema``)
  before any model is built.

TorchScript archives are refused: their layers can't be hooked from Python. Files that are not
regular files (folders, devices, pipes) are refused before anything is read from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import json
import logging
import os
import pickle
import pickletools
import re
import socket
import stat
import threading
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _optional, _pt2
from .schema import FIELDS, MAX_SIDECAR_BYTES, check_fields, file_argument_names
from .spec import ModelSpec, check_input_size, first_conv, normalise_intensity, refuse_torchscript

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pt2")
SIDECAR_FIELDS = {name: what for name, (_check, what) in FIELDS.items()}
# architecture families a model file may name without trust_code: building them runs only the
# library's own constructors (add a model-zoo family here once build_architecture knows it)
KNOWN_FAMILIES = ("torchvision", "timm", "monai", "smp")
# segmentation_models_pytorch: its import name and the extra that installs it
SMP = "segmentation_models_pytorch"
SMP_INSTALL = "pip install 'napari-gradcam[segmentation]' (segmentation-models-pytorch)"
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "params")
_PREFIXES = ("module.", "model.", "_orig_mod.", "net.")


# ---- files ---------------------------------------------------------------------------------------

def find_sidecar(weights: Path) -> Path | None:
    """``<weights>.json``, ``<weights stem>.json`` or ``model.json`` beside the weights."""
    for candidate in (weights.with_name(weights.name + ".json"), weights.with_suffix(".json"),
                      weights.with_name("model.json")):
        if candidate.is_file() and candidate != weights:
            return candidate
    return None


def _regular_file(path: Path, what: str) -> int:
    """The size of ``path``; ValueError unless it is a regular file (a folder, device or pipe
    would block or never end when read)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist.") from None
    except OSError as err:
        raise ValueError(f"can't open {what} {str(path)!r}: {err.strerror}.") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else (
            "a pipe" if stat.S_ISFIFO(info.st_mode) else "a device or socket")
        raise ValueError(f"{what} {str(path)!r} is not a regular file (it is {kind}); give the "
                         "file itself.")
    return info.st_size


def read_sidecar(path: Path) -> dict:
    """The checked fields of a model description (sidecar JSON)."""
    path = Path(path)
    size = _regular_file(path, "model description")
    if size > MAX_SIDECAR_BYTES:
        raise ValueError(f"model description {str(path)!r} is {size} bytes; a description is "
                         f"at most {MAX_SIDECAR_BYTES} bytes (is it the right file?).")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"can't read the model description {str(path)!r}: "
                         f"{str(err)[:200]}; it must be a JSON object (see the README's "
                         "sidecar example).") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(meta).__name__}; the model "
                         "description must be a JSON object with fields such as "
                         "'architecture' and 'class_names'.")
    unknown = sorted(set(meta) - set(SIDECAR_FIELDS))
    if unknown:
        hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, SIDECAR_FIELDS, 1)[0]!r}?)"
                 if difflib.get_close_matches(k, SIDECAR_FIELDS, 1) else repr(k) for k in unknown]
        raise ValueError(f"{str(path)!r}: unknown field(s) {', '.join(hints)}; the fields are "
                         f"{', '.join(SIDECAR_FIELDS)}.")
    return check_fields(meta, repr(str(path)))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


TRUST_HINT = ("pass trust_code=True (CLI: --trust-code; in the widget: tick 'trust code in "
              "model files')")


def _unsafe_pickle_error(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"{str(path)!r} holds pickled Python objects (a whole model, not just its weights): "
        "loading it would run code stored in the file, so it is refused. If you trust where it "
        f"came from, {TRUST_HINT}; better, save model.state_dict() (or safetensors) and load "
        f"it with the architecture name. ({detail.splitlines()[0][:200]})"
    )


def resolve_trust(trust_code: bool, trust_pickle: bool | None) -> bool:
    """``trust_code``, honouring ``trust_pickle``, its old name (deprecated: it covers more than
    pickles now, since sidecars and ``.pt2`` archives can name code too)."""
    if trust_pickle is None:
        return bool(trust_code)
    if trust_code and not trust_pickle:
        raise TypeError("trust_code=True and trust_pickle=False disagree; trust_pickle is the old "
                        "name of trust_code: give only trust_code.")
    warnings.warn("trust_pickle= is deprecated: use trust_code= (same meaning).",
                  DeprecationWarning, stacklevel=3)
    return bool(trust_pickle)


def _is_json(path: Path, limit: int = 1 << 20) -> bool:
    """Whether a small file parses as JSON text (a sidecar given as weights); random bytes
    that happen to start with a brace are not."""
    if path.stat().st_size > limit:
        return False
    try:
        json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def read_weights(path, trust_code: bool = False, *, trust_pickle: bool | None = None):
    """A state dict (dict of tensors), or a module (torch.export programs; pickled modules only
    when ``trust_code``). Corrupt and truncated files raise ValueError."""
    trust_code = resolve_trust(trust_code, trust_pickle)
    path = Path(path)
    _regular_file(path, "weights file")
    with path.open("rb") as f:
        head = f.read(64)
    if head.lstrip()[:1] in (b"{", b"[") and _is_json(path):
        raise ValueError(f"{str(path)!r} is JSON text, not weights: if it describes the model "
                         "(a sidecar), open it as the model itself, load_model(path), and let "
                         "its 'weights' field name the weights file.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"can't read {str(path)!r}: it is not a complete safetensors file "
                             f"(truncated or corrupt?): {err}") from None
    if suffix == ".pt2":
        return _read_export(path, trust_code)
    if _is_torchscript(path):
        raise ValueError(
            f"{str(path)!r} is a TorchScript archive: its layers can't be hooked from Python, so "
            "CAM can't read them. Use a state dict (.pt/.pth with weights_only, or "
            ".safetensors) with the architecture name, or a torch.export program (.pt2)."
        )
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a pickle
        raise ValueError(f"{str(path)!r} is not a PyTorch file (corrupt or another format): "
                         "give a state dict saved with torch.save, or a .safetensors file.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if not _names_objects(path):
            raise _corrupt(path, text) from None
        if not trust_code:
            raise _unsafe_pickle_error(path, text) from None
        obj = _load_trusted(path)
    except Exception as err:  # noqa: BLE001 - truncated files fail in many ways
        raise _corrupt(path, str(err)) from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        return _state_dict(obj, path)
    raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not model weights (a state "
                     "dict of tensors) or a model.")


_OBJECT_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _names_objects(path: Path) -> bool:
    """Whether the pickle in ``path`` (a bare pickle, or torch.save's zip) parses completely and
    builds Python objects: only then is trusting the file an answer, rather than bytes that are
    no pickle at all. Parsed with pickletools, which runs nothing."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                data = z.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
        ops = {op.name for op, _arg, _pos in pickletools.genops(data)}
    except Exception:  # noqa: BLE001 - anything that doesn't parse is not a pickle
        return False
    return bool(ops & _OBJECT_OPCODES)


def _read_export(path: Path, trust_code: bool) -> nn.Module:
    """A torch.export program, inspected first: torch.export.load unpickles parts of it."""
    if not trust_code:
        try:
            _pt2.check_pt2(path)
        except _pt2.Unsafe as err:
            raise ValueError(
                f"{str(path)!r} is a torch.export archive that would run code stored in it when "
                f"loaded ({err}), so it is refused. If you trust where it came from, "
                f"{TRUST_HINT}; better, export it again with plain tensors.") from None
        except _pt2.Corrupt as err:
            raise ValueError(f"can't read {str(path)!r} as a torch.export program (truncated "
                             f"or corrupt?): {err}.") from None
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001 - any failure means an unreadable file
        first = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(f"can't read {str(path)!r} as a torch.export program (truncated "
                         f"or corrupt, or saved by another PyTorch?): {first}") from None
    return _from_export(program)


def _corrupt(path: Path, detail: str) -> ValueError:
    first = (detail.splitlines() or [""])[0][:200]
    return ValueError(f"can't read {str(path)!r}: it is not a complete PyTorch file "
                      f"(truncated or corrupt?); save it again with torch.save(model."
                      f"state_dict()): {first}")


def _load_trusted(path: Path):
    log.warning("loading pickled objects from %s: trust_code=True", path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - the file is the user's
        raise ValueError(f"can't unpickle {str(path)!r}: {err}") from None


def _state_dict(obj: dict, path) -> dict:
    """The tensors of a state dict, unwrapped from checkpoint dicts ({"state_dict": ...})."""
    for key in _STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{str(path)!r} holds a dict without tensors (keys: "
                         f"{', '.join(map(str, list(obj)[:8]))}); save model.state_dict().")
    return tensors


def _from_export(program) -> nn.Module:
    """A torch.export program as a module whose submodules can be hooked."""
    module = torch.export.unflatten(program)
    module.extra_spec = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user = [n for n in placeholders if n.name in program.graph_signature.user_inputs]
    val = user[0].meta.get("val") if user else None
    if val is not None and hasattr(val, "shape"):
        shape = [s if isinstance(s, int) else None for s in val.shape]
        if len(shape) >= 4:
            if shape[0] is not None:
                module.extra_spec["fixed_batch"] = shape[0]
            if all(s is not None for s in shape[2:]):
                module.extra_spec["input_size"] = tuple(shape[2:])
            if shape[1] is not None:
                module.extra_spec["in_channels"] = shape[1]
    return module


# ---- architectures -------------------------------------------------------------------------------

def _import_optional(name: str, what: str, install: str | None = None):
    try:
        return _optional.import_library(name)
    except ImportError:
        raise ValueError(f"{what} needs the optional package {name!r}, which is not installed: "
                         f"{install or 'pip install ' + name}.") from None


def _known_names(monai: bool = False) -> list[str]:
    """Architecture names for suggestions; MONAI's only when asked for (``monai``), since
    importing it takes seconds and it is needed only for ``"monai:"`` names."""
    names = [f"monai:{n}" for n in _monai_names()] if monai else []
    names += [f"smp:{n}" for n in _smp_names()]
    try:
        torchvision = _optional.import_library("torchvision")

        names += list(torchvision.models.list_models())
    except ImportError:
        pass
    try:
        timm = _optional.import_library("timm")

        names += [f"timm:{n}" for n in timm.list_models()]
    except ImportError:
        pass
    return names


def build_architecture(arch: str, num_classes: int | None = None,
                       in_channels: int | None = None, arguments: dict | None = None
                       ) -> tuple[nn.Module, dict]:
    """Instantiate ``arch`` (no pretrained weights). Returns (module, defaults) where defaults
    may hold mean / std / input_size known for that family.

    ``"package.module:factory"`` calls the user's factory; ``"torchvision:name"`` and
    ``"timm:name"`` need that library; a plain name is looked up in torchvision, then timm.
    ``"monai:Name"`` builds a network class of ``monai.networks.nets`` (see :func:`_from_monai`);
    ``"smp:Name"`` a segmentation_models_pytorch architecture (see :func:`_from_smp`).
    """
    arguments = dict(arguments or {})
    if _is_factory(arch):
        return _from_factory(arch, arguments), {}
    family, _, name = arch.rpartition(":")
    if family == "monai":
        _import_optional("monai", f"architecture {arch!r}")
        nets = _optional.import_library("monai.networks.nets")
        with _offline(arch):
            return _from_monai(nets, name, num_classes, in_channels, arguments), {}
    if family == "smp":
        smp = _import_optional(SMP, f"architecture {arch!r}", SMP_INSTALL)
        builder, arguments, defaults = _smp_arguments(smp, name, arguments)
        if num_classes is not None:
            arguments.setdefault("classes", int(num_classes))
        if in_channels is not None:
            arguments.setdefault("in_channels", int(in_channels))
        with _offline(arch):
            return _from_smp(builder, arch, arguments, defaults)
    for library, builder in (("torchvision", _from_torchvision), ("timm", _from_timm)):
        if family not in ("", library):
            continue
        if family:  # named explicitly: the library must be there
            lib = _import_optional(library, f"architecture {arch!r}")
        else:
            try:
                lib = _optional.import_library(library)
            except ImportError:
                continue
        with _offline(arch):
            built = builder(lib, name, num_classes, in_channels, arguments)
        if built is not None:
            return built
    raise _unknown(arch)


class _Offline:
    """Which threads are building a named architecture right now (see :func:`_offline`)."""

    lock = threading.Lock()
    threads: dict = {}  # thread id -> the architecture being built
    saved: dict = {}


class _DownloadRefused(ValueError):
    """A named architecture tried to fetch files while being built."""


def _refuse_download(*_args, **_kwargs):
    arch = _Offline.threads.get(threading.get_ident())
    raise _DownloadRefused(f"{arch} tried to download files while being built (its arguments "
                           "or defaults ask for pretrained weights); the weights come from the "
                           "weights file: drop the argument that asks for them, or build the "
                           "model in your own code and pass the module.")


def _guarded(original):
    def call(*args, **kwargs):
        if threading.get_ident() in _Offline.threads:
            _refuse_download()
        return original(*args, **kwargs)
    return call


def _patch_targets() -> list:
    """(module, attribute) pairs through which named architectures fetch files: torch.hub
    (torchvision's and timm's pretrained weights, also when torchvision bound the function at
    import) and, for anything else, opening a network connection."""
    import sys

    targets = [(torch.hub, "load_state_dict_from_url"), (torch.hub, "download_url_to_file"),
               (socket.socket, "connect")]
    api = sys.modules.get("torchvision.models._api")
    if api is not None and hasattr(api, "load_state_dict_from_url"):
        targets.append((api, "load_state_dict_from_url"))
    return targets


@contextlib.contextmanager
def _offline(arch: str):
    """Building a named architecture (from a model file or a name the user typed) never
    fetches anything: a builder whose arguments or defaults ask for pretrained weights (a
    torchvision detection backbone behind MONAI's TorchVisionFCModel, say) fails with a
    sentence instead of downloading. Only the building thread is refused; others (a viewer's
    own connections) go on, and the originals are restored when the last build ends."""
    me = threading.get_ident()
    with _Offline.lock:
        if not _Offline.threads:
            for owner, name in _patch_targets():
                original = getattr(owner, name)
                _Offline.saved[(owner, name)] = original
                setattr(owner, name, _guarded(original))
        _Offline.threads[me] = arch
    try:
        yield
    finally:
        with _Offline.lock:
            _Offline.threads.pop(me, None)
            if not _Offline.threads:
                for (owner, name), original in _Offline.saved.items():
                    setattr(owner, name, original)
                _Offline.saved.clear()


def _from_factory(arch: str, arguments: dict) -> nn.Module:
    module_name, _, factory = arch.partition(":")
    try:
        mod = _optional.import_library(module_name)
    except ImportError as err:
        raise ValueError(f"can't import {module_name!r} for architecture {arch!r}: {err}; "
                         "install the package that defines it.") from None
    fn = getattr(mod, factory, None)
    if fn is None or not callable(fn):
        raise ValueError(f"{module_name!r} has no callable {factory!r}; give "
                         "'package.module:factory' naming a function or class that "
                         "returns the model.")
    model = fn(**arguments)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{arch} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _from_torchvision(torchvision, name, num_classes, in_channels, arguments):
    """A torchvision builder with ImageNet normalisation, or None when it has no such model."""
    if name not in torchvision.models.list_models():
        return None
    if num_classes is not None:
        arguments.setdefault("num_classes", num_classes)
    model = torchvision.models.get_model(name, weights=None, **arguments)
    if in_channels is not None:
        _adapt_first_conv(model, in_channels)
    defaults = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if getattr(model, "image_size", None):  # ViTs: a fixed input size
        defaults["input_size"] = (int(model.image_size),) * 2
    return model, defaults


def _from_timm(timm, name, num_classes, in_channels, arguments):
    """A timm model with its own normalisation (and fixed input size, where it has one), or
    None when timm has no such model."""
    if not timm.is_model(name):
        return None
    if num_classes is not None:
        arguments.setdefault("num_classes", num_classes)
    if in_channels is not None:
        arguments.setdefault("in_chans", in_channels)
    model = timm.create_model(name, pretrained=False, **arguments)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    defaults = {k: tuple(cfg[k]) for k in ("mean", "std") if cfg.get(k)}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        defaults["input_size"] = tuple(cfg["input_size"][1:])
    return model, defaults


# MONAI's networks name their shapes differently: the first name a network takes is used
_MONAI_CLASS_ARGS = ("out_channels", "num_classes")
_MONAI_INPUT_ARGS = ("in_channels", "n_input_channels")
_MONAI_FUNCTIONS = re.compile(r"resnet\d+")  # resnet18 ...: ResNet with a depth's blocks
# arguments that make a MONAI network fetch weights when true (pretrained, pretrained_url,
# TorchVisionFCModel's weights, Transchex's path_or_repo_id / filename); use_checkpoint and
# the like are gradient checkpointing and stay allowed
_MONAI_FETCH_ARGS = re.compile(r"^pretrained|^weights|url|repo|file", re.IGNORECASE)
# networks that download while being built whatever their arguments say (Transchex loads BERT;
# MONAI releases before its path_or_repo_id argument hid the download inside)
_MONAI_FETCHING = ("Transchex",)


def _monai_network(nets, name: str):
    """``(builder, parameters)`` for ``name`` in ``monai.networks.nets`` (a network class, or
    one of the ResNet depth functions), else None: a name in a model file reaches nothing
    else of MONAI (its helper functions download weights)."""
    obj = None if name.startswith("_") else getattr(nets, name, None)
    if inspect.isclass(obj) and issubclass(obj, nn.Module):
        return obj, dict(inspect.signature(obj).parameters)
    if inspect.isfunction(obj) and _MONAI_FUNCTIONS.fullmatch(name):
        return obj, {**inspect.signature(nets.ResNet).parameters,
                     **inspect.signature(obj).parameters}
    return None


def _monai_names() -> list[str]:
    """The names ``"monai:"`` accepts ([] without MONAI)."""
    try:
        nets = _optional.import_library("monai.networks.nets")
    except ImportError:
        return []
    return [n for n in dir(nets) if _monai_network(nets, n) is not None]


def _monai_example(params) -> str:
    shapes = {"spatial_dims": 3}
    for names, value in ((_MONAI_INPUT_ARGS, 1), (_MONAI_CLASS_ARGS, 2)):
        key = next((k for k in names if k in params), None)
        if key:
            shapes[key] = value
    return json.dumps(shapes)


def _from_monai(nets, name: str, num_classes, in_channels, arguments: dict) -> nn.Module:
    """A network of ``monai.networks.nets`` built from ``arguments`` (``spatial_dims``,
    ``in_channels``, ``out_channels`` ...); ``num_classes`` / ``in_channels`` fill the
    network's own argument for them (``out_channels`` or ``num_classes``; ``in_channels`` or
    ``n_input_channels``) unless ``arguments`` give it. Nothing is downloaded: ``pretrained``
    is False (EfficientNetBN defaults to True), a true one is refused, and networks whose
    defaults fetch files are refused."""
    found = _monai_network(nets, name)
    if found is None:
        raise _unknown(f"monai:{name}")
    builder, params = found
    fetching = [f"{k}={p.default!r}" for k, p in params.items() if k != "pretrained"
                and isinstance(p.default, str) and p.default
                and re.search(r"path|file|url|repo|dir", k, re.IGNORECASE)]
    if fetching or builder.__name__ in _MONAI_FETCHING:
        fetching = fetching or ["it loads a pretrained language model"]
        raise ValueError(f"monai:{name} reads or downloads files when it is built "
                         f"({', '.join(fetching)}), so it can't be loaded by name; build it in "
                         "your own code and pass the module: load_model(module, weights=...).")
    asked = [k for k, v in arguments.items() if _MONAI_FETCH_ARGS.search(k) and v]
    if asked:
        raise ValueError(f"monai:{name}: {', '.join(asked)} would download weights or read "
                         "them from another file; the weights come from the weights file: "
                         "leave it out (or set it to false).")
    arguments = dict(arguments)
    if "pretrained" in params:
        arguments.setdefault("pretrained", False)
    for names, value in ((_MONAI_CLASS_ARGS, num_classes), (_MONAI_INPUT_ARGS, in_channels)):
        key = next((k for k in names if k in params), None)
        if key and value is not None:
            arguments.setdefault(key, int(value))
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in arguments if k not in params and not takes_any]
    if unknown:
        close = {k: difflib.get_close_matches(k, params, 1) for k in unknown}
        hints = [f"{k!r} (did you mean {close[k][0]!r}?)" if close[k] else repr(k)
                 for k in unknown]
        raise ValueError(f"monai:{name} takes no argument {', '.join(hints)}; its arguments "
                         f"are {', '.join(k for k in params if k not in ('args', 'kwargs'))}.")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in arguments
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and not inspect.isfunction(builder)]
    if missing:
        raise ValueError(f"monai:{name} needs the argument(s) {', '.join(missing)}: give them "
                         f"in arguments (e.g. {_monai_example(params)}, as the network was "
                         "trained).")
    try:
        model = builder(**arguments)
    except Exception as err:  # noqa: BLE001 - MONAI checks its arguments in many ways
        first = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(f"can't build monai:{name} with arguments {json.dumps(arguments)}: "
                         f"{type(err).__name__}: {first}; give the arguments the network was "
                         "trained with.") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"monai:{name} returned a {type(model).__name__}, not a network.")
    return model


def _weights_spatial_dims(state: dict) -> int | None:
    """2 or 3 when the weights' convolution kernels (4-D or 5-D tensors) are all of one rank."""
    ranks = {t.ndim for t in state.values() if isinstance(t, torch.Tensor) and t.ndim in (4, 5)}
    return ranks.pop() - 2 if len(ranks) == 1 else None


# smp's activation argument turns the logits into probabilities inside the model; the
# explanation wants the logits, so it is left out and says how the scores are read instead
_SMP_ACTIVATIONS = {None: None, "identity": None, "sigmoid": "multilabel",
                    "softmax": "softmax", "softmax2d": "softmax"}


def _smp_architectures(smp) -> dict[str, type]:
    """segmentation_models_pytorch's architecture classes by class name (``Unet``, ``FPN``)."""
    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def _smp_names() -> list[str]:
    """The names ``"smp:"`` accepts ([] without segmentation_models_pytorch)."""
    try:
        return sorted(_smp_architectures(_optional.import_library(SMP)))
    except ImportError:
        return []


def _smp_arguments(smp, name: str, arguments: dict) -> tuple[type, dict, dict]:
    """(architecture class, arguments to build it with, defaults) for ``"smp:<name>"``, every
    argument checked before anything is built: the encoder is always built without
    pretrained weights (``encoder_weights=None``; a named one would be downloaded), arguments
    that name files or downloads are refused, and so are unknown encoders and arguments."""
    classes = _smp_architectures(smp)
    cls = classes.get(name) or next((c for n, c in classes.items() if n.lower() == name.lower()),
                                    None)
    if cls is None:
        raise _unknown(f"smp:{name}")
    arch = f"smp:{cls.__name__}"
    risky = file_argument_names(arguments)
    if risky:
        raise ValueError(
            f"{arch}: {', '.join(f'{k}={arguments[k]!r}' for k in risky)} would download "
            "weights or read another file; the weights come from the weights file (the encoder "
            "is built without pretrained weights): leave "
            f"{'it' if len(risky) == 1 else 'them'} out.")
    arguments = dict(arguments)
    defaults: dict = {}
    activation = arguments.pop("activation", None)
    key = activation.lower() if isinstance(activation, str) else activation
    if key not in _SMP_ACTIVATIONS:
        raise ValueError(f"{arch}: activation={activation!r} would change the scores that are "
                         "explained; leave it out (explanations use the logits) and say how "
                         "they are read with output='softmax' or output='multilabel'.")
    if _SMP_ACTIVATIONS[key]:
        defaults["output"] = _SMP_ACTIVATIONS[key]
    params = inspect.signature(cls).parameters
    encoder = arguments.get("encoder_name", params["encoder_name"].default)
    _check_smp_encoder(smp, arch, encoder)
    if not encoder.startswith("tu-"):  # timm encoders take timm's keywords as well
        unknown = [k for k in arguments if k not in params]
        if unknown:
            hints = [f"{k!r} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(
                k, params, 1)) else repr(k) for k in unknown]
            raise ValueError(f"{arch} takes no argument {', '.join(hints)}; its arguments are "
                             f"{', '.join(k for k in params if k != 'kwargs')}.")
    arguments["encoder_weights"] = None
    return cls, arguments, defaults


def _check_smp_encoder(smp, arch: str, encoder) -> None:
    """An encoder smp knows (``resnet18``), or ``tu-<timm model>``; close names otherwise."""
    if not isinstance(encoder, str) or not encoder:
        raise ValueError(f"{arch}: encoder_name must be an encoder's name such as 'resnet34', "
                         f"not {encoder!r}.")
    known = list(smp.encoders.encoders)
    if encoder in known:
        return
    if encoder.startswith("tu-"):
        timm = _import_optional("timm", f"encoder {encoder!r}")
        if timm.is_model(encoder[3:]):
            return
        close = difflib.get_close_matches(encoder[3:], timm.list_models(), n=3, cutoff=0.6)
        close = [f"tu-{c}" for c in close]
    else:
        close = difflib.get_close_matches(encoder, known, n=3, cutoff=0.6)
    hint = (f"did you mean {', '.join(map(repr, close))}?" if close else
            f"give one of smp's encoders ({', '.join(known[:6])}, ...) or 'tu-' and a timm "
            "model name.")
    raise ValueError(f"{arch}: unknown encoder_name {encoder!r}; {hint}")


def _from_smp(builder: type, arch: str, arguments: dict, defaults: dict
              ) -> tuple[nn.Module, dict]:
    """A segmentation_models_pytorch model from checked arguments (:func:`_smp_arguments`),
    with the normalisation its encoder was pretrained with (timm's for ``tu-`` encoders,
    ImageNet's for smp's own ImageNet encoders); the weights file holds the trained ones."""
    try:
        model = builder(**arguments)
    except _DownloadRefused:
        raise
    except Exception as err:  # noqa: BLE001 - smp and timm check their arguments in many ways
        first = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(f"can't build {arch} with arguments {json.dumps(arguments)}: "
                         f"{type(err).__name__}: {first}; give the arguments the network was "
                         "trained with.") from None
    defaults = dict(defaults)
    cfg = getattr(getattr(model.encoder, "model", None), "pretrained_cfg", None) or {}
    settings = getattr(_optional.import_library(SMP).encoders, "encoders", {}).get(
        arguments.get("encoder_name"), {}).get("pretrained_settings", {})
    if cfg.get("mean") and cfg.get("std"):
        defaults["mean"], defaults["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    elif "imagenet" in settings:
        defaults["mean"], defaults["std"] = IMAGENET_MEAN, IMAGENET_STD
    return model, defaults


def _unknown(arch: str) -> ValueError:
    family, _, name = arch.partition(":")
    if family == "smp":
        known = _smp_names()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5) or [
            k for k in known if name.lower() in k.lower()]
        hint = (f"did you mean {', '.join(repr('smp:' + c) for c in close)}?" if close
                else f"its architectures are {', '.join(known)}.")
        return ValueError(f"unknown architecture {arch!r}: segmentation_models_pytorch has no "
                          f"architecture {name!r}; {hint}")
    if family == "monai":
        known = _monai_names()
        same = [k for k in known if k.lower() == name.lower()]
        close = same or difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = (f" Did you mean {', '.join(repr('monai:' + c) for c in close)}?" if close
                else " Give a network class name of monai.networks.nets, e.g. "
                     "'monai:DenseNet121'.")
        return ValueError(f"unknown architecture {arch!r}: monai.networks.nets has no network "
                          f"class {name!r}.{hint}")
    known = _known_names()
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    sources = "torchvision" + (" and timm" if any(k.startswith("timm:") for k in known) else
                               " (install timm for its models)")
    return ValueError(f"unknown architecture {arch!r}: not a {sources} model name nor "
                      f"'package.module:factory'.{hint}")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)


def _head(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    """The layer whose outputs are the model's classes: smp's ``segmentation_head`` (looked
    up by name since an auxiliary classifier may follow it), else the last Linear registered
    (a classifier's head, wherever its ``__init__`` happens to register it, e.g. before the
    convolutions), else the last convolution (SqueezeNet-like 1x1 heads, fully convolutional
    segmentation networks such as MONAI's UNet)."""
    seg = getattr(model, "segmentation_head", None)
    root = seg if isinstance(seg, nn.Module) else model
    linear = conv = (None, None)
    for name, m in root.named_modules():
        if isinstance(m, nn.Linear):
            linear = (name, m)
        elif isinstance(m, _CONVS):
            conv = (name, m)
    found = conv if (isinstance(seg, nn.Module) and conv[0] is not None) or linear[0] is None \
        else linear
    if found[0] is not None and isinstance(seg, nn.Module):
        found = (f"segmentation_head.{found[0]}".rstrip("."), found[1])
    return found


def _outputs(layer: nn.Module | None, weight: torch.Tensor | None = None) -> int | None:
    """How many outputs ``layer`` makes (from ``weight``, the weights file's tensor for it,
    when given): a Linear's and a convolution's weight is (out, in, ...), a transposed
    convolution's (in, out / groups, ...)."""
    if layer is None:
        return None
    if weight is None:
        return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)
    shape = tuple(weight.shape)
    if len(shape) < 2:
        return None
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return int(shape[1]) * layer.groups
    return int(shape[0])


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first convolution by one taking ``in_channels`` (same geometry)."""
    name, conv = first_conv(model)
    if conv is None or conv.in_channels == in_channels:
        return
    new = type(conv)(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, conv.groups if conv.groups == 1 else 1,
                     conv.bias is not None, conv.padding_mode)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _shapes_from_weights(model: nn.Module, state: dict) -> tuple[int | None, int | None]:
    """(num_classes, in_channels) that the weights say, from the architecture's head (its last
    Linear, or a segmentation network's last convolution) and first convolution."""
    state = _match_prefix(state, model)
    head_name, head = _head(model)
    conv_name, _conv = first_conv(model)
    classes = state.get(f"{head_name}.weight") if head_name else None
    conv = state.get(f"{conv_name}.weight") if conv_name else None
    return (_outputs(head, classes) if classes is not None else None,
            int(conv.shape[1]) if conv is not None and conv.ndim > 1 else None)


def _match_prefix(state: dict, model: nn.Module) -> dict:
    """Strip a wrapper prefix ('module.', 'model.', '_orig_mod.') when that makes keys match."""
    own = set(model.state_dict())
    for _ in range(2):
        if set(state) & own:
            break
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                break
        else:
            break
    return state


def load_weights(model: nn.Module, state: dict, label: str) -> None:
    """``load_state_dict`` with an error that lists what doesn't fit."""
    state = _match_prefix(state, model)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
             if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("wrong shapes (file vs model)", wrong)):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                parts.append(f"{title}: {', '.join(items[:5])}{more}")
        raise ValueError(f"the weights don't fit {label}: {'; '.join(parts)}. Check the "
                         "architecture name (and its arguments) the weights were trained with.")
    model.load_state_dict(state, strict=False)


# ---- the entry point ---------------------------------------------------------------------------

def _spec_from_module(module: nn.Module, name: str) -> ModelSpec:
    _head_name, head = _head(module)
    _conv_name, conv = first_conv(module)
    extra = dict(getattr(module, "extra_spec", {}) or {})
    n = _outputs(head)
    spec = ModelSpec(module.eval(), [f"class {i}" for i in range(n or 0)],
                     extra.pop("in_channels", conv.in_channels if conv is not None else 1),
                     extra.pop("input_size", None), name=name)
    spec.extra.update(extra)
    return spec


def load_model(
    source,
    *,
    weights=None,
    arguments: dict | None = None,
    class_names: Sequence[str] | None = None,
    in_channels: int | None = None,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    target_layer: str | None = None,
    trust_code: bool = False,
    intensity: str | None = None,
    name: str | None = None,
    trust_pickle: bool | None = None,
    output: str | None = None,
) -> ModelSpec:
    """A :class:`ModelSpec`: the model in eval mode plus its class names and preprocessing.

    ``source``:

    - ``"demo"``: the bundled synthetic-shapes model (offline);
    - ``"demo3d"``: the bundled 3D model (spheres, cubes, cones in grey volumes; offline);
    - an ``nn.Module`` (``weights=`` optionally loaded into it) or a ``ModelSpec``;
    - an architecture name with ``weights=``: torchvision (``"resnet18"``, ``"densenet121"``,
      ``"torchvision:efficientnet_b0"``), timm (``"timm:convnext_tiny"``, or a plain name
      torchvision doesn't have), a MONAI network class (``"monai:DenseNet121"``, needs the
      optional ``monai`` package), a segmentation_models_pytorch architecture (``"smp:Unet"``
      with ``arguments={"encoder_name": "resnet34"}``, needs the ``segmentation`` extra; the
      encoder is built without pretrained weights) or ``"package.module:factory"``; the number
      of classes and input channels are read from the weights (the last Linear of a
      classifier, the last convolution of a segmentation network; MONAI's ``spatial_dims``
      too);
    - a weights file (``.safetensors``, ``.pt`` / ``.pth`` state dict, ``.pt2`` torch.export
      program) whose sidecar JSON (``<weights>.json`` or ``model.json`` beside it) names the
      architecture, or that sidecar JSON itself (its ``weights`` field names the file).

    ``arguments``: keyword arguments for the architecture (e.g. ``{"spatial_dims": 3,
    "in_channels": 1, "out_channels": 2}`` for MONAI), over a sidecar's ``arguments``.

    ``output``: how the scores become a decision, ``"softmax"`` (one class per image or pixel)
    or ``"multilabel"`` (each class on its own, sigmoid > 0.5); None decides from the head
    (one output: multilabel, several: softmax). An smp ``activation`` sets it too.

    Keywords override the source and its sidecar. ``trust_code=True`` allows what would run
    code stored in a file: pickled modules, pickled payloads in ``.pt2`` archives, and a
    ``"package.module:factory"`` architecture named by a sidecar. ``trust_pickle`` is its old,
    deprecated name.
    """
    trust_code = resolve_trust(trust_code, trust_pickle)
    # the same rules as a sidecar's fields, checked before anything is loaded
    keywords = check_fields({"class_names": class_names, "in_channels": in_channels,
                             "input_size": input_size, "mean": mean, "std": std,
                             "target_layer": target_layer, "intensity": intensity,
                             "name": name, "arguments": arguments, "output": output},
                            "load_model")
    in_channels = keywords["in_channels"]
    arguments = keywords.pop("arguments")
    if arguments and (not isinstance(source, (str, Path))
                                  or str(source).lower() in ("demo", "demo3d")):
        raise ValueError("arguments= is for building an architecture: give it with an "
                         "architecture name (load_model('monai:DenseNet121', weights=..., "
                         "arguments={...})) or a model file whose description names one.")
    sidecar: dict = {}
    spec: ModelSpec | None = None
    if isinstance(source, ModelSpec):
        spec = dataclasses.replace(source, extra=dict(source.extra))
    elif isinstance(source, nn.Module):
        refuse_torchscript(source)
        if weights is not None:
            load_weights(source, _weights_dict(weights, trust_code), type(source).__name__)
        spec = _spec_from_module(source, type(source).__name__)
    elif isinstance(source, (str, Path)) and str(source).lower() == "demo":
        from . import demo_spec

        spec = demo_spec()
    elif isinstance(source, (str, Path)) and str(source).lower() == "demo3d":
        from .demo3d import demo3d_spec

        spec = demo3d_spec()
    elif isinstance(source, (str, Path)) and _looks_like_file(source):
        spec, sidecar = _from_file(Path(source), weights, trust_code, arguments)
    elif isinstance(source, str):
        spec = _from_architecture(source, weights, trust_code, arguments or {}, in_channels)
    else:
        raise TypeError(f"can't load a model from a {type(source).__name__}; give 'demo', an "
                        "architecture name with weights=, a weights or sidecar file, or an "
                        "nn.Module.")
    return _override(spec, sidecar, **keywords)


def _looks_like_file(source) -> bool:
    """A path rather than an architecture name (names never hold a path separator)."""
    path = Path(source)
    return (path.suffix.lower() in (*WEIGHT_SUFFIXES, ".json") or os.path.exists(path)
            or isinstance(source, Path) or any(sep and sep in str(source)
                                               for sep in (os.sep, os.altsep)))


def _weights_dict(weights, trust_code: bool) -> dict:
    if isinstance(weights, dict):
        return weights
    loaded = read_weights(weights, trust_code)
    if not isinstance(loaded, dict):
        raise ValueError(f"{str(weights)!r} holds a whole model, not weights for this "
                         "architecture; load it on its own: load_model(path).")
    return loaded


def _from_file(path: Path, weights, trust_code: bool,
               arguments: dict | None = None) -> tuple[ModelSpec, dict]:
    """The model of a weights or sidecar file; ``arguments`` (the caller's) go over the
    sidecar's."""
    if path.suffix.lower() == ".json":
        sidecar = read_sidecar(path)
        _check_named_code(sidecar, path, trust_code)
        if weights is None:
            if not sidecar.get("weights"):
                raise ValueError(f"{str(path)!r} names no 'weights' file; add one (relative to "
                                 "the JSON) or pass weights=.")
            weights = path.parent / sidecar["weights"]
        weights = Path(weights)
    else:
        if weights is not None:
            raise ValueError("give the weights file once: load_model(path) or "
                             "load_model(architecture, weights=path).")
        weights = path
        found = find_sidecar(path)
        sidecar = read_sidecar(found) if found else {}
        if found:
            _check_named_code(sidecar, found, trust_code)
    label = sidecar.get("name") or weights.stem
    loaded = read_weights(weights, trust_code)
    if isinstance(loaded, nn.Module):
        if arguments:
            raise ValueError(f"{str(weights)!r} holds a whole model, which is not built from "
                             "an architecture: leave arguments= out.")
        spec = _spec_from_module(loaded, label)
    elif sidecar.get("architecture"):
        spec = _from_architecture(sidecar["architecture"], loaded, trust_code,
                                  {**(sidecar.get("arguments") or {}), **(arguments or {})},
                                  sidecar.get("in_channels"))
        spec.name = label
    else:
        raise ValueError(
            f"{str(weights)!r} holds weights but nothing says which architecture they belong "
            f"to: use load_model('resnet18', weights={str(weights)!r}) (the architecture they "
            f"were trained with), or write {weights.name}.json beside it, e.g. "
            '{"architecture": "resnet18", "class_names": ["normal", "tuberculosis"]}.'
        )
    return spec, sidecar


def _is_factory(arch: str) -> bool:
    """``"package.module:factory"``, as opposed to a name of a known family."""
    return ":" in arch and arch.partition(":")[0] not in KNOWN_FAMILIES


def _check_named_code(sidecar: dict, path: Path, trust_code: bool) -> None:
    """A model file may name only known families: a ``package.module:factory`` in it would
    import and call any Python the file names (``subprocess:run``), and factory arguments that
    name files would load them (timm's ``checkpoint_path`` unpickles). Checked before anything
    is imported or read."""
    if trust_code:
        return
    arch = sidecar.get("architecture")
    if arch and _is_factory(arch):
        raise ValueError(
            f"{str(path)!r} names the Python callable {arch!r} as its architecture: building "
            "it would run code chosen by the file, so it is refused. Use a torchvision, timm, "
            "MONAI ('monai:DenseNet121') or segmentation_models_pytorch ('smp:Unet') "
            f"architecture name, or, if you trust the file, {TRUST_HINT}.")
    risky = file_argument_names(sidecar.get("arguments") or {})
    if risky:
        raise ValueError(
            f"{str(path)!r}: arguments {', '.join(map(repr, risky))} would make the "
            "architecture load another file, so they are refused; the weights come from the "
            f"weights file. Remove them, or, if you trust the file, {TRUST_HINT}.")


def _from_architecture(arch: str, weights, trust_code: bool, arguments: dict,
                       in_channels: int | None) -> ModelSpec:
    if weights is None:
        raise ValueError(
            f"{arch!r} without weights= would be a randomly initialised network whose heatmaps "
            "mean nothing (and pretrained weights can't be downloaded here); pass the file "
            f"your model was trained into: load_model({arch!r}, weights='model.safetensors')."
        )
    if arch.partition(":")[0] == "monai":
        params = _monai_parameters(arch)  # name errors first
        state = _weights_dict(weights, trust_code)
        arguments, probe_arguments = _monai_shapes(params, arguments, state)
        probe, _ = build_architecture(arch, arguments=probe_arguments)
    else:
        probe, probe_defaults = build_architecture(arch, arguments=arguments)  # name errors
        state = _weights_dict(weights, trust_code)
    classes, channels = _shapes_from_weights(probe, state)
    if in_channels is not None:
        channels = int(in_channels)
    if _is_factory(arch):  # the user's own factory: its arguments say the shapes
        model, defaults = probe, {}
    elif arch.partition(":")[0] != "monai" and (classes, channels) == (
            _outputs(_head(probe)[1]), getattr(first_conv(probe)[1], "in_channels", None)):
        # the probe already has the weights' shapes: building it again would give the same
        model, defaults = probe, probe_defaults
    else:
        del probe
        model, defaults = build_architecture(arch, classes, channels, arguments)
    load_weights(model, state, repr(arch))
    spec = _spec_from_module(model, arch)
    if defaults.get("mean") and len(defaults["mean"]) == spec.in_channels:
        spec.mean, spec.std = tuple(defaults["mean"]), tuple(defaults["std"])
    if defaults.get("input_size"):
        spec.input_size = tuple(defaults["input_size"])
    spec.output = defaults.get("output", spec.output)
    spec.extra["architecture"] = arch
    return spec


def _monai_parameters(arch: str) -> dict:
    """The constructor parameters of the MONAI network ``arch`` (``"monai:Name"``)."""
    _import_optional("monai", f"architecture {arch!r}")
    found = _monai_network(_optional.import_library("monai.networks.nets"),
                           arch.partition(":")[2])
    if found is None:
        raise _unknown(arch)
    return found[1]


def _monai_shapes(params: dict, arguments: dict, state: dict) -> tuple[dict, dict]:
    """(arguments, probe arguments) for a MONAI network and its weights. MONAI's classifiers
    require ``spatial_dims``, ``in_channels`` and ``out_channels``; what the arguments leave
    open is read from the weights: ``spatial_dims`` from the rank of the convolution kernels
    here, the channels and classes from the probe (a network built with placeholder channels,
    whose first convolution and last Linear say where to look in the weights)."""
    arguments = dict(arguments)
    if "spatial_dims" in params and "spatial_dims" not in arguments:
        dims = _weights_spatial_dims(state)
        if dims:
            arguments["spatial_dims"] = dims
    probe = dict(arguments)
    for names in (_MONAI_CLASS_ARGS, _MONAI_INPUT_ARGS):
        key = next((k for k in names if k in params), None)
        if key:
            probe.setdefault(key, 1)
    return arguments, probe


def _override(spec: ModelSpec, sidecar: dict, **keywords) -> ModelSpec:
    """Sidecar values, then keywords, over what the source said; validated."""
    values: dict[str, Any] = {k: sidecar[k] for k in
                              ("class_names", "in_channels", "input_size", "mean", "std",
                               "target_layer", "intensity", "name", "output")
                              if sidecar.get(k) is not None}
    values.update({k: v for k, v in keywords.items() if v is not None})
    if "class_names" in values:
        spec.class_names = [str(c) for c in values["class_names"]]
    if "in_channels" in values:
        spec.in_channels = int(values["in_channels"])
    if "input_size" in values:
        size = tuple(int(s) for s in values["input_size"])
        if not size or any(s < 1 for s in size):
            raise ValueError(f"input_size={values['input_size']}: give (H, W) in pixels.")
        spec.input_size = size
    check_input_size(spec.module, spec.input_size)
    for key in ("mean", "std"):
        if key in values:
            v = values[key]
            setattr(spec, key, tuple(float(x) for x in (v if isinstance(v, (list, tuple))
                                                        else [v])))
    if any(s == 0 for s in spec.std):
        raise ValueError(f"std={spec.std} has a zero; give the standard deviations used in "
                         "training.")
    if "target_layer" in values:
        spec.target_layer = str(values["target_layer"])
    if "intensity" in values:
        spec.intensity = values["intensity"]
    spec.intensity = normalise_intensity(spec.intensity)
    if "name" in values:
        spec.name = str(values["name"])
    if "output" in values:
        spec.output = values["output"]
    if len(spec.mean) not in (1, spec.in_channels) or len(spec.std) not in (1, spec.in_channels):
        raise ValueError(f"mean has {len(spec.mean)} and std {len(spec.std)} values for a model "
                         f"with {spec.in_channels} input channels; give one value or one per "
                         "channel.")
    _head_name, head = _head(spec.module)
    n = _outputs(head)
    if n is not None and spec.class_names and len(spec.class_names) != n:
        raise ValueError(f"{len(spec.class_names)} class names for a model with {n} outputs; "
                         "give one name per output.")
    if n == 1 and spec.output == "softmax":
        raise ValueError("output='softmax' for a model with one output would predict its only "
                         "class everywhere; use output='multilabel' (sigmoid > 0.5) or leave "
                         "it out.")
    if spec.target_layer:
        try:
            spec.module.get_submodule(spec.target_layer)
        except AttributeError:
            names = [nm for nm, _ in spec.module.named_modules() if nm]
            close = difflib.get_close_matches(spec.target_layer, names, n=5, cutoff=0.5)
            raise ValueError(f"the model has no layer {spec.target_layer!r}"
                             + (f"; did you mean {', '.join(map(repr, close))}?" if close
                                else "; leave target_layer empty to find it automatically.")
                             ) from None
    return spec
