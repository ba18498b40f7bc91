"""``napari-gradcam evaluate``: can these heatmaps be trusted? Every input image explained by
one :class:`~napari_gradcam.job.ExplainJob`, then the chosen :mod:`napari_gradcam.metrics` on
its heatmaps, for the same class the heatmap explains.

- faithfulness: deletion and insertion curves and their areas, ROAD (most / least relevant
  first and combined), average drop / increase in confidence;
- agreement with a reader's annotations (``annotations``: a pattern with ``{dir}``, ``{name}``,
  ``{stem}`` per input, as the batch command's ``--mask``): a mask image, a GeoJSON or a COCO
  JSON (a COCO file of many images is matched by file name); an input without an annotation
  file gets "no annotation" and its other metrics;
- the sanity check (cascading randomisation), slow: one explanation per layer of the model.

Inputs are found and read as the batch command finds and reads them (files, folders, TIFF
stacks, zarr arrays, NIfTI / DICOM volumes); every image of a stack is a row of its own. In
``out``: ``metrics.csv`` (a row per image and method), ``summary.csv`` (means per method) and
``curves/`` (deletion / insertion plots), each written atomically, under the batch command's
lock and settings rules, so two runs into one folder never mix or half-write files. No cell
holds NaN: a metric not asked for, or agreement without an annotation, is an empty cell.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

METRICS = ("deletion", "insertion", "road", "drop", "agreement", "sanity")
# the sanity check explains every image again once per layer of the model: asked for by name
DEFAULT_METRICS = tuple(m for m in METRICS if m != "sanity")
BASELINES = ("black", "blur", "mean")

# metrics.csv: one row per image and method; a metric not computed is an empty cell
COLUMNS = (
    "image", "file", "index", "method", "class", "probability",
    "deletion_auc", "insertion_auc", "road_morf", "road_lerf", "road_combined",
    "drop", "increase", "annotated", "pointing", "energy", "iou", "dice",
    "region_iou", "region_dice", "sanity_spearman", "sanity_ssim",
)
# summary.csv and the terminal table: one row per method
SUMMARY_COLUMNS = (
    "method", "images", "deletion_auc", "insertion_auc", "road_morf", "road_lerf",
    "road_combined", "average_drop", "increase_in_confidence", "annotated", "pointing_game",
    "energy", "iou", "dice", "region_iou", "region_dice", "sanity_spearman", "sanity_ssim",
)
_AGREEMENT = ("pointing", "energy", "iou", "dice", "region_iou", "region_dice")
ANNOTATED, EMPTY, MISSING = "yes", "empty", "no annotation"
_SUMMARY_OF = {"pointing_game": "pointing"}  # summary column -> the rows' column it averages
CURVES = "curves"


@dataclass
class Evaluation:
    """What :func:`evaluate` found: ``rows`` (a dict per image and method, the columns of
    ``metrics.csv``; None where a metric was not computed), ``summary`` (a dict per method,
    the columns of ``summary.csv``), ``curves`` ({(image, index, method): (fractions,
    deletion, insertion)}), ``metrics`` (the metrics computed), ``files`` (what was
    written) and ``failed`` ((input, message) per input that could not be evaluated: as the
    batch command, one bad input is recorded and the others go on)."""

    rows: list
    summary: list
    curves: dict = field(default_factory=dict)
    metrics: tuple = DEFAULT_METRICS
    files: list = field(default_factory=list)
    failed: list = field(default_factory=list)

    def table(self) -> str:
        """The summary as aligned text: methods as rows, the computed metrics as columns."""
        return summary_table(self.summary)


def check_metrics(metrics) -> tuple:
    """``metrics`` (names, or one comma-separated string; None: the default) -> a tuple of
    known names in :data:`METRICS` order."""
    if metrics is None:
        return DEFAULT_METRICS
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric{'s' * (len(unknown) > 1)} "
                         f"{', '.join(map(repr, unknown)) or '(none given)'}: choose from "
                         f"{', '.join(METRICS)} (comma-separated).")
    return tuple(m for m in METRICS if m in names)


def check_threshold(value, label: str | None = None) -> float:
    """``value`` (a number or its text) as a heat threshold in [0, 1]; else one sentence that
    starts with ``label`` (default ``threshold=<value>``; the command line names its flag)."""
    try:
        threshold = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        threshold = math.nan
    if isinstance(value, bool) or not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"{label or f'threshold={value!r}'}: give a heat value in [0, 1] "
                         "(e.g. 0.5).")
    return threshold


def _check_settings(steps, threshold, baseline, seed) -> tuple:
    from .metrics._perturbation import _check_steps

    steps = _check_steps(steps)
    threshold = check_threshold(threshold)
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r}: give one of {', '.join(BASELINES)}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: give a whole number >= 0.")
    return int(steps), threshold, baseline, int(seed)


def evaluate(inputs: Iterable, spec, methods: Sequence[str] = ("gradcam",),
             annotations: str | None = None, out=None, *, metrics=None, steps: int = 50,
             threshold: float = 0.5, baseline: str = "black", seed: int = 0, target=None,
             device="auto", batch_size: int | None = None, overwrite: bool = False,
             model=None, part_size: int = 256,
             progress: Callable[[int, int, str], None] | None = None) -> Evaluation:
    """Explain every image of ``inputs`` with ``methods`` and measure the heatmaps.

    Parameters
    ----------
    inputs : image files, folders, TIFF stacks, zarr arrays, NIfTI / DICOM volumes (as the
        batch command takes them).
    spec : a classifier's :class:`~napari_gradcam.models.ModelSpec`; segmentation models are
        refused (these metrics score one probability per image).
    methods : CAM method names; each gets its own rows.
    annotations : a pattern with ``{dir}``, ``{name}``, ``{stem}`` naming each input's
        annotation: a mask image (> 0 = annotated; one for a stack's every image, or one per
        image), a GeoJSON file (a feature's plane is its image) or a COCO JSON file (its images
        matched to the input by file name: ``<stem>.<ext>``, a stack's ``<stem>_<i>.<ext>``).
    out : a folder for ``metrics.csv``, ``summary.csv`` and ``curves/`` (None: nothing
        written). Held and checked as the batch command holds its folder: other settings
        there are refused unless ``overwrite``.
    metrics : names from :data:`METRICS` (default: all but ``sanity``, which explains every
        image again once per layer); ``agreement`` needs ``annotations`` and ``road`` a 2D
        model (each left out of the default without them).
    steps : deletion / insertion steps. threshold : heat threshold for IoU / Dice and the
        regions. baseline : what deleted pixels become (``black``, ``blur``, ``mean``; also
        the average drop's). seed : ROAD's imputation noise and the sanity check's weights.
    target : None (each image's prediction), a class name or index; every metric scores the
        class its heatmap explains.
    model : ``load_model``'s arguments as a dict, for the settings' fingerprint (default:
        the spec's weights).
    progress : called with (inputs done, inputs, name) after each input.
    """
    from .batch import check_output, claim_output, collect_units, mask_pattern_problem
    from .batch.explainer import is_segmentation_job
    from .job import ExplainJob, is_found

    explicit = metrics is not None
    metrics = check_metrics(metrics)
    if annotations is None and "agreement" in metrics:
        if explicit:
            raise ValueError("the agreement metric compares heatmaps with annotations; give "
                             "--annotations PATTERN, or leave agreement out of --metrics.")
        metrics = tuple(m for m in metrics if m != "agreement")
    steps, threshold, baseline, seed = _check_settings(steps, threshold, baseline, seed)
    if annotations is not None:
        problem = mask_pattern_problem(str(annotations))
        if problem:
            raise ValueError(f"--annotations {annotations!r}: {problem}.")
    if is_found(target):
        raise ValueError("--target found explains several classes per image, but each metric "
                         "scores one class; give one class (name or index), or leave --target "
                         "out for each image's prediction.")
    methods = [methods] if isinstance(methods, str) else list(methods or ["gradcam"])
    inputs = list(inputs)
    if out is not None:
        out = check_output(out, inputs)
    job = ExplainJob(spec, methods, target, device=device, batch_size=batch_size,
                     regions={"threshold": threshold})
    if is_segmentation_job(job):
        raise ValueError(f"the model {getattr(spec, 'name', 'model')!r} is a segmentation "
                         "model (a map of class scores per pixel), but these metrics are for "
                         "classifiers (one probability per image to perturb); give a "
                         "classification model.")
    dims = job.runner.dims
    if dims != 2 and "road" in metrics and not explicit:  # the default: what a 3D model has
        metrics = tuple(m for m in metrics if m != "road")
    if dims != 2 and "road" in metrics:
        raise ValueError("ROAD imputes pixels from their neighbours in a plane, so it takes 2D "
                         "models; leave road out of --metrics for a 3D model.")
    units = collect_units(inputs, part_size=part_size, exclude=out,
                          in_channels=spec.in_channels, spatial_dims=dims,
                          companions=[str(annotations)] if annotations is not None else [])
    settings = _settings(spec, model, methods, metrics, steps, threshold, baseline, seed,
                         target, annotations)
    claim = claim_output(out, settings, overwrite=overwrite) if out is not None else \
        contextlib.nullcontext()
    with claim:
        rows, curves, failed = [], {}, []
        options = {"steps": steps, "threshold": threshold, "baseline": baseline,
                   "seed": seed, "device": device, "batch_size": batch_size}
        for k, unit in enumerate(units):
            try:
                unit_rows, unit_curves = _evaluate_unit(unit, job, spec, methods, metrics,
                                                        annotations, dims, options)
            except Exception as err:  # noqa: BLE001 - this input fails, the others go on
                failed.append((_input_name(unit), _reason(err)))
            else:
                rows += unit_rows
                curves.update(unit_curves)
            if progress is not None:
                progress(k + 1, len(units), unit.key)
        summary = summarise(rows, methods, metrics)
        result = Evaluation(rows, summary, curves, metrics, failed=failed)
        if out is not None and rows:  # nothing evaluated: nothing written, not empty tables
            result.files = write_outputs(result, out)
    return result


def _input_name(unit) -> str:
    """The input as a user named it; a part of a stack with its images."""
    if unit.kind == "parts":
        return f"{unit.path} (images {unit.start} to {unit.stop - 1})"
    return str(unit.path)


def _reason(err: Exception) -> str:
    """One line: a user's error as it is, anything else with its type."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, (ValueError, TypeError, OSError)) and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _settings(spec, model, methods, metrics, steps, threshold, baseline, seed, target,
              annotations) -> dict:
    """What makes an evaluation's files, fingerprinted into the output folder as a batch
    run's settings are (the model by its files' or weights' hash)."""
    from .batch.settings import _plain, model_fingerprint

    return _plain({
        "command": "evaluate", "model": model_fingerprint(model if model is not None else spec),
        "method": list(methods), "metrics": list(metrics), "steps": steps,
        "threshold": threshold, "baseline": baseline, "seed": seed, "target": target,
        "annotations": annotations,
        "model_input": {"in_channels": spec.in_channels, "input_size": spec.input_size,
                        "mean": spec.mean, "std": spec.std, "intensity": spec.intensity,
                        "class_names": list(spec.class_names),
                        "target_layer": spec.target_layer}})


# ---- one input ----------------------------------------------------------------------------------

def _evaluate_unit(unit, job, spec, methods, metrics, annotations, dims, options):
    """The rows (a dict per image and method) and deletion / insertion curves of one unit."""
    from . import metrics as M
    from .batch.read import open_lazy, read_unit
    from .explain_arrays import layout
    from .metrics._common import class_label

    try:
        pixels = _slide_pixels(unit, spec, options) if unit.kind == "slide" else \
            read_unit(unit, None, None, spec.in_channels, dims)
    except ValueError as err:
        text = str(err).rstrip(".")
        raise ValueError(text if "leave it out" in text else
                         f"{text}; replace the file or leave it out.") from None
    lay = layout(pixels.shape, None, dims, in_channels=spec.in_channels)
    lead, spatial = tuple(lay.lead), tuple(lay.spatial)
    n = int(np.prod(lead, dtype=np.int64)) if lead else 1
    offset = (unit.start,) + (0,) * (len(lead) - 1) if unit.kind == "parts" and lead else ()
    full_lead = lead
    if offset:  # a part of a stack: annotations describe the whole stack
        full_lead = (int(open_lazy(unit.path).shape[0]), *lead[1:])
    state, masks = MISSING, None
    if "agreement" in metrics:
        state, masks = _annotation_masks(unit, annotations, full_lead, spatial, dims)
        if masks is not None and offset:
            rest = int(np.prod(lead[1:], dtype=np.int64)) if len(lead) > 1 else 1
            masks = masks[unit.start * rest:unit.stop * rest]
    result = job.run(pixels)
    targets = result.class_ids[..., 0]
    probs = result.probabilities[..., 0] if result.probabilities is not None else None
    common = {"device": options["device"], "batch_size": options["batch_size"]}
    rows, curves = [], {}
    for method in methods:
        heat = result.heatmaps[method]
        di = rd = ad = ag = sc = None
        if {"deletion", "insertion"} & set(metrics):
            di = M.deletion_insertion(pixels, spec, heat, targets, options["steps"],
                                      baseline=options["baseline"], **common)
        if "road" in metrics:
            rd = M.road(pixels, spec, heat, targets, most_relevant_first="both",
                        seed=options["seed"], **common)
        if "drop" in metrics:
            ad = M.average_drop_increase(pixels, spec, heat, targets,
                                         baseline=options["baseline"], **common)
        if masks is not None and masks.any():
            ag = M.agreement(heat, masks.reshape(*lead, *spatial), options["threshold"],
                             regions=result.regions_of(method), spatial_dims=dims)
        if "sanity" in metrics:
            sc = M.sanity_check(pixels, spec, method, targets, seed=options["seed"], **common)
        ids = np.asarray(targets).reshape(n)
        chances = None if probs is None else np.asarray(probs, np.float64).reshape(n)
        for k in range(n):
            index = [int(i) for i in np.unravel_index(k, lead)] if lead else []
            if offset:
                index[0] += unit.start
            cid = int(ids[k])
            row = dict.fromkeys(COLUMNS)
            p = None if chances is None else float(chances[k])
            row.update(image=unit.name, file=unit.path, index=index, method=method,
                       **{"class": class_label(spec.class_names, cid)},
                       probability=p if p is not None and math.isfinite(p) else None)
            if di is not None:
                dele = di.deletion.reshape(n, -1)[k]
                ins = di.insertion.reshape(n, -1)[k]
                if "deletion" in metrics:
                    row["deletion_auc"] = float(di.deletion_auc.reshape(n)[k])
                if "insertion" in metrics:
                    row["insertion_auc"] = float(di.insertion_auc.reshape(n)[k])
                curves[(unit.name, tuple(index), method)] = (di.fractions, dele, ins)
            if rd is not None:
                row["road_morf"] = float(rd.morf.reshape(n, -1)[k].mean())
                row["road_lerf"] = float(rd.lerf.reshape(n, -1)[k].mean())
                row["road_combined"] = float(rd.combined.reshape(n)[k])
            if ad is not None:
                row["drop"] = float(ad.drop.reshape(n)[k])
                row["increase"] = bool(ad.increase.reshape(n)[k])
            if "agreement" in metrics:
                row["annotated"] = _state_of(state, masks, k)
                if ag is not None and bool(ag.annotated.reshape(n)[k]):
                    for name in _AGREEMENT:
                        values = getattr(ag, name)
                        v = values.reshape(n)[k]
                        row[name] = bool(v) if name == "pointing" else float(v)
            if sc is not None:
                row["sanity_spearman"] = float(sc.spearman.reshape(n, -1)[k, -1])
                row["sanity_ssim"] = float(sc.ssim.reshape(n, -1)[k, -1])
            rows.append(row)
    return rows, curves


def _slide_pixels(unit, spec, options) -> np.ndarray:
    """A slide's (SVS, OME-TIFF, pyramidal TIFF, OME-Zarr) full-resolution level as one image,
    read as the batch command reads slides: the metrics perturb and explain the image whole,
    so a level that can't fit in memory is refused with its numbers instead of being read."""
    from . import memory
    from ._device import describe_device, resolve_device
    from .explain_arrays import layout
    from .pyramids import open_pyramid

    with open_pyramid(unit.path) as pyramid:  # ValueError: truncated, unreadable
        level = pyramid.level(0)
        shape = tuple(int(s) for s in level.shape)
        lay = layout(shape, pyramid.channel_axis, 2, spec.in_channels)
        need = memory.estimate(shape, np.dtype(level.dtype), lay, spec.in_channels,
                               spec.input_size)
        device = resolve_device(options["device"])
        problem = memory.refusal(need, memory.available_host_memory(),
                                 memory.available_device_memory(device),
                                 describe_device(device))
        if problem:
            h, w = lay.spatial
            raise ValueError(
                f"this slide's full-resolution level ({h} x {w} pixels) is evaluated whole, "
                f"and {problem}, or explain the slide in tiles with napari-gradcam batch, or "
                "leave it out")
        pixels = np.asarray(level[...])
    if pyramid.channel_axis is not None:
        pixels = np.moveaxis(pixels, pyramid.channel_axis, -1)
    return pixels


def _state_of(state: str, masks, k: int) -> str:
    if masks is None:
        return state
    return ANNOTATED if bool(masks[k].any()) else EMPTY


# ---- annotations --------------------------------------------------------------------------------

def _annotation_masks(unit, pattern, lead, spatial, dims):
    """(state, bool masks (n, *spatial) of the unit's images or None): the unit's annotation
    file read as a mask image, GeoJSON or COCO JSON; (MISSING, None) when it has none."""
    from .batch import format_mask
    from .metrics import annotation_masks
    from .metrics._agreement import read_json

    path = Path(format_mask(str(pattern), Path(unit.path), "annotations"))
    if not path.exists():
        return MISSING, None
    where = f"annotation {str(path)!r} of input {unit.path!r}"
    if path.is_dir():
        raise ValueError(f"{where} is a folder; give a mask image, GeoJSON or COCO JSON file "
                         "(check the --annotations pattern).")
    if path.suffix.lower() in (".json", ".geojson"):
        doc = read_json(path, where)
        try:
            if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
                return ANNOTATED, _coco_masks(doc, unit, lead, spatial, path)
            return ANNOTATED, annotation_masks(doc, lead, spatial)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {_lower_first(err)}") from None
    from .batch.read import _decoder_reason, _imread

    try:
        m = np.asarray(_imread(path))
    except Exception as err:  # noqa: BLE001 - a decoder's failure, as one line
        raise ValueError(f"{where} can't be read as an image ({_decoder_reason(err)}); give a "
                         "mask image (PNG, TIFF), a GeoJSON or a COCO JSON file.") from None
    image = (*lead, *spatial)
    if m.ndim >= 3 and m.shape[-1] in (3, 4) and m.shape not in (spatial, image):
        m = m[..., 0]  # an RGB(A) mask: its first channel
    if m.shape not in (spatial, image):
        stack = f" (or {spatial} for each of its images)" if lead else ""
        raise ValueError(f"{where} has shape {m.shape} but the image is {image}{stack}; give "
                         "a mask of the image's size and planes.")
    return ANNOTATED, annotation_masks(m, lead, spatial)


def _lower_first(err) -> str:
    text = str(err)
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _coco_masks(doc: dict, unit, lead, spatial, path: Path) -> np.ndarray:
    """The unit's images' masks from a COCO file that may describe many images: each image
    matched by file name (``<stem>.<ext>``, a stack's images ``<stem>_<i>[_<j>].<ext>`` as the
    batch command's coco.json names them; the extension may differ). A stack whose planes are
    not named but whose file is: that one image's annotations for every plane."""
    from .metrics import annotation_masks

    images = doc.get("images")
    anns = doc.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise TypeError("its COCO 'images' and 'annotations' must be lists; fix the file.")
    by_stem: dict = {}
    for im in images:
        if isinstance(im, dict) and isinstance(im.get("file_name"), str):
            by_stem.setdefault(Path(im["file_name"]).stem.lower(), im)
    source = Path(unit.path)
    stem = unit.stem or source.stem
    names = [source.stem]
    n = int(np.prod(lead, dtype=np.int64)) if lead else 1
    picks = []
    for k in range(n):
        index = np.unravel_index(k, lead) if lead else ()
        key = (source.stem + "".join(f"_{int(i)}" for i in index)).lower()
        picks.append(by_stem.get(key))
    if lead and not any(picks) and source.stem.lower() in by_stem:
        picks = [by_stem[source.stem.lower()]] * n
    if not any(picks):
        listed = ", ".join(str(im.get("file_name")) for im in images[:5]
                           if isinstance(im, dict)) + (" ..." if len(images) > 5 else "")
        wanted = f"{names[0]}{source.suffix}" + (f" or {names[0]}_<index>" if lead else "")
        raise ValueError(f"the COCO file holds no image named {wanted} (its images: "
                         f"{listed or 'none'}); add the image to the file, or point "
                         f"--annotations at the file that describes {stem}.")
    out = np.zeros((n, *spatial), bool)
    categories = doc.get("categories", [])
    for k, im in enumerate(picks):
        if im is None:
            continue
        one = {"images": [im], "categories": categories,
               "annotations": [a for a in anns if isinstance(a, dict)
                               and a.get("image_id") == im.get("id")]}
        out[k] = annotation_masks(one, (), spatial)[0]
    return out


# ---- the summary --------------------------------------------------------------------------------

def summarise(rows: list, methods: Sequence[str], metrics: Sequence[str]) -> list:
    """A dict per method: its number of images and the mean of each metric over its rows
    (agreement over the annotated rows only; ``increase_in_confidence``: the share of rows
    whose confidence rose, in %); None for a metric not computed or without any row."""
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry = dict.fromkeys(SUMMARY_COLUMNS)
        entry["method"], entry["images"] = method, len(mine)
        for col in SUMMARY_COLUMNS[2:]:
            if col == "average_drop":
                entry[col] = _mean([r["drop"] for r in mine])
            elif col == "increase_in_confidence":
                values = [r["increase"] for r in mine if r["increase"] is not None]
                entry[col] = float(np.mean(values) * 100) if values else None
            elif col == "annotated":
                if "agreement" in metrics:
                    entry[col] = sum(r["annotated"] == ANNOTATED for r in mine)
            else:
                entry[col] = _mean([r[_SUMMARY_OF.get(col, col)] for r in mine])
        out.append(entry)
    return out


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ""
    return str(v)


def summary_table(summary: list) -> str:
    """Methods as rows, the metrics with a value as columns, right-aligned numbers."""
    cols = [c for c in SUMMARY_COLUMNS
            if c == "method" or any(s.get(c) is not None for s in summary)]
    cells = [[_short(s.get(c)) for c in cols] for s in summary]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(cols, widths)))]
    for row in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else ""
    return "" if v is None else str(v)


