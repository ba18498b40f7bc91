"""The dock widget in a real napari viewer (Xvfb in CI): runs, layers, regions, cancel, errors."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import napari_gradcam as ng
from napari_gradcam.models.demo.synthetic import make_image, make_stack

napari = pytest.importorskip("napari")

from conftest import small_cnn

from napari_gradcam._device import describe_device, resolve_device
from napari_gradcam._napari import widget as widget_mod
from napari_gradcam._napari.widget import GradCamWidget

DATA = Path(__file__).parent / "data" / "chest-xray"
SEED = 6  # the sample image: a disc, a square and a triangle


pytestmark = pytest.mark.usefixtures("our_plugin")


def dock(viewer) -> GradCamWidget:
    _dock, w = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM")
    assert isinstance(w, GradCamWidget)
    assert w.wait_until_ready(), "the demo model did not load"
    return w


def use(w, model, name):
    """``set_model`` and wait for the layer probe (it runs on a worker)."""
    spec = w.set_model(model, name=name)
    assert w.wait_until_ready(), "the layer probe did not finish"
    return spec


def auto_device() -> str:
    """The device the widget's 'auto' picks here (CPU, or the GPU when there is one)."""
    return str(resolve_device("auto"))


def finish(qtbot, w, timeout=60_000):
    qtbot.waitUntil(lambda: not w.running and w._region_worker is None, timeout=timeout)


def run(qtbot, w, **kw):
    worker = w.run()
    assert worker is not None, "the run did not start"
    finish(qtbot, w, **kw)
    return worker


def box_iou(a, b):
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def rect_box(vertices):
    """A napari rectangle (centre coordinates) -> (min_row, min_col, max_row, max_col) in
    pixel-corner coordinates."""
    v = np.asarray(vertices)[:, -2:] + 0.5
    return (*v.min(0), *v.max(0))


def run_every_class(viewer, qtbot):
    """The sample with a disc, a square and a triangle, explained for every class found."""
    item = make_image(256, seed=SEED, classes=[0, 1, 2])
    viewer.add_image(item.image, name="sample")
    w = dock(viewer)
    w.target.value = "every class found"
    run(qtbot, w)
    return item, w, viewer.layers["regions · sample"]


def raw(obj):
    """The object behind napari's public-only proxy (proxies are made per access)."""
    return getattr(obj, "__wrapped__", obj)


def layer_names(viewer):
    return [layer.name for layer in viewer.layers]


# ---- the main job -------------------------------------------------------------------------------

def test_run_on_the_synthetic_sample(viewer, qtbot):
    item = make_image(256, seed=SEED, classes=[0, 1, 2])
    image = viewer.add_image(item.image, name="sample", scale=(0.5, 0.5), translate=(3, 4),
                             units=("um", "um"), axis_labels=("y", "x"))
    w = dock(viewer)
    assert raw(w.image.value) is raw(image) and w.model.value == "demo"
    assert w.device_label.value == describe_device(resolve_device("auto"))
    run(qtbot, w)
    assert layer_names(viewer) == ["sample", "gradcam · sample", "regions · sample",
                                   "labels · sample"]

    heat = viewer.layers["gradcam · sample"]
    assert heat.data.shape == (256, 256) and heat.data.dtype == np.float32
    # transparent where cold, so the image shows through untouched (additive blending would
    # wash a bright object out to white: see the screenshot test)
    assert heat.colormap.name == "gradcam heat" and heat.blending == "translucent"
    assert heat.colormap.map(np.array([0.0]))[0, 3] == 0 and heat.colormap.map(
        np.array([1.0]))[0, 3] == 1
    assert tuple(heat.contrast_limits) == (0.0, 1.0)
    np.testing.assert_array_equal(heat.scale, image.scale)
    np.testing.assert_array_equal(heat.translate, image.translate)
    assert tuple(heat.axis_labels) == ("y", "x") and tuple(heat.units) == tuple(image.units)
    # the same numbers as the library call
    ref = ng.explain(item.image, ng.load_model("demo"), device=auto_device())
    np.testing.assert_allclose(heat.data, ref.heatmaps, atol=1e-5)

    shapes = viewer.layers["regions · sample"]
    np.testing.assert_array_equal(shapes.scale, image.scale)
    feats = shapes.features
    for column in ("kind", "class", "class_id", "score", "peak", "area", "label"):
        assert column in feats.columns
    assert list(feats["kind"][:2]) == ["rectangle", "polygon"]
    assert shapes.shape_type[:2] == ["rectangle", "polygon"]
    predicted = ng.load_model("demo").class_names[int(ref.class_ids)]
    assert set(feats["class"]) == {predicted}
    # the label says the probability (the demo is multi-label: a sigmoid); the logit stays
    # in the table
    prob = 1 / (1 + np.exp(-float(ref.scores)))
    assert feats["label"][0] == f"{predicted} {prob:.2f}"
    assert feats["score"][0] == pytest.approx(float(ref.scores), rel=1e-4)
    assert feats["probability"][0] == pytest.approx(prob, rel=1e-4)
    truth = [o.box for o in item.objects if o.class_name == predicted]
    boxes = [rect_box(d) for d, t in zip(shapes.data, shapes.shape_type) if t == "rectangle"]
    assert max(box_iou(t, b) for t in truth for b in boxes) >= 0.5
    # shapes the user draws get a valid features row (kind filled in once drawn)
    assert shapes.feature_defaults["kind"][0] == ""
    meta = shapes.metadata["napari_gradcam"]
    assert meta["class_names"] == ["disc", "square", "triangle"]
    assert meta["image_shape"] == [256, 256] and meta["image_name"] == "sample"
    assert "regions" in w.status.value
    assert describe_device(resolve_device("auto")) in w.status.value


