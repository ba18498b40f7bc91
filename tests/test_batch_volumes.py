"""The batch command on volumes: a 3D (Conv3d) model explains each volume whole and finds 3D
regions; NIfTI and DICOM series in, NIfTI heatmap and label map (with the scan's affine), a CSV
of 3D boxes, plane-wise GeoJSON and COCO, overlay PNGs out; parts cut leading axes only."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from napari_gradcam.cli import main

nib = pytest.importorskip("nibabel")

CUBE = (slice(4, 10), slice(6, 14), slice(8, 18))  # display (z, row, col) of the bright block


def bright3d(classes: int = 2) -> nn.Module:
    """Conv3d(1 -> 4, 3x3x3 mean) -> ReLU -> GAP -> Linear (all weights 1): with inputs scaled
    to [-1, 1] its Grad-CAM is the smoothed brightness, so a bright block gives one 3D region
    around it (a factory for the sidecar's 'test_batch_volumes:bright3d')."""
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                        nn.Flatten(), nn.Linear(4, classes))
    with torch.no_grad():
        net[0].weight.fill_(1 / 27)
        net[0].bias.zero_()
        net[4].weight.fill_(1.0)
        net[4].bias.zero_()
    return net.eval()


@pytest.fixture(scope="module")
def model3d(tmp_path_factory) -> list[str]:
    """The CLI flags for :func:`bright3d` saved with its sidecar."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("model3d")
    save_file(bright3d().state_dict(), str(folder / "m3.safetensors"))
    (folder / "m3.safetensors.json").write_text(json.dumps({
        "architecture": "test_batch_volumes:bright3d", "class_names": ["blob", "other"],
        "in_channels": 1, "intensity": "minmax", "mean": [0.5], "std": [0.5]}))
    return ["--model", str(folder / "m3.safetensors"), "--trust-code", "--device", "cpu",
            "--quiet", "--min-area", "4"]


def block_volume(shape=(16, 24, 24), seed=0) -> np.ndarray:
    """Dim noise with one bright block at CUBE (display order)."""
    rng = np.random.default_rng(seed)
    v = (rng.random(shape) * 0.2).astype(np.float32)
    v[(...,) + CUBE] += 1.0
    return v


def oblique_affine() -> np.ndarray:
    """Voxel -> mm with a rotation about x, anisotropic voxels and a translation."""
    a = np.radians(20)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-10.0, 22.5, 7.25]
    return affine


def write_nifti_volume(path: Path, display: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI file whose display order (z, y, x) is ``display``: voxel (i, j, k) = (x, y, z)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(display.T), affine), str(path))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def box_of(row: dict) -> tuple:
    return tuple(int(row[k]) for k in ("z0", "row0", "col0", "z1", "row1", "col1"))


def bbox_of(mask: np.ndarray) -> tuple:
    where = np.nonzero(mask)
    return (*(int(w.min()) for w in where), *(int(w.max()) + 1 for w in where))


def check_coco(out: Path, planes: int, boxes: list[tuple]) -> dict:
    """coco.json loads with pycocotools; one image per plane; every region's part lies on a
    plane its 3D box crosses."""
    from pycocotools.coco import COCO

    coco = COCO(str(out / "coco.json"))
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == planes
    by_label = {}
    for ann in coco.loadAnns(coco.getAnnIds()):
        name = coco.loadImgs(ann["image_id"])[0]["file_name"]
        z = int(Path(name).stem.rsplit("_z", 1)[1])
        label = ann["attributes"]["region_label"]
        by_label.setdefault(label, set()).add(z)
    parts = sum(b[3] - b[0] for b in boxes)
    assert len(coco.getAnnIds()) == parts
    return by_label


def test_nifti_with_an_oblique_affine_end_to_end(tmp_path, model3d):
    affine = oblique_affine()
    src = write_nifti_volume(tmp_path / "in" / "scan.nii.gz", block_volume(), affine)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), *model3d]) == 0

    heat = nib.load(str(out / "heatmaps" / "scan_heatmap.nii.gz"))
    np.testing.assert_allclose(heat.affine, affine, atol=1e-6)
    assert heat.shape == nib.load(str(src)).shape == (24, 24, 16)
    display_heat = np.asarray(heat.dataobj).T  # back to (z, y, x)
    peak = np.unravel_index(np.argmax(display_heat), display_heat.shape)
    assert all(s.start <= p < s.stop for p, s in zip(peak, CUBE))  # the block, not its mirror

    labels_img = nib.load(str(out / "regions" / "scan_regions.nii.gz"))
    np.testing.assert_allclose(labels_img.affine, affine, atol=1e-6)
    labels = np.asarray(labels_img.dataobj).T
    rows = read_csv(out / "regions" / "scan_boxes.csv")
    assert rows and sorted(int(r["label"]) for r in rows) == sorted(
        int(v) for v in np.unique(labels) if v)
    for row in rows:
        assert bbox_of(labels == int(row["label"])) == box_of(row)
        assert int(row["voxels"]) == int(np.count_nonzero(labels == int(row["label"])))
    block = next(r for r in rows if box_of(r)[0] <= 6 < box_of(r)[3])
    z0, r0, c0, z1, r1, c1 = box_of(block)
    cube = [s.start for s in CUBE] + [s.stop for s in CUBE]
    assert np.abs(np.subtract(box_of(block), cube)).max() <= 1  # the block, within a voxel
    # world millimetres: the box's voxel corners through the affine (x from i = column)
    corners = np.array([[c, r, z, 1.0] for c in (c0 - 0.5, c1 - 0.5)
                        for r in (r0 - 0.5, r1 - 0.5) for z in (z0 - 0.5, z1 - 0.5)]).T
    world = (affine @ corners)[:3]
    assert float(block["x_min_mm"]) == pytest.approx(world[0].min())
    assert float(block["z_max_mm"]) == pytest.approx(world[2].max())

    summary = read_csv(out / "summary.csv")
    assert len(summary) == 1 and summary[0]["status"] == "ok"
    assert int(summary[0]["regions"]) == len(rows)
    by_label = check_coco(out, 16, [box_of(r) for r in rows])
    for row in rows:
        z0, z1 = box_of(row)[0], box_of(row)[3]
        assert by_label[int(row["label"])] == set(range(z0, z1))

    geo = json.loads((out / "geojson" / "scan.geojson").read_text())
    planes = {}
    for f in geo["features"]:
        plane = f["geometry"]["plane"]
        assert plane["c"] == -1 and plane["t"] == 0
        planes.setdefault(f["properties"]["measurements"]["region_label"], set()).add(
            plane["z"])
    assert planes == by_label

    # resumed: the same command redoes nothing
    record = out / ".napari-gradcam" / "records" / "scan.json"
    before = record.stat().st_mtime_ns, (out / "regions" / "scan_boxes.csv").read_bytes()
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), *model3d]) == 0
    assert (record.stat().st_mtime_ns, (out / "regions" / "scan_boxes.csv").read_bytes()) == \
        before


def dicom_series(folder: Path, n: int = 4, uid: str | None = None, shift=(0.0, 0.0)) -> Path:
    """``n`` copies of pydicom's CT_small.dcm as one series: positions 2.5 mm apart along the
    slice normal (written in shuffled order with shuffled InstanceNumbers)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = uid or pydicom.uid.generate_uid()
    iop = np.array([float(v) for v in template.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.array([float(v) for v in template.ImagePositionPatient])
    for order, k in enumerate([2, 0, 3, 1][:n] if n == 4 else range(n)):
        ds = template.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        pos = origin + normal * 2.5 * k + np.array([*shift, 0.0])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.InstanceNumber = n - order
        ds.save_as(str(folder / f"slice{order:02d}.dcm"))
    return folder


def test_a_dicom_series_folder_is_one_input(tmp_path, model3d):
    from napari_gradcam.batch import collect_units
    from napari_gradcam.volumes import read_volume

    series = dicom_series(tmp_path / "in" / "ct.series")
    units = collect_units([tmp_path / "in"], spatial_dims=3)
    assert [(u.kind, u.name) for u in units] == [("volume", "ct.series")]
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), *model3d]) == 0
    vol = read_volume(series)
    heat = nib.load(str(out / "heatmaps" / "ct.series_heatmap.nii.gz"))
    np.testing.assert_allclose(heat.affine, vol.affine, atol=1e-5)
    assert heat.shape == (128, 128, 4)
    rows = read_csv(out / "regions" / "ct.series_boxes.csv")
    summary = read_csv(out / "summary.csv")
    assert [(s["file"], s["status"], int(s["regions"])) for s in summary] == [
        (str(series), "ok", len(rows))]
    check_coco(out, 4, [box_of(r) for r in rows])

    # the folder's fingerprint is its slices: untouched, a rerun skips it; one slice
    # rewritten, the series is redone
    record = out / ".napari-gradcam" / "records" / "ct.series.json"
    stamp = record.stat().st_mtime_ns
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), *model3d]) == 0
    assert record.stat().st_mtime_ns == stamp
    slice0 = series / "slice00.dcm"
    os.utime(slice0, ns=(slice0.stat().st_atime_ns, slice0.stat().st_mtime_ns + 10**9))
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), *model3d]) == 0
    assert record.stat().st_mtime_ns != stamp