# ---- files --------------------------------------------------------------------------------------

def write_outputs(result: Evaluation, out) -> list:
    """metrics.csv, summary.csv and the curve PNGs, each written atomically; curve PNGs of an
    earlier run that this one did not write are removed, so the folder shows one run."""
    from .files import atomic_write

    out = Path(out)
    _remove_our_temps(out)
    written = [atomic_write(out / "metrics.csv", _csv(COLUMNS, result.rows)),
               atomic_write(out / "summary.csv", _csv(SUMMARY_COLUMNS, result.summary))]
    pngs = write_curves(result, out / CURVES)
    if (out / CURVES).is_dir():
        keep = {p.name for p in pngs}
        for old in (out / CURVES).glob("*.png"):
            if old.name not in keep and old.is_file() and not old.is_symlink():
                with contextlib.suppress(OSError):
                    old.unlink()
    return written + pngs


def _remove_our_temps(out: Path) -> None:
    """The temporary files a killed evaluation left (only ours, only while the lock is
    held)."""
    from .batch.output import _TEMP

    for folder, prefixes in ((out, (".metrics.csv.", ".summary.csv.")), (out / CURVES, (".",))):
        with contextlib.suppress(OSError):
            for stale in folder.iterdir():
                if _TEMP.match(stale.name) and stale.name.startswith(prefixes) and \
                        stale.is_file() and not stale.is_symlink():
                    with contextlib.suppress(OSError):
                        stale.unlink()


