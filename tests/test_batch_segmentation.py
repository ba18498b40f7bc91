"""The batch command with a segmentation model (output (N, classes, *spatial)): summary rows,
regions and heatmaps for its predicted classes; ``--target-mask PATTERN`` (a region file per
input, found like ``--mask``) for the region whose class logits are explained; predicted labels
with ``--write-segmentation``; target masks that are missing, of the wrong shape, unreadable or
given for a classifier; resuming with changed target masks; NIfTI target masks on the scan's
grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam.cli import main

CLASSES = ["background", "blob", "other"]
BLOCK = (slice(8, 20), slice(10, 26))  # the bright block of every 2D test image (32 x 40)


def tiny_seg(classes: int = 3, dims: int = 2) -> nn.Module:
    """Conv(1 -> 4, 3^dims mean) -> ReLU -> 1x1 Conv head (a factory for the sidecar's
    'test_batch_segmentation:tiny_seg'). With inputs scaled to [-1, 1] the feature f is the
    local brightness in [0, 1]: class 0 (background) scores 2 - 4f, class 1 (blob) 4f - 2, so
    bright pixels are "blob"; class 2 scores -10 everywhere and is never predicted."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    net = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU(), conv(4, classes, 1))
    with torch.no_grad():
        net[0].weight.fill_(1 / 3 ** dims)
        net[0].bias.zero_()
        net[2].weight.zero_()
        net[2].bias.zero_()
        net[2].weight[0].fill_(-1.0)
        net[2].bias[0] = 2.0
        net[2].weight[1].fill_(1.0)
        net[2].bias[1] = -2.0
        if classes > 2:
            net[2].bias[2:] = -10.0
    return net.eval()


def save_model(folder: Path, dims: int = 2) -> list[str]:
    """:func:`tiny_seg` saved as weights + sidecar; the CLI flags that load it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_seg(dims=dims).state_dict(), str(folder / "seg.safetensors"))
    (folder / "seg.safetensors.json").write_text(json.dumps({
        "architecture": "test_batch_segmentation:tiny_seg",
        "arguments": {"classes": 3, "dims": dims}, "class_names": CLASSES, "in_channels": 1,
        "intensity": "minmax", "mean": [0.5], "std": [0.5]}))
    return ["--model", str(folder / "seg.safetensors"), "--trust-code", "--device", "cpu",
            "--quiet", "--min-area", "4"]


@pytest.fixture(scope="module")
def seg2d(tmp_path_factory) -> list[str]:
    return save_model(tmp_path_factory.mktemp("seg2d"))


def logits_of(image: np.ndarray, dims: int = 2) -> np.ndarray:
    """The model's logits (classes, *spatial) for a 0/1 image, computed here by hand from
    the same weights (minmax then (x - 0.5) / 0.5 maps 0/1 to -1/+1)."""
    x = torch.as_tensor(image * 2.0 - 1.0, dtype=torch.float32)[None, None]
    with torch.no_grad():
        return tiny_seg(dims=dims)(x)[0].numpy()


def block_image(shift: int = 0) -> np.ndarray:
    img = np.zeros((32, 40), np.float32)
    img[BLOCK[0], BLOCK[1].start + shift:BLOCK[1].stop + shift] = 1.0
    return img


def write_tif(path: Path, data: np.ndarray) -> Path:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(str(path), data, photometric="minisblack")
    return path


def write_png(path: Path, data: np.ndarray) -> Path:
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(str(path), data)
    return path


def summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def inputs(tmp_path: Path, n: int = 2) -> Path:
    folder = tmp_path / "in"
    for k in range(n):
        write_tif(folder / f"img{k}.tif", block_image(shift=2 * k))
    return folder


def test_predicted_classes_regions_heatmaps_and_labels(tmp_path, seg2d):
    """No --target-mask: each image's largest predicted class (background skipped) over its
    own predicted region; --write-segmentation writes the argmax labels."""
    import tifffile

    folder, out = inputs(tmp_path), tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--write-segmentation",
                 *seg2d]) == 0
    rows = summary(out)
    assert [(Path(r["file"]).name, r["class"], r["status"]) for r in rows] == [
        ("img0.tif", "blob", "ok"), ("img1.tif", "blob", "ok")]
    for k, row in enumerate(rows):
        logits = logits_of(block_image(shift=2 * k))
        predicted = logits.argmax(0)
        assert float(row["score"]) == pytest.approx(logits[1][predicted == 1].sum(), rel=1e-4)
        assert int(row["regions"]) >= 1
        heat = tifffile.imread(str(out / "heatmaps" / f"img{k}.tif"))
        assert heat.shape == (32, 40) and np.isfinite(heat).all()
        # the heat sits on the block: its peak inside, the far corner cold
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert predicted[peak] == 1 and heat[0, 0] < 0.1 * heat.max()
        labels = tifffile.imread(str(out / "segmentation" / f"img{k}_labels.tif"))
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, predicted)
    geo = json.loads((out / "geojson" / "img0.geojson").read_text())
    assert geo["features"]


def test_target_mask_explains_the_given_region(tmp_path, seg2d):
    """--target-mask with --target by name and by index: the score explained is the class's
    logits summed over the mask file's region (> 0 in an integer file; a float file weighs)."""
    folder, out = inputs(tmp_path), tmp_path / "out"
    half = np.zeros((32, 40), np.uint8)
    half[8:20, 10:18] = 255  # the left half of the block
    write_tif(tmp_path / "regions" / "img0_region.tif", half)
    weights = np.zeros((32, 40), np.float32)
    weights[8:20, 14:30] = 0.25
    write_tif(tmp_path / "regions" / "img1_region.tif", weights)
    pattern = "{dir}/../regions/{stem}_region.tif"
    for target in ("blob", "1"):
        dest = out / target
        assert main(["batch", str(folder), "--out", str(dest), "--target-mask", pattern,
                     "--target", target, *seg2d]) == 0
        rows = summary(dest)
        assert [r["class"] for r in rows] == ["blob", "blob"]
        l0, l1 = logits_of(block_image(0)), logits_of(block_image(2))
        assert float(rows[0]["score"]) == pytest.approx(l0[1][half > 0].sum(), rel=1e-4)
        assert float(rows[1]["score"]) == pytest.approx((l1[1] * weights).sum(), rel=1e-4)
    # the class whose region it is not: background explained inside the same region
    assert main(["batch", str(folder), "--out", str(out / "bg"), "--target-mask", pattern,
                 "--target", "background", *seg2d]) == 0
    rows = summary(out / "bg")
    assert rows[0]["class"] == "background"
    assert float(rows[0]["score"]) == pytest.approx(l0[0][half > 0].sum(), rel=1e-4)


