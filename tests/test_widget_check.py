"""The widget's Check section: faithfulness curves in a dock, the sanity check's stages side by
side, agreement with a reader's Labels / Shapes layer, cancel, and every bad input."""

import numpy as np
import pytest
from torch import nn

import napari_gradcam as ng
from napari_gradcam import metrics as M
from napari_gradcam.models.demo.synthetic import make_image

napari = pytest.importorskip("napari")

from test_widget import Slow, dock, finish, layer_names, run, use

from napari_gradcam._napari import check as check_mod
from napari_gradcam._napari.check import CURVES_DOCK

pytestmark = pytest.mark.usefixtures("our_plugin")
SIDE = 96


@pytest.fixture
def errors(errors, monkeypatch):
    """The widget's error notifications and the Check section's, in one list."""
    monkeypatch.setattr(check_mod, "show_error", errors.append)
    return errors


@pytest.fixture
def infos(monkeypatch):
    seen = []
    monkeypatch.setattr(check_mod, "show_info", seen.append)
    return seen


def grid_of(viewer):
    return viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid


def sample(viewer, qtbot, methods=("gradcam",), **kw):
    item = make_image(SIDE, seed=6, classes=[0])
    viewer.add_image(item.image, name="img", **kw)
    w = dock(viewer)
    w.methods.value = list(methods)
    run(qtbot, w)
    return item, w


def check(qtbot, w, start):
    worker = start()
    assert worker is not None, "the check did not start"
    finish(qtbot, w)
    return worker


def state(viewer):
    """What a check must leave alone: every layer's name, visibility, data and metadata."""
    return [(layer.name, layer.visible, np.asarray(layer.data).copy()
             if not isinstance(layer.data, list) else [np.copy(d) for d in layer.data],
             dict(layer.metadata)) for layer in viewer.layers]


def same_state(a, b):
    assert [x[0] for x in a] == [y[0] for y in b]
    for (n1, v1, d1, m1), (n2, v2, d2, m2) in zip(a, b):
        assert v1 == v2 and m1.keys() == m2.keys(), n1
        if isinstance(d1, list):
            assert len(d1) == len(d2) and all(np.array_equal(p, q) for p, q in zip(d1, d2))
        else:
            assert np.array_equal(d1, d2), n1


# ---- faithfulness ---------------------------------------------------------------------------

def test_faithfulness_plots_the_library_curves_in_one_dock(viewer, qtbot):
    item, w = sample(viewer, qtbot, methods=("gradcam", "layercam"))
    c = w.check
    c.steps.value = 5
    check(qtbot, w, c.check_faithfulness)
    assert CURVES_DOCK in viewer.window.dock_widgets
    ax = c.plot.axes
    lines = ax.get_lines()
    assert len(lines) == 4  # deletion and insertion per method
    spec = w._last.job.explain.spec
    target = int(w._last.explained.class_ids.reshape(-1)[0])
    legends = [t.get_text() for t in ax.get_legend().get_texts()]
    for i, method in enumerate(("gradcam", "layercam")):
        heat = w._last.explained.heatmaps[method]
        ref = M.deletion_insertion(item.image, spec, heat, target, 5, baseline="black")
        np.testing.assert_allclose(lines[2 * i].get_ydata(), ref.deletion, atol=1e-6)
        np.testing.assert_allclose(lines[2 * i + 1].get_ydata(), ref.insertion, atol=1e-6)
        np.testing.assert_allclose(lines[2 * i].get_xdata(), ref.fractions)
        assert f"{method} deletion (AUC {float(ref.deletion_auc):.3f})" == legends[2 * i]
        assert f"{method} insertion (AUC {float(ref.insertion_auc):.3f})" == legends[2 * i + 1]
        drop = M.average_drop_increase(item.image, spec, heat, target)
        assert f"{method}: deletion AUC {float(ref.deletion_auc):.3f}" in c.result.value
        assert f"drop {drop.average_drop:.1f} %" in c.result.value
    assert "nan" not in c.result.value.lower()
    docks = dict(viewer.window.dock_widgets)
    figure = c.plot.figure
    # again, to a blurred baseline: the same dock, redrawn
    c.baseline.value = "blur"
    c.steps.value = 4
    check(qtbot, w, c.check_faithfulness)
    assert dict(viewer.window.dock_widgets).keys() == docks.keys()
    assert c.plot.figure is figure and len(c.plot.axes.get_lines()) == 4
    assert len(c.plot.axes.get_lines()[0].get_xdata()) == 5
    assert layer_names(viewer) == ["img", "gradcam · img", "layercam · img", "regions · img",
                                   "labels · img"]


