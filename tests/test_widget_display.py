"""Reading the results at a glance: side by side (a grid cell per method: the image, that
method's heatmap and regions, its name in the corner) and one label per region, inside the image,
thinned where crowded."""

import numpy as np
import pytest

import napari_gradcam as ng
from napari_gradcam.models.demo.synthetic import make_image

napari = pytest.importorskip("napari")

from test_widget import SEED, dock, finish, raw, rect_box, run

from napari_gradcam._napari import results as results_mod
from napari_gradcam._napari.io import META_KEY

pytestmark = pytest.mark.usefixtures("our_plugin")


@pytest.fixture
def infos(monkeypatch):
    """Messages the widget shows as napari info notifications."""
    seen = []
    monkeypatch.setattr(results_mod, "show_info", seen.append)
    return seen


def grid_of(viewer):
    return viewer.canvas.grid


def role(layer):
    return layer.metadata.get(META_KEY, {}).get("role")


def names(viewer):
    return [layer.name for layer in viewer.layers]


def boxes(layer):
    return sorted(rect_box(d) for d, t in zip(layer.data, layer.shape_type) if t == "rectangle")


def region_boxes(regions):
    """(min_row, min_col, max_row, max_col) of regions' boxes, pixel corners."""
    out = []
    for r in regions:
        x0, y0, x1, y1 = r.box.bounds
        out.append((y0, x0, y1, x1))
    return sorted(out)


def explain_methods(viewer, qtbot, methods, size=96):
    viewer.add_image(make_image(size, seed=SEED, classes=[0, 1, 2]).image, name="img")
    w = dock(viewer)
    w.methods.value = methods
    w.target.value = "every class found"
    run(qtbot, w)
    return w


def check_cells(viewer, w, methods):
    """The grid as side by side leaves it: cell k is layers 4k..4k+3 (a view of the image named
    after the method, the method's heatmap, its regions and their labels), every other layer
    hidden."""
    grid, layers = grid_of(viewer), viewer.layers
    image = layers["img"]
    assert grid.enabled and grid.stride == 4 and w.grid_button.text == "Overlay"
    assert grid.actual_shape(list(layers)) == ((1, len(methods)) if len(methods) <= 3 else
                                               grid.actual_shape(list(layers)))
    explained = w._last.explained
    for k, method in enumerate(methods):
        view, heat, shapes, labels = (layers[4 * k + i] for i in range(4))
        assert {grid.position(i, list(layers)) for i in range(4 * k, 4 * k + 4)} == {
            divmod(k, grid.actual_shape(list(layers))[1])}
        # the image, its data shared (not copied), captioned with the method's name
        assert role(view) == "cell image" and view.metadata[META_KEY]["method"] == method
        assert view.name == method and view.name_overlay.visible
        assert np.shares_memory(view.data, image.data)
        assert tuple(view.contrast_limits) == tuple(image.contrast_limits)
        # the method's heatmap over it, transparent where cold
        assert role(heat) == "heatmap" and heat.metadata[META_KEY]["method"] == method
        assert heat.colormap.name == "gradcam heat" and heat.opacity == 0.7
        # the method's regions
        assert boxes(shapes) == region_boxes(explained.regions_of(method))
        if k == 0:
            assert raw(shapes) is raw(layers["regions · img"]) and not shapes.locked
        else:
            meta = shapes.metadata[META_KEY]
            assert meta["role"] == "cell regions" and meta["view"] and meta["method"] == method
            assert "view" in shapes.name and shapes.locked
        # their labels, one per labelled region
        assert role(labels) == "region labels" and raw(labels) is raw(
            results_mod.labels_of(raw(shapes)))
        assert all(layer.visible for layer in (view, heat, shapes, labels))
    assert not any(layer.visible for layer in list(layers)[4 * len(methods):])
    # the cells' extra layers are ours: the widget offers none of them as an image
    assert [name for name, _layer in w._image_choices()] == ["img"]


# ---- side by side ---------------------------------------------------------------------------------

def test_side_by_side_gives_each_method_a_cell_and_leaving_restores_the_overlay(viewer, qtbot,
                                                                                tmp_path):
    w = explain_methods(viewer, qtbot, ["gradcam", "layercam"])
    extra = viewer.add_points(np.array([[5.0, 5.0]]), name="pts")  # a layer of the user's,
    extra.visible = False  # hidden: it must stay so
    grid = grid_of(viewer)
    grid.shape, before = (2, 2), names(viewer)
    visible = [layer.visible for layer in viewer.layers]
    n = len(viewer.layers["regions · img"].data)

    w.grid_button.clicked()
    check_cells(viewer, w, ["gradcam", "layercam"])
    assert grid.shape == (1, 2)
    second = viewer.layers[6]  # the second cell's regions
    assert len(second.data) and list(second.features["class"]) and set(
        second.features["class"]) <= {"disc", "square", "triangle"}
    # the first cell's regions are the editable layer: File > Save writes all of them
    path = tmp_path / "cell.geojson"
    viewer.layers.selection = {viewer.layers[2]}
    viewer.layers.save(str(path), selected=True, plugin="napari-gradcam")
    annotations, _meta = ng.read_geojson(path)
    assert len(annotations) == n

    w.grid_button.clicked()
    assert names(viewer) == before and [layer.visible for layer in viewer.layers] == visible
    assert not grid.enabled and grid.shape == (2, 2) and grid.stride == 1
    assert w.grid_button.text == "Side by side"
    assert not any(layer.name_overlay.visible for layer in viewer.layers)
    assert raw(viewer.layers["pts"]) is raw(extra)