def test_stack_with_a_target_mask_per_frame_in_several_batches(tmp_path, seg2d):
    """A 3-frame TIFF stack with a 3-frame target mask, explained two frames per pass: each
    frame's own region."""
    frames = np.stack([block_image(shift=k) for k in range(3)])
    write_tif(tmp_path / "in" / "stack.tif", frames)
    regions = np.zeros((3, 32, 40), np.uint8)
    regions[0, 8:12, 10:20] = 1
    regions[1, 10:20, 12:16] = 1
    regions[2, 8:20, 20:28] = 1
    write_tif(tmp_path / "masks" / "stack.tif", regions)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), "--target-mask",
                 str(tmp_path / "masks" / "{name}"), "--target", "blob", "--batch-size", "2",
                 "--write-segmentation", *seg2d]) == 0
    rows = summary(out)
    assert [r["index"] for r in rows] == ["0", "1", "2"]
    for k, row in enumerate(rows):
        logits = logits_of(frames[k])
        assert float(row["score"]) == pytest.approx(logits[1][regions[k] > 0].sum(), rel=1e-4)
    import tifffile

    labels = tifffile.imread(str(out / "segmentation" / "stack_labels.tif"))
    assert labels.shape == (3, 32, 40)
    np.testing.assert_array_equal(labels[2], logits_of(frames[2]).argmax(0))


def test_empty_region_gives_a_zero_map_and_a_note(tmp_path, seg2d, capsys):
    """A class predicted nowhere ("other"), and an all-zero target mask: score 0, a zero
    heatmap (no NaN), no regions, and the summary's message says why; so does one line per
    input on stderr, in place of the engine's warning (which numbers the images of a batch,
    not of the input)."""
    import warnings

    import tifffile

    from napari_gradcam.cam import EmptyTargetWarning

    folder = inputs(tmp_path, 1)
    write_tif(tmp_path / "masks" / "img0.tif", np.zeros((32, 40), np.uint8))
    runs = {"other": ["--target", "other"],
            "empty": ["--target", "blob", "--target-mask", str(tmp_path / "masks" / "{name}")]}
    for name, flags in runs.items():
        out = tmp_path / name
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert main(["batch", str(folder), "--out", str(out), *flags, *seg2d]) == 0
        assert not [w for w in seen if issubclass(w.category, EmptyTargetWarning)]
        err = capsys.readouterr().err
        assert "EmptyTargetWarning" not in err and "sample(s)" not in err
        note, = [line for line in err.splitlines() if "no pixels" in line]
        assert note.startswith(f"napari-gradcam: {folder / 'img0.tif'}: class ")
        assert "heatmap is zero" in note
        row, = summary(out)
        assert row["status"] == "ok" and float(row["score"]) == 0.0 and row["regions"] == "0"
        assert "no pixels" in row["message"] and "heatmap is zero" in row["message"]
        heat = tifffile.imread(str(out / "heatmaps" / "img0.tif"))
        assert np.isfinite(heat).all() and not heat.any()


