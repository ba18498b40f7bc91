"""``napari-gradcam evaluate``: metrics.csv, summary.csv, curve PNGs and the terminal table
against the library's metrics on the same images; mask, GeoJSON and COCO annotations (a COCO
file of several images matched by name); an input without annotation; and every bad input
refused with exit status 2 and one line saying what to change."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from napari_gradcam import metrics as M
from napari_gradcam.cli import main
from napari_gradcam.evaluate import COLUMNS, SUMMARY_COLUMNS, evaluate
from napari_gradcam.job import ExplainJob
from napari_gradcam.models import load_model
from napari_gradcam.models.demo.synthetic import make_image

iio = pytest.importorskip("imageio.v3")
tifffile = pytest.importorskip("tifffile")

SIZE = 96
FAST = ["--device", "cpu", "--steps", "5", "--quiet"]


def write_png(path: Path, seed: int):
    """A synthetic image with one object as an 8-bit PNG, and that object's mask."""
    im = make_image(SIZE, seed=seed, n_objects=1)
    iio.imwrite(path, (im.image * 255).astype(np.uint8))
    return im.objects[0].mask


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def spec():
    return load_model("demo")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """a.png, b.png with mask files, and a 2-frame TIFF stack s.tif without annotation."""
    d = tmp_path_factory.mktemp("images")
    masks = {}
    for name, seed in (("a", 1), ("b", 2)):
        masks[name] = write_png(d / f"{name}.png", seed)
        iio.imwrite(d / f"{name}_mask.png", masks[name].astype(np.uint8) * 255)
    frames = [make_image(SIZE, seed=s, n_objects=1).image for s in (3, 4)]
    tifffile.imwrite(d / "s.tif", np.stack(frames).astype(np.float32))
    return d, masks


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """One CLI run over the three inputs (default metrics, with mask annotations)."""
    d, _ = folder
    out = tmp_path_factory.mktemp("run") / "out"
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["evaluate", str(d / "a.png"), str(d / "b.png"), str(d / "s.tif"),
                     "--annotations", "{dir}/{stem}_mask.png", "--out", str(out), *FAST])
    return code, out, stdout.getvalue(), stderr.getvalue()


def test_metrics_csv_has_a_row_per_image_and_method_and_no_nan(run):
    code, out, _stdout, _stderr = run
    assert code == 0
    rows = read_csv(out / "metrics.csv")
    assert tuple(rows[0]) == COLUMNS
    assert [(r["image"], r["index"]) for r in rows] == [("a", ""), ("b", ""), ("s", "0"),
                                                        ("s", "1")]
    assert {r["method"] for r in rows} == {"gradcam"}
    assert [r["annotated"] for r in rows] == ["yes", "yes", "no annotation", "no annotation"]
    for r in rows:
        assert r["class"] in ("disc", "square", "triangle")
        for col in ("probability", "deletion_auc", "insertion_auc", "road_morf", "road_lerf",
                    "road_combined", "drop"):
            assert math.isfinite(float(r[col])), (col, r)
        assert r["increase"] in ("0", "1")
        assert r["sanity_spearman"] == r["sanity_ssim"] == ""  # not asked for
        agreement = [r[c] for c in ("pointing", "energy", "iou", "dice", "region_iou",
                                    "region_dice")]
        if r["annotated"] == "yes":
            assert all(math.isfinite(float(v)) for v in agreement)
        else:  # the input's other metrics are there, its agreement cells empty
            assert agreement == [""] * 6
    text = (out / "metrics.csv").read_text() + (out / "summary.csv").read_text()
    assert "nan" not in text.lower() and "inf" not in text.lower()