def test_a_tiff_volume_is_never_cut_and_its_overlay_shows_the_boxes(tmp_path, model3d):
    import imageio.v3 as iio
    import tifffile

    from napari_gradcam.annotations import class_color

    tifffile.imwrite(tmp_path / "vol.tif", block_volume())
    outs = {}
    for mode in ("mip", "mid"):
        out = outs[mode] = tmp_path / f"out-{mode}"
        assert main(["batch", str(tmp_path / "vol.tif"), "--out", str(out), "--overlay",
                     "--volume-overlay", mode, "--part-size", "4", *model3d]) == 0
        records = list((out / ".napari-gradcam" / "records").glob("*.json"))
        assert [r.name for r in records] == ["vol.json"]  # one unit: not cut at 4 planes
        rows = read_csv(out / "regions" / "vol_boxes.csv")
        assert rows
        labels = tifffile.imread(out / "regions" / "vol_regions.tif")
        for row in rows:
            assert bbox_of(labels == int(row["label"])) == box_of(row)
            # no affine: world = voxel centres
            assert float(row["x_min_mm"]) == int(row["col0"]) - 0.5
        assert int(read_csv(out / "summary.csv")[0]["regions"]) == len(rows)
        check_coco(out, 16, [box_of(r) for r in rows])
        png = iio.imread(out / "overlays" / "vol.png")
        assert png.shape == (24, 24, 3)
        z0, r0, c0, z1, r1, c1 = box_of(rows[0])
        colour = class_color(0)
        if mode == "mip" or z0 <= 8 < z1:
            assert tuple(png[r0, c0]) == colour and tuple(png[r1 - 1, c1 - 1]) == colour
        assert tifffile.imread(out / "heatmaps" / "vol.tif").shape == (16, 24, 24)
    # the drawing is a setting; the default is left out, so older runs keep their digest
    settings = {m: json.loads((o / ".napari-gradcam" / "run.json").read_text())["settings"]
                for m, o in outs.items()}
    assert settings["mid"]["volume_overlay"] == "mid" and "volume_overlay" not in settings["mip"]


