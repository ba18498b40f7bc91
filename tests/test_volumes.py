"""NIfTI and DICOM volumes in, NIfTI out, 3D boxes in world millimetres (volumes.py).

Real scans that install with the packages: nibabel's test images (a big-endian brain MRI with a
flipped x axis, a 4D EPI with an oblique affine) and pydicom's CT slice, turned into a series
here.
"""

import dataclasses
import os
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_gradcam.regions import Region
from napari_gradcam.volumes import (
    Volume,
    box_rows,
    is_volume_path,
    read_volume,
    volume_array,
    volume_from_metadata,
    write_nifti,
)

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
from nibabel.testing import data_path
from pydicom.data import get_testdata_file

ANATOMICAL = os.path.join(data_path, "anatomical.nii")
EXAMPLE4D = os.path.join(data_path, "example4d.nii.gz")
CT_SLICE = get_testdata_file("CT_small.dcm")
IPP0 = np.array([-158.135803, -179.035797, -75.699997])


def world_of_display(vol: Volume, display_index) -> np.ndarray:
    """World RAS+ of a display index (..., z, y, x) through the file affine (voxel = reversed)."""
    k, j, i = display_index[-3:]
    return (np.asarray(vol.affine) @ [i, j, k, 1.0])[:3]


def ras_of_dicom(ds, row, col, ipp) -> np.ndarray:
    """DICOM's own formula for a pixel's patient position (LPS), turned into RAS+."""
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = np.asarray(ipp, float) + col * dc * iop[:3] + row * dr * iop[3:]
    return lps * [-1, -1, 1]


def make_series(folder, n=5, step=2.5, series_uid=None, shuffle=True, **changes):
    """Copies of the CT slice with shifted positions and shuffled InstanceNumbers; each slice's
    pixels carry its position rank in the top-left pixel so the order can be checked."""
    folder.mkdir(parents=True, exist_ok=True)
    src = pydicom.dcmread(CT_SLICE)
    numbers = list(range(1, n + 1))
    if shuffle:
        random.Random(1).shuffle(numbers)
    uid = series_uid or pydicom.uid.generate_uid()
    paths = []
    for rank in range(n):
        ds = src.copy()
        ds.ImagePositionPatient = [float(v) for v in IPP0 + [0, 0, step * rank]]
        ds.InstanceNumber = numbers[rank]
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        px = src.pixel_array.copy()
        px[0, 0] = 1000 + rank
        ds.PixelData = px.tobytes()
        for key, value in changes.items():
            setattr(ds, key, value)
        path = folder / f"im{numbers[rank]:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths, uid


def region3d(bbox, area, *, label=1, class_id=0, score=2.0, index=()):
    kw = {"index": index, "bbox": bbox, "polygon": None, "area": area, "peak": 0.9,
          "mean": 0.6, "threshold": 0.5, "class_id": class_id, "score": score}
    if "label" in {f.name for f in dataclasses.fields(Region)}:
        return Region(**kw, label=label)
    return SimpleNamespace(**kw, label=label)


# --------------------------------------------------------------------------------- NIfTI in


def test_anatomical_reads_in_display_order_with_its_geometry():
    vol = read_volume(ANATOMICAL)
    img = nib.load(ANATOMICAL)
    ref = np.asarray(img.dataobj)  # (X, Y, Z), big-endian int16
    assert vol.kind == "nifti" and vol.source == ANATOMICAL
    assert vol.data.shape == (25, 41, 33) and vol.axis_labels == ("z", "y", "x")
    assert vol.data.dtype == np.int16 and vol.data.dtype.isnative
    np.testing.assert_array_equal(vol.data, ref.transpose(2, 1, 0))
    assert vol.data[3, 7, 11] == ref[11, 7, 3]
    np.testing.assert_array_equal(vol.affine, img.affine)
    assert vol.spacing == (2.0, 2.0, 2.0)
    assert vol.origin == (-16.0, -40.0, 32.0)  # affine[:3, 3] in (S, A, R) order
    # napari's affine maps a display index to the reversed world of the file affine
    idx = np.array([3, 7, 11])
    world = (vol.napari_affine @ [*idx, 1])[:3]
    np.testing.assert_allclose(world[::-1], world_of_display(vol, idx))
    # the flipped x axis is not a positive scale: the layer gets the affine
    assert set(vol.layer_transform()) == {"affine"}