def test_target_found_lists_every_predicted_class(tmp_path, seg2d):
    folder, out = inputs(tmp_path, 1), tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--target", "found", *seg2d]) == 0
    # background is skipped, "other" is predicted nowhere: blob alone
    assert [r["class"] for r in summary(out)] == ["blob"]


def test_resume_redoes_inputs_whose_target_mask_changed(tmp_path, seg2d):
    folder, out = inputs(tmp_path), tmp_path / "out"
    masks = tmp_path / "masks"
    region = np.zeros((32, 40), np.uint8)
    region[8:20, 10:26] = 1
    for k in range(2):
        write_png(masks / f"img{k}.png", region)
    args = ["batch", str(folder), "--out", str(out), "--target-mask",
            str(masks / "{stem}.png"), "--target", "blob", *seg2d]
    assert main(args) == 0
    first = {r["file"]: float(r["score"]) for r in summary(out)}
    heat1 = out / "heatmaps" / "img1.tif"
    stamp = heat1.stat().st_mtime_ns
    run_json = (out / ".napari-gradcam" / "run.json").read_text()
    assert "target_mask" in run_json

    smaller = np.zeros((32, 40), np.uint8)
    smaller[8:12, 10:14] = 1
    write_png(masks / "img0.png", smaller)  # only img0's target mask changes
    assert main(args) == 0
    second = {r["file"]: float(r["score"]) for r in summary(out)}
    img0 = str(folder / "img0.tif")
    assert second[img0] != first[img0]
    assert second[img0] == pytest.approx(logits_of(block_image(0))[1][smaller > 0].sum(),
                                         rel=1e-4)
    assert heat1.stat().st_mtime_ns == stamp  # img1 was not redone

    # another pattern: other settings, refused naming the option, nothing rewritten
    (masks / "other").mkdir()
    for k in range(2):
        write_png(masks / "other" / f"img{k}.png", region)
    changed = [a if "{stem}" not in a else str(masks / "other" / "{stem}.png") for a in args]
    assert main(changed) == 2
    assert heat1.stat().st_mtime_ns == stamp
    assert (out / ".napari-gradcam" / "run.json").read_text() == run_json
    # a run without target masks over the same folder: refused as well
    assert main([a for a in args if a not in ("--target-mask", str(masks / "{stem}.png"))]) == 2


def test_bad_target_masks_fail_their_input_only(tmp_path, seg2d, capsys):
    """Missing, wrong-shaped, unreadable, negative and folder target masks: each fails its own
    input with one line naming the file; the good input is explained; exit status 1."""
    folder = tmp_path / "in"
    names = ["good", "missing", "shape", "garbage", "negative", "folder"]
    for k, name in enumerate(names):
        write_tif(folder / f"{name}.tif", block_image())
    masks = tmp_path / "masks"
    region = np.zeros((32, 40), np.uint8)
    region[8:20, 10:26] = 1
    write_tif(masks / "good.tif", region)
    write_tif(masks / "shape.tif", np.ones((16, 16), np.uint8))
    (masks / "garbage.tif").write_bytes(b"not a tiff at all")
    write_tif(masks / "negative.tif", np.full((32, 40), -1.0, np.float32))
    (masks / "folder.tif").mkdir()
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--target-mask",
                 str(masks / "{stem}.tif"), *seg2d]) == 1
    rows = {Path(r["file"]).stem: r for r in summary(out)}
    assert rows["good"]["status"] == "ok" and rows["good"]["class"] == "blob"
    expect = {"missing": "does not exist", "shape": "has shape (16, 16)",
              "garbage": "can't be read as an image", "negative": "negative values",
              "folder": "is a folder"}
    for name, words in expect.items():
        message = rows[name]["message"]
        assert rows[name]["status"] == "failed"
        assert words in message and "target mask" in message, message
        assert str(masks / f"{name}.tif") in message and "\n" not in message
    err = capsys.readouterr().err
    assert "failed: " + str(folder / "missing.tif") in err
    assert not (out / "heatmaps" / "missing.tif").exists()