def test_summary_equals_the_library_on_the_same_images(run, folder, spec):
    _code, out, _stdout, _stderr = run
    d, masks = folder
    images = [iio.imread(d / "a.png"), iio.imread(d / "b.png"),
              *tifffile.imread(d / "s.tif")]
    expect = {k: [] for k in ("deletion_auc", "insertion_auc", "road_combined", "drop",
                              "iou", "pointing")}
    for k, img in enumerate(images):
        res = ExplainJob(spec, ["gradcam"], device="cpu").run(img)
        heat, target = res.heatmaps["gradcam"], res.class_ids[..., 0]
        di = M.deletion_insertion(img, spec, heat, target, 5, device="cpu")
        rd = M.road(img, spec, heat, target, most_relevant_first="both", seed=0, device="cpu")
        ad = M.average_drop_increase(img, spec, heat, target, device="cpu")
        expect["deletion_auc"].append(float(di.deletion_auc))
        expect["insertion_auc"].append(float(di.insertion_auc))
        expect["road_combined"].append(float(rd.combined))
        expect["drop"].append(float(ad.drop))
        if k < 2:
            ag = M.agreement(heat, masks["ab"[k]], 0.5)
            expect["iou"].append(float(ag.iou))
            expect["pointing"].append(float(ag.pointing))
    (summary,) = read_csv(out / "summary.csv")
    assert tuple(summary) == SUMMARY_COLUMNS
    assert summary["method"] == "gradcam" and summary["images"] == "4"
    assert summary["annotated"] == "2"
    for col, key in (("deletion_auc", "deletion_auc"), ("insertion_auc", "insertion_auc"),
                     ("road_combined", "road_combined"), ("average_drop", "drop"),
                     ("iou", "iou"), ("pointing_game", "pointing")):
        assert float(summary[col]) == pytest.approx(np.mean(expect[key]), rel=1e-5,
                                                    abs=1e-7), col


def test_curve_pngs_are_written_per_image_and_for_the_mean(run):
    _code, out, _stdout, _stderr = run
    names = sorted(p.name for p in (out / "curves").iterdir())
    assert names == ["a_gradcam.png", "b_gradcam.png", "mean_gradcam.png", "s_0_gradcam.png",
                     "s_1_gradcam.png"]
    for name in names:
        img = iio.imread(out / "curves" / name)
        assert img.shape[:2] == (400, 600)
        assert img[..., :3].std() > 10  # axes, curves and text drawn, not a blank canvas


def test_terminal_table_has_methods_as_rows_and_aligned_columns(run):
    _code, out, stdout, _stderr = run
    lines = stdout.splitlines()
    header, row = lines[0], lines[1]
    assert header.split()[:4] == ["method", "images", "deletion_auc", "insertion_auc"]
    assert "sanity_spearman" not in header  # only computed metrics are columns
    assert row.split()[0] == "gradcam" and row.split()[1] == "4"
    (summary,) = read_csv(out / "summary.csv")
    for col in ("deletion_auc", "road_combined", "iou"):
        end = header.index(col) + len(col)  # numbers right-aligned under their header
        value = row[:end].split()[-1]
        assert float(value) == pytest.approx(float(summary[col]), abs=1e-4)
    assert "written to" in lines[-1] and "metrics.csv" in lines[-1]


def test_geojson_and_coco_annotations_match_the_mask(folder, tmp_path, spec):
    """One object's box as a mask, as GeoJSON and in a COCO file of two images (the other
    image listed first): the same agreement numbers."""
    d, masks = folder
    rows, cols = np.nonzero(masks["a"])
    r0, c0, r1, c1 = (int(v) for v in (rows.min(), cols.min(), rows.max() + 1,
                                       cols.max() + 1))
    box = np.zeros((SIZE, SIZE), np.uint8)
    box[r0:r1, c0:c1] = 255
    ring = [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]
    ann = tmp_path / "ann"
    ann.mkdir()
    iio.imwrite(ann / "a.png", box)
    (ann / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"objectType": "annotation"},
         "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    (ann / "coco.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "other.png", "height": SIZE, "width": SIZE},
                   {"id": 9, "file_name": "sub/a.jpg", "height": SIZE, "width": SIZE}],
        "annotations": [{"id": 1, "image_id": 9, "category_id": 1,
                         "bbox": [int(c0), int(r0), int(c1 - c0), int(r1 - r0)]},
                        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5]}],
        "categories": [{"id": 1, "name": "object"}]}))
    got = {}
    for kind, pattern in (("mask", f"{ann}/{{name}}"), ("geojson", f"{ann}/{{stem}}.geojson"),
                          ("coco", f"{ann}/coco.json")):
        res = evaluate([d / "a.png"], spec, ["gradcam"], pattern, None, metrics=["agreement"],
                       device="cpu")
        (row,) = res.rows
        assert row["annotated"] == "yes" and row["deletion_auc"] is None
        got[kind] = [row[c] for c in ("pointing", "energy", "iou", "dice", "region_iou")]
    assert got["geojson"] == pytest.approx(got["mask"]) and \
        got["coco"] == pytest.approx(got["mask"])
    assert 0 < got["mask"][2] < 1