def test_example4d_time_leads_and_the_oblique_affine_is_exact():
    vol = read_volume(EXAMPLE4D)
    img = nib.load(EXAMPLE4D)
    assert vol.data.shape == (2, 24, 96, 128) and vol.axis_labels == ("t", "z", "y", "x")
    assert vol.data[1, 5, 6, 7] == np.asarray(img.dataobj)[7, 6, 5, 1]
    rng = np.random.default_rng(0)
    for idx in rng.integers(0, [24, 96, 128], size=(5, 3)):
        world = (vol.napari_affine @ [*idx, 1])[:3]
        np.testing.assert_allclose(world[::-1], (img.affine @ [*idx[::-1], 1.0])[:3],
                                   atol=1e-9)
    np.testing.assert_allclose(vol.spacing, np.linalg.norm(img.affine[:3, :3], axis=0)[::-1])
    t = vol.layer_transform()
    assert set(t) == {"affine"} and t["affine"].shape == (5, 5)
    np.testing.assert_array_equal(t["affine"][1:, 1:], vol.napari_affine)
    assert t["affine"][0, 0] == 1 and not t["affine"][0, 1:].any()


def test_plain_nifti_is_memory_mapped_and_diagonal_affine_gives_scale(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (X, Y, Z)
    aff = np.diag([0.5, 0.75, 3.0, 1.0])
    aff[:3, 3] = [10, 20, 30]
    nib.save(nib.Nifti1Image(arr, aff), tmp_path / "plain.nii")
    vol = read_volume(tmp_path / "plain.nii")
    assert isinstance(vol.data, np.memmap)  # read lazily, when touched
    np.testing.assert_array_equal(vol.data, arr.T)
    assert vol.layer_transform() == {"scale": [3.0, 0.75, 0.5], "translate": [30.0, 20.0, 10.0]}
    assert vol.voxel_volume == pytest.approx(1.125)


def test_scaled_nifti_is_float32_with_slope_and_intercept(tmp_path):
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, -3.0)
    img.set_data_dtype(np.int16)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    vol = read_volume(path)
    assert vol.data.dtype == np.float32
    np.testing.assert_allclose(vol.data, (raw * 0.5 - 3.0).T)


def test_trailing_singleton_axis_and_2d_images_give_three_spatial_axes(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.float32), np.eye(4)), tmp_path / "a.nii")
    nib.save(nib.Nifti1Image(np.ones((4, 5), np.float32), np.eye(4)), tmp_path / "b.nii")
    assert read_volume(tmp_path / "a.nii").data.shape == (6, 5, 4)
    assert read_volume(tmp_path / "b.nii").data.shape == (1, 5, 4)


def test_nan_in_a_float_nifti_is_kept_and_volume_array_can_replace_it(tmp_path):
    arr = np.ones((4, 4, 3), np.float32)
    arr[1, 2, 0] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii")
    vol = read_volume(tmp_path / "nan.nii")
    assert np.isnan(vol.data[0, 2, 1])  # reading keeps what the file holds
    plain = volume_array(vol)
    assert np.isnan(plain[0, 2, 1]) and plain.flags.c_contiguous
    fixed = volume_array(vol, nan=0.0)
    assert fixed[0, 2, 1] == 0 and np.isnan(vol.data[0, 2, 1])  # the volume is left as it was


def test_volume_array_gives_native_contiguous_arrays():
    arr = volume_array(ANATOMICAL)
    assert arr.shape == (25, 41, 33) and arr.dtype == np.int16
    assert arr.dtype.isnative and arr.flags.c_contiguous and type(arr) is np.ndarray