def _csv(columns, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def curve_name(image: str, index, method: str) -> str:
    """``<image>[_<index>]_<method>.png``: a stack's image carries its index."""
    return f"{image}{''.join(f'_{i}' for i in index)}_{method}.png"


def write_curves(result: Evaluation, folder) -> list:
    """A deletion / insertion plot per image and method (AUCs in the legend) and one of the
    mean curves per method (``mean_<method>.png``; an image named ``mean`` gets
    ``mean-image_...``)."""
    if not result.curves:
        return []
    folder = Path(folder)
    show = [m for m in ("deletion", "insertion") if m in result.metrics]
    written = []
    by_method: dict = {}
    for (image, index, method), (x, dele, ins) in result.curves.items():
        name = curve_name("mean-image" if image == "mean" else image, index, method)
        title = f"{image}{' ' + str(list(index)) if index else ''} · {method}"
        written.append(plot_curves(folder / name, x, dele, ins, title, show))
        by_method.setdefault(method, []).append((x, dele, ins))
    for method, curves in by_method.items():
        steps = max(len(c[0]) for c in curves)
        grid = np.linspace(0.0, 1.0, steps)
        dele = np.mean([np.interp(grid, x, d) for x, d, _ in curves], 0)
        ins = np.mean([np.interp(grid, x, i) for x, _, i in curves], 0)
        written.append(plot_curves(folder / f"mean_{method}.png", grid, dele, ins,
                                   f"mean of {len(curves)} image{'s' * (len(curves) != 1)} · "
                                   f"{method}", show))
    return written


def plot_curves(path, fractions, deletion, insertion, title: str,
                show=("deletion", "insertion")) -> Path:
    """One PNG (600 x 400 pixels): the target's probability against the share of pixels
    removed (deletion) or revealed (insertion), each curve's AUC in the legend. Drawn on
    matplotlib's Agg canvas directly (no pyplot), so no display is needed and the backend of
    a process that shows plots (napari's) is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .files import atomic_output
    from .metrics import auc

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"deletion": ("#d62728", deletion), "insertion": ("#1f77b4", insertion)}
    for name in show:
        colour, y = styles[name]
        ax.plot(fractions, y, color=colour,
                label=f"{name} (AUC {float(auc(np.asarray(y), np.asarray(fractions))):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("share of pixels removed (deletion) / revealed (insertion)")
    ax.set_ylabel("probability of the class")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
