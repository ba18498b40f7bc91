"""The dock widget on volumes (Xvfb in CI): a 3D model explains each volume in one run, a 2D
model slice by slice; the heatmap lies on the scan (oblique affines too) and renders in 3D; 3D
regions show in every plane they cross and as box wireframes in the 3D view; Labels masks."""

import csv
import json

import numpy as np
import pytest

import napari_gradcam as ng
from napari_gradcam.annotations import box_wireframe, regions_to_annotations

napari = pytest.importorskip("napari")

from conftest import small_cnn

from napari_gradcam._napari.widget import GradCamWidget

CLASSES = ["sphere", "cube", "cone"]
SHAPE = (16, 32, 32)


pytestmark = pytest.mark.usefixtures("our_plugin")


@pytest.fixture(scope="module")
def conv3d():
    """A random-weights Conv3d classifier (3 classes, 1 channel)."""
    import torch

    torch.manual_seed(0)
    return ng.load_model(small_cnn(dims=3, classes=3), class_names=CLASSES)


def dock(viewer, spec=None, name="conv3d") -> GradCamWidget:
    _dock, w = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM")
    assert w.wait_until_ready(), "the demo model did not load"
    if spec is not None:
        w.set_model(spec, name=name)
        assert w.wait_until_ready(), "the layer probe did not finish"
    return w


def run(qtbot, w, timeout=60_000):
    assert w.run() is not None, "the run did not start"
    qtbot.waitUntil(lambda: not w.running and w._region_worker is None, timeout=timeout)


def settle(qtbot, w):
    qtbot.waitUntil(lambda: w._region_worker is None, timeout=30_000)


def volume(seed=0, shape=SHAPE):
    """Smooth noise with a bright block: something for a random model to look at."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32)
    v[4:10, 8:20, 12:26] += 2.0
    return v


def oblique_affine(angle=0.3) -> np.ndarray:
    """A rotation in the (y, z) plane plus a shift: a scan acquired at an angle."""
    c, s = np.cos(angle), np.sin(angle)
    a = np.eye(4)
    a[:2, :2] = [[c, -s], [s, c]]
    a[:3, 3] = [5.0, -3.0, 2.0]
    return a


def corners(shape):
    return np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(
        len(shape), -1).T.astype(float)


def assert_same_transform(layer, image):
    """Data -> world of ``layer`` equals the image's (checked on the corners of the data)."""
    for p in corners(image.data.shape):
        np.testing.assert_allclose(layer.data_to_world(p), image.data_to_world(p), atol=1e-9)


def planes_of(shapes, label, axis=0):
    """Plane -> the rectangle's pixel-corner box (r0, c0, r1, c1) of the 3D region ``label``."""
    feats = shapes.features
    out = {}
    for d, kind, lab in zip(shapes.data, feats["kind"], feats["region_label"]):
        if lab == label and kind == "rectangle":
            z = d[0, axis]
            assert (d[:, axis] == z).all(), "a shape's vertices leave its plane"
            v = d[:, -2:] + 0.5
            out[int(z)] = (*v.min(0), *v.max(0))
    return out


# ---- a 3D model on a volume ----------------------------------------------------------------------