def test_rerun_updates_layers_in_place_and_a_target_by_name(viewer, qtbot):
    item = make_image(256, seed=SEED, classes=[0, 1, 2])
    viewer.add_image(item.image, name="sample")
    w = dock(viewer)
    run(qtbot, w)
    heat, shapes = viewer.layers["gradcam · sample"], viewer.layers["regions · sample"]
    shapes.visible = False  # a user setting that must survive the re-run
    w.target.value = "square"
    run(qtbot, w)
    assert layer_names(viewer) == ["sample", "gradcam · sample", "regions · sample",
                                   "labels · sample"]
    assert raw(viewer.layers["gradcam · sample"]) is raw(heat)
    assert raw(viewer.layers["regions · sample"]) is raw(shapes) and not shapes.visible
    assert set(shapes.features["class"]) == {"square"}
    square = next(o.box for o in item.objects if o.class_name == "square")
    boxes = [rect_box(d) for d, t in zip(shapes.data, shapes.shape_type) if t == "rectangle"]
    assert max(box_iou(square, b) for b in boxes) >= 0.5
    # new shapes have no class, even when the run explained one
    assert shapes.feature_defaults["class"][0] == ""


def test_every_class_found_boxes_each_object_in_its_class(viewer, qtbot):
    item, w, shapes = run_every_class(viewer, qtbot)
    rects = [(rect_box(d), c) for d, t, c in
             zip(shapes.data, shapes.shape_type, shapes.features["class"]) if t == "rectangle"]
    for o in item.objects:  # each object has a box of its own class
        assert max(box_iou(o.box, b) for b, c in rects if c == o.class_name) >= 0.5
    assert (shapes.features["score"] > 0).all()
    # one heatmap: per pixel the hottest class found, each class's map as the library makes it
    spec = ng.load_model("demo")
    heat = viewer.layers["gradcam · sample"].data
    maps = [ng.explain(item.image, spec, target=k, device=auto_device()).heatmaps
            for k in range(3)]
    np.testing.assert_allclose(heat, np.max(maps, 0), atol=1e-5)
    assert all(name in w.status.value for name in ("disc", "square", "triangle"))
    # shapes drawn by hand: no class until the user gives one
    assert shapes.feature_defaults["class"][0] == ""


def test_every_class_found_runs_one_forward_per_batch_per_method(viewer, qtbot):
    from napari_gradcam.job import ExplainJob

    stack = np.stack([make_image(128, seed=s, classes=[0, 1, 2]).image for s in (6, 7, 8, 9)])
    viewer.add_image(stack, name="four")
    w = dock(viewer)
    spec = use(w, ng.load_model("demo"), "demo (counted)")
    w.methods.value = ["gradcam", "hirescam"]
    w.target.value = "every class found"
    w.scope.value = "whole stack"
    w.batch_size.value = 2
    calls, progress = [], []
    handle = spec.module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        worker = w.run()
        worker.yielded.connect(progress.append)
        finish(qtbot, w)
    finally:
        handle.remove()
    # 2 batches x 2 methods, every class from the same pass (the demo model names its layer)
    assert len(calls) == 2 * 2
    assert [(p.done, p.total) for p in progress] == [(2, 4), (4, 4)]
    ref = ExplainJob(spec, ["gradcam", "hirescam"], "found", device=auto_device(),
                     batch_size=2).run(stack)
    for method in ("gradcam", "hirescam"):
        np.testing.assert_allclose(viewer.layers[f"{method} · four"].data,
                                   ref.heatmaps[method], atol=1e-5)
    shapes = viewer.layers["regions · four"]
    rects = [(int(d[0, 0]), c, rect_box(d)) for d, t, c in
             zip(shapes.data, shapes.shape_type, shapes.features["class"]) if t == "rectangle"]
    assert rects == [(r.index[0], spec.class_names[r.class_id], tuple(float(v) for v in r.bbox))
                     for r in ref.regions]
    assert len({c for _, c, _ in rects}) == 3


def test_whole_stack_and_current_slice(viewer, qtbot):
    stack, labels, objects = make_stack(6, 128, seed=3)
    image = viewer.add_image(stack, name="movie", scale=(2.0, 0.5, 0.5), translate=(10, 1, 1),
                             axis_labels=("t", "y", "x"))
    w = dock(viewer)
    assert w.scope.enabled
    w.scope.value = "whole stack"
    w.batch_size.value = 4
    run(qtbot, w)
    heat = viewer.layers["gradcam · movie"]
    assert heat.data.shape == stack.shape
    np.testing.assert_array_equal(heat.scale, image.scale)
    np.testing.assert_array_equal(heat.translate, image.translate)
    shapes = viewer.layers["regions · movie"]
    assert shapes.ndim == 3
    frames = {int(d[0, 0]) for d in shapes.data}
    assert frames <= set(range(6)) and len(frames) >= 3
    for d, t in zip(shapes.data, shapes.features["index0"]):
        assert (d[:, 0] == t).all()  # every vertex carries its frame
    ref = ng.explain(stack, ng.load_model("demo"), device=auto_device())
    np.testing.assert_allclose(heat.data, ref.heatmaps, atol=1e-5)

    # the current slice: frame 4 (world t = 10 + 4 * 2)
    viewer.dims.set_point(0, 18.0)
    w.scope.value = "current slice"
    run(qtbot, w)
    heat = viewer.layers["gradcam · movie"]
    assert heat.data.shape == (1, 128, 128)
    assert heat.translate[0] == 18.0
    np.testing.assert_allclose(heat.data[0], ref.heatmaps[4], atol=1e-5)
    shapes = viewer.layers["regions · movie"]
    assert set(shapes.features["index0"]) <= {4.0}
    assert all((d[:, 0] == 4).all() for d in shapes.data)


