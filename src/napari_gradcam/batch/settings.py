"""What a run is asked to do (:class:`Options`) and what of it changes the results: the
settings recorded in the output folder and carried, as a digest, by every record, so that a
rerun with other settings is refused (or redoes everything) instead of mixing results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Options:
    method: str = "gradcam"
    target: object = None
    threshold: float | str = 0.5
    threshold_mode: str = "absolute"
    min_area: int = 16
    simplify: float = 1.0
    device: str = "auto"
    batch_size: int | None = None
    overlay: bool = False
    volume_overlay: str = "mip"  # how --overlay draws a 3D model's volume: "mip" or "mid"
    overwrite: bool = False
    channel_axis: object = None
    workers: int = 2  # threads for reading and for writing
    prefetch: int = 4  # units read ahead of the engine
    # a segmentation model's predicted labels per unit, under segmentation/
    write_segmentation: bool = False
    # large images and slides explained in tiles: "auto" (the job's rule), None (never) or
    # the tile side in pixels; the overlap between neighbouring tiles; the pyramid level of a
    # slide to explain (None: level 0; a level above 0 fails the inputs that are not pyramids)
    tile: object = "auto"
    overlap: int = 64
    level: int | None = None


_SETTING_NAMES = {
    "model": "--model", "method": "--method", "target": "--target",
    "threshold": "--threshold", "threshold_mode": "--threshold-mode",
    "min_area": "--min-area", "simplify": "--simplify", "mask": "--mask",
    "target_mask": "--target-mask", "write_segmentation": "--write-segmentation",
    "channel_axis": "channel axis", "overlay": "--overlay",
    "volume_overlay": "--volume-overlay",
    "tile": "--tile", "overlap": "--overlap", "level": "--level",
    "model_input": "the model's input (channels, size, normalisation, classes, layer)",
    # the evaluate command's (its folder is held and checked as a batch run's)
    "command": "the command (batch or evaluate)", "metrics": "--metrics", "steps": "--steps",
    "baseline": "--baseline", "seed": "--seed", "annotations": "--annotations",
}


def _plain(value):
    """``value`` as it reads back from JSON (tuples as lists)."""
    return json.loads(json.dumps(value))


def _sha256_files(paths) -> str:
    h = hashlib.sha256()
    for role, path in paths:
        h.update(f"{role}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


_STATE_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _state_digest(module) -> str:
    """sha256 of a module's state dict, kept while no tensor of it changed (same storage, same
    in-place version counter): a script that runs the same model again pays the hash once."""
    import torch

    state = module.state_dict()
    key = tuple((k, v.data_ptr(), v._version, str(v.dtype), tuple(v.shape), str(v.device))
                for k, v in state.items())
    known = _STATE_DIGESTS.get(module)
    if known is not None and known[0] == key:
        return known[1]
    h = hashlib.sha256()
    for name, value in state.items():
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            value = value.float()  # NumPy has no such dtypes
        h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        h.update(value.contiguous().numpy().reshape(-1).view(np.uint8))
    _STATE_DIGESTS[module] = (key, h.hexdigest())
    return h.hexdigest()


def model_fingerprint(model) -> dict:
    """What identifies a model's results, cheaply: for files (a weights file, its sidecar,
    the bundled demo) the sha256 of their contents, whatever path they were given by; for an
    architecture name without a file, the name; for a ``ModelSpec`` the sha256 of its state
    dict. ``model`` is ``load_model``'s arguments as a dict (``{"source": ..., "weights":
    ...}``) or a ``ModelSpec``. Returns ``{"sha256": ..., "label": ...}``; only the hash is
    compared."""
    if not isinstance(model, dict):  # a ModelSpec
        return {"sha256": _state_digest(model.module),
                "label": str(getattr(model, "name", "model"))}
    source, weights = model.get("source"), model.get("weights")
    files, named = [], []
    if str(source).lower() == "demo":
        from ..models import DEMO_DIR

        files = [("weights", DEMO_DIR / "demo.safetensors"),
                 ("sidecar", DEMO_DIR / "demo.safetensors.json")]
    elif Path(str(source)).is_file():
        path = Path(str(source))
        if path.suffix.lower() == ".json":
            files.append(("sidecar", path))
            if weights is None:
                with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                    name = json.loads(path.read_text()).get("weights")
                    weights = path.parent / name if name else None
        else:
            from ..models.loader import find_sidecar

            weights, side = path, find_sidecar(path)
            if side is not None:
                files.append(("sidecar", side))
    else:
        named.append(str(source))
    if weights is not None and Path(weights).is_file():
        files.insert(0, ("weights", Path(weights)))
    h = hashlib.sha256("\0".join(named).encode())
    h.update(_sha256_files(files).encode())
    label = f"{source} + {Path(weights).name}" if named and weights else str(source)
    return {"sha256": h.hexdigest(), "label": label}


def run_settings(opts: Options, model, spec=None, mask: str | None = None,
                 target_mask: str | None = None) -> dict:
    """The settings that change a run's results, as plain JSON values: the model (see
    :func:`model_fingerprint`), method, target, region and mask settings, a segmentation
    model's target mask pattern and label maps, overlays, and what the model is fed
    (channels, input size, normalisation, classes, target layer), the tiling (tile, overlap)
    and the pyramid level. Device, batch size and
    worker counts are left out: they don't change the results. How overlays draw volumes,
    the target mask pattern, the label maps, the tiling and the level are recorded only when
    not the default, so
    that the settings of runs made before those options existed keep their digest. (Each
    target mask file's size and mtime are in its unit's fingerprint, as a mask's are: a
    changed file redoes its input.)"""
    settings = {
        "command": "batch",
        "model": model_fingerprint(model if model is not None else spec),
        "method": opts.method, "target": opts.target,
        "threshold": opts.threshold, "threshold_mode": opts.threshold_mode,
        "min_area": opts.min_area, "simplify": opts.simplify, "mask": mask,
        "channel_axis": opts.channel_axis, "overlay": bool(opts.overlay),
    }
    if opts.overlay and opts.volume_overlay != Options.volume_overlay:
        settings["volume_overlay"] = opts.volume_overlay
    if target_mask is not None:
        settings["target_mask"] = target_mask
    if getattr(opts, "write_segmentation", False):
        settings["write_segmentation"] = True
    # tiling changes the heat (each tile is explained alone, then blended) and the level
    # changes what is explained; recorded only when not the default, so that runs made before
    # these options existed keep their digest
    if getattr(opts, "tile", "auto") != Options.tile:
        settings["tile"] = opts.tile
    if getattr(opts, "overlap", Options.overlap) != Options.overlap:
        settings["overlap"] = opts.overlap
    if getattr(opts, "level", None):
        settings["level"] = opts.level
    if spec is not None:
        settings["model_input"] = {
            "in_channels": spec.in_channels, "input_size": spec.input_size,
            "mean": spec.mean, "std": spec.std, "intensity": spec.intensity,
            "class_names": list(spec.class_names), "target_layer": spec.target_layer}
    return _plain(settings)


def _digest(settings: dict) -> str:
    # a batch run's "command" is left out, so folders of runs made before it was recorded
    # keep their digest (a folder without one holds a batch run's results)
    plain = {k: (v["sha256"] if k == "model" else v) for k, v in settings.items()
             if not (k == "command" and v == "batch")}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def _show(key: str, value) -> str:
    if key == "model":
        return f"{value['label']} (sha256 {value['sha256'][:12]})"
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show(k, v)}" for k, v in value.items())
    return json.dumps(value) if not isinstance(value, str) else value


def command_of(settings) -> str:
    """The command whose results a folder's settings describe (batch when not recorded)."""
    command = settings.get("command") if isinstance(settings, dict) else None
    return command if isinstance(command, str) else "batch"


