"""Region labels drawn by a Points layer beside the regions layer (one point per region, moved
inside the image, thinned where crowded or where a label would hide its region), side by side
restoring the selection and the camera, one grid mechanism for the methods and the sanity
check's stages, label scores as the batch run writes them, and a light metrics import."""

import subprocess
import sys

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from test_widget import raw
from test_widget_display import drawn, explain_methods, regions_layer, role

from napari_gradcam._napari import results as results_mod
from napari_gradcam._napari.io import META_KEY
from napari_gradcam._napari.widget import GradCamWidget

pytestmark = pytest.mark.usefixtures("our_plugin")


def test_fit_labels_moves_labels_inside_and_only_a_label_larger_than_the_image_stays_out():
    bounds = (0.0, 0.0, 100.0, 200.0)
    rects = [[10, 190, 20, 230],    # past the right edge: moved left
             [95, 10, 105, 50],     # past the bottom: moved up
             [-5, -8, 5, 20],       # before the top-left corner: moved down and right
             [10, 10, 20, 250],     # wider than the image: left where it is
             [30, 30, 40, 60]]      # inside: unchanged
    fitted = results_mod.fit_labels(rects, bounds)
    assert fitted.tolist() == [[10, 160, 20, 200], [90, 10, 100, 50], [0, 0, 10, 28],
                               [10, 10, 20, 250], [30, 30, 40, 60]]
    keep = results_mod.thin_labels(fitted, [1, 1, 1, 1, 1], bounds)
    assert keep.tolist() == [True, True, True, False, True]
    assert results_mod.fit_labels(np.empty((0, 4)), bounds).shape == (0, 4)
    assert results_mod.fit_labels(rects, None).tolist() == np.asarray(rects, float).tolist()


def test_labels_at_the_bottom_right_corner_move_up_and_left_into_the_image(viewer):
    layer = regions_layer(viewer, [(97, 185, 100, 200, "corner 0.91")], scale_factor=0.3)
    assert drawn(layer) == ["corner 0.91"]
    points = results_mod.labels_of(raw(layer))
    widths, em = results_mod.text_extent(["corner 0.91"], points.text.size)
    per_px = layer.scale_factor
    row, col = points.data[0]
    top = row - results_mod.LABEL_LIFT * em * per_px
    assert top + results_mod.LABEL_HEIGHT * em * per_px == pytest.approx(99.5)
    assert col + widths[0] * per_px == pytest.approx(199.5)


def test_a_label_much_larger_than_its_small_region_waits_for_a_closer_zoom(viewer):
    # seen from far, the label's letters would cover the small region they name
    layer = regions_layer(viewer, [(40, 40, 43, 43, "dot 0.80"), (60, 10, 95, 120, "big 0.70")],
                          scale_factor=1.0)
    assert drawn(layer) == ["", "big 0.70"]
    layer.scale_factor = 0.05
    assert drawn(layer) == ["dot 0.80", "big 0.70"]


def test_the_labels_layer_follows_its_regions_layer(viewer):
    layer = regions_layer(viewer, [(10, 10, 40, 60, "disc 0.93")], scale_factor=0.2)
    labels, = [lay for lay in viewer.layers if role(lay) == "region labels"]
    assert role(labels) == "region labels" and labels.locked
    assert [lay.name for lay in viewer.layers].index(labels.name) == \
        [lay.name for lay in viewer.layers].index(layer.name) + 1  # just above the regions
    # the editable regions stay the selected layer, not the locked labels napari just added
    assert viewer.layers.selection.active.name == layer.name
    assert [lay.name for lay in viewer.layers.selection] == [layer.name]
    # the regions layer draws no text of its own (napari redraws a Shapes layer's text at
    # every zoom step, at a cost that grows with the square of its shapes)
    assert set(np.asarray(layer.text.values).reshape(-1)) <= {""}
    layer.visible = False
    assert not labels.visible
    layer.visible = True
    assert labels.visible
    # a zoom step redraws the labels once; the same zoom again, not at all
    redrawn = []
    labels.events.set_data.connect(lambda _e: redrawn.append(1))
    layer.scale_factor = 0.3
    assert len(redrawn) == 1
    results_mod.place_labels(raw(layer))
    assert len(redrawn) == 1
    # removed by hand: labelled anew by the next labelling
    viewer.layers.remove(labels)
    results_mod.label_regions(raw(layer), viewer.layers)
    assert role(viewer.layers[-1]) == "region labels" and drawn(layer) == ["disc 0.93"]
    # the regions layer removed: its labels go with it
    viewer.layers.remove(layer)
    assert not [lay for lay in viewer.layers if role(lay) == "region labels"]