def test_threshold_rederives_shapes_without_running_the_model(viewer, qtbot):
    item = make_image(256, seed=SEED, classes=[0, 1, 2])
    viewer.add_image(item.image, name="sample")
    w = dock(viewer)
    spec = use(w, ng.load_model("demo"), "demo (counted)")
    calls = []
    spec.module.register_forward_pre_hook(lambda *_: calls.append(1))
    w.target.value = "square"
    run(qtbot, w)
    shapes = viewer.layers["regions · sample"]
    before = len(calls)
    area_hi = shapes.features["area"].max()
    w.threshold.value = 0.2
    finish(qtbot, w)
    assert len(calls) == before
    assert shapes.features["area"].max() > area_hi  # a lower threshold: larger regions
    w.min_area.value = 10**6
    finish(qtbot, w)
    assert len(shapes.data) == 0 and len(calls) == before
    w.min_area.value = 16
    w.threshold_mode.value = "otsu"
    finish(qtbot, w)
    assert len(shapes.data) >= 2 and len(calls) == before


class Slow(nn.Module):
    """A tiny CNN that takes ``delay`` seconds per forward pass."""

    def __init__(self, delay=0.25):
        super().__init__()
        self.net = small_cnn()
        self.delay, self.calls = delay, 0

    def forward(self, x):
        self.calls += 1
        time.sleep(self.delay)
        return self.net(x)


def test_cancel_stops_a_long_run_and_keeps_the_layers(viewer, qtbot):
    from qtpy.QtCore import QTimer

    stack = np.random.default_rng(0).random((24, 32, 32), dtype=np.float32)
    viewer.add_image(stack, name="long")
    w = dock(viewer)
    slow = Slow()
    use(w, ng.load_model(slow, class_names=["a", "b", "c"]), "slow")
    w.scope.value = "whole stack"
    w.batch_size.value = 1
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    probes = slow.calls  # the layer and segmentation probes' forwards
    worker = w.run()
    assert w.running and not w.run_button.enabled and w.cancel_button.enabled
    assert w.run() is None  # a second click while running starts nothing
    qtbot.waitUntil(lambda: slow.calls >= probes + 2, timeout=20_000)
    assert len(ticks) >= 10  # the event loop kept ticking while the worker ran
    with qtbot.waitSignal(worker.finished, timeout=20_000):
        w.cancel_button.clicked()
    timer.stop()
    assert slow.calls < 12  # stopped long before the 24 frames (+ the layer probe)
    assert layer_names(viewer) == ["long"]
    assert "cancelled" in w.status.value
    assert w.run_button.enabled and not w.cancel_button.enabled


def test_compare_methods_side_by_side(viewer, qtbot):
    viewer.add_image(make_image(192, seed=SEED, classes=[0, 1, 2]).image, name="img")
    w = dock(viewer)
    w.methods.value = ["cam", "gradcam", "layercam"]
    run(qtbot, w)
    assert layer_names(viewer) == ["img", "cam · img", "gradcam · img",
                                   "layercam · img", "regions · img", "labels · img"]
    assert viewer.layers["regions · img"].metadata["napari_gradcam"]["method"] == "cam"
    grid = viewer.canvas.grid if hasattr(viewer, "canvas") else viewer.grid
    w.grid_button.clicked()
    assert grid.enabled and w.grid_button.text == "Overlay"
    heat = viewer.layers["cam · img"]
    # over the image in its cell: transparent where cold, as in the overlay
    assert heat.colormap.name == "gradcam heat" and heat.opacity == 0.7
    w.grid_button.clicked()
    assert not grid.enabled and heat.colormap.name == "gradcam heat" and heat.opacity == 0.7


def test_chest_xray_rgb_palette_png_with_its_lung_mask(viewer, qtbot):
    import imageio.v3 as iio

    name = "CHNCXR_0628_1"
    xray = iio.imread(DATA / "images" / f"{name}.png")  # palette PNG -> (512, 512, 3) uint8
    lungs = iio.imread(DATA / "lung-masks" / f"{name}.png") > 127
    assert xray.shape == (512, 512, 3)
    image = viewer.add_image(xray, name="xray")
    assert image.rgb
    viewer.add_labels(lungs.astype(np.uint8), name="lungs")
    viewer.layers.selection.active = image
    w = dock(viewer)
    w.mask.value = viewer.layers["lungs"]
    w.threshold_mode.value = "relative"
    w.threshold.value = 0.15
    run(qtbot, w)
    heat = viewer.layers["gradcam · xray"]
    assert heat.data.shape == (512, 512) and not heat.rgb
    shapes = viewer.layers["regions · xray"]
    assert len(shapes.data) >= 2
    from napari_gradcam.annotations import shapes_to_annotations
    from napari_gradcam.regions import rasterize

    for a in shapes_to_annotations(shapes.data, shapes.shape_type, shapes.features):
        if a.kind == "polygon":
            inside = rasterize(a.geometry, lungs.shape)
            assert inside.any() and not (inside & ~lungs).any()  # polygons stay in the lungs
    # a mask the size of nothing here is refused, and the regions stay as they were
    before = [d.copy() for d in shapes.data]
    viewer.add_labels(np.ones((100, 100), np.uint8), name="tiny")
    w.mask.value = viewer.layers["tiny"]
    finish(qtbot, w)
    assert all(np.array_equal(a, b) for a, b in zip(before, shapes.data))


