"""The reader and writers through napari itself (needs a display: Xvfb in CI)."""

import json

import numpy as np
import pytest

import napari_gradcam as ng
from napari_gradcam.annotations import annotations_to_shapes, regions_to_annotations

napari = pytest.importorskip("napari")

CLASSES = ["disc", "square", "triangle"]


pytestmark = pytest.mark.usefixtures("our_plugin")


def ring_stack():
    yy, xx = np.mgrid[:64, :64]
    d = (yy - 32) ** 2 + (xx - 32) ** 2
    h = np.zeros((2, 64, 64), np.float32)
    h[0][(d <= 20 ** 2) & (d > 8 ** 2)] = 0.9
    h[1, 5:20, 40:60] = 0.7
    return h


def add_regions(viewer, h):
    regions = ng.find_regions(h, 0.5, class_ids=[0, 1], scores=[2.0, 1.0])
    data, types, feats = annotations_to_shapes(regions_to_annotations(regions, CLASSES))
    return regions, viewer.add_shapes(
        data, shape_type=types, features=feats, name="regions", scale=(1, 0.5, 0.5),
        face_color="red", edge_width=0,
        metadata={"napari_gradcam": {"class_names": CLASSES, "image_shape": list(h.shape)}},
    )


def test_file_save_offers_our_writers():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    names = {w.display_name for w in pm.iter_compatible_writers(["shapes"])
             if w.command.startswith("napari-gradcam")}
    assert names == {"QuPath GeoJSON", "COCO JSON", "CSV with features"}


def test_save_and_open_keeps_vertices_features_and_scale(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    h = ring_stack()
    regions, layer = add_regions(viewer, h)
    path = tmp_path / "regions.geojson"
    viewer.layers.save(str(path), selected=False, plugin="napari-gradcam")
    assert path.exists()
    (new,) = viewer.open(str(path), plugin="napari-gradcam")
    assert new.shape_type == layer.shape_type
    for a, b in zip(layer.data, new.data):
        np.testing.assert_array_equal(a, b)
    assert list(new.features["class"]) == list(layer.features["class"])
    np.testing.assert_array_equal(new.features["peak"], layer.features["peak"])
    np.testing.assert_array_equal(new.scale, layer.scale)

    viewer.layers.selection = {layer}
    for ext in (".json", ".csv"):
        out = tmp_path / f"regions{ext}"
        viewer.layers.save(str(out), selected=True, plugin="napari-gradcam")
        assert out.exists()
    coco = json.loads((tmp_path / "regions.json").read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"]) == len(regions)


def test_edited_shapes_are_what_gets_saved(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, layer = add_regions(viewer, ring_stack())
    layer.selected_data = {0}
    layer.remove_selected()  # the user deletes a rectangle ...
    layer.add_rectangles(np.array([[1, 2.5, 2.5], [1, 2.5, 9.5], [1, 9.5, 9.5], [1, 9.5, 2.5]]))
    path = tmp_path / "edited.geojson"
    viewer.layers.save(str(path), selected=False, plugin="napari-gradcam")
    feats = json.loads(path.read_text())["features"]
    assert len(feats) == len(layer.data)
    drawn = feats[-1]["geometry"]["coordinates"][0]
    assert {tuple(p) for p in drawn} == {(3.0, 3.0), (10.0, 3.0), (10.0, 10.0), (3.0, 10.0)}
    assert feats[-1]["geometry"]["plane"]["z"] == 1


def test_polygon_hole_is_drawn_open(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    h = ring_stack()[:1]
    regions = ng.find_regions(h[0], 0.5)
    data, types, feats = annotations_to_shapes(regions_to_annotations(regions, kinds=("polygon",)))
    viewer.add_image(np.zeros((64, 64), np.float32), colormap="gray")
    viewer.add_shapes(data, shape_type=types, face_color="red", edge_width=0)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    cy, cx = shot.shape[0] // 2, shot.shape[1] // 2
    red = lambda p: p[0] > 150 and p[1] < 80
    assert not red(shot[cy, cx])  # the hole's centre shows the image, not the fill
    ring_y = cy - int(shot.shape[0] * 14 / 64 * 0.9)  # 14 px above the centre, on the ring
    assert any(red(shot[y, cx]) for y in range(ring_y - 3, ring_y + 4))


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-gradcam", "synthetic-shapes")
    viewer.open_sample("napari-gradcam", "synthetic-stack")
    assert [layer.name for layer in viewer.layers] == ["synthetic shapes", "synthetic stack"]
    assert viewer.layers["synthetic stack"].data.shape == (16, 192, 192)
