"""The ``napari-gradcam`` command."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path


def _example(args) -> int:
    from ._example import run_example

    run_example(methods=args.method or None, device=args.device, seed=args.seed)
    return 0


def _demo(args) -> int:
    if args.headless:
        return _demo_headless(args)
    from ._napari.demo import run_demo

    return run_demo(stack=args.stack, volume=args.volume, methods=args.method or None,
                    device=args.device, screenshot=args.screenshot)


def _demo_headless(args) -> int:
    """The main job without a display: the sample and the demo model, files in DIR."""
    from .batch import Options, process_units, units_for_array, write_summary
    from .models import load_model
    from .samples import IMAGE_NAME, STACK_NAME, VOLUME_NAME, sample_image, sample_stack
    from .samples import sample_volume

    if args.volume:  # the synthetic volume and the 3D model: 3D heatmap and regions
        data, name, model = sample_volume(), VOLUME_NAME, "demo3d"
    elif args.stack:
        data, name, model = sample_stack(), STACK_NAME, "demo"
    else:
        data, name, model = sample_image(), IMAGE_NAME, "demo"
    units, arrays = units_for_array(data, name.replace(" ", "-"))
    spec = load_model(model)
    opts = Options(method=(args.method or ["gradcam"])[0], device=args.device, overlay=True,
                   overwrite=True, target="found")  # as the window: every object it finds
    records = process_units(units, spec, args.headless, opts, arrays=arrays)
    write_summary(records, Path(args.headless), spec.class_names)
    _report(records, args.headless, quiet=False)
    return 0 if all(r.status == "ok" for r in records) else 1


def _report(records, out, quiet: bool) -> None:
    failed = [r for r in records if r.status != "ok"]
    images = sum(r.image_count for r in records)
    print(f"napari-gradcam: {images} image{'s' * (images != 1)} from "
          f"{len(records) - len(failed)} input{'s' * (len(records) - len(failed) != 1)} "
          f"written "
          f"to {out} ({', '.join(_written(out))})"
          + (f"; {len(failed)} failed (see summary.csv)" if failed else ""),
          file=sys.stderr if quiet else sys.stdout)
    for r in failed:
        print(f"  failed: {r.source}: {r.message}", file=sys.stderr)


def _written(out) -> list[str]:
    """What the output folder holds, in the order the help lists it: the folders some runs
    write (overlays/, regions/, segmentation/) only when they are there."""
    out = Path(out)
    folders = [f"{d}/" for d in ("heatmaps", "geojson", "regions", "overlays", "segmentation")
               if d in ("heatmaps", "geojson") or (out / d).is_dir()]
    return [*folders, "coco.json", "summary.csv"]


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line is logged, not as it was when the handler
    was made (callers and tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _batch(args) -> int:
    """The batch command; Ctrl-C ends it with one line saying what finished (each finished
    input's files and record are complete, so the same command resumes), exit status 130."""
    state: dict = {}
    try:
        return _batch_run(args, state)
    except KeyboardInterrupt:
        from .batch import count_done

        units, run = state.get("units"), state.get("run")
        if units and run is not None:
            what = "inputs" if all(u.kind == "file" for u in units) else "units of work"
            done = f"{count_done(units, run.out, run.digest)} of {len(units)} {what} finished"
        else:
            done = "nothing was written"
        if not args.quiet:
            sys.stderr.write("\n")  # past the progress bar
        print(f"napari-gradcam: interrupted: {done}; rerun the same command to resume.",
              file=sys.stderr)
        return 130


def _batch_run(args, state: dict) -> int:
    from .batch import (
        Options, check_output, check_segmentation_options, claim_output, collect_units,
        iter_progress, make_job, process_units, run_settings, write_summary,
    )

    ours = logging.getLogger("napari_gradcam")
    if not ours.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("napari-gradcam: %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO if args.quiet else logging.WARNING)
    _check_batch_options(args)  # every option, before the model loads or anything is written
    # an --out that is a file, can't be written or holds an input: before anything is loaded
    out = check_output(args.out, args.inputs)
    spec, model = _load_model(args)
    opts = Options(method=args.method, target=args.target, threshold=args.threshold,
                   threshold_mode=args.threshold_mode, min_area=args.min_area,
                   simplify=args.simplify, device=args.device, batch_size=args.batch_size,
                   overlay=args.overlay, volume_overlay=args.volume_overlay,
                   overwrite=args.overwrite, workers=args.workers,
                   write_segmentation=args.write_segmentation, tile=args.tile,
                   overlap=args.overlap, level=args.level)
    try:  # bad method, target, device or tiling: say so before reading anything
        job = make_job(spec, opts)
    except (ValueError, TypeError) as err:
        raise type(err)(_as_flags(str(err))) from None
    # a target mask or label maps for a classifier: refused before any image is read
    check_segmentation_options(job, args.target_mask is not None, args.write_segmentation)
    # parts cut only leading axes: a 3D model's volume is one image, never cut
    units = collect_units(args.inputs, mask=args.mask, part_size=args.part_size, exclude=out,
                          in_channels=spec.in_channels, spatial_dims=job.runner.dims,
                          target_mask=args.target_mask)
    # hashes the model files once
    settings = run_settings(opts, model, spec, args.mask, target_mask=args.target_mask)
    # the lock, then other settings refused, before any model runs
    with claim_output(out, settings, overwrite=args.overwrite) as run:
        state["run"] = run
        units = state["units"] = run.name(units)
        progress = iter_progress(len(units), args.quiet)
        if args.dask_scheduler or args.dask_local:
            from .batch.cluster import make_client, process_on_cluster

            with make_client(args.dask_scheduler, args.dask_local, args.device) as client:
                records = process_on_cluster(client, units, model, out, opts,
                                             spatial_dims=job.runner.dims,
                                             in_channels=spec.in_channels,
                                             progress=progress)
        else:
            records = process_units(units, spec, out, opts, progress=progress)
        write_summary(records, out, list(spec.class_names))
    _report(records, out, args.quiet)
    return 0 if all(r.status == "ok" for r in records) else 1


def _threshold(text):
    if str(text).strip().lower() == "otsu":
        return "otsu"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"--threshold {str(text)!r}: give a number in [0, 1] (a heat value, or "
                         "with --threshold-mode relative a fraction of each map's maximum) or "
                         "'otsu'.")
    return value


def _whole(text, flag: str, least: int, what: str) -> int:
    """``text`` as a whole number >= ``least``, else a one-line ValueError naming the flag."""
    try:
        value = float(str(text).strip())
        ok = math.isfinite(value) and value == int(value) and value >= least
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{flag} {str(text)!r}: give {what}.")
    return int(value)


def _check_batch_options(args) -> None:
    """Check and convert every option of ``batch`` before any model is loaded or any file
    written, so that a typo costs one line (exit status 2) instead of a run over every input.
    Numbers are parsed here rather than by argparse, whose errors add a usage block."""
    from .batch import mask_pattern_problem

    args.threshold = _threshold(args.threshold)
    args.min_area = _whole(args.min_area, "--min-area", 0, "a whole number of pixels >= 0")
    try:
        simplify = float(str(args.simplify).strip())
    except ValueError:
        simplify = math.nan
    if not (math.isfinite(simplify) and simplify >= 0):
        raise ValueError(f"--simplify {str(args.simplify)!r}: give a tolerance in pixels >= 0 "
                         "(0 keeps the exact pixel outline).")
    args.simplify = simplify
    args.part_size = _whole(args.part_size, "--part-size", 1,
                            "a whole number of images per unit >= 1")
    if args.batch_size is not None:
        args.batch_size = _whole(args.batch_size, "--batch-size", 1,
                                 "a whole number of images per pass >= 1, or leave it out "
                                 "(automatic)")
    args.workers = _whole(args.workers, "--workers", 1, "a whole number of threads >= 1")
    if getattr(args, "dask_local", None) is not None:
        args.dask_local = _whole(args.dask_local, "--dask-local", 1,
                                 "a whole number of worker processes >= 1")
    for flag, pattern in (("--mask", args.mask), ("--target-mask", args.target_mask)):
        problem = None if pattern is None else mask_pattern_problem(pattern)
        if problem:
            raise ValueError(f"{flag} {pattern!r}: {problem}.")
    _check_tiling_options(args)
    _check_device(args)


def _check_tiling_options(args) -> None:
    """--tile ("auto", "none" or a side in pixels), --overlap and --level as the job takes
    them; an overlap the tile can't hold is refused here with the tiling's own sentence,
    naming the flags (the job checks it again when it is made)."""
    text = str(args.tile).strip().lower()
    if text in ("auto", "none"):
        args.tile = None if text == "none" else "auto"
    else:
        args.tile = _whole(args.tile, "--tile", 1, "a tile side in pixels >= 1 (e.g. 512), "
                                                   "'auto' (tile large images and slides) or "
                                                   "'none' (never tile)")
    args.overlap = _whole(args.overlap, "--overlap", 0, "a whole number of pixels >= 0 that "
                                                        "neighbouring tiles share (e.g. 64)")
    if args.level is not None:
        args.level = _whole(args.level, "--level", 0, "a pyramid level, a whole number >= 0 "
                                                      "(0 = full resolution)")
    if isinstance(args.tile, int):
        from .tiles import check_tiling

        try:
            check_tiling(args.tile, args.overlap)
        except (TypeError, ValueError) as err:
            raise ValueError(_as_flags(str(err))) from None


def _as_flags(message: str) -> str:
    """The tiling's sentences, written for the library (``tile=256``), in the command's words
    (``--tile 256``)."""
    import re

    message = message.replace("tile=None", "--tile none")
    return re.sub(r"\b(tile|overlap)=", r"--\1 ", message)


def _method_and_device(parser, default: str) -> None:
    from .cam import available_methods

    parser.add_argument("--method", action="append", choices=available_methods(),
                        help=f"method to run (repeatable; {default})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def _shared_arguments(p, target_help: str) -> None:
    """What ``batch`` and ``evaluate`` both take: the inputs, --out, the model (file, weights,
    trust), the target, the device and the batch size."""
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files (PNG, JPEG, TIFF incl. multi-page and 16-bit), NIfTI "
                        "volumes (.nii, .nii.gz), DICOM series (a folder of slices is one "
                        "input), folders (searched recursively) or zarr arrays (each leading "
                        "index one image)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--model", default="demo",
                   help="demo, a weights file with its sidecar JSON, a sidecar JSON, a .pt2, or "
                        "an architecture name with --weights (default: demo)")
    p.add_argument("--weights", help="weights file for an architecture name")
    p.add_argument("--trust-code", action="store_true",
                   help="allow a model file to run code: pickled objects, or an architecture "
                        "named in its sidecar outside the known families (only files you "
                        "trust)")
    p.add_argument("--trust-pickle", action="store_true", dest="trust_code",
                   help=argparse.SUPPRESS)  # the old name of --trust-code
    p.add_argument("--target", default=None, help=target_help)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", default=None, help="images per pass (auto)")


def _load_model(args):
    """The model the shared arguments name, and ``load_model``'s arguments (for the
    settings' fingerprint)."""
    from .models import load_model

    model = {"source": args.model, "trust_code": args.trust_code}
    if args.weights:
        model["weights"] = args.weights
    return load_model(**model), model


def _check_device(args) -> None:
    from ._device import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as err:
        raise ValueError(f"--device {args.device!r}: {err}") from None


def _evaluate(args) -> int:
    """The evaluate command: options checked first (one line, exit status 2), then the
    model, then every input; the summary table on stdout."""
    from .batch import check_output
    from .evaluate import check_metrics, check_threshold, evaluate

    steps = _whole(args.steps, "--steps", 1, "a whole number of deletion / insertion steps "
                                             ">= 1 (e.g. 50)")
    seed = _whole(args.seed, "--seed", 0, "a whole number >= 0")
    threshold = check_threshold(args.threshold, f"--threshold {str(args.threshold)!r}")
    batch_size = None if args.batch_size is None else _whole(
        args.batch_size, "--batch-size", 1, "a whole number of images per pass >= 1, or leave "
                                            "it out (automatic)")
    try:
        metrics = None if args.metrics is None else check_metrics(args.metrics)
    except ValueError as err:
        raise ValueError(f"--metrics {args.metrics!r}: {err}") from None
    _check_device(args)
    out = check_output(args.out, args.inputs)
    spec, model = _load_model(args)
    quiet = args.quiet

    def progress(done: int, total: int, name: str) -> None:
        if not quiet:
            print(f"napari-gradcam: evaluated {done}/{total}: {name}", file=sys.stderr)

    try:
        result = evaluate(args.inputs, spec, args.method or ["gradcam"], args.annotations,
                          out, metrics=metrics, steps=steps, threshold=threshold,
                          baseline=args.baseline, seed=seed, target=args.target,
                          device=args.device, batch_size=batch_size, overwrite=args.overwrite,
                          model=model, progress=progress)
    except KeyboardInterrupt:
        print("napari-gradcam: interrupted: nothing was written; run the same command again.",
              file=sys.stderr)
        return 130
    images = len({(r["image"], tuple(r["index"])) for r in result.rows})
    failed = result.failed
    if result.rows:
        print(result.table())
        print(f"napari-gradcam: {images} image{'s' * (images != 1)} evaluated, written to "
              f"{out} (metrics.csv, summary.csv{', curves/' if result.curves else ''})"
              + (f"; {len(failed)} input{'s' * (len(failed) != 1)} failed" if failed else ""))
    else:
        print(f"napari-gradcam: no input could be evaluated, nothing written to {out}; fix "
              "the inputs below and run the same command again.", file=sys.stderr)
    for source, message in failed:  # as batch lists them: one line per input
        print(f"  failed: {source}: {message}", file=sys.stderr)
    return 1 if failed else 0


def _evaluate_parser(sub) -> None:
    from .cam import available_methods
    from .evaluate import BASELINES, DEFAULT_METRICS, METRICS

    e = sub.add_parser(
        "evaluate",
        help="can the heatmaps be trusted? deletion / insertion, ROAD, average drop, "
             "agreement with annotations and the sanity check per image, as CSV, a summary "
             "table and curve plots",
        description="Explain every image of the inputs (every image of a stack is a row) and "
                    "measure its heatmaps for the class they explain. Writes into OUT: "
                    "metrics.csv (a row per image and method), summary.csv (means per "
                    "method), curves/<image>_<method>.png (deletion and insertion curves, "
                    "their AUC in the legend) and curves/mean_<method>.png; prints the "
                    "summary table. Classifiers only.",
    )
    _shared_arguments(e, target_help="class name or index to explain and score (default: each "
                                     "image's prediction)")
    e.add_argument("--method", action="append", choices=available_methods(),
                   help="method to evaluate (repeatable; default gradcam)")
    e.add_argument("--annotations", metavar="PATTERN",
                   help="each input's annotation, with {dir}, {name}, {stem} as for batch's "
                        "--mask: a mask image (> 0 = annotated), a GeoJSON (QuPath's or ours) "
                        "or a COCO JSON (a file of many images is matched by file name). An "
                        "input without one gets 'no annotation' in the annotated column")
    e.add_argument("--metrics", metavar="LIST",
                   help=f"comma-separated, from {', '.join(METRICS)} (default: "
                        f"{','.join(DEFAULT_METRICS)}; agreement only with --annotations). "
                        "sanity (cascading weight randomisation) is slow: it explains every "
                        "image again once per layer of the model")
    e.add_argument("--steps", default="50", help="deletion / insertion steps (default 50)")
    e.add_argument("--threshold", default="0.5",
                   help="heat threshold in [0, 1] for IoU / Dice and the regions (default 0.5)")
    e.add_argument("--baseline", default="black", choices=BASELINES,
                   help="what a deleted pixel becomes (deletion, average drop): black (zero "
                        "intensity, default), blur (a blurred copy) or mean (the training mean)")
    e.add_argument("--seed", default="0", help="ROAD's imputation noise and the sanity "
                                               "check's random weights (default 0)")
    e.add_argument("--overwrite", action="store_true",
                   help="write into an OUT that holds results made with other settings")
    e.add_argument("--quiet", action="store_true", help="no progress lines")
    e.set_defaults(func=_evaluate)


def _batch_parser(sub) -> None:
    from .cam import available_methods

    b = sub.add_parser(
        "batch",
        help="explain image files, folders, TIFF stacks, zarr arrays and NIfTI / DICOM "
             "volumes without a display: heatmaps, regions (QuPath GeoJSON, COCO) and a "
             "summary, resumable",
        description="Explain every image of the inputs and write into OUT: heatmaps/ (float32 "
                    "TIFF per input, zarr for zarr inputs, NIfTI with the scan's affine for "
                    "NIfTI / DICOM inputs), geojson/ (QuPath GeoJSON per input, plane by "
                    "plane), regions/ (for volumes: 3D boxes CSV in voxels and millimetres, "
                    "label map), overlays/ (with --overlay), segmentation/ (with "
                    "--write-segmentation), coco.json and summary.csv. A "
                    "3D model (Conv3d) explains each volume whole and finds 3D regions. A "
                    "segmentation model (output (N, classes, *spatial): a U-Net) explains a "
                    "class inside its predicted region, or inside --target-mask. A "
                    "second run skips finished inputs. Exit status 1 when an input failed.",
    )
    _shared_arguments(
        b, target_help="class name or index to explain, or 'found': every class with a "
                       "positive logit (multi-label models; a summary row per class found). "
                       "Default: each image's prediction. For a segmentation model: the "
                       "class's predicted region (or its --target-mask region); default the "
                       "class with the largest predicted region; 'found' every class "
                       "predicted somewhere")
    b.add_argument("--method", default="gradcam", choices=available_methods())
    b.add_argument("--threshold", default="0.5", help="heat value in [0, 1], or otsu")
    b.add_argument("--threshold-mode", default="absolute", choices=("absolute", "relative"))
    # numbers are checked by _check_batch_options: one line per mistake, no usage block
    b.add_argument("--min-area", default="16", help="smallest region in pixels")
    b.add_argument("--simplify", default="1.0", help="polygon tolerance in pixels")
    b.add_argument("--mask", metavar="PATTERN",
                   help="mask file per image, with {dir}, {name}, {stem}: e.g. "
                        "'{dir}/../lung-masks/{name}'; regions only where the mask is > 0")
    b.add_argument("--target-mask", metavar="PATTERN",
                   help="segmentation models only: a region file per image, with {dir}, "
                        "{name}, {stem} as for --mask (NIfTI / DICOM for volumes, on the "
                        "scan's grid); explains why the model gave the pixels inside it their "
                        "class (the class's logits summed over the region; integer masks "
                        "count where > 0, float masks are weights). Default: each class's own "
                        "predicted region")
    b.add_argument("--write-segmentation", action="store_true",
                   help="segmentation models only: also write each input's predicted labels "
                        "to segmentation/ (<name>_labels.tif; <name>_labels.zarr, uint16, "
                        "for zarr inputs and TIFF stacks read in parts; NIfTI with the scan's "
                        "affine for NIfTI / DICOM inputs; 0 = background, or for multi-label "
                        "models 0 = no class and class c = c + 1)")
    b.add_argument("--overlay", action="store_true",
                   help="also write overlay PNGs: the image in grey with the heat, each "
                        "region's box and polygon outline in its class colour, and one label "
                        "per region ('<class> <probability>', the score where the model "
                        "gives no probability; overlapping labels keep the larger region's)")
    b.add_argument("--volume-overlay", default="mip", choices=("mip", "mid"),
                   help="how --overlay draws a volume explained by a 3D model: mip (default: "
                        "maximum-intensity projection of image and heat, every region "
                        "projected: its box's footprint and outline) or mid (the middle "
                        "plane, the regions crossing it)")
    b.add_argument("--overwrite", action="store_true", help="redo finished inputs")
    b.add_argument("--workers", default="2",
                   help="reader and writer threads each (default 2)")
    b.add_argument("--part-size", default="256",
                   help="images per unit of work for zarr arrays and TIFF stacks longer than "
                        "this, which are read a part at a time (default 256); only leading "
                        "axes are cut: a 3D model's volume is never cut, a (T, D, H, W) stack "
                        "is cut along T")
    b.add_argument("--tile", default="auto",
                   help="explain large images and slides tile by tile, tiles of N x N pixels "
                        "blended into one heatmap normalised over the whole image: auto "
                        "(default: slides larger than the model's input and images that would "
                        "not fit in memory), N, or none (never tile)")
    b.add_argument("--overlap", default="64",
                   help="pixels that neighbouring tiles share (default 64; less than the tile)")
    b.add_argument("--level", default=None, metavar="K",
                   help="pyramid level of slides (SVS, OME-TIFF, pyramidal TIFF, OME-Zarr) to "
                        "explain: 0 = full resolution (default); the GeoJSON is in level-0 "
                        "pixels whatever the level")
    b.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    group = b.add_mutually_exclusive_group()
    group.add_argument("--dask-scheduler", metavar="ADDRESS",
                       help="run on an existing dask.distributed cluster (tcp://host:8786); "
                            "OUT must be reachable from its workers")
    group.add_argument("--dask-local", metavar="N",
                       help="start a local dask cluster of N worker processes (one per GPU "
                            "with dask-cuda)")
    b.set_defaults(func=_batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-gradcam",
        description="Class activation maps (CAM, Grad-CAM and family) for napari and scripts.",
    )
    sub = parser.add_subparsers(dest="command")
    ex = sub.add_parser(
        "example",
        help="run every CAM method with the bundled demo model on a synthetic image and print "
             "what it found next to the truth",
    )
    _method_and_device(ex, "default: all")
    ex.add_argument("--seed", type=int, default=6, help="which synthetic image (default 6)")
    ex.set_defaults(func=_example)
    demo = sub.add_parser(
        "demo",
        help="open napari with a synthetic sample and the bundled model, run Grad-CAM and show "
             "the heatmap and the editable regions",
    )
    _method_and_device(demo, "one heatmap layer each; default gradcam")
    kind = demo.add_mutually_exclusive_group()
    kind.add_argument("--stack", action="store_true",
                      help="use the 16-frame synthetic stack instead of the single image")
    kind.add_argument("--3d", action="store_true", dest="volume",
                      help="use the synthetic volume and the 3D demo model (spheres, cubes, "
                           "cones), shown in napari's 3D view")
    demo.add_argument("--screenshot", metavar="PNG",
                      help="save a picture of the window after the run, then close")
    demo.add_argument("--headless", metavar="DIR",
                      help="no window: write the heatmap, overlay, GeoJSON, COCO and summary "
                           "of the demo run to DIR")
    demo.set_defaults(func=_demo)
    _batch_parser(sub)
    _evaluate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:  # errors a user can cause: one clear sentence
        print(f"napari-gradcam: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