def test_grey_layer_feeds_a_three_channel_model_and_dask_uint16(viewer, qtbot):
    da = pytest.importorskip("dask.array")
    stack, _, _ = make_stack(4, 96, seed=8)
    u16 = (stack * 65535).astype(np.uint16)
    viewer.add_image(da.from_array(u16, chunks=(1, 96, 96)), name="lazy")
    w = dock(viewer)
    model = small_cnn(in_ch=3)
    use(w, ng.load_model(model, class_names=["a", "b", "c"]), "rgb-net")
    assert w.target.choices[-3:] == ("a", "b", "c")
    w.scope.value = "whole stack"
    run(qtbot, w)
    heat = viewer.layers["gradcam · lazy"].data
    ref = ng.explain(np.repeat(stack[..., None], 3, -1), ng.load_model(model),
                     device=auto_device())
    np.testing.assert_allclose(heat, ref.heatmaps, atol=2e-3)


# ---- bad input: a sentence that says what to do, and no layer touched --------------------------

def test_bad_inputs_notify_and_change_nothing(viewer, qtbot, errors):
    w = dock(viewer)
    assert w.run() is None and "no image layer" in errors[-1]

    viewer.add_labels(np.zeros((64, 64), np.int32), name="cells")
    viewer.layers.selection.active = viewer.layers["cells"]
    assert w.run() is None
    assert "'cells' is a Labels layer" in errors[-1] and "Image layer" in errors[-1]

    rgba = np.random.default_rng(0).random((64, 64, 4)).astype(np.float32)
    viewer.add_image(rgba, name="rgba", rgb=True)
    assert w.run() is None
    assert "RGBA" in errors[-1] and "1 input channel" in errors[-1]

    viewer.add_image(np.zeros((0, 64, 64), np.float32), name="empty", contrast_limits=(0, 1))
    w.image.value = viewer.layers["empty"]
    assert w.run() is None and "empty" in errors[-1]

    viewer.add_image(np.zeros((64, 64), np.float32), name="grey")
    w.image.value = viewer.layers["grey"]
    w.target.choices = ["predicted class", "zebra"]  # e.g. a choice left from another model
    w.target.value = "zebra"
    assert w.run() is None and "no class 'zebra'" in errors[-1] and "'disc'" in errors[-1]
    w.target.reset_choices()
    w.target.value = "predicted class"

    viewer.add_labels(np.ones((32, 32), np.uint8), name="small mask")
    w.mask.value = viewer.layers["small mask"]
    assert w.run() is None and "mask 'small mask' has shape (32, 32)" in errors[-1]

    w.methods.value = []
    assert w.run() is None and "method" in errors[-1]
    assert layer_names(viewer) == ["cells", "rgba", "empty", "grey", "small mask"]


def test_errors_inside_the_run_are_reported(viewer, qtbot, errors):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)

        def forward(self, x):
            if x.shape[-1] > 60:  # the layer probe (64 px) passes, the real image fails
                raise RuntimeError("this model only takes small images")
            return self.conv(x).mean((2, 3))

    viewer.add_image(np.zeros((100, 100), np.float32), name="img")
    w = dock(viewer)
    use(w, ng.load_model(Broken(), class_names=["a", "b", "c"]), "broken")
    w.target_layer.value = "conv"
    run(qtbot, w)
    assert "only takes small images" in errors[-1]
    assert layer_names(viewer) == ["img"] and w.status.value == "failed"


# ---- what the user sees -------------------------------------------------------------------------

def test_screenshot_shows_heat_on_the_object_and_the_box(make_napari_viewer_proxy, qtbot):
    viewer = make_napari_viewer_proxy(show=True)
    item = make_image(256, seed=SEED, classes=[0, 1, 2])
    viewer.add_image(item.image, name="sample", colormap="gray")
    w = dock(viewer)
    # wide enough that the dock leaves the canvas room for the image (the dock is wide)
    viewer.window.resize(1600, 900)
    qtbot.wait(50)
    run(qtbot, w)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot[..., :3].std() > 10  # not blank
    assert min(shot.shape[:2]) >= 400, f"the canvas is {shot.shape[1]} x {shot.shape[0]} px"

    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    zoom = camera.zoom
    cy, cx = camera.center[-2:]
    h, wd = shot.shape[:2]

    def screen(row, col):  # data (= world here) pixel centre -> screenshot pixel
        return int(round(h / 2 + (row - cy) * zoom)), int(round(wd / 2 + (col - cx) * zoom))

    def warm(rgb):
        r, g, b = (int(v) for v in rgb[:3])
        return r > 150 and r > b + 60 and r > g + 30

    predicted = viewer.layers["regions · sample"].features["class"][0]
    obj = next(o for o in item.objects if o.class_name == predicted)
    r0, c0, r1, c1 = obj.box
    centre = shot[screen((r0 + r1) / 2 - 0.5, (c0 + c1) / 2 - 0.5)]
    assert warm(centre), f"no heat colour on the {predicted}: {centre}"
    far = [o for o in item.objects if o.class_name != predicted]
    for o in far:  # the other objects stay grey: the map is class-discriminative
        px = shot[screen((o.box[0] + o.box[2]) / 2 - 0.5, (o.box[1] + o.box[3]) / 2 - 0.5)]
        assert not warm(px), f"heat on the {o.class_name}: {px}"
    # the rectangle's edge in the class colour, just outside the object's box
    from napari_gradcam.annotations import class_color

    colour = np.array(class_color(ng.load_model("demo").class_names.index(predicted)))
    rect = viewer.layers["regions · sample"].data[0][:, -2:]
    top = rect[:, 0].min()
    left, right = rect[:, 1].min(), rect[:, 1].max()
    row, col = screen(top, (left + right) / 2)
    patch = shot[max(row - 2, 0):row + 3, col - 2:col + 3, :3].reshape(-1, 3).astype(int)
    assert np.abs(patch - colour).sum(1).min() < 60, "the box edge is not drawn"