# --------------------------------------------------------------------------------- hostile NIfTI


def test_truncated_nii_gz_is_a_clear_error(tmp_path):
    whole = Path(EXAMPLE4D).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="cut.nii.gz.*truncated or damaged"):
        read_volume(path)


def test_truncated_uncompressed_nii_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.nii"
    path.write_bytes(Path(ANATOMICAL).read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.nii.*is truncated.*export it again"):
        read_volume(path)


def test_a_nii_that_is_not_nifti_is_a_clear_error(tmp_path):
    path = tmp_path / "fake.nii"
    path.write_bytes(b"this is not a NIfTI header\n" * 40)
    with pytest.raises(ValueError, match="fake.nii.*not a readable NIfTI"):
        read_volume(path)


def test_rgb_nifti_is_refused(tmp_path):
    rgb = np.zeros((3, 3, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    with pytest.raises(ValueError, match="RGB or complex.*scalar NIfTI"):
        read_volume(tmp_path / "rgb.nii")


def test_other_files_and_missing_paths_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither NIfTI.*nor DICOM"):
        read_volume(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="series=.*DICOM"):
        read_volume(ANATOMICAL, series="1.2.3")


@pytest.mark.parametrize("module", ["nibabel", "pydicom"])
def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch, module):
    make_series(tmp_path / "s", n=2)
    monkeypatch.setitem(sys.modules, module, None)
    source = ANATOMICAL if module == "nibabel" else tmp_path / "s"
    with pytest.raises(ImportError, match=r"pip install napari-gradcam\[radiology\]"):
        read_volume(source)


# --------------------------------------------------------------------------------- NIfTI out


def test_heatmap_written_back_overlays_the_oblique_scan(tmp_path):
    vol = read_volume(EXAMPLE4D)
    heat = np.zeros(vol.data.shape, np.float32)
    heat[1, 5, 60, 100] = 1.0  # display order (t, z, y, x)
    out = write_nifti(heat, vol, tmp_path / "heat.nii.gz")
    img = nib.load(out)
    src = nib.load(EXAMPLE4D)
    np.testing.assert_array_equal(img.affine, src.affine)
    assert img.header["sform_code"] == src.header["sform_code"]
    assert img.header["qform_code"] == src.header["qform_code"]
    np.testing.assert_array_equal(img.header.get_qform(), src.header.get_qform())
    assert img.get_data_dtype() == np.float32 and img.shape == src.shape
    i, j, k, t = np.argwhere(np.asarray(img.dataobj) == 1.0)[0]
    assert t == 1
    np.testing.assert_allclose(img.affine @ [i, j, k, 1], src.affine @ [100, 60, 5, 1])
    np.testing.assert_allclose((img.affine @ [i, j, k, 1])[:3],
                               world_of_display(vol, (5, 60, 100)))
    # one map for the whole 4D scan: written 3D, same affine
    out3 = write_nifti(heat[1], vol, tmp_path / "heat3d.nii")
    img3 = nib.load(out3)
    assert img3.shape == (128, 96, 24)
    np.testing.assert_array_equal(img3.affine, src.affine)
    assert np.asarray(img3.dataobj)[100, 60, 5] == 1.0


def test_label_map_of_the_big_endian_scan_keeps_affine_and_gets_label_intent(tmp_path):
    vol = read_volume(ANATOMICAL)
    labels = np.zeros(vol.data.shape, np.int64)  # int64 is narrowed to int32
    labels[10:12, 20:25, 5:9] = 3
    out = write_nifti(labels, vol, tmp_path / "labels.nii.gz")
    img = nib.load(out)
    np.testing.assert_array_equal(img.affine, nib.load(ANATOMICAL).affine)
    assert img.get_data_dtype() == np.int32 and img.get_data_dtype().isnative
    assert img.header.get_intent()[0] == "label"
    assert img.header["sform_code"] == 2 and img.header["qform_code"] == 2
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels.T)
    small = write_nifti(labels.astype(np.int16), vol, tmp_path / "labels16.nii")
    assert nib.load(small).get_data_dtype() == np.int16


def test_written_files_are_reproducible_and_unscaled(tmp_path):
    vol = read_volume(EXAMPLE4D)
    heat = np.linspace(0, 1, vol.data[0].size, dtype=np.float32).reshape(vol.data[0].shape)
    a = write_nifti(heat, vol, tmp_path / "a.nii.gz")
    b = write_nifti(heat, vol, tmp_path / "b.nii.gz")
    assert a.read_bytes() == b.read_bytes()  # no time stamp or temporary name inside
    img = nib.load(a)
    assert img.header.get_slope_inter() == (None, None)
    np.testing.assert_array_equal(np.asarray(img.dataobj), heat.T)


def test_a_crash_while_writing_leaves_no_file_and_the_old_one_untouched(tmp_path, monkeypatch):
    vol = read_volume(ANATOMICAL)
    target = tmp_path / "heat.nii.gz"
    target.write_bytes(b"previous result")

    def crash(self, file_map, *args, **kwargs):
        file_map["image"].fileobj.write(b"half a header")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", crash)
    with pytest.raises(KeyboardInterrupt):
        write_nifti(np.zeros(vol.data.shape, np.float32), vol, target)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.nii.gz"]
    with pytest.raises(KeyboardInterrupt):
        write_nifti(np.zeros(vol.data.shape, np.float32), vol, tmp_path / "new.nii")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.nii.gz"]


def test_write_nifti_refuses_wrong_shapes_names_and_values(tmp_path):
    vol = read_volume(ANATOMICAL)
    with pytest.raises(ValueError, match=r"shape \(33, 41, 25\).*display order"):
        write_nifti(np.zeros((33, 41, 25), np.float32), vol, tmp_path / "x.nii")
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        write_nifti(np.zeros(vol.data.shape, np.float32), vol, tmp_path / "x.tif")
    with pytest.raises(ValueError, match="32-bit integers"):
        write_nifti(np.full(vol.data.shape, 2 ** 40), vol, tmp_path / "x.nii")
    with pytest.raises(ValueError, match="integer or float arrays"):
        write_nifti(np.zeros(vol.data.shape, np.complex64), vol, tmp_path / "x.nii")
    assert list(tmp_path.iterdir()) == []


def test_volume_from_metadata_rebuilds_what_write_nifti_takes(tmp_path):
    vol = read_volume(EXAMPLE4D)
    meta = {"affine": vol.affine, "header": vol.header, "kind": "nifti", "source": vol.source}
    again = volume_from_metadata(meta, vol.data)
    out = write_nifti(np.ones(vol.data.shape[1:], np.float32), again, tmp_path / "h.nii")
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(EXAMPLE4D).affine)
    with pytest.raises(ValueError, match="no volume geometry.*napari-gradcam reader"):
        volume_from_metadata({}, vol.data)