def test_a_3d_model_explains_the_volume_in_one_run(viewer, qtbot, conv3d, tmp_path):
    vol = volume()
    image = viewer.add_image(vol, name="scan", scale=(2.0, 0.8, 0.8), translate=(1, 2, 3),
                             affine=oblique_affine(), axis_labels=("z", "y", "x"),
                             units=("mm", "mm", "mm"))
    w = dock(viewer, conv3d)
    assert "volume in one run" in w.explains.value and not w.scope.enabled
    w.threshold.value = 0.4
    run(qtbot, w)
    assert "3D regions" in w.status.value

    heat = viewer.layers["gradcam · scan"]
    assert heat.data.shape == SHAPE and heat.rendering == "attenuated_mip"
    assert tuple(heat.contrast_limits) == (0.0, 1.0)
    assert tuple(heat.axis_labels) == ("z", "y", "x") and tuple(map(str, heat.units)) == \
        tuple(map(str, image.units))
    assert_same_transform(heat, image)
    ref = ng.explain(vol, conv3d, device="cpu")
    np.testing.assert_allclose(heat.data, ref.heatmaps, atol=1e-4)

    regions = w._last.explained.regions
    assert regions and all(r.ndim == 3 for r in regions)
    assert [r.label for r in regions] == list(range(1, len(regions) + 1))
    shapes = viewer.layers["regions · scan"]
    assert shapes.ndim == 3
    assert_same_transform(shapes, image)
    for r in regions:  # its rectangle in every plane it crosses, and nowhere else
        planes = planes_of(shapes, r.label)
        z0, r0, c0, z1, r1, c1 = r.bbox
        assert sorted(planes) == list(range(z0, z1))
        for box in planes.values():  # each plane's box lies inside the 3D box
            assert r0 <= box[0] < box[2] <= r1 and c0 <= box[1] < box[3] <= c1
        boxes = np.array(list(planes.values()))  # together they make up the 3D box
        assert (*boxes[:, :2].min(0), *boxes[:, 2:].max(0)) == (r0, c0, r1, c1)
    polygons = shapes.features["kind"] == "polygon"
    assert set(shapes.features["region_label"][polygons]) == {r.label for r in regions}

    # the wireframe: 12 edges per box, only in the 3D view, on the scan
    wire = viewer.layers["boxes 3D · scan"]
    assert isinstance(wire, napari.layers.Vectors) and len(wire.data) == 12 * len(regions)
    assert_same_transform(wire, image)
    assert not wire.visible and shapes.visible
    viewer.dims.ndisplay = 3  # wireframes instead of every plane's outlines stacked
    assert wire.visible and not shapes.visible
    viewer.dims.ndisplay = 2
    assert not wire.visible and shapes.visible

    # the exports keep each plane and the 3D region's label
    geo, table = tmp_path / "r.geojson", tmp_path / "r.csv"
    napari.save_layers(str(geo), [shapes], plugin="napari-gradcam")
    napari.save_layers(str(table), [shapes], plugin="napari-gradcam")

    doc = json.loads(geo.read_text())
    seen = {}
    for f in doc["features"]:
        ours = f["properties"]["napari_gradcam"]
        if ours["kind"] == "rectangle":
            label = ours["features"]["region_label"]
            seen.setdefault(label, set()).add(f["geometry"]["plane"]["z"])
    assert seen == {r.label: set(range(r.bbox[0], r.bbox[3])) for r in regions}

    rows = list(csv.DictReader(table.open()))
    assert len(rows) == len(shapes.data)
    planes = {}
    for row in rows:
        planes.setdefault(int(float(row["region_label"])), set()).add(int(row["index0"]))
    assert planes == {r.label: set(range(r.bbox[0], r.bbox[3])) for r in regions}


def test_a_nifti_scan_with_an_oblique_affine_gets_its_heatmap_on_it(viewer, qtbot, conv3d):
    """nibabel's example4d.nii.gz (rotated in y/z, two time points) through our reader."""
    from nibabel.testing import data_path

    from napari_gradcam.volumes import volume_from_metadata

    path = f"{data_path}/example4d.nii.gz"
    (image,) = viewer.open(path, plugin="napari-gradcam")
    assert image.data.shape == (2, 24, 96, 128)
    assert not np.allclose(image.affine.affine_matrix, np.diag(np.diag(
        image.affine.affine_matrix)))  # oblique: the placement is in the affine
    w = dock(viewer, conv3d)
    w.scope.value = "whole stack"
    run(qtbot, w)
    heat = viewer.layers[f"gradcam · {image.name}"]
    assert heat.data.shape == image.data.shape
    assert_same_transform(heat, image)
    assert_same_transform(viewer.layers[f"regions · {image.name}"], image)
    # the file's geometry travels with the heatmap: it can be written back onto the scan
    back = volume_from_metadata(heat.metadata, heat.data)
    np.testing.assert_array_equal(back.affine, image.metadata["affine"])