# ---- sanity check ---------------------------------------------------------------------------

def test_sanity_check_shows_the_stages_side_by_side_and_leaving_restores(viewer, qtbot):
    item, w = sample(viewer, qtbot)
    before = [(layer.name, layer.visible) for layer in viewer.layers]
    grid = grid_of(viewer)
    old_grid = (grid.enabled, grid.stride, tuple(grid.shape))
    c = w.check
    c.stages.value = 3
    check(qtbot, w, c.check_sanity)
    spec = w._last.job.explain.spec
    target = int(w._last.explained.class_ids.reshape(-1)[0])
    ref = M.sanity_check(item.image, spec, "gradcam", target, stages=3,
                         target_layer=w._last.explained.target_layer)
    stages = [layer for layer in viewer.layers
              if layer.metadata.get("napari_gradcam", {}).get("role") == "sanity"]
    assert len(stages) == 4  # the original and three stages
    np.testing.assert_allclose(stages[0].data, ref.original, atol=1e-5)
    for s in range(3):
        np.testing.assert_allclose(stages[s + 1].data, ref.maps[s], atol=1e-5)
    assert grid.enabled and grid.stride == 2 and w.grid_button.text == "Overlay"
    captions = [layer.name for layer in viewer.layers][0:8:2]
    assert captions[0] == "original (trained)"
    for s in range(3):
        assert captions[s + 1].startswith(f"stage {s + 1}")
        assert f"\u03c1 {check_mod._finite(ref.spearman[s])}" in captions[s + 1]
        assert f"SSIM {check_mod._finite(ref.ssim[s])}" in captions[s + 1]
    assert "(all)" in captions[3]
    shown = [layer.name for layer in viewer.layers if layer.visible]
    assert len(shown) == 8 and "img" not in shown  # only the cells
    assert all(viewer.layers[n].name_overlay.visible for n in captions)
    # ours: the widget's image choice skips the stage layers and the cells' images
    assert [layer.name for layer in w.image.choices if layer is not None] == ["img"]
    # re-running replaces the stage layers (and the grid shows the new ones)
    check(qtbot, w, c.check_sanity)
    assert len([layer for layer in viewer.layers
                if layer.metadata.get("napari_gradcam", {}).get("role") == "sanity"]) == 4
    assert grid.enabled
    # the widget's Side-by-side button leaves the grid as it was
    w.grid_button.clicked()
    assert (grid.enabled, grid.stride, tuple(grid.shape)) == old_grid
    after = [(layer.name, layer.visible) for layer in viewer.layers]
    assert after[:len(before)] == before  # every layer where and as it was
    assert all(not visible for _name, visible in after[len(before):])  # the stages, hidden
    assert len(after) == len(before) + 4
    # the section's button shows them again and leaves again
    assert c.stages_button.enabled
    c.stages_button.clicked()
    assert grid.enabled and c.stages_button.text == "Leave grid"
    c.stages_button.clicked()
    assert (grid.enabled, grid.stride, tuple(grid.shape)) == old_grid
    assert [(layer.name, layer.visible) for layer in viewer.layers] == after
    assert w._grid_state is None and w.grid_button.text == "Side by side"


# ---- agreement ------------------------------------------------------------------------------