# --------------------------------------------------------------------------------- DICOM in


def test_dicom_series_is_sorted_by_position_and_rescaled(tmp_path):
    folder = tmp_path / "ct"
    make_series(folder, n=5, step=2.5)
    (folder / "README.txt").write_text("not DICOM")  # ignored
    vol = read_volume(folder)
    src = pydicom.dcmread(CT_SLICE)
    assert vol.kind == "dicom" and vol.data.shape == (5, 128, 128)
    assert vol.data.dtype == np.float32
    # top-left pixel = 1000 + position rank, in Hounsfield units (slope 1, intercept -1024)
    np.testing.assert_array_equal(vol.data[:, 0, 0], np.arange(5) + 1000 - 1024)
    np.testing.assert_array_equal(vol.data[2, 5:, :], src.pixel_array[5:, :] - 1024.0)
    # spacing from the positions (2.5 mm), not SliceThickness (5 mm)
    assert float(src.SliceThickness) == 5.0
    np.testing.assert_allclose(vol.spacing, (2.5, 0.661468, 0.661468))
    # voxel (row, col) of slice rank 3 sits where DICOM's own formula puts it, in RAS+
    for row, col in [(0, 0), (17, 90), (127, 1)]:
        np.testing.assert_allclose(world_of_display(vol, (3, row, col)),
                                   ras_of_dicom(src, row, col, IPP0 + [0, 0, 7.5]), atol=1e-6)
    assert vol.header["Modality"] == "CT" and len(vol.header["files"]) == 5
    assert "PatientName" not in vol.header


