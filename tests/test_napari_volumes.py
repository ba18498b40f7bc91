"""NIfTI and DICOM through napari's own open path (needs a display: Xvfb in CI)."""

import os
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
from nibabel.testing import data_path
from pydicom.data import get_testdata_file

from napari_gradcam._napari.io import get_volume_reader, read_volume_layer
from napari_gradcam.volumes import read_volume, volume_from_metadata, write_nifti

ANATOMICAL = os.path.join(data_path, "anatomical.nii")
EXAMPLE4D = os.path.join(data_path, "example4d.nii.gz")


pytestmark = pytest.mark.usefixtures("our_plugin")


def ct_series(folder, n=3):
    folder.mkdir()
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = pydicom.uid.generate_uid()
    for rank in range(n):
        ds = src.copy()
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 2.0 * rank]
        ds.InstanceNumber = n - rank
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesDescription = "CT small"
        ds.save_as(folder / f"{rank}.dcm")
    return folder


def assert_world_matches_file_affine(layer, affine, points):
    """napari world (display order) of a voxel = the file affine's world, axes reversed."""
    lead = layer.ndim - 3
    for p in points:
        k, j, i = p[lead:]
        world = np.asarray(layer.data_to_world(p))
        np.testing.assert_allclose(world[lead:][::-1], (affine @ [i, j, k, 1.0])[:3], atol=1e-6)
        np.testing.assert_allclose(world[:lead], p[:lead])


def test_reader_claims_volumes_only(tmp_path):
    dicom = ct_series(tmp_path / "ct")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    (tmp_path / "image.tif").write_bytes(b"II*\0")
    assert get_volume_reader(ANATOMICAL) is read_volume_layer
    assert get_volume_reader(EXAMPLE4D) is read_volume_layer
    assert get_volume_reader(str(dicom)) is read_volume_layer
    assert get_volume_reader(str(dicom / "0.dcm")) is read_volume_layer
    assert get_volume_reader(str(tmp_path / "plain")) is None
    assert get_volume_reader(str(tmp_path / "image.tif")) is None
    assert get_volume_reader([ANATOMICAL, EXAMPLE4D]) is None


def test_oblique_4d_nifti_opens_placed_by_its_affine(make_napari_viewer):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(EXAMPLE4D, plugin="napari-gradcam")
    affine = nib.load(EXAMPLE4D).affine
    assert layer.name == "example4d" and layer.data.shape == (2, 24, 96, 128)
    assert tuple(layer.axis_labels) == ("t", "z", "y", "x")
    assert [str(u) for u in layer.units][1:] == ["millimeter"] * 3
    assert_world_matches_file_affine(layer, affine, [(0, 0, 0, 0), (1, 5, 60, 100),
                                                     (0, 23, 95, 127)])
    meta = layer.metadata
    assert meta["kind"] == "nifti" and meta["source"] == EXAMPLE4D
    np.testing.assert_array_equal(meta["affine"], affine)


def test_nii_gz_without_naming_the_plugin_offers_ours(make_napari_viewer):
    """napari's builtin reader claims *.nii.gz too (through imageio, which needs ITK), so with
    no plugin named napari asks which reader to use (a dialog in the GUI); once the user
    picks ours and napari remembers it, files open without asking."""
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings

    viewer = make_napari_viewer()
    with pytest.raises(MultipleReaderError) as err:
        viewer.open(EXAMPLE4D, plugin=None)
    assert "napari-gradcam" in str(err.value)
    settings = get_settings().plugins
    before = dict(settings.extension2reader)
    try:
        settings.extension2reader = {**before, "*.nii.gz": "napari-gradcam"}
        (layer,) = viewer.open(EXAMPLE4D, plugin=None)
    finally:
        settings.extension2reader = before
    assert layer.data.shape == (2, 24, 96, 128)
    assert_world_matches_file_affine(layer, nib.load(EXAMPLE4D).affine, [(1, 3, 4, 5)])


def test_flipped_nii_and_diagonal_nii_open_in_world_millimetres(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    (flipped,) = viewer.open(ANATOMICAL, plugin="napari-gradcam")
    assert_world_matches_file_affine(flipped, nib.load(ANATOMICAL).affine,
                                     [(0, 0, 0), (10, 20, 30)])
    aff = np.diag([0.5, 0.75, 2.0, 1.0])
    aff[:3, 3] = [5, 6, 7]
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), aff), tmp_path / "d.nii")
    (diag,) = viewer.open(str(tmp_path / "d.nii"), plugin="napari-gradcam")
    np.testing.assert_allclose(diag.scale, [2.0, 0.75, 0.5])
    np.testing.assert_allclose(diag.translate, [7, 6, 5])
    assert_world_matches_file_affine(diag, aff, [(3, 4, 5)])


def test_dicom_folder_opens_as_one_layer_and_results_go_back_aligned(make_napari_viewer,
                                                                     tmp_path):
    folder = ct_series(tmp_path / "ct")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(folder), plugin="napari-gradcam")
    vol = read_volume(folder)
    assert layer.name == "CT small" and layer.data.shape == (3, 128, 128)
    assert layer.metadata["kind"] == "dicom"
    assert_world_matches_file_affine(layer, vol.affine, [(2, 10, 100)])
    # a heatmap on the layer goes back to the file through the metadata
    heat = np.zeros(layer.data.shape, np.float32)
    heat[2, 10, 100] = 1
    out = write_nifti(heat, volume_from_metadata(layer.metadata, layer.data), tmp_path / "h.nii")
    img = nib.load(out)
    i, j, k = np.argwhere(np.asarray(img.dataobj) == 1)[0]
    np.testing.assert_allclose((img.affine @ [i, j, k, 1])[:3],
                               np.asarray(layer.data_to_world((2, 10, 100)))[::-1], atol=1e-3)
    # napari's builtin reader (imageio's deprecated DICOM folder reader) claims folders too:
    # with no plugin named napari asks, offering ours
    from napari.errors import MultipleReaderError

    with pytest.raises(MultipleReaderError, match="napari-gradcam"):
        viewer.open(str(folder), plugin=None)
    assert len(viewer.layers) == 1


def test_a_damaged_volume_fails_with_the_reason(make_napari_viewer, tmp_path):
    path = tmp_path / "cut.nii.gz"
    whole = Path(EXAMPLE4D).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    viewer = make_napari_viewer()
    with pytest.raises(ValueError, match="'cut.nii.gz'.*truncated or damaged.*export it again"):
        viewer.open(str(path), plugin="napari-gradcam")
    assert len(viewer.layers) == 0


def test_a_micron_nifti_layer_is_placed_in_millimetres_and_written_back_in_microns(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([500.0, 250.0, 2000.0, 1]))
    img.header.set_xyzt_units("micron")
    nib.save(img, tmp_path / "um.nii.gz")
    data, kwargs, kind = read_volume_layer(str(tmp_path / "um.nii.gz"))[0]
    assert kind == "image" and kwargs["units"] == ("mm", "mm", "mm")
    assert kwargs["scale"] == pytest.approx([2.0, 0.25, 0.5])
    vol = volume_from_metadata(kwargs["metadata"], np.ones(data.shape, np.float32))
    out = nib.load(write_nifti(vol.data, vol, tmp_path / "heat.nii.gz"))
    np.testing.assert_allclose(out.affine, img.affine)
    assert out.header.get_xyzt_units()[0] == "micron"