def test_target_mask_for_a_classifier_is_refused_before_reading(tmp_path, monkeypatch, capsys):
    """A classifier has no per-pixel class: --target-mask (and --write-segmentation) refused
    with the reason before any image is read or anything written."""
    from napari_gradcam.batch import read

    folder = inputs(tmp_path, 1)
    write_tif(tmp_path / "masks" / "img0.tif", np.ones((32, 40), np.uint8))
    opened = []
    monkeypatch.setattr(read, "_imread", lambda path: opened.append(path) or 1 / 0)
    for flags in (["--target-mask", str(tmp_path / "masks" / "{stem}.tif")],
                  ["--write-segmentation"]):
        out = tmp_path / "out"
        assert main(["batch", str(folder), "--out", str(out), "--model", "demo",
                     "--device", "cpu", "--quiet", *flags]) == 2
        err = capsys.readouterr().err
        assert f"{flags[0]}:" in err and "classifier" in err and "segmentation model" in err
        assert err.count("\n") == 1
        assert not out.exists() and not opened


def test_bad_target_mask_pattern_is_refused_naming_the_option(tmp_path, seg2d, capsys):
    folder = inputs(tmp_path, 1)
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--target-mask",
                 "{dir.__class__}/{name}", *seg2d]) == 2
    err = capsys.readouterr().err
    assert "--target-mask '{dir.__class__}/{name}'" in err and "unknown field" in err
    assert not out.exists()


def test_target_mask_fingerprint_and_units(tmp_path):
    """The target mask joins the unit's fingerprint tagged as such: the same file as --mask or
    as --target-mask never matches; no target mask keeps the old fingerprint."""
    from napari_gradcam.batch import collect_units
    from napari_gradcam.batch.discover import source_fingerprint

    image = write_tif(tmp_path / "a.tif", block_image())
    write_tif(tmp_path / "a_m.tif", np.ones((32, 40), np.uint8))
    plain, = collect_units([image])
    as_mask, = collect_units([image], mask="{dir}/{stem}_m.tif")
    as_target, = collect_units([image], target_mask="{dir}/{stem}_m.tif")
    assert as_target.target_mask == str(tmp_path / "a_m.tif") and as_target.mask is None
    assert plain.fingerprint == source_fingerprint(image)
    assert len({plain.fingerprint, as_mask.fingerprint, as_target.fingerprint}) == 3
    with pytest.raises(ValueError, match="target mask pattern"):
        collect_units([image], target_mask="{name[0]}")


# --- volumes ---------------------------------------------------------------------------------

def block_volume() -> np.ndarray:
    v = np.zeros((12, 16, 20), np.float32)
    v[3:9, 4:12, 3:15] = 1.0  # off-centre along x: a mirrored mask lands elsewhere
    return v


def write_nifti(path: Path, display: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(display.T), affine), str(path))
    return path


def test_nifti_target_mask_reoriented_and_labels_with_the_affine(tmp_path):
    """A 3D segmentation model on a NIfTI scan: the target mask stored with x flipped (LAS
    against the scan's RAS) is reoriented onto the scan's grid; the labels are NIfTI with the
    scan's affine; a mask on another grid fails its input naming the file."""
    nib = pytest.importorskip("nibabel")
    flags = save_model(tmp_path / "model3d", dims=3)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-5.0, 3.0, 10.0]
    vol = block_volume()
    write_nifti(tmp_path / "in" / "scan.nii.gz", vol, affine)
    write_nifti(tmp_path / "in" / "other.nii.gz", vol, affine)
    region = np.zeros(vol.shape, np.uint8)
    region[3:9, 4:12, 2:8] = 1  # across the block's low-x edge: mirrored, it would not be
    logits = logits_of(vol, dims=3)
    assert abs(logits[1][region > 0].sum() - logits[1][region[:, :, ::-1] > 0].sum()) > 10
    flipped = np.diag([-1.0, 1, 1, 1])
    flipped[0, 3] = vol.shape[2] - 1  # voxel i -> X - 1 - i: the same world positions
    write_nifti(tmp_path / "masks" / "scan.nii.gz", region[:, :, ::-1], affine @ flipped)
    # another voxel grid (2x the spacing): refused, not applied shifted
    write_nifti(tmp_path / "masks" / "other.nii.gz", region, affine @ np.diag([2, 2, 2, 1.0]))
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), "--target-mask",
                 str(tmp_path / "masks" / "{name}"), "--target", "blob",
                 "--write-segmentation", *flags]) == 1
    rows = {Path(r["file"]).name: r for r in summary(out)}
    assert rows["scan.nii.gz"]["status"] == "ok"
    assert float(rows["scan.nii.gz"]["score"]) == pytest.approx(logits[1][region > 0].sum(),
                                                                rel=1e-4)
    message = rows["other.nii.gz"]["message"]
    assert rows["other.nii.gz"]["status"] == "failed"
    assert "target mask" in message and "not on the scan's voxel grid" in message
    assert str(tmp_path / "masks" / "other.nii.gz") in message
    labels = nib.load(str(out / "segmentation" / "scan_labels.nii.gz"))
    np.testing.assert_allclose(labels.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(labels.dataobj).T, logits.argmax(0))
    assert (out / "heatmaps" / "scan_heatmap.nii.gz").is_file()