def test_dicom_sorting_uses_the_slice_normal_for_oblique_series(tmp_path):
    folder = tmp_path / "obl"
    c, s = np.cos(0.3), np.sin(0.3)
    iop = [1.0, 0.0, 0.0, 0.0, c, s]  # rows tilted about x: normal (0, -s, c)
    normal = np.cross(iop[:3], iop[3:])
    paths, _ = make_series(folder, n=4, ImageOrientationPatient=iop)
    for rank, p in enumerate(paths):  # move slices along the normal, ranks as generated
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient = [float(v) for v in IPP0 + normal * 3.0 * (3 - rank)]
        ds.save_as(p)
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.data[:, 0, 0], [1003 - 1024, 1002 - 1024,
                                                      1001 - 1024, 1000 - 1024])
    np.testing.assert_allclose(vol.spacing[0], 3.0)
    np.testing.assert_allclose(np.linalg.det(vol.affine[:3, :3]),
                               np.prod(vol.spacing), rtol=1e-6)


def test_one_slice_file_reads_its_series_and_series_keyword_chooses(tmp_path):
    folder = tmp_path / "mixed"
    paths, uid = make_series(folder, n=4)
    other, other_uid = make_series(tmp_path / "other", n=1, shuffle=False)
    shutil.move(other[0], folder / "zz_other.dcm")
    with pytest.raises(ValueError, match=f"holds 2 DICOM series.*{uid}.*series=") as err:
        read_volume(folder)
    assert other_uid in str(err.value)
    assert read_volume(paths[0]).data.shape == (4, 128, 128)
    assert read_volume(folder / "zz_other.dcm").data.shape == (1, 128, 128)
    assert read_volume(folder, series=uid).data.shape == (4, 128, 128)
    with pytest.raises(ValueError, match="matches 0 of the series"):
        read_volume(folder, series="1.2.3.4")
    assert is_volume_path(folder) and is_volume_path(paths[0])
    assert not is_volume_path(tmp_path / "other")  # emptied by the move


def test_dicom_slices_of_different_sizes_are_refused(tmp_path):
    folder = tmp_path / "sizes"
    paths, _ = make_series(folder, n=3)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.pixel_array[:64, :64].copy().tobytes()
    ds.Rows, ds.Columns = 64, 64
    ds.save_as(paths[1])
    with pytest.raises(ValueError, match=r"different sizes \(64 x 64, 128 x 128\)"):
        read_volume(folder)


def test_missing_positions_fall_back_to_instance_number_with_a_warning(tmp_path):
    folder = tmp_path / "nopos"
    paths, _ = make_series(folder, n=4)
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p)
    with pytest.warns(UserWarning, match="ordered by InstanceNumber"):
        vol = read_volume(folder)
    numbers = [int(pydicom.dcmread(p).InstanceNumber) for p in paths]
    by_number = [1000 + paths.index(p) - 1024 for _, p in sorted(zip(numbers, paths))]
    np.testing.assert_array_equal(vol.data[:, 0, 0], by_number)
    np.testing.assert_allclose(vol.spacing[0], 5.0)  # SliceThickness, the only spacing left
    # without positions nor unique numbers the order is unknown: an error
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = 1
        ds.save_as(p)
    with pytest.raises(ValueError, match="order is unknown"):
        read_volume(folder)