def other_command(out, old: dict, new: dict) -> str | None:
    """One sentence when ``out`` holds another command's results (a batch run's folder given
    to evaluate, or an evaluation's given to batch): their files share names (summary.csv),
    so a list of every setting that differs would hide what is wrong."""
    had, wants = command_of(old), command_of(new)
    if had == wants:
        return None
    article = "an" if had[:1] in "aeiou" else "a"
    return (f"--out {str(out)!r} holds the results of {article} {had} run (its summary.csv "
            f"would be replaced); write the {wants} results into a folder of their own, or "
            "pass --overwrite to write beside them.")


def settings_changes(old: dict, new: dict) -> list[str]:
    """``"--method gradcam -> scorecam"`` for each setting that differs (a different command
    is :func:`other_command`'s one sentence instead)."""
    changes = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if key == "command":
            continue
        if key == "model":
            a, b = (a or {"sha256": "", "label": "none"}), (b or {"sha256": "", "label": "none"})
            if a["sha256"] == b["sha256"]:
                continue
        elif key == "model_input" and isinstance(a, dict) and isinstance(b, dict):
            diff = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
            if diff:
                changes.append(f"{_SETTING_NAMES[key]}: " + ", ".join(
                    f"{k} {_show(k, a.get(k))} -> {_show(k, b.get(k))}" for k in diff))
            continue
        elif a == b:
            continue
        changes.append(f"{_SETTING_NAMES.get(key, key)} {_show(key, a)} -> {_show(key, b)}")
    return changes