def test_parts_cut_only_leading_axes(tmp_path, model3d):
    import tifffile

    from napari_gradcam.batch import collect_units

    tifffile.imwrite(tmp_path / "vol.tif", block_volume())
    tifffile.imwrite(tmp_path / "movie.tif", np.stack([block_volume(seed=1),
                                                       block_volume(seed=2)]))
    # a 2D model's images are the planes: a volume is cut along its first axis
    assert [(u.kind, u.start, u.stop) for u in collect_units([tmp_path / "vol.tif"],
                                                             part_size=4)] == [
        ("parts", 0, 4), ("parts", 4, 8), ("parts", 8, 12), ("parts", 12, 16)]
    assert [u.kind for u in collect_units([tmp_path / "vol.tif"], part_size=4,
                                          spatial_dims=3)] == ["file"]
    # a (T, D, H, W) stack with a 3D model: cut along T
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "movie.tif"), "--out", str(out), "--part-size", "1",
                 *model3d]) == 0
    records = sorted(p.name for p in (out / ".napari-gradcam" / "records").glob("*.json"))
    assert records == ["movie_000000-000001.json", "movie_000001-000002.json"]
    import zarr

    heat = zarr.open(str(out / "heatmaps" / "movie.zarr"), mode="r")
    assert heat.shape == (2, 16, 24, 24) and float(np.max(heat[1])) > 0
    summary = read_csv(out / "summary.csv")
    assert [s["index"] for s in summary] == ["0", "1"]
    assert all(int(s["regions"]) >= 1 for s in summary)
    for key, t in (("movie_000000-000001", "0"), ("movie_000001-000002", "1")):
        rows = read_csv(out / "regions" / f"{key}_boxes.csv")
        assert rows and {r["index"] for r in rows} == {t}  # indexed in the whole stack
        labels = tifffile.imread(out / "regions" / f"{key}_regions.tif")
        assert labels.shape == (1, 16, 24, 24)
        for row in rows:
            assert bbox_of(labels[0] == int(row["label"])) == box_of(row)
    from pycocotools.coco import COCO

    names = [i["file_name"] for i in COCO(str(out / "coco.json")).dataset["images"]]
    assert len(names) == 32 and names[0] == "movie_0_z0.tif" and names[-1] == "movie_1_z15.tif"