def test_duplicate_positions_and_uneven_spacing(tmp_path):
    folder = tmp_path / "dup"
    paths, _ = make_series(folder, n=3, shuffle=False)
    ds = pydicom.dcmread(paths[2])
    ds.ImagePositionPatient = pydicom.dcmread(paths[1]).ImagePositionPatient
    ds.save_as(paths[2])
    with pytest.raises(ValueError, match="same position.*own folder"):
        read_volume(folder)
    ds.ImagePositionPatient = [float(v) for v in IPP0 + [0, 0, 10.0]]  # 0, 2.5, 10
    ds.save_as(paths[2])
    with pytest.warns(UserWarning, match="uneven.*missing slice"):
        vol = read_volume(folder)
    np.testing.assert_allclose(vol.spacing[0], 5.0)


def test_unparsable_dcm_is_named(tmp_path):
    folder = tmp_path / "bad"
    paths, _ = make_series(folder, n=3)
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 7)
    with pytest.raises(ValueError, match="'broken.dcm'.*not a readable DICOM.*remove it"):
        read_volume(folder)
    (folder / "broken.dcm").write_bytes(b"garbage, no preamble at all")
    with pytest.raises(ValueError, match="'broken.dcm'.*not a readable DICOM"):
        read_volume(folder)
    (folder / "broken.dcm").unlink()
    whole = paths[1].read_bytes()  # a slice of the series cut in the middle of its pixels
    paths[1].write_bytes(whole[: len(whole) - 9000])
    with pytest.raises(ValueError, match=f"'{paths[1].name}'.*(not a readable|cannot be decod)"):
        read_volume(folder)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert not is_volume_path(tmp_path)
    with pytest.raises(ValueError, match="no DICOM image slices"):
        read_volume(tmp_path)


def test_dicom_volume_written_as_nifti_lands_on_the_same_world_points(tmp_path):
    folder = tmp_path / "ct"
    make_series(folder, n=3)
    vol = read_volume(folder)
    heat = np.zeros(vol.data.shape, np.float32)
    heat[2, 10, 100] = 1
    img = nib.load(write_nifti(heat, vol, tmp_path / "h.nii.gz"))
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-4)  # NIfTI stores float32
    assert img.header["sform_code"] == 1 and img.header["qform_code"] == 1
    i, j, k = np.argwhere(np.asarray(img.dataobj) == 1)[0]
    np.testing.assert_allclose((img.affine @ [i, j, k, 1])[:3],
                               ras_of_dicom(pydicom.dcmread(CT_SLICE), 10, 100,
                                            IPP0 + [0, 0, 5.0]), atol=1e-3)


# --------------------------------------------------------------------------------- boxes


def test_box_rows_in_voxels_and_world_millimetres():
    vol = read_volume(ANATOMICAL)  # affine diag(-2, 2, 2), origin (32, -40, -16)
    r = region3d((2, 3, 4, 5, 7, 10), area=30, label=1, class_id=1, score=2.5)
    (row,) = box_rows([r], vol, class_names=["sphere", "cube", "cone"])
    assert row["label"] == 1 and row["class"] == "cube" and row["class_id"] == 1
    assert row["score"] == 2.5 and row["voxels"] == 30
    assert (row["z0"], row["row0"], row["col0"], row["z1"], row["row1"], row["col1"]) == \
        (2, 3, 4, 5, 7, 10)
    # voxel centres on integers: columns 4..9 span i in [3.5, 9.5] -> x = 32 - 2 i
    assert (row["x_min_mm"], row["x_max_mm"]) == (13.0, 25.0)
    assert (row["y_min_mm"], row["y_max_mm"]) == (-35.0, -27.0)
    assert (row["z_min_mm"], row["z_max_mm"]) == (-13.0, -7.0)
    assert row["volume_mm3"] == 240.0
    assert "class" not in box_rows([r], vol)[0]