def test_rerun_into_the_same_folder_replaces_files_and_drops_old_curves(folder, tmp_path):
    d, _ = folder
    out = tmp_path / "out"
    base = ["evaluate", "--out", str(out), *FAST, "--metrics", "drop"]
    assert main([*base[:1], str(d / "a.png"), str(d / "b.png"), *base[1:]]) == 0
    assert main([*base[:1], str(d / "a.png"), *base[1:]]) == 0  # same settings, fewer inputs
    assert [r["image"] for r in read_csv(out / "metrics.csv")] == ["a"]
    assert not (out / "curves").exists()  # no deletion / insertion asked: no curves
    assert not [p for p in out.rglob("*.tmp*")]
    # other settings into the same folder: refused as batch refuses them, files untouched
    before = (out / "metrics.csv").read_text()
    assert main([*base[:1], str(d / "a.png"), *base[1:], "--seed", "3"]) == 2
    assert (out / "metrics.csv").read_text() == before


def test_sanity_columns_and_an_empty_annotation(folder, tmp_path, spec):
    """--metrics sanity fills the final stage's Spearman and SSIM; an annotation file that
    marks nothing says "empty" and leaves the agreement cells empty."""
    d, _ = folder
    iio.imwrite(tmp_path / "a.png", np.zeros((SIZE, SIZE), np.uint8))
    res = evaluate([d / "a.png"], spec, ["gradcam"], f"{tmp_path}/{{name}}", None,
                   metrics="sanity,agreement", device="cpu")
    (row,) = res.rows
    assert row["annotated"] == "empty" and row["iou"] is None and row["pointing"] is None
    assert -1 <= row["sanity_spearman"] <= 1 and -1 <= row["sanity_ssim"] <= 1
    (summary,) = res.summary
    assert summary["annotated"] == 0 and summary["iou"] is None
    assert summary["sanity_spearman"] == pytest.approx(row["sanity_spearman"])
    assert "sanity_spearman" in res.table().splitlines()[0]


# ---- bad options: exit status 2, one line, nothing half-written; a bad input: named, exit 1 --------------------------------