def test_agreement_with_labels_and_with_shapes_gives_the_library_numbers(viewer, qtbot):
    item, w = sample(viewer, qtbot, methods=("gradcam", "gradcam++"))
    obj = item.objects[0]
    viewer.add_labels(obj.mask.astype(np.int32) * 2, name="reader")
    c = w.check
    c.annotations.value = viewer.layers["reader"]
    check(qtbot, w, c.check_agreement)
    explained = w._last.explained
    shown = c.agreement_values
    assert list(shown) == ["gradcam", "gradcam++"] and not c.table.native.isHidden()
    for method in ("gradcam", "gradcam++"):
        ref = M.agreement(explained.heatmaps[method], obj.mask, threshold=0.5,
                          regions=explained.regions_of(method)).summary()
        row = shown[method]
        assert row["energy"] == f"{ref['energy']:.2f}"
        assert row["IoU"] == f"{ref['iou']:.2f}" and row["Dice"] == f"{ref['dice']:.2f}"
        assert row["region IoU"] == f"{ref['region_iou']:.2f}"
        assert row["region Dice"] == f"{ref['region_dice']:.2f}"
        assert row["pointing"] == ("yes" if ref["pointing_game"] else "no")
    # a rectangle drawn around the object (napari's centre coordinates), on an image placed
    # elsewhere in the world: the shape goes through both layers' scale and translate
    r0, c0, r1, c1 = obj.box
    viewer.add_shapes([np.array([[r0, c0], [r0, c1 - 1], [r1 - 1, c1 - 1], [r1 - 1, c0]]) * 2
                       + 10], shape_type="rectangle", name="drawn", scale=(0.5, 0.5),
                      translate=(-5, -5))
    c.annotations.value = viewer.layers["drawn"]
    check(qtbot, w, c.check_agreement)
    box = np.zeros((SIDE, SIDE), bool)
    box[r0:r1, c0:c1] = True
    for method in ("gradcam", "gradcam++"):
        ref = M.agreement(explained.heatmaps[method], box, threshold=0.5,
                          regions=explained.regions_of(method)).summary()
        row = c.agreement_values[method]
        assert row["IoU"] == f"{ref['iou']:.2f}" and row["energy"] == f"{ref['energy']:.2f}"
        assert row["region Dice"] == f"{ref['region_dice']:.2f}"
    assert "nan" not in str(c.agreement_values).lower()
    assert layer_names(viewer) == ["img", "gradcam · img", "gradcam++ · img", "regions · img",
                                   "labels · img", "reader", "drawn"]


# ---- cancel ---------------------------------------------------------------------------------

def test_cancel_mid_check_leaves_the_layers(viewer, qtbot):
    viewer.add_image(np.random.default_rng(0).random((32, 32), dtype=np.float32), name="img")
    w = dock(viewer)
    slow = Slow(delay=0.2)
    use(w, ng.load_model(slow, class_names=["a", "b", "c"]), "slow")
    w.methods.value = ["gradcam", "gradcam++", "layercam"]
    run(qtbot, w)
    before = state(viewer)
    c = w.check
    c.stages.value = 6
    calls = slow.calls
    worker = c.check_sanity()
    steps = []
    worker.yielded.connect(steps.append)  # queued from the worker: none is missed
    assert worker is not None and w.running and not c.faithfulness_button.enabled
    assert w.run() is None  # a Run waits: one job at a time
    qtbot.waitUntil(lambda: len(steps) >= 1, timeout=20_000)
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        w.cancel_button.clicked()
    assert "cancelled" in w.status.value and len(steps) < 6
    same_state(before, state(viewer))
    assert not grid_of(viewer).enabled
    # and faithfulness: no plot, no layer
    c.steps.value = 3
    worker = c.check_faithfulness()
    steps = []
    worker.yielded.connect(steps.append)
    qtbot.waitUntil(lambda: len(steps) >= 1, timeout=20_000)
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        w.cancel()
    assert len(steps) < 6 and slow.calls > calls
    assert c.plot is None and CURVES_DOCK not in viewer.window.dock_widgets
    same_state(before, state(viewer))
    assert c.faithfulness_button.enabled and w.run_button.enabled


# ---- bad input --------------------------------------------------------------------------------