def test_a_rerun_while_side_by_side_updates_the_cells(viewer, qtbot):
    w = explain_methods(viewer, qtbot, ["gradcam", "layercam"])
    before = names(viewer)
    w.grid_button.clicked()
    view = viewer.layers[5]
    # new region settings: the same cells, each method's regions found again
    w.threshold.value = 0.2
    finish(qtbot, w)
    assert raw(viewer.layers[5]) is raw(view)
    check_cells(viewer, w, ["gradcam", "layercam"])
    # another set of methods: the cells are built again for them
    w.methods.value = ["gradcam", "layercam", "gradcam++"]
    run(qtbot, w)
    methods = list(w._last.explained.methods)  # in the widget's order of methods
    assert sorted(methods) == ["gradcam", "gradcam++", "layercam"]
    check_cells(viewer, w, methods)
    w.grid_button.clicked()
    assert names(viewer) == before + ["gradcam++ · img"]
    assert all(layer.visible for layer in viewer.layers) and not grid_of(viewer).enabled


def test_one_method_side_by_side_is_one_captioned_cell(viewer, qtbot):
    w = explain_methods(viewer, qtbot, ["gradcam"])
    w.grid_button.clicked()
    check_cells(viewer, w, ["gradcam"])
    assert len(viewer.layers) == 5  # the image (hidden) and the cell's four
    # napari's own grid button turned off: side by side is left cleanly
    grid_of(viewer).enabled = False
    assert names(viewer) == ["img", "gradcam · img", "regions · img", "labels · img"]
    assert all(layer.visible for layer in viewer.layers) and w.grid_button.text == "Side by side"


def test_side_by_side_without_a_result_or_image_says_what_to_do(viewer, qtbot, infos):
    viewer.add_image(make_image(96, seed=SEED).image, name="img")
    w = dock(viewer)
    w.grid_button.clicked()
    assert not grid_of(viewer).enabled and names(viewer) == ["img"]
    assert len(infos) == 1 and "press Run first" in infos[0]
    run(qtbot, w)
    viewer.layers.remove("gradcam · img")
    w.grid_button.clicked()
    assert not grid_of(viewer).enabled and "heatmap" in infos[-1] and "run again" in infos[-1]
    viewer.layers.remove("img")
    w.grid_button.clicked()
    assert not grid_of(viewer).enabled and "'img'" in infos[-1] and "no longer" in infos[-1]
    assert names(viewer) == ["regions · img", "labels · img"]


# ---- labels ---------------------------------------------------------------------------------------

def regions_layer(viewer, regions, shape=(100, 200), scale_factor=1.0):
    """A regions layer as the widget labels it: a rectangle and a polygon per region
    ``(top, left, bottom, right, label)`` (pixel corners), then hand-drawn shapes can follow."""
    data, types, rows = [], [], {"region": [], "kind": [], "label": [], "area": []}
    for k, (r0, c0, r1, c1, label) in enumerate(regions):
        rect = np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], float) - 0.5
        poly = np.array([[r0 + 1, c0], [r0, c1], [r1, (c0 + c1) / 2]], float) - 0.5
        for kind, vertices in (("rectangle", rect), ("polygon", poly)):
            data.append(vertices)
            types.append(kind)
            rows["region"].append(k)
            rows["kind"].append(kind)
            rows["label"].append(label)
            rows["area"].append((r1 - r0) * (c1 - c0))
    layer = viewer.add_shapes(data, shape_type=types, features=rows,
                              metadata={META_KEY: {"role": "regions",
                                                   "image_shape": list(shape)}},
                              text=results_mod.LABEL_TEXT)
    layer.feature_defaults = {"region": np.nan, "kind": "", "label": "", "area": np.nan}
    results_mod.label_regions(layer, viewer.layers)  # adds the labels layer: the view may
    layer.scale_factor = scale_factor  # change, so the zoom is set after
    return layer


def drawn(layer):
    """The labels drawn for a regions layer at its zoom: its labels layer's texts, one per
    labelled region ("" where it is not drawn at this zoom)."""
    return list(np.asarray(results_mod.labels_of(raw(layer)).text.values, dtype=object))


def glyph_boxes(layer):
    """Where the drawn labels' letters lie, in data coordinates: (top, left) of each drawn
    label, from the text positions napari computes (the letters' tops sit LABEL_LIFT ems above
    a text's position)."""
    points = results_mod.labels_of(raw(layer))
    coords, anchor_x, _anchor_y = points._view_text_coords
    assert anchor_x == "left"
    _widths, em = results_mod.text_extent([], points.text.size)
    lift = results_mod.LABEL_LIFT * em * layer.scale_factor
    shown = [bool(t) for t in points._view_text]
    return (coords - (lift, 0))[shown]