def test_a_3d_model_on_a_time_series_of_volumes(viewer, qtbot, conv3d):
    stack = np.stack([volume(0), volume(1)])
    viewer.add_image(stack, name="series", axis_labels=("t", "z", "y", "x"))
    w = dock(viewer, conv3d)
    assert w.scope.enabled  # the leading axis is a series of volumes
    w.scope.value = "whole stack"
    w.threshold.value = 0.4
    run(qtbot, w)
    heat = viewer.layers["gradcam · series"]
    assert heat.data.shape == stack.shape
    ref = ng.explain(stack, conv3d, device="cpu")
    np.testing.assert_allclose(heat.data, ref.heatmaps, atol=1e-4)
    regions = w._last.explained.regions
    assert {r.index for r in regions} == {(0,), (1,)}
    shapes = viewer.layers["regions · series"]
    assert shapes.ndim == 4
    for d, t, z in zip(shapes.data, shapes.features["index0"], shapes.features["index1"]):
        assert (d[:, 0] == t).all() and (d[:, 1] == z).all()
    wire = viewer.layers["boxes 3D · series"]
    assert wire.data.shape == (12 * len(regions), 2, 4)
    assert set(wire.data[:, 0, 0]) == {0.0, 1.0} and (wire.data[:, 1, 0] == 0).all()

    # the current volume only: t = 1
    viewer.dims.set_point(0, 1)
    w.scope.value = "current slice"
    run(qtbot, w)
    heat = viewer.layers["gradcam · series"]
    assert heat.data.shape == (1, *SHAPE) and heat.translate[0] == 1
    np.testing.assert_allclose(heat.data[0], ref.heatmaps[1], atol=1e-4)
    assert set(viewer.layers["regions · series"].features["index0"]) == {1.0}


def test_a_2d_model_explains_a_volume_slice_by_slice(viewer, qtbot):
    vol = volume()
    viewer.add_image(vol, name="scan")
    w = dock(viewer)  # the demo model: 2D, one channel
    assert "slice by slice" in w.explains.value
    w.scope.value = "whole stack"
    run(qtbot, w)
    assert "slice by slice" in w.status.value
    heat = viewer.layers["gradcam · scan"]
    assert heat.data.shape == SHAPE
    regions = w._last.explained.regions
    assert regions and all(getattr(r, "ndim", 2) == 2 and len(r.index) == 1 for r in regions)
    shapes = viewer.layers["regions · scan"]
    assert "region_label" not in shapes.features  # plane-wise regions, no 3D label
    assert "boxes 3D · scan" not in viewer.layers


def test_a_3d_model_on_a_2d_image_notifies_and_changes_nothing(viewer, qtbot, conv3d,
                                                               errors):
    viewer.add_image(volume()[0], name="plane")
    w = dock(viewer, conv3d)
    assert "volume in one run" in w.explains.value
    before = [layer.name for layer in viewer.layers]
    assert w.run() is None
    assert errors and "(D, H, W)" in errors[-1] and "(32, 32)" in errors[-1]
    assert [layer.name for layer in viewer.layers] == before and not w.running


# ---- masks ------------------------------------------------------------------------------------------

def test_a_labels_mask_restricts_3d_regions_and_masks_the_heat(viewer, qtbot, conv3d,
                                                               errors):
    vol = volume()
    mask = np.zeros(SHAPE, np.int32)
    mask[2:12, 4:24, 6:28] = 1
    viewer.add_labels(mask, name="brain")
    image = viewer.add_image(vol, name="scan")
    w = dock(viewer, conv3d)
    w.threshold_mode.value = "relative"
    w.threshold.value = 0.5
    w.mask.value = viewer.layers["brain"]
    settle(qtbot, w)
    assert w.mask_mode.value == "multiply"
    run(qtbot, w)
    heat = viewer.layers["gradcam · scan"]
    assert (heat.data[mask == 0] == 0).all() and heat.data[mask > 0].max() > 0
    regions = w._last.explained.regions
    assert regions
    for r in regions:
        z0, r0, c0, z1, r1, c1 = r.bbox
        assert 2 <= z0 and z1 <= 12 and 4 <= r0 and r1 <= 24 and 6 <= c0 and c1 <= 28
    # restrict: the same regions' rule, the heat shown unmasked, without running the model
    w.mask_mode.value = "restrict"
    settle(qtbot, w)
    heat = viewer.layers["gradcam · scan"]
    assert heat.data[mask == 0].max() > 0
    for r in w._last.explained.regions:
        z0, r0, c0, z1, r1, c1 = r.bbox
        assert 2 <= z0 and z1 <= 12 and 4 <= r0 and r1 <= 24 and 6 <= c0 and c1 <= 28
    assert image.data is vol

    # a mask of one plane on a 3D model: a notification that names the shape wanted, and the
    # layers stay as they were
    viewer.add_labels(np.ones(SHAPE[1:], np.int32), name="one plane")
    w.mask.value = viewer.layers["one plane"]
    settle(qtbot, w)
    before = [layer.name for layer in viewer.layers]
    shown = heat.data.copy()
    assert w.run() is None
    assert errors and "mask" in errors[-1] and "(16, 32, 32)" in errors[-1]
    assert [layer.name for layer in viewer.layers] == before
    np.testing.assert_array_equal(viewer.layers["gradcam · scan"].data, shown)