def test_volume_headers_are_read_without_the_voxels(tmp_path):
    from napari_gradcam.batch import volume_header

    path = write_nifti_volume(tmp_path / "a.nii.gz", block_volume(), np.eye(4))
    assert volume_header(path) == ((16, 24, 24), np.dtype(np.float32))
    four = tmp_path / "b.nii"
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 16, 3), np.int16), np.eye(4)), str(four))
    assert volume_header(four) == ((3, 16, 20, 24), np.dtype(np.int16))
    series = dicom_series(tmp_path / "ct", n=3)
    assert volume_header(series)[0] == (3, 128, 128)


def test_a_huge_nifti_is_refused_from_its_header(tmp_path, model3d, monkeypatch):
    """The header says 1000^3 voxels: refused with the numbers, before any voxel is read."""
    from napari_gradcam import memory

    path = tmp_path / "huge.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.float32)
    with open(path, "wb") as f:  # the header alone: the voxels would be 4 GB
        f.write(header.binaryblock + b"\0" * 4)
    monkeypatch.setattr(memory, "available_host_memory", lambda: 2 * 10**9)
    out = tmp_path / "out"
    assert main(["batch", str(path), "--out", str(out), *model3d]) == 1
    row = read_csv(out / "summary.csv")[0]
    assert row["status"] == "failed" and "1000 x 1000 x 1000 float32" in row["message"]
    assert "GB" in row["message"]


def test_a_truncated_nifti_fails_alone_and_the_run_goes_on(tmp_path, model3d):
    folder = tmp_path / "in"
    good = write_nifti_volume(folder / "good.nii.gz", block_volume(), oblique_affine())
    bad = write_nifti_volume(folder / "bad.nii.gz", block_volume(seed=3), np.eye(4))
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    before = bad.read_bytes()
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), *model3d]) == 1
    rows = {Path(r["file"]).name: r for r in read_csv(out / "summary.csv")}
    assert rows["good.nii.gz"]["status"] == "ok"
    assert rows["bad.nii.gz"]["status"] == "failed"
    message = rows["bad.nii.gz"]["message"]
    assert "can't read it as a volume" in message and "truncated" in message
    assert bad.read_bytes() == before and good.exists()
    assert not (out / "heatmaps" / "bad_heatmap.nii.gz").exists()


def test_a_dicom_folder_with_two_series_says_so(tmp_path, model3d):
    pydicom = pytest.importorskip("pydicom")
    folder = tmp_path / "in" / "mixed"
    dicom_series(folder, n=2, uid=pydicom.uid.generate_uid())
    other = dicom_series(tmp_path / "other", n=2, uid=pydicom.uid.generate_uid(),
                         shift=(5.0, 0.0))
    for k, f in enumerate(sorted(other.iterdir())):
        shutil.copy(f, folder / f"b{k}.dcm")
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), *model3d]) == 1
    (row,) = read_csv(out / "summary.csv")
    assert row["status"] == "failed" and "2 DICOM series" in row["message"]
    assert "folder of its own" in row["message"]