def stack_in_parts(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 3-frame TIFF stack, read in parts of 2 frames with ``--part-size 2``."""
    frames = np.stack([block_image(shift=k) for k in range(3)])
    write_tif(tmp_path / "in" / "stack.tif", frames)
    return tmp_path / "in", frames


def test_masks_of_a_stack_read_in_parts(tmp_path, seg2d, capsys):
    """--target-mask and --mask of a stack read in parts: the same whole-stack file as when
    read whole, each part taking its own frames (part 2 = frame 2, not frame 0); labels in
    one zarr array for the stack, not a file per part, named in the closing line."""
    import zarr

    folder, frames = stack_in_parts(tmp_path)
    regions = np.zeros((3, 32, 40), np.uint8)
    regions[0, 8:12, 10:20] = 1
    regions[1, 10:20, 12:16] = 1
    regions[2, 8:20, 20:28] = 1
    write_tif(tmp_path / "targets" / "stack.tif", regions)
    keep = np.zeros((3, 32, 40), np.uint8)
    keep[:2] = 1  # regions allowed in frames 0 and 1 only
    write_tif(tmp_path / "masks" / "stack.tif", keep)
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--part-size", "2",
                 "--target-mask", str(tmp_path / "targets" / "{name}"),
                 "--mask", str(tmp_path / "masks" / "{name}"), "--target", "blob",
                 "--write-segmentation", *seg2d]) == 0
    rows = summary(out)
    assert [(r["index"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok"), ("2", "ok")]
    for k, row in enumerate(rows):
        logits = logits_of(frames[k])
        assert float(row["score"]) == pytest.approx(logits[1][regions[k] > 0].sum(), rel=1e-4)
    assert int(rows[0]["regions"]) >= 1 and rows[2]["regions"] == "0"
    labels = zarr.open(str(out / "segmentation" / "stack_labels.zarr"), mode="r")
    assert labels.shape == (3, 32, 40) and labels.dtype == np.uint16
    for k in range(3):
        np.testing.assert_array_equal(labels[k], logits_of(frames[k]).argmax(0))
    assert sorted(p.name for p in (out / "segmentation").iterdir()) == ["stack_labels.zarr"]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(heatmaps/, geojson/, segmentation/, coco.json, summary.csv)" in last


@pytest.mark.parametrize("flag", ["--target-mask", "--mask"])
def test_a_mask_as_long_as_a_part_is_refused(tmp_path, seg2d, flag, capsys):
    """A 2-frame mask for a 3-frame stack read in parts of 2: as long as the first part but
    not the stack, it would give part 2 frame 0's region; every part fails saying the mask
    needs one frame per frame of the whole stack, and nothing is explained."""
    folder, _ = stack_in_parts(tmp_path)
    write_tif(tmp_path / "masks" / "stack.tif", np.ones((2, 32, 40), np.uint8))
    out = tmp_path / "out"
    target = ["--target", "blob"] if flag == "--target-mask" else []
    assert main(["batch", str(folder), "--out", str(out), "--part-size", "2", flag,
                 str(tmp_path / "masks" / "{name}"), *target, *seg2d]) == 1
    rows = summary(out)
    assert len(rows) == 2 and all(r["status"] == "failed" for r in rows)
    for row in rows:
        assert "has shape (2, 32, 40)" in row["message"]
        assert "one frame per frame of the whole stack (3, 32, 40)" in row["message"]
        assert "or one image (32, 40)" in row["message"]
    assert "one frame per frame of the whole stack" in capsys.readouterr().err