def test_no_run_yet_and_a_removed_or_changed_image(viewer, qtbot, errors):
    viewer.add_image(make_image(SIDE, seed=6, classes=[0]).image, name="img")
    w = dock(viewer)
    c = w.check
    for start in (c.check_faithfulness, c.check_sanity, c.check_agreement):
        assert start() is None and "press Run first" in errors[-1]
    run(qtbot, w)
    before = state(viewer)
    viewer.layers["img"].data = np.zeros((SIDE, SIDE), np.float32)
    for start in (c.check_faithfulness, c.check_sanity):
        assert start() is None
        assert "changed since the last run" in errors[-1] and "run again" in errors[-1]
    viewer.layers.remove("img")
    for start in (c.check_faithfulness, c.check_sanity):
        assert start() is None and "no longer in the viewer" in errors[-1]
    assert layer_names(viewer) == [name for name, *_ in before][1:]
    assert not w.running


def test_a_segmentation_model_and_a_model_without_parameters(viewer, qtbot, errors):
    from test_widget_segmentation import seg_spec, two_squares

    viewer.add_image(two_squares(), name="img")
    w = dock(viewer)
    use(w, seg_spec(), "seg")
    run(qtbot, w)
    assert w._last is not None and w._last.job.explain.segmentation, errors
    before = state(viewer)
    for start in (w.check.check_faithfulness, w.check.check_sanity):
        assert start() is None
        assert "segmentation model" in errors[-1] and "classification model" in errors[-1]
    same_state(before, state(viewer))

    class NoParams(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Identity()

        def forward(self, x):  # three "classes": the mean, max and min of the image
            f = self.features(x)
            return nn.functional.adaptive_avg_pool2d(
                nn.functional.interpolate(f, size=(3, 3)), 1).flatten(1)[:, :1].repeat(1, 3) \
                + nn.functional.interpolate(f, size=(1, 3)).flatten(1)

    flat = use(w, ng.load_model(NoParams(), class_names=["a", "b", "c"], in_channels=1), "flat")
    w.methods.value = ["gradcam"]
    w.target_layer.value = "features"
    run(qtbot, w)
    assert w._last.job.explain.spec is flat, errors
    before = state(viewer)
    assert w.check.check_sanity() is None
    assert "no parameters" in errors[-1] and "learnt layers" in errors[-1]
    same_state(before, state(viewer))


def test_bad_annotation_layers_say_what_to_change(viewer, qtbot, errors):
    _item, w = sample(viewer, qtbot)
    c = w.check
    assert c.check_agreement() is None and "no annotation layer chosen" in errors[-1]
    viewer.add_shapes(None, ndim=2, name="empty shapes")
    c.annotations.value = viewer.layers["empty shapes"]
    assert c.check_agreement() is None
    assert "'empty shapes' has no shapes" in errors[-1] and "draw" in errors[-1]
    viewer.add_labels(np.zeros((SIDE, SIDE), np.int32), name="blank")
    c.annotations.value = viewer.layers["blank"]
    assert c.check_agreement() is None
    assert "'blank' has no labels" in errors[-1] and "paint" in errors[-1]
    viewer.add_labels(np.ones((32, 32), np.int32), name="small")
    c.annotations.value = viewer.layers["small"]
    assert c.check_agreement() is None
    assert "'small' has shape (32, 32)" in errors[-1] and "(96, 96)" in errors[-1]
    # a label on a plane the image is not on (a 3D Labels layer, its label in plane 2)
    planes = np.zeros((3, SIDE, SIDE), np.int32)
    planes[2, 10:20, 10:20] = 1
    viewer.add_labels(planes, name="other plane")
    viewer.dims.set_point(0, 0)
    c.annotations.value = viewer.layers["other plane"]
    assert c.check_agreement() is None
    assert "'other plane' marks no pixel" in errors[-1]
    # shapes far from the image
    viewer.add_shapes([np.array([[500, 500], [500, 520], [520, 520], [520, 500]])],
                      shape_type="rectangle", name="far")
    c.annotations.value = viewer.layers["far"]
    assert c.check_agreement() is None and "don't overlap the image" in errors[-1]
    assert layer_names(viewer) == ["img", "gradcam · img", "regions · img", "labels · img",
                                   "empty shapes", "blank", "small", "other plane", "far"]
    assert c.table.native.isHidden() and not w.running


def test_a_check_while_a_run_goes_says_so(viewer, qtbot, infos):
    _item, w = sample(viewer, qtbot)
    worker = w.run()
    assert worker is not None and not w.check.sanity_button.enabled
    assert w.check.check_sanity() is None and "in progress" in infos[-1]
    finish(qtbot, w)
    assert w.check.sanity_button.enabled


def test_a_stack_explained_whole_is_checked_on_the_frame_shown(viewer, qtbot, errors):
    items = [make_image(SIDE, seed=s, classes=[0]) for s in (6, 7, 8)]
    viewer.add_image(np.stack([i.image for i in items]), name="stack")
    w = dock(viewer)
    w.scope.value = "whole stack"
    run(qtbot, w)
    viewer.dims.set_point(0, 1)
    c = w.check
    truth = np.zeros((3, SIDE, SIDE), np.int32)
    truth[1] = items[1].objects[0].mask
    viewer.add_labels(truth, name="truth")
    c.annotations.value = viewer.layers["truth"]
    check(qtbot, w, c.check_agreement)
    explained = w._last.explained
    regions = [r for r in explained.regions if tuple(r.index) == (1,)]
    assert regions
    import dataclasses

    ref = M.agreement(explained.heatmaps["gradcam"][1], truth[1], threshold=0.5,
                      regions=[dataclasses.replace(r, index=()) for r in regions]).summary()
    assert c.agreement_values["gradcam"]["IoU"] == f"{ref['iou']:.2f}"
    assert c.agreement_values["gradcam"]["region Dice"] == f"{ref['region_dice']:.2f}"
    assert "stack frame 1" in c.result.value
    c.steps.value = 3
    check(qtbot, w, c.check_faithfulness)
    spec = w._last.job.explain.spec
    ref = M.deletion_insertion(items[1].image, spec, explained.heatmaps["gradcam"][1],
                               int(explained.class_ids[1, 0]), 3)
    np.testing.assert_allclose(c.plot.axes.get_lines()[0].get_ydata(), ref.deletion,
                               atol=1e-6)
    viewer.dims.set_point(0, 2)  # the annotation is not on this frame
    assert c.check_agreement() is None
    assert "'truth' marks no pixel of 'stack' in the frame checked" in errors[-1]


def test_shapes_on_another_frame_name_that_frame(viewer, qtbot, errors):
    """3D shapes drawn on frame 2 of the stack while frame 0 is checked: the message names
    both frames (the shapes are on the image, only not on the frame checked)."""
    items = [make_image(SIDE, seed=s, classes=[0]) for s in (6, 7, 8)]
    viewer.add_image(np.stack([i.image for i in items]), name="stack")
    w = dock(viewer)
    viewer.dims.set_point(0, 0)
    run(qtbot, w)
    box = np.array([[2, 10, 10], [2, 10, 40], [2, 40, 40], [2, 40, 10]], float)
    viewer.add_shapes([box], shape_type="rectangle", name="ann")
    w.check.annotations.value = viewer.layers["ann"]
    assert w.check.check_agreement() is None
    assert "the shapes of 'ann' lie on frame 2; the check looks at frame 0: go to frame 2 " \
           "and run, or draw on frame 0" in errors[-1]
    assert "don't overlap" not in errors[-1] and not w.running


def test_removing_the_sanity_image_drops_its_maps_and_the_stages_button(viewer, qtbot):
    _item, w = sample(viewer, qtbot)
    w.check.stages.value = 2
    check(qtbot, w, w.check.check_sanity)
    w.check.toggle_stages()  # leave the grid: the maps stay, hidden, for showing again
    assert len(w.check._sanity_layers()) == 3 and w.check.stages_button.enabled
    viewer.layers.remove("img")
    assert w.check._sanity_layers() == []
    assert "gradcam · img" in layer_names(viewer)
    assert not any("stage" in name for name in layer_names(viewer))
    assert not w.check.stages_button.enabled
    assert w.check.stages_button.text == "Stages side by side"