def test_a_2d_model_explains_a_nifti_plane_by_plane(tmp_path):
    """A 2D model's images are the planes: per-plane regions and overlays, and still the NIfTI
    heatmap and label map with the scan's affine, and one-plane boxes in the CSV."""
    from conftest import small_cnn
    from safetensors.torch import save_file

    save_file(small_cnn(in_ch=1, classes=3).state_dict(), str(tmp_path / "m2.safetensors"))
    (tmp_path / "m2.safetensors.json").write_text(json.dumps({
        "architecture": "conftest:small_cnn", "class_names": ["a", "b", "c"]}))
    affine = oblique_affine()
    write_nifti_volume(tmp_path / "in" / "scan.nii", block_volume((6, 24, 24)), affine)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), "--overlay", "--model",
                 str(tmp_path / "m2.safetensors"), "--trust-code", "--device", "cpu", "--quiet",
                 "--min-area", "1"]) == 0
    heat = nib.load(str(out / "heatmaps" / "scan_heatmap.nii.gz"))
    np.testing.assert_allclose(heat.affine, affine, atol=1e-6)
    assert heat.shape == (24, 24, 6)
    summary = read_csv(out / "summary.csv")
    assert [s["index"] for s in summary] == [str(z) for z in range(6)]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [
        f"scan_{z}.png" for z in range(6)]
    labels = np.asarray(nib.load(str(out / "regions" / "scan_regions.nii.gz")).dataobj).T
    rows = read_csv(out / "regions" / "scan_boxes.csv")
    assert len(rows) == sum(int(s["regions"]) for s in summary) > 0
    for row in rows:
        z0, r0, c0, z1, r1, c1 = box_of(row)
        assert z1 == z0 + 1
        assert bbox_of(labels[z0] == int(row["label"])) == (r0, c0, r1, c1)


def test_a_nifti_mask_multiplies_a_volume_and_a_wrong_shape_fails_that_input(tmp_path,
                                                                             model3d):
    """--mask may name NIfTI masks (a brain mask): read in display order like the scan; the
    regions lie inside it. A mask of another shape fails its input, the others run."""
    folder = tmp_path / "in"
    write_nifti_volume(folder / "a.nii.gz", block_volume(), oblique_affine())
    write_nifti_volume(folder / "b.nii.gz", block_volume(seed=4), oblique_affine())
    keep = np.zeros((16, 24, 24), np.uint8)
    keep[:, :, :13] = 1  # the block's left part only
    write_nifti_volume(tmp_path / "masks" / "a.nii.gz", keep, oblique_affine())
    write_nifti_volume(tmp_path / "masks" / "b.nii.gz", keep[:8], oblique_affine())
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--mask",
                 str(tmp_path / "masks" / "{name}"), *model3d]) == 1
    rows = {Path(r["file"]).name: r for r in read_csv(out / "summary.csv")}
    assert rows["a.nii.gz"]["status"] == "ok"
    assert rows["b.nii.gz"]["status"] == "failed"
    assert "has shape (8, 24, 24), the image (16, 24, 24)" in rows["b.nii.gz"]["message"]
    boxes = read_csv(out / "regions" / "a_boxes.csv")
    assert boxes and all(int(b["col1"]) <= 13 for b in boxes)
    heat = np.asarray(nib.load(str(out / "heatmaps" / "a_heatmap.nii.gz")).dataobj).T
    assert float(heat[:, :, 13:].max()) == 0.0  # the written heatmap is the masked one


def test_a_folder_of_images_with_a_stray_dicom_file_stays_a_folder_of_images(tmp_path, caplog):
    import logging

    import imageio.v3 as iio

    from napari_gradcam.batch import collect_units

    folder = tmp_path / "in"
    dicom_series(folder / "photos", n=1)
    iio.imwrite(folder / "photos" / "a.png", np.zeros((8, 8), np.uint8))
    dicom_series(folder / "ct", n=2)
    with caplog.at_level(logging.WARNING, logger="napari_gradcam"):
        units = collect_units([folder], spatial_dims=3)
    assert sorted((u.kind, u.name) for u in units) == [("file", "photos__a"), ("volume", "ct")]
    assert "holds image files and DICOM files" in caplog.text


def test_a_slice_file_input_is_its_series_named_and_fingerprinted_as_its_folder(tmp_path):
    from napari_gradcam.batch import collect_units

    series = dicom_series(tmp_path / "ct", n=4)
    first = min(series.iterdir())
    unit, = collect_units([first], spatial_dims=3)
    assert unit.kind == "volume" and unit.name == "ct"
    max(series.iterdir()).unlink()  # a slice beside it: what is read changes
    again, = collect_units([first], spatial_dims=3)
    assert again.fingerprint != unit.fingerprint


def test_a_dicom_folder_mask_is_fingerprinted_by_its_slices(tmp_path):
    from napari_gradcam.batch.discover import source_fingerprint

    mask = dicom_series(tmp_path / "mask", n=2)
    write_nifti_volume(tmp_path / "img.nii.gz", np.zeros((2, 4, 4), np.float32), np.eye(4))
    before = source_fingerprint(tmp_path / "img.nii.gz", mask=str(mask))
    slice_ = min(mask.iterdir())
    slice_.write_bytes(slice_.read_bytes() + b"\0\0")  # a slice rewritten, the folder not
    os.utime(mask, ns=(0, 0))
    assert source_fingerprint(tmp_path / "img.nii.gz", mask=str(mask)) != before