def test_demo_command_opens_sample_widget_and_run(viewer, qtbot):
    from napari_gradcam._napari.demo import open_demo

    _viewer, w, worker = open_demo(viewer)
    assert worker is not None
    finish(qtbot, w)
    assert layer_names(viewer) == ["synthetic shapes", "gradcam · synthetic…apes",
                                   "regions · synthetic…apes", "labels · synthetic…apes"]
    shapes = viewer.layers["regions · synthetic…apes"]
    assert set(shapes.features["class"]) == {"disc", "square", "triangle"}


def test_demo_without_a_display_says_what_to_do(monkeypatch, capsys):
    from napari_gradcam import cli

    monkeypatch.setattr("sys.platform", "linux")
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["demo"]) == 2
    assert "xvfb-run" in capsys.readouterr().err


def test_devices_offered_are_the_ones_present():
    devices = widget_mod.available_devices()
    assert devices[:2] == ["auto", "cpu"]
    assert any(d.startswith("cuda") for d in devices) == torch.cuda.is_available()


def test_edited_regions_save_through_the_file_menu_writers(viewer, qtbot, tmp_path):
    item, _w, shapes = run_every_class(viewer, qtbot)
    n = len(shapes.data)
    shapes.selected_data = {0}  # the user deletes one shape and draws a rectangle
    shapes.remove_selected()
    shapes.add_rectangles(np.array([[10.0, 10.0], [30.0, 40.0]]))
    assert shapes.features["kind"].iloc[-1] == "rectangle"  # its real kind, no class
    assert shapes.features["class"].iloc[-1] == ""
    path = tmp_path / "edited.geojson"
    viewer.layers.selection = {shapes}
    viewer.layers.save(str(path), selected=True, plugin="napari-gradcam")
    annotations, _meta = ng.read_geojson(path)
    assert len(annotations) == n
    assert sorted(a.kind for a in annotations).count("rectangle") == n // 2
    drawn = annotations[-1]
    assert drawn.kind == "rectangle" and drawn.geometry.bounds == (10.5, 10.5, 40.5, 30.5)
    assert {a.class_name for a in annotations[:-1]} == {"disc", "square", "triangle"}
    coco = tmp_path / "edited.json"
    viewer.layers.save(str(coco), selected=True, plugin="napari-gradcam")
    from pycocotools.coco import COCO

    c = COCO(str(coco))
    assert {cat["name"] for cat in c.loadCats(c.getCatIds())} >= {"disc", "square", "triangle"}


def test_the_progress_bar_cancel_button_stops_the_run(viewer, qtbot):
    viewer.add_image(np.random.default_rng(1).random((24, 32, 32), dtype=np.float32), name="s")
    w = dock(viewer)
    slow = Slow(0.15)
    use(w, ng.load_model(slow, class_names=["a", "b", "c"]), "slow")
    w.scope.value = "whole stack"
    w.batch_size.value = 1
    probes = slow.calls  # the layer and segmentation probes' forwards
    worker = w.run()
    qtbot.waitUntil(lambda: slow.calls >= probes + 1, timeout=20_000)
    with qtbot.waitSignal(worker.finished, timeout=20_000):
        w._pbar.cancel()  # what the activity panel's Cancel button calls
    assert slow.calls < 14 and layer_names(viewer) == ["s"]


def test_a_model_file_with_its_sidecar_is_one_pick(viewer, qtbot, tmp_path, errors):
    import json

    from safetensors.torch import save_file

    model = small_cnn(in_ch=3, classes=2)
    weights = tmp_path / "tb.safetensors"
    save_file(model.state_dict(), str(weights))
    (tmp_path / "tb.safetensors.json").write_text(json.dumps({
        "architecture": "conftest:small_cnn", "arguments": {"in_ch": 3, "classes": 2},
        "class_names": ["normal", "tuberculosis"], "name": "TB"}))
    viewer.add_image(np.random.default_rng(0).random((96, 96), dtype=np.float32), name="x")
    w = dock(viewer)
    assert w.trust_code.text == "trust code in model files" and not w.trust_code.value
    # a sidecar naming a Python factory runs code: refused until the user trusts the file
    w.model_file.value = weights
    assert w.wait_until_ready()
    assert "trust code in model files" in errors[-1] and w.model.value == "demo"
    w.trust_code.value = True  # ticking reloads the picked file
    assert w.wait_until_ready()
    assert w.model.value == "TB (tb.safetensors)" and len(errors) == 1
    w.trust_code.value = False
    assert w.target.choices[-2:] == ("normal", "tuberculosis")
    viewer.add_image(np.zeros((8, 8), np.float32), name="another layer")  # choices refresh
    assert w.model.value == "TB (tb.safetensors)"
    w.image.value = viewer.layers["x"]
    w.target.value = "tuberculosis"
    run(qtbot, w)
    assert viewer.layers["gradcam · x"].metadata["napari_gradcam"]["class_names"] == [
        "normal", "tuberculosis"]

    # a whole pickled model: refused with the reason, loaded once trusted
    torch.save(model, tmp_path / "whole.pt")
    w.model_file.value = tmp_path / "whole.pt"
    assert w.wait_until_ready()
    assert "trust_code=True" in errors[-1] and w.model.value == "TB (tb.safetensors)"
    assert w.trust_pickle is w.trust_code  # the old name still works for scripts
    w.trust_pickle.value = True
    assert w.wait_until_ready()
    assert w.model.value.endswith("(whole.pt)")