def test_labelling_a_new_regions_layer_needs_the_layer_list(viewer):
    from napari.layers import Shapes

    shapes = Shapes(np.array([[[0.0, 0.0], [0.0, 5.0], [5.0, 5.0], [5.0, 0.0]]]),
                    shape_type="rectangle", features={"label": ["x 0.50"]})
    with pytest.raises(ValueError, match="layer list.*pass viewer.layers"):
        results_mod.label_regions(shapes)


def test_side_by_side_restores_the_selection_and_the_camera(viewer, qtbot):
    w = explain_methods(viewer, qtbot, ["gradcam", "gradcam++"])
    image, regions = viewer.layers["img"], viewer.layers["regions · img"]
    viewer.layers.selection.active = raw(image)
    viewer.layers.selection.add(raw(regions))
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.zoom, camera.center = 3.0, (0.0, 20.0, 30.0)[-len(camera.center):]
    before = (*camera.center, camera.zoom)
    w.grid_button.clicked()
    assert w._grid_state is not None
    viewer.layers.selection = {viewer.layers[0]}  # the user selects a cell's layer
    w.grid_button.clicked()
    assert {layer.name for layer in viewer.layers.selection} == {"img", "regions · img"}
    assert (*camera.center, camera.zoom) == pytest.approx(before)
    # one selected layer: napari's active layer again
    viewer.layers.selection.active = raw(image)
    w.grid_button.clicked()
    viewer.layers.selection.active = viewer.layers[1]
    w.grid_button.clicked()
    assert viewer.layers.selection.active.name == "img" and len(viewer.layers.selection) == 1
    # a selected layer that went away meanwhile is left out
    viewer.layers.selection = {raw(regions)}
    viewer.layers.selection.active = raw(regions)
    w.grid_button.clicked()
    viewer.layers.remove("regions · img")
    w.grid_button.clicked()
    assert list(viewer.layers.selection) == [] and viewer.layers.selection.active is None


def test_the_sanity_stages_and_the_methods_share_one_grid_mechanism(viewer, qtbot, monkeypatch):
    w = explain_methods(viewer, qtbot, ["gradcam"])
    calls = []
    real = GradCamWidget._enter_cells

    def spy(self, make_cells, stride, **about):
        calls.append((stride, about.get("kind")))
        return real(self, make_cells, stride, **about)

    monkeypatch.setattr(GradCamWidget, "_enter_cells", spy)
    w.grid_button.clicked()
    w.grid_button.clicked()
    image = viewer.layers["img"]
    for stage in range(2):  # a sanity check's maps, as the check writes them
        viewer.add_image(np.zeros(image.data.shape[:2], np.float32), name=f"s{stage}",
                         metadata={META_KEY: {"role": "sanity", "source": "img",
                                              "stage": stage, "caption": f"stage {stage}"}})
    assert w.check.enter_stages()
    grid = viewer.canvas.grid
    assert calls == [(results_mod.GRID_STRIDE, None), (2, "sanity")]
    assert grid.enabled and grid.stride == 2 and w.grid_button.text == "Overlay"
    assert [layer.name for layer in viewer.layers][:4] == ["stage 0", "s0", "stage 1", "s1"]
    w.grid_button.clicked()
    assert not grid.enabled and w._grid_state is None
    assert not [layer for layer in viewer.layers if layer.name.startswith("stage ")]


def test_labels_and_the_summary_show_scores_as_the_batch_run_writes_them():
    from types import SimpleNamespace

    from napari_gradcam.render import shown_score

    row = {"index": (), "class": "disc", "class_id": 0, "probability": np.nan, "score": np.nan}
    result = SimpleNamespace(  # what _summary reads
        explained=SimpleNamespace(class_names=["disc"], rows=[row]),
        job=SimpleNamespace(found=False))
    text = GradCamWidget._summary(result)
    assert "nan" not in text and "disc" in text  # no number where the model gave none
    row.update(probability=0.5, score=3.0)
    assert "disc 0.50" in GradCamWidget._summary(result)
    assert shown_score({"probability": None, "score": 2.0}) == 2.0


def test_importing_the_metrics_leaves_the_heavy_libraries_for_later():
    code = ("import sys, napari_gradcam.metrics; "
            "print(sorted(m for m in ('scipy.stats', 'scipy.sparse', 'skimage.metrics') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