# ---- the pure helpers behind the layers ---------------------------------------------------------------

def test_regions_to_annotations_and_box_wireframe_of_a_3d_region():
    heat = np.zeros((2, 8, 12, 14), np.float32)
    heat[1, 2:5, 3:9, 4:12] = 0.9  # one box in the second volume
    (region,) = ng.find_regions(heat, 0.5, min_area=1, ndim=3)
    assert region.index == (1,) and region.bbox == (2, 3, 4, 5, 9, 12) and region.label == 1
    anns = regions_to_annotations([region], CLASSES)
    assert [(a.index, a.kind) for a in anns] == [
        ((1, z), k) for z in (2, 3, 4) for k in ("rectangle", "polygon")]
    for a in anns:
        assert a.properties["region"] == 0 and a.properties["region_label"] == 1
        assert a.properties["area"] == 48 and a.properties["volume"] == 144
        assert a.geometry.bounds == (4.0, 3.0, 12.0, 9.0)

    vectors, ids = box_wireframe([region])
    assert vectors.shape == (12, 2, 4) and (ids == 0).all()
    ends = np.concatenate([vectors[:, 0], vectors[:, 0] + vectors[:, 1]])
    assert (ends[:, 0] == 1).all()  # every point carries its volume's index
    corners_ = {tuple(p) for p in ends[:, 1:]}
    assert corners_ == {(z, r, c) for z in (1.5, 4.5) for r in (2.5, 8.5) for c in (3.5, 11.5)}
    lengths = np.sort(np.abs(vectors[:, 1, 1:]).sum(1))
    assert list(lengths) == [3.0] * 4 + [6.0] * 4 + [8.0] * 4  # depth, rows, columns
    # 2D regions have no depth: no wireframe
    flat = ng.find_regions(heat[1, 3], 0.5, min_area=1)
    assert box_wireframe(flat)[0].shape == (0, 2, 3)


# ---- the bundled 3D demo model on its sample ---------------------------------------------------------

def _demo3d():
    try:
        return ng.load_model("demo3d")
    except Exception as err:  # noqa: BLE001 - absent until its weights are trained
        pytest.skip(f"the demo3d model is not available here: {err}")


def test_demo3d_finds_the_objects_of_its_sample_in_3d(viewer, qtbot):
    from napari_gradcam.models.demo3d.synthetic import sample_volume

    spec = _demo3d()
    item = sample_volume()
    viewer.add_image(item.volume, name="sample", colormap="gray")
    w = dock(viewer, spec, name="demo3d")
    assert "volume in one run" in w.explains.value
    w.target.value = "every class found"
    run(qtbot, w)
    heat = viewer.layers["gradcam · sample"]
    assert heat.data.shape == item.volume.shape
    regions = w._last.explained.regions
    assert regions and all(r.ndim == 3 for r in regions)
    for obj in item.objects:  # each object: a region of its class around it
        mine = [r for r in regions if r.class_id == obj.class_id]
        assert mine, f"no region for the {obj.class_name}"
        z, y, x = (np.array(obj.box[:3]) + np.array(obj.box[3:])) // 2
        assert any(r.bbox[0] <= z < r.bbox[3] and r.bbox[1] <= y < r.bbox[4]
                   and r.bbox[2] <= x < r.bbox[5] for r in mine), \
            f"no {obj.class_name} region holds the object's centre"
    wire = viewer.layers["boxes 3D · sample"]
    assert len(wire.data) == 12 * len(regions)