# ---- models load off the UI thread ----------------------------------------------------------------

def test_a_picked_model_loads_and_is_probed_on_a_worker_and_run_waits(viewer, qtbot,
                                                                       monkeypatch, tmp_path):
    import threading

    seen = {}
    real_probe = widget_mod.probe_layers

    def slow_load(source, trust_code=False):
        seen["load"] = threading.current_thread()
        time.sleep(0.6)
        return ng.load_model(small_cnn(), class_names=["a", "b", "c"], name="slow")

    def probe(spec):
        seen["probe"] = threading.current_thread()
        return real_probe(spec)

    viewer.add_image(np.random.default_rng(0).random((48, 48), dtype=np.float32), name="x")
    w = dock(viewer)
    monkeypatch.setattr(widget_mod, "load_model", slow_load)
    monkeypatch.setattr(widget_mod, "probe_layers", probe)
    path = tmp_path / "slow.safetensors"
    path.write_bytes(b"stand-in: the patched loader doesn't read it")
    t0 = time.perf_counter()
    w.model_file.value = path
    assert time.perf_counter() - t0 < 0.4  # the pick returns at once
    assert w.loading and w.model.value == "demo" and "loading" in w.status.value
    assert not w.run_button.enabled
    assert w.run() is None  # asked for while loading: it starts once the model is ready
    qtbot.waitUntil(lambda: "gradcam · x" in layer_names(viewer), timeout=20_000)
    finish(qtbot, w)
    assert w.model.value == "slow (slow.safetensors)" and w.run_button.enabled
    assert w.target.choices[-3:] == ("a", "b", "c") and "2" in w.target_layer.choices
    main = threading.main_thread()
    assert seen["load"] is not main and seen["probe"] is not main


def test_a_failing_model_file_notifies_and_keeps_the_model(viewer, qtbot, errors, tmp_path):
    viewer.add_image(np.zeros((48, 48), np.float32), name="x")
    w = dock(viewer)
    w.target.value = "square"
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # a truncated header
    w.model_file.value = bad
    assert w.run() is None  # waits for the load, which fails: no run at all
    assert w.wait_until_ready()
    assert "not a complete safetensors file" in errors[-1]
    assert w.model.value == "demo" and w.target.value == "square"
    assert w.run_button.enabled and not w.running and layer_names(viewer) == ["x"]


def test_the_model_asked_for_last_is_chosen_whichever_load_finishes_last(viewer, qtbot,
                                                                          monkeypatch,
                                                                          tmp_path):
    import threading

    real_prepare = widget_mod.prepare_model
    delays = {"demo": 0.6, "a": 0.8, "b": 0.05, "c": 0.05}
    threads = []

    def prepare(source, trust_code=False):  # each load sleeps as long as its name says
        if isinstance(source, ng.ModelSpec):
            return real_prepare(source)
        key = Path(str(source)).stem
        threads.append(threading.current_thread())
        time.sleep(delays[key])
        spec = (ng.load_model("demo") if key == "demo" else
                ng.load_model(small_cnn(), class_names=["p", "q", "r"], name=key))
        return real_prepare(spec)

    monkeypatch.setattr(widget_mod, "prepare_model", prepare)
    # set_model right after construction: the start-up demo load, finishing later, doesn't
    # take the choice back
    w = GradCamWidget(viewer)
    spec = w.set_model(ng.load_model(small_cnn(), class_names=["p", "q", "r"]), name="mine")
    assert w.model.value == "mine" and w.loading
    assert w.wait_until_ready()
    assert w.model.value == "mine" and w._loaded().spec is spec
    assert "demo" in w.model.choices and w.target.choices[-3:] == ("p", "q", "r")

    # two picked files, the first finishing last: the second stays chosen, and the Run asked
    # for meanwhile uses it
    viewer.add_image(np.random.default_rng(0).random((48, 48), dtype=np.float32), name="x")
    for key in "ab":
        (tmp_path / f"{key}.safetensors").write_bytes(b"stand-in: the loader is patched")
    w.model_file.value = tmp_path / "a.safetensors"
    w.model_file.value = tmp_path / "b.safetensors"
    assert w.run() is None  # waits for the loads
    qtbot.waitUntil(lambda: "gradcam · x" in layer_names(viewer), timeout=20_000)
    finish(qtbot, w)
    assert not w.loading and w.model.value == "b (b.safetensors)"
    assert {"a (a.safetensors)", "b (b.safetensors)"} <= set(w.model.choices)
    assert w._last.job.explain.spec.name == "b"

    # a path handed to set_model loads on a worker too (None: the spec comes later), and a
    # pick in the model list meanwhile wins over it
    assert w.set_model(str(tmp_path / "c.safetensors")) is None and w.loading
    assert w.model.value == "b (b.safetensors)"  # nothing chosen before it is ready
    w.model.value = "mine"
    assert w.wait_until_ready()
    assert w.model.value == "mine" and "c" in w.model.choices
    assert threading.main_thread() not in threads