def test_box_rows_on_the_oblique_scan_enclose_every_voxel_and_take_plane_regions():
    vol = read_volume(EXAMPLE4D)
    r = region3d((3, 10, 20, 7, 30, 50), area=100, index=(1,))
    (row,) = box_rows([r], vol)
    assert row["index"] == "1"
    k, j, i = np.mgrid[3:7, 10:30, 20:50]
    centres = (vol.affine @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3]
    lo = np.array([row[f"{a}_min_mm"] for a in "xyz"])
    hi = np.array([row[f"{a}_max_mm"] for a in "xyz"])
    assert np.all(centres.min(1) > lo) and np.all(centres.max(1) < hi)
    assert row["volume_mm3"] == pytest.approx(100 * vol.voxel_volume)
    # a region found plane by plane: its plane is the last index
    plane = SimpleNamespace(index=(1, 6), bbox=(10, 20, 30, 50), area=40, peak=1.0, mean=0.8,
                            class_id=None, score=None)
    (prow,) = box_rows([plane], vol)
    assert (prow["z0"], prow["z1"], prow["index"], prow["label"]) == (6, 7, "1", None)
    with pytest.raises(ValueError, match="outside the volume's 24 planes"):
        box_rows([SimpleNamespace(**{**vars(plane), "index": (1, 30)})], vol)
    with pytest.raises(ValueError, match=r"ndim=3"):
        box_rows([SimpleNamespace(**{**vars(plane), "index": ()})], vol)


# ------------------------------------------------------------------- hostile files and layouts