def test_one_label_per_region_from_a_run(viewer, qtbot):
    viewer.add_image(make_image(128, seed=SEED, classes=[0, 1, 2]).image, name="sample")
    w = dock(viewer)
    w.target.value = "every class found"
    run(qtbot, w)
    shapes = viewer.layers["regions · sample"]
    shapes.scale_factor = 0.05  # zoomed in: every label has room
    feats = shapes.features
    texts = drawn(shapes)
    regions = sorted(set(feats["region"]))
    assert len(regions) == 3 and texts == [  # each region's, from its rectangle's row
        feats["label"][list(feats["region"]).index(r)] for r in regions]
    assert all(feats["label"])  # the table keeps every row's label
    assert set(np.asarray(shapes.text.values).reshape(-1)) <= {""}  # it draws no text
    # each label at the top-left corner of its region's rectangle
    for (top, left), r in zip(glyph_boxes(shapes), regions):
        box = rect_box(shapes.data[list(feats["region"]).index(r)])
        assert box[0] - 0.5 <= top < box[0] + 0.5 and box[1] - 0.5 <= left < box[1] + 0.5
    labels = viewer.layers["labels · sample"]
    assert role(labels) == "region labels" and labels.locked


def test_a_label_at_the_top_left_edge_stays_inside_the_image(viewer):
    layer = regions_layer(viewer, [(0, 0, 30, 40, "disc 0.93")], scale_factor=0.5)
    assert drawn(layer) == ["disc 0.93"]
    (top, left), = glyph_boxes(layer)
    assert top >= -0.5 and left >= -0.5  # inside the image (and inside its box)
    assert top < 5 and left < 5  # at the box's top-left corner
    # zooming keeps the letters at the corner
    layer.scale_factor = 0.1
    (top2, left2), = glyph_boxes(layer)
    assert -0.5 <= top2 < top and -0.5 <= left2 < left


def test_a_label_at_the_right_edge_moves_left_to_stay_inside_the_image(viewer):
    # a region at the right edge: its label, longer than the region is wide, would run past
    # the image; it is drawn where it ends at the image's edge
    layer = regions_layer(viewer, [(40, 190, 60, 200, "triangle 0.95")], scale_factor=0.5)
    assert drawn(layer) == ["triangle 0.95"]
    (top, left), = glyph_boxes(layer)
    widths, _em = results_mod.text_extent(["triangle 0.95"], layer.text.size)
    assert left < 190 and left + widths[0] * layer.scale_factor <= 199.5 + 1e-6
    assert 39.5 <= top <= 41  # at its box's top (pixel 40's top edge)
    layer.scale_factor = 0.05  # zoomed in: it fits at its box's corner
    (top, left), = glyph_boxes(layer)
    assert 189.5 <= left < 190.5


def test_crowded_labels_keep_the_larger_regions(viewer):
    regions = [(10, 10, 20, 20, "small 0.50"), (12, 14, 60, 80, "large 0.90"),
               (70, 100, 80, 110, "apart 0.70")]
    layer = regions_layer(viewer, regions, scale_factor=0.5)
    assert drawn(layer) == ["", "large 0.90", "apart 0.70"]
    assert list(layer.features["label"]) == [r[4] for r in regions for _ in range(2)]
    layer.scale_factor = 0.02  # zoomed in far: room for all three
    assert drawn(layer) == ["small 0.50", "large 0.90", "apart 0.70"]


def test_hand_drawn_shapes_get_no_label_and_a_deleted_rectangle_passes_its_label_on(viewer):
    layer = regions_layer(viewer, [(10, 10, 40, 60, "disc 0.93")], scale_factor=0.2)
    layer.add_rectangles(np.array([[50.0, 100.0], [90.0, 190.0]]))
    assert drawn(layer) == ["disc 0.93"]
    layer.selected_data = {0}
    layer.remove_selected()  # the region's rectangle: its polygon shows the label now
    assert drawn(layer) == ["disc 0.93"]


def test_thin_labels_on_edge_cases():
    assert results_mod.thin_labels(np.empty((0, 4)), []).shape == (0,)
    rects = [[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]]
    # NaN priority loses to any number; a tie goes to the first
    assert list(results_mod.thin_labels(rects, [np.nan, 1.0, 1.0])) == [False, True, True]
    assert list(results_mod.thin_labels(rects, [2.0, 2.0, 0.0])) == [True, False, True]
    # outside the bounds: never drawn; a gap keeps labels apart
    assert list(results_mod.thin_labels(rects, [3, 2, 1], bounds=(0, 0, 25, 25))) == [
        True, False, False]
    assert list(results_mod.thin_labels([[0, 0, 10, 10], [0, 11, 10, 20]], [2, 1],
                                        gap=(0, 2))) == [True, False]