def test_a_class_named_found_is_one_class_not_every_class(viewer, qtbot):
    torch.manual_seed(0)
    spec = ng.load_model(small_cnn(), class_names=["found", "b", "c"], name="tricky")
    image = np.random.default_rng(1).random((48, 48), dtype=np.float32)
    viewer.add_image(image, name="x")
    w = dock(viewer)
    use(w, spec, "tricky")
    w.target.value = "found"  # the class, not "every class found"
    job = w.job()
    assert not job.found and job.target == 0
    run(qtbot, w)
    expected = ng.explain(image, spec, target=0, device=auto_device()).heatmaps
    np.testing.assert_allclose(viewer.layers["gradcam · x"].data, expected, atol=1e-5)
    rows = w._last.explained.rows
    assert rows and all(r["class_id"] == 0 for r in rows)
    if "regions · x" in layer_names(viewer):
        assert set(viewer.layers["regions · x"].features["class_id"]) <= {0}


# ---- a model file that can't be one, and shapes drawn by hand ------------------------------------

def test_a_model_file_path_that_is_no_model_notifies_and_changes_nothing(viewer, qtbot, errors,
                                                                        tmp_path, monkeypatch):
    import json
    import os

    from safetensors.torch import save_file

    viewer.add_image(np.zeros((48, 48), np.float32), name="x")
    w = dock(viewer)
    assert w.wait_until_ready()
    w.target.value = "square"

    def unchanged():
        assert w.model.value == "demo" and w.target.value == "square" and not w.loading
        assert layer_names(viewer) == ["x"] and w.run_button.enabled

    w.model_file.value = tmp_path / "nope.safetensors"
    assert "'" + str(tmp_path / "nope.safetensors") + "' does not exist" in errors[-1]
    assert "Select file" in errors[-1] and "stays 'demo'" in errors[-1]
    unchanged()

    (tmp_path / "empty").mkdir()
    w.model_file.value = tmp_path / "empty"
    assert "is a folder with no model.json" in errors[-1] and ".safetensors" in errors[-1]
    unchanged()

    locked = tmp_path / "locked.pt"
    locked.write_bytes(b"x")
    locked.chmod(0)
    real_access = os.access  # root reads anything: say the file is unreadable as a user sees it
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked
                        else real_access(p, mode, **kw))
    w.model_file.value = locked
    assert "can't be read" in errors[-1] and "readable" in errors[-1]
    unchanged()
    assert len(errors) == 3

    # typing: no error per keystroke, one when the typing ends, not repeated on focus loss
    edit = w.model_file.line_edit.native
    monkeypatch.setattr(edit, "hasFocus", lambda: True)
    w.model_file.line_edit.value = str(tmp_path / "half")
    w.model_file.line_edit.value = str(tmp_path / "half-typed")
    assert len(errors) == 3
    edit.editingFinished.emit()
    assert len(errors) == 4 and "half-typed' does not exist" in errors[-1]
    edit.editingFinished.emit()
    assert len(errors) == 4
    monkeypatch.setattr(edit, "hasFocus", lambda: False)
    w.model_file.line_edit.value = ""  # a cleared field is no error
    assert len(errors) == 4
    unchanged()

    # a folder holding a model.json sidecar is that model
    save_file(small_cnn(in_ch=3, classes=2).state_dict(), str(tmp_path / "tb.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps({
        "architecture": "conftest:small_cnn", "arguments": {"in_ch": 3, "classes": 2},
        "weights": "tb.safetensors", "class_names": ["normal", "tb"], "name": "TB"}))
    w.trust_code.value = True
    w.model_file.value = tmp_path
    assert w.wait_until_ready()
    assert len(errors) == 4 and w.model.value == "TB (model.json)"


def test_shapes_drawn_by_hand_get_their_kind_and_no_class(viewer, qtbot):
    item = make_image(128, seed=SEED, classes=[0, 1, 2])
    viewer.add_image(item.image, name="sample")
    w = dock(viewer)
    w.target.value = "square"  # a run that explained one class
    run(qtbot, w)
    shapes = viewer.layers["regions · sample"]
    before = shapes.features.copy()
    n = len(before)
    assert n and set(before["class"]) == {"square"}
    shapes.selected_data = {0}  # the user had a region selected
    shapes.add_rectangles(np.array([[2, 2], [10, 12]]))
    shapes.add_ellipses(np.array([[[20, 20], [20, 30], [30, 30], [30, 20]],
                                  [[40, 40], [40, 50], [50, 50], [50, 40]]]))
    shapes.add_polygons([np.array([[60, 60], [60, 70], [70, 65]])])
    shapes.add_paths([np.array([[80, 80], [85, 90], [90, 80]])])
    shapes.add_lines([np.array([[100, 100], [110, 110]])])
    drawn = shapes.features.iloc[n:]
    assert list(drawn["kind"]) == ["rectangle", "ellipse", "ellipse", "polygon", "path", "line"]
    assert list(drawn["kind"]) == shapes.shape_type[n:]
    assert set(drawn["class"]) == {""} and drawn["class_id"].isna().all()
    assert set(drawn["label"]) == {""} and drawn["score"].isna().all()
    # the explained regions keep their rows
    assert shapes.features.iloc[:n].equals(before)

    # a re-run replaces the regions; drawing after it still works, once per shape
    run(qtbot, w)
    assert raw(viewer.layers["regions · sample"]) is raw(shapes)
    m = len(shapes.features)
    shapes.add_rectangles(np.array([[2, 2], [10, 12]]))
    assert list(shapes.features["kind"][m:]) == ["rectangle"]
    assert shapes.features["class"].iloc[-1] == "" and len(shapes.features) == m + 1


# ---- result layer names and the status line of a stack ----------------------------------------