def _raw_tag(ds, keyword: str, value: bytes) -> None:
    """Put a tag's bytes in the file as they are (pydicom would refuse "abc" as a number)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    tag = Tag(tag_for_keyword(keyword))
    value += b" " * (len(value) % 2)
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


@pytest.mark.parametrize(("edit", "words"), [
    (lambda ds: delattr(ds, "Rows"), "has no Rows tag"),
    (lambda ds: _raw_tag(ds, "RescaleSlope", b"abc"), "unusable RescaleSlope"),
    (lambda ds: _raw_tag(ds, "NumberOfFrames", b"abc"), "unusable NumberOfFrames"),
    (lambda ds: (delattr(ds, "ImagePositionPatient"), _raw_tag(ds, "InstanceNumber", b"x")),
     "unusable InstanceNumber"),
    (lambda ds: setattr(ds, "ImageOrientationPatient", [0, 0, 0, 0, 0, 0]),
     "degenerate ImageOrientationPatient"),
    (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]),
     "degenerate ImageOrientationPatient"),
])
def test_hostile_dicom_tags_are_one_sentence_naming_file_and_tag(tmp_path, edit, words):
    paths, _ = make_series(tmp_path / "s", n=3)
    for p in paths:
        ds = pydicom.dcmread(p)
        edit(ds)
        ds.save_as(p)
    with pytest.raises(ValueError, match=words) as err:
        read_volume(tmp_path / "s")
    assert ".dcm" in str(err.value) and ("re-export" in str(err.value) or "fix" in str(err.value))


def test_zero_pixel_spacing_on_every_slice_falls_back_to_1_mm_with_a_warning(tmp_path):
    make_series(tmp_path / "s", n=3, PixelSpacing=["0", "0"])
    with pytest.warns(UserWarning, match="no usable PixelSpacing"):
        vol = read_volume(tmp_path / "s")
    assert vol.spacing[1:] == pytest.approx((1.0, 1.0))


def test_apple_double_files_and_dicomdir_are_not_slices(tmp_path):
    paths, _ = make_series(tmp_path / "s", n=3)
    for p in paths:  # macOS companions: junk after a name that looks like a slice
        (p.parent / ("._" + p.name)).write_bytes(b"\x00\x05\x16\x07Mac OS X" + b"\0" * 500)
    shutil.copy(get_testdata_file("DICOMDIR"), tmp_path / "s" / "DICOMDIR")
    vol = read_volume(tmp_path / "s")
    assert vol.spatial_shape == (3, 128, 128)
    assert len(vol.header["files"]) == 3
    only = tmp_path / "cd"
    only.mkdir()
    shutil.copy(get_testdata_file("DICOMDIR"), only / "DICOMDIR")
    assert not is_volume_path(only)  # an index without slices is no series
    shutil.move(only / "DICOMDIR", only / "report")  # any DICOM file without pixels
    assert not is_volume_path(only)


def test_a_folder_of_images_is_told_from_dicom_without_opening_files(tmp_path, monkeypatch):
    from napari_gradcam import volumes

    for n in range(20):
        (tmp_path / f"i{n:02d}.png").write_bytes(b"\x89PNG")
    (tmp_path / "scan.nii.gz").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    opened = []
    monkeypatch.setattr(volumes, "_has_dicom_magic", lambda p: opened.append(p) or False)
    assert not is_volume_path(tmp_path)
    assert opened == []


def test_nifti_units_other_than_mm_give_millimetres_and_are_written_back_raw(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([500.0, 500.0, 2000.0, 1]))
    img.header.set_xyzt_units("micron")
    nib.save(img, tmp_path / "um.nii.gz")
    vol = read_volume(tmp_path / "um.nii.gz")
    assert vol.spacing == pytest.approx((2.0, 0.5, 0.5))
    assert vol.layer_transform()["scale"] == pytest.approx([2.0, 0.5, 0.5])
    row = box_rows([region3d((0, 0, 0, 1, 1, 1), 1)], vol)[0]
    assert (row["x_min_mm"], row["x_max_mm"], row["volume_mm3"]) == pytest.approx(
        (-0.25, 0.25, 0.5))
    out = nib.load(write_nifti(np.ones(vol.spatial_shape, np.float32), vol,
                               tmp_path / "o.nii.gz"))
    np.testing.assert_allclose(out.affine, img.affine)
    assert out.header.get_xyzt_units()[0] == "micron"
    assert out.header.get_zooms() == pytest.approx((500.0, 500.0, 2000.0))
    img.header.set_xyzt_units("meter")
    nib.save(img, tmp_path / "m.nii")
    assert read_volume(tmp_path / "m.nii").spacing == pytest.approx((2e6, 5e5, 5e5))


def test_written_results_carry_no_header_extensions_or_free_text(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(2, b"PatientName=Doe^Jane"))
    img.header["descrip"] = b"Doe^Jane 1970"
    img.header["aux_file"] = b"jane.txt"
    nib.save(img, tmp_path / "s.nii")
    vol = read_volume(tmp_path / "s.nii")
    path = write_nifti(np.ones(vol.spatial_shape, np.float32), vol, tmp_path / "o.nii")
    out = nib.load(path)
    assert len(out.header.extensions) == 0
    assert out.header["descrip"].item() == b"" and out.header["aux_file"].item() == b""
    assert b"Doe" not in path.read_bytes()


def test_a_nifti_with_no_voxels_or_a_huge_header_is_refused_with_a_sentence(tmp_path):
    import gzip
    import struct

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    block = bytearray(img.header.binaryblock)
    body = b"\0" * 4 + np.zeros(64, np.int16).tobytes()
    struct.pack_into("<8h", block, 40, 3, 4, 0, 4, 1, 1, 1, 1)
    (tmp_path / "zero.nii").write_bytes(bytes(block) + body)
    with pytest.raises(ValueError, match="has no voxels"):
        read_volume(tmp_path / "zero.nii")
    struct.pack_into("<8h", block, 40, 3, 30000, 30000, 30000, 1, 1, 1, 1)
    with gzip.open(tmp_path / "huge.nii.gz", "wb") as f:
        f.write(bytes(block) + body)
    with pytest.raises(ValueError, match="too large to read.*more than the"):
        read_volume(tmp_path / "huge.nii.gz")