def refused(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("napari-gradcam: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def input_failed(capsys, argv, source) -> str:
    """An input that can't be evaluated: recorded and named, the others go on, exit status 1
    (as batch); with no other input nothing is written."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if x.strip().startswith("failed:"))
    assert line.strip().startswith(f"failed: {source}: "), err
    return line


def test_no_input_found(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    err = refused(capsys, ["evaluate", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                           *FAST])
    assert "no images found" in err and "give image files" in err


def test_annotation_of_the_wrong_size_names_both_shapes(capsys, folder, tmp_path):
    d, _ = folder
    iio.imwrite(tmp_path / "a.png", np.zeros((50, 60), np.uint8))
    err = input_failed(capsys, ["evaluate", str(d / "a.png"), "--annotations",
                                f"{tmp_path}/{{name}}", "--out", str(tmp_path / "o"), *FAST],
                       d / "a.png")
    assert "(50, 60)" in err and f"({SIZE}, {SIZE})" in err and "give a mask" in err
    assert not (tmp_path / "o" / "metrics.csv").exists()


def test_annotation_on_a_plane_the_stack_lacks(capsys, folder, tmp_path):
    d, _ = folder
    (tmp_path / "s.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {},
         "geometry": {"type": "Polygon", "plane": {"c": -1, "z": 5},
                      "coordinates": [[[1, 1], [9, 1], [9, 9], [1, 9], [1, 1]]]}}]}))
    err = input_failed(capsys, ["evaluate", str(d / "s.tif"), "--annotations",
                                f"{tmp_path}/{{stem}}.geojson", "--out", str(tmp_path / "o"),
                                *FAST], d / "s.tif")
    assert "plane (5,)" in err and "(2,)" in err


@pytest.mark.parametrize("name, content, words", [
    ("a.png", b"not a png at all", "can't be read as an image"),
    ("a.json", b'{"images": [', "is not valid JSON"),
])
def test_unreadable_or_malformed_annotation(capsys, folder, tmp_path, name, content, words):
    d, _ = folder
    (tmp_path / name).write_bytes(content)
    err = input_failed(capsys, ["evaluate", str(d / "a.png"), "--annotations",
                                str(tmp_path / name), "--out", str(tmp_path / "o"), *FAST],
                       d / "a.png")
    assert words in err and name in err


def test_coco_file_without_the_image(capsys, folder, tmp_path):
    d, _ = folder
    (tmp_path / "coco.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "other.png", "height": SIZE, "width": SIZE}],
        "annotations": [], "categories": []}))
    err = input_failed(capsys, ["evaluate", str(d / "a.png"), "--annotations",
                                str(tmp_path / "coco.json"), "--out", str(tmp_path / "o"),
                                *FAST], d / "a.png")
    assert "holds no image named a.png" in err and "other.png" in err


@pytest.mark.parametrize("flags, words", [
    (["--metrics", "deletion,accuracy"], "unknown metric 'accuracy'"),
    (["--steps", "0"], "--steps '0'"),
    (["--steps", "2.5"], "--steps '2.5'"),
    (["--target", "cat"], "no class 'cat'"),
    (["--target", "7"], "out of range"),
    (["--target", "found"], "one class"),
    (["--metrics", "agreement"], "--annotations"),
    (["--threshold", "2"], "--threshold '2'"),
])
def test_bad_options(capsys, folder, tmp_path, flags, words):
    d, _ = folder
    err = refused(capsys, ["evaluate", str(d / "a.png"), "--out", str(tmp_path / "o"), *FAST,
                           *flags])
    assert words in err
    assert not (tmp_path / "o" / "metrics.csv").exists()


def test_segmentation_model_is_refused(capsys, folder, tmp_path):
    from test_batch_segmentation import save_model

    d, _ = folder
    flags = [f for f in save_model(tmp_path / "seg") if f not in ("--min-area", "4")]
    err = refused(capsys, ["evaluate", str(d / "a.png"), "--out", str(tmp_path / "o"),
                           "--steps", "5", *flags])
    assert "segmentation model" in err and "classifiers" in err


def test_output_folder_of_another_run_kind_is_refused(capsys, folder, tmp_path):
    """A batch run's folder: refused before any model runs, as batch refuses other settings;
    --overwrite writes beside them."""
    d, _ = folder
    out = tmp_path / "o"
    assert main(["batch", str(d / "a.png"), "--out", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    capsys.readouterr()
    before = (out / "summary.csv").read_text()
    err = refused(capsys, ["evaluate", str(d / "a.png"), "--out", str(out), *FAST,
                           "--metrics", "drop"])
    assert "results of a batch run" in err and "--overwrite" in err
    assert (out / "summary.csv").read_text() == before and not (out / "metrics.csv").exists()
    assert main(["evaluate", str(d / "a.png"), "--out", str(out), *FAST, "--metrics", "drop",
                 "--overwrite"]) == 0
    assert [r["image"] for r in read_csv(out / "metrics.csv")] == ["a"]


def test_a_bad_input_is_named_and_the_others_are_written(capsys, folder, tmp_path):
    """One unreadable input among good ones: its name and reason on stderr, exit status 1,
    metrics.csv and summary.csv of the inputs that worked."""
    d, _ = folder
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "o"
    line = input_failed(capsys, ["evaluate", str(d / "a.png"), str(tmp_path / "broken.png"),
                                 "--out", str(out), *FAST, "--metrics", "drop"],
                        tmp_path / "broken.png")
    assert "replace the file or leave it out" in line
    assert [r["image"] for r in read_csv(out / "metrics.csv")] == ["a"]
    assert read_csv(out / "summary.csv")[0]["images"] == "1"


def test_annotation_files_beside_the_images_are_not_inputs(folder, tmp_path, spec):
    """A folder holding a.png and a_mask.png, with --annotations '{dir}/{stem}_mask.png': the
    mask is a's annotation, not an image of its own."""
    d, _ = folder
    (tmp_path / "in").mkdir()
    for name in ("a.png", "a_mask.png"):
        (tmp_path / "in" / name).write_bytes((d / name).read_bytes())
    result = evaluate([tmp_path / "in"], spec, annotations="{dir}/{stem}_mask.png",
                      metrics="agreement", device="cpu")
    assert [(r["image"], r["annotated"]) for r in result.rows] == [("a", "yes")]
    assert not result.failed


def test_batch_into_an_evaluation_folder_is_refused_in_one_sentence(capsys, folder, tmp_path):
    """The two commands share the folder's settings check: either into the other's folder is
    one sentence naming the other command, not a list of every setting that differs."""
    d, _ = folder
    out = tmp_path / "o"
    assert main(["evaluate", str(d / "a.png"), "--out", str(out), *FAST,
                 "--metrics", "drop"]) == 0
    capsys.readouterr()
    err = refused(capsys, ["batch", str(d / "a.png"), "--out", str(out), "--device", "cpu",
                           "--quiet"])
    assert "results of an evaluate run" in err and "--overwrite" in err
    assert "->" not in err  # no settings diff