def test_a_cd_layout_with_dicomdir_finds_the_nested_series(tmp_path):
    """DICOMDIR + DICOM/ST0/SE0/IM*: the index is skipped, the folders below are searched,
    and a folder with slices and subfolders is its own series plus those below."""
    from pydicom.data import get_testdata_file

    from napari_gradcam.batch import collect_units

    disc = tmp_path / "disc"
    disc.mkdir()
    shutil.copy(get_testdata_file("DICOMDIR"), disc / "DICOMDIR")
    se0 = dicom_series(disc / "DICOM" / "ST0" / "SE0", n=2)
    for p in se0.iterdir():
        p.rename(p.with_suffix(""))  # CDs name slices without a suffix
    dicom_series(se0 / "SE1", n=2)
    units = collect_units([disc], spatial_dims=3)
    assert sorted((u.kind, u.name) for u in units) == [
        ("volume", "DICOM__ST0__SE0"), ("volume", "DICOM__ST0__SE0__SE1")]
    given = collect_units([se0], spatial_dims=3)
    assert sorted(u.name for u in given) == ["SE0", "SE1"]


def _mask_unit(tmp_path, mask_display, mask_affine, image_affine):
    from napari_gradcam.batch.discover import Unit
    from napari_gradcam.batch.read import _read_mask
    from napari_gradcam.volumes import read_volume

    img = write_nifti_volume(tmp_path / "scan.nii.gz", block_volume(), image_affine)
    mask = write_nifti_volume(tmp_path / "mask.nii.gz", mask_display, mask_affine)
    unit = Unit(str(img), "scan", "volume", mask=str(mask))
    return _read_mask(unit, read_volume(img))


def test_a_nifti_mask_stored_flipped_is_reoriented_and_another_grid_is_refused(tmp_path):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    keep = np.zeros((16, 24, 24), np.uint8)
    keep[:, :, :12] = 1  # the left half of the scan, by its own x axis
    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -1.0, 23.0  # the same world points, x stored reversed
    mask = _mask_unit(tmp_path, keep[:, :, ::-1], flipped, affine)
    np.testing.assert_array_equal(mask, keep > 0)
    shifted = affine.copy()
    shifted[0, 3] = 5.0
    with pytest.raises(ValueError, match="not on the scan's voxel grid.*resample"):
        _mask_unit(tmp_path, keep, shifted, affine)


def test_a_volume_mask_restricts_a_2d_model_explaining_plane_by_plane(tmp_path):
    from conftest import small_cnn
    from safetensors.torch import save_file

    save_file(small_cnn(in_ch=1, classes=3).state_dict(), str(tmp_path / "m2.safetensors"))
    (tmp_path / "m2.safetensors.json").write_text(json.dumps({
        "architecture": "conftest:small_cnn", "class_names": ["a", "b", "c"]}))
    write_nifti_volume(tmp_path / "in" / "scan.nii.gz", block_volume((3, 24, 24)),
                       oblique_affine())
    keep = np.zeros((3, 24, 24), np.uint8)
    keep[:, :, :13] = 1
    write_nifti_volume(tmp_path / "masks" / "scan.nii.gz", keep, oblique_affine())
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), "--model",
                 str(tmp_path / "m2.safetensors"), "--trust-code", "--device", "cpu", "--quiet",
                 "--min-area", "1", "--mask", str(tmp_path / "masks" / "{name}")]) == 0
    assert all(r["status"] == "ok" for r in read_csv(out / "summary.csv"))
    assert all(int(b["col1"]) <= 13 for b in read_csv(out / "regions" / "scan_boxes.csv"))


def test_searching_a_tree_of_image_folders_opens_no_file_to_look_for_dicom(tmp_path,
                                                                         monkeypatch):
    from napari_gradcam import volumes
    from napari_gradcam.batch import collect_units

    for d in range(3):
        for f in range(5):
            (tmp_path / "in" / f"d{d}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "in" / f"d{d}" / f"i{f}.png").write_bytes(b"\x89PNG")
    opened = []
    monkeypatch.setattr(volumes, "_has_dicom_magic", lambda p: opened.append(p) or False)
    assert len(collect_units([tmp_path / "in"])) == 15
    assert opened == []