def test_short_names_keep_both_ends():
    assert widget_mod.short_name("sample") == "sample"
    assert widget_mod.short_name("synthetic shapes 1") == "synthetic\u2026es 1"
    assert widget_mod.result_name("gradcam", "synthetic shapes 2") == \
        "gradcam \u00b7 synthetic\u2026es 2"


def test_result_names_lead_with_the_method_and_rerun_in_place(viewer, qtbot):
    for k in (1, 2):
        viewer.add_image(make_image(96, seed=k).image, name=f"synthetic shapes {k}")
    for k in (3, 4):
        viewer.add_image(make_image(96, seed=k).image, name=f"patient 000{k} scan t1")
    w = dock(viewer)
    w.methods.value = ["gradcam", "hirescam"]
    for layer in viewer.layers[:4]:
        w.image.value = layer
        run(qtbot, w)
    names = layer_names(viewer)
    assert len(set(names)) == len(names) == 4 + 4 * 4  # 2 heatmaps, regions, labels
    assert "gradcam \u00b7 synthetic\u2026es 1" in names and "regions \u00b7 synthetic\u2026es 2" in names
    # two images whose short names would be the same: their full names, not napari's " [1]"
    assert "hirescam \u00b7 patient 0003 scan t1" in names and "regions \u00b7 patient 0004 scan t1" \
        in names
    heat = viewer.layers["gradcam \u00b7 synthetic\u2026es 2"]
    assert heat.metadata["napari_gradcam"]["source"] == "synthetic shapes 2"
    # a re-run updates the same layers, also one the user renamed
    heat.name = "my heat"
    w.image.value = viewer.layers["synthetic shapes 2"]
    run(qtbot, w)
    assert len(viewer.layers) == 4 + 4 * 4 and raw(viewer.layers["my heat"]) is raw(heat)


def test_status_line_follows_the_frame_shown(viewer, qtbot):
    stack = np.stack([make_image(96, seed=10 + k, classes=[k]).image for k in range(3)])
    viewer.add_image(stack, name="three")
    w = dock(viewer)
    w.scope.value = "whole stack"
    viewer.dims.set_current_step(0, 0)
    run(qtbot, w)
    rows = w._last.explained.rows
    said = {tuple(r["index"]): r["class"] for r in rows}
    assert said[(0,)] != said[(2,)]  # the frames' predictions differ, so the line must too
    assert f"{said[(0,)]} " in w.status.value and "frame 0 (of 3 explained)" in w.status.value
    viewer.dims.set_current_step(0, 2)
    assert f"{said[(2,)]} " in w.status.value and "frame 2 (of 3 explained)" in w.status.value
    assert f"{said[(0,)]} " not in w.status.value
    assert "regions" in w.status.value  # the rest of the line stays
    # a later message is not overwritten by scrolling
    w.status.value = "something else"
    viewer.dims.set_current_step(0, 1)
    assert w.status.value == "something else"
    # a re-run says the frame shown then
    run(qtbot, w)
    assert "frame 1 (of 3 explained)" in w.status.value


def test_labels_and_status_show_probabilities_and_the_table_keeps_logits(viewer, qtbot):
    _item, w, shapes = run_every_class(viewer, qtbot)
    feats = shapes.features
    assert {"score", "probability", "label"} <= set(feats.columns)
    assert len(feats) and (feats["probability"] > 0.5).all()  # found: positive logits
    np.testing.assert_allclose(feats["probability"], 1 / (1 + np.exp(-feats["score"])),
                               rtol=1e-5)
    assert list(feats["label"]) == [f"{c} {p:.2f}" for c, p in zip(feats["class"],
                                                                   feats["probability"])]
    rows = [r for r in w._last.explained.rows if r["class_id"] >= 0]
    assert rows and all(f"{r['class']} {r['probability']:.2f}" in w.status.value for r in rows)
    # the logit would read differently: the line no longer shows it
    assert not any(f"{r['class']} {r['score']:.2f}" in w.status.value for r in rows)


def test_an_image_removed_mid_run_gets_no_layers(viewer, qtbot):
    viewer.add_image(make_image(96, seed=6, classes=[0]).image, name="img")
    w = dock(viewer)
    use(w, Slow(0.5), "slow")
    worker = w.run()
    assert worker is not None
    qtbot.waitUntil(lambda: w.running, timeout=10_000)
    viewer.layers.remove("img")
    finish(qtbot, w)
    assert layer_names(viewer) == [] and w._last is None
    assert w.status.value == "the image 'img' was removed during the run; nothing to show"


def test_target_shapes_on_another_frame_name_that_frame(viewer):
    """A Shapes target drawn on frame 2 of a stack while frame 0 is explained."""
    from napari_gradcam._napari.geometry import shape_outlines

    image = viewer.add_image(np.zeros((3, 96, 96), np.float32), name="stack")
    box = np.array([[2, 10, 10], [2, 10, 40], [2, 40, 40], [2, 40, 10]], float)
    shapes = viewer.add_shapes([box, box + [-1, 0, 0]], shape_type="rectangle", name="ann")
    with pytest.raises(ValueError, match="the shapes of 'ann' lie on frames 1, 2; the run "
                                         "explains frame 0: go to frame 1 and run, or draw "
                                         "on frame 0"):
        shape_outlines(shapes, image, (0,))
    assert shape_outlines(shapes, image, (2,)).planes  # the frame they are on: found
    far = viewer.add_shapes([box + [0, 500, 500]], shape_type="rectangle", name="far")
    with pytest.raises(ValueError, match="don't overlap the image 'stack'"):
        shape_outlines(far, image, (2,))
