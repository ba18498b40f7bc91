"""The dock widget with a segmentation model (targets over a region of a Labels or Shapes
layer, the predicted segmentation as a Labels layer) and with a vision transformer."""

import numpy as np
import pytest
import torch
from torch import nn

import napari_gradcam as ng
from napari_gradcam.job import ExplainJob

napari = pytest.importorskip("napari")

from test_widget import dock, use

from napari_gradcam._napari import widget as widget_mod

pytestmark = pytest.mark.usefixtures("our_plugin")

CLASSES = ["background", "cell", "edge"]
A = (slice(8, 16), slice(8, 16))  # the two bright squares of the test image
B = (slice(20, 28), slice(20, 28))


class TinySeg(nn.Module):
    """A hand-set segmentation net: ``features`` is the 3x3 mean of the input (and 1 minus
    it), the 1x1 head scores background = 1 - mean, cell = mean, edge = -10: bright squares
    are cells, edge is never predicted. Cell's logit at a pixel depends only on the pixels
    around it, so HiResCAM over a region lights that region and nothing else."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 2, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(2, 3, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.stack([torch.full((1, 3, 3), 1 / 9),
                                                    torch.full((1, 3, 3), -1 / 9)]))
            self.features.bias.copy_(torch.tensor([0.0, 1.0]))
            self.head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])[..., None,
                                                                                       None])
            self.head.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))

    def forward(self, x):
        return self.head(self.relu(self.features(x)))


def seg_spec():
    return ng.load_model(TinySeg().eval(), class_names=CLASSES, name="tinyseg")


def two_squares(size=32):
    img = np.zeros((size, size), np.float32)
    img[A] = 1.0
    img[B] = 1.0
    return img


def run(qtbot, w, worker=None):
    worker = worker or w.run()
    assert worker is not None, "the run did not start"
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    return worker


def labels_of(w):
    return [w.target.native.itemText(i) for i in range(w.target.native.count())]


def layer_names(viewer):
    return [layer.name for layer in viewer.layers]


def choose(w, text):
    """Pick a target by the text the user sees."""
    index = labels_of(w).index(text)
    w.target.value = w.target.choices[index]


@pytest.fixture
def warnings_shown(monkeypatch):
    seen = []
    monkeypatch.setattr(widget_mod, "show_warning", seen.append)
    return seen


# ---- targets ------------------------------------------------------------------------------------

def test_segmentation_targets_name_classes_and_region_layers_and_follow_them(viewer, qtbot):
    viewer.add_image(two_squares(), name="img")
    w = dock(viewer)
    # a classifier keeps its targets, and has no segmentation to add
    assert labels_of(w) == ["predicted class", "every class found", "disc", "square",
                            "triangle"]
    assert not w.segment_button.enabled
    use(w, seg_spec(), "seg")
    assert w.segment_button.enabled and "inside layer" in w.target.tooltip
    assert labels_of(w) == ["predicted", "every class found", "predicted background",
                            "predicted cell", "predicted edge"]
    viewer.add_labels(np.zeros((32, 32), np.int32), name="cells")
    roi = viewer.add_shapes([[[8, 8], [15, 15]]], shape_type="rectangle", name="roi")
    viewer.add_image(np.zeros((32, 32), np.float32), name="not a region")
    inside = labels_of(w)[5:]
    assert inside == [f"{c} inside layer {layer}" for layer in ("cells", "roi")
                      for c in CLASSES]
    choose(w, "cell inside layer roi")
    roi.name = "nucleus"  # renamed: the choice follows, still chosen
    assert "cell inside layer nucleus" in labels_of(w)
    assert "cell inside layer roi" not in labels_of(w)
    assert labels_of(w)[w.target.native.currentIndex()] == "cell inside layer nucleus"
    viewer.layers.remove("nucleus")
    assert not any("nucleus" in text for text in labels_of(w))
    # back to a classifier: its own targets again, no segmentation button
    w.model.value = "demo"
    assert labels_of(w)[:2] == ["predicted class", "every class found"]
    assert not w.segment_button.enabled


def test_a_class_inside_a_labels_layer_explains_that_region(viewer, qtbot, errors):
    img = two_squares()
    viewer.add_image(img, name="img")
    w = dock(viewer)
    spec = use(w, seg_spec(), "seg")
    w.methods.value = ["hirescam"]
    labels = np.zeros((32, 32), np.int32)
    labels[A], labels[B] = 1, 2
    cells = viewer.add_labels(labels, name="cells")
    w.image.value = viewer.layers["img"]

    choose(w, "cell inside layer cells")  # all its labels: both squares
    run(qtbot, w)
    heat = viewer.layers["hirescam · img"].data
    assert heat[A].max() > 0.5 and heat[B].max() > 0.5 and not errors
    ref = ExplainJob(spec, ["hirescam"], "cell", target_mask=labels > 0).run(img)
    np.testing.assert_allclose(heat, ref.heatmaps["hirescam"], atol=1e-5)

    cells.selected_label = 2  # "show selected": only that cell
    cells.show_selected_label = True
    run(qtbot, w)
    heat = viewer.layers["hirescam · img"].data
    assert heat[B].max() > 0.5 and heat[A].max() == 0
    ref = ExplainJob(spec, ["hirescam"], "cell", target_mask=labels == 2).run(img)
    np.testing.assert_allclose(heat, ref.heatmaps["hirescam"], atol=1e-5)
    shapes = viewer.layers["regions · img"]
    assert set(shapes.features["class"]) == {"cell"} and len(shapes.data) >= 1
    assert not errors


def test_the_selected_shapes_are_rasterised_through_world_coordinates(viewer, qtbot, errors):
    img = two_squares()
    viewer.add_image(img, name="img", scale=(2, 2), translate=(10, 10))
    w = dock(viewer)
    use(w, seg_spec(), "seg")
    w.methods.value = ["hirescam"]
    # drawn in world coordinates (scale 1): square A of the image is world 26..40
    roi = viewer.add_shapes([[[26, 26], [40, 40]], [[50, 50], [64, 64]]],
                            shape_type=["rectangle", "ellipse"], name="roi")
    w.image.value = viewer.layers["img"]
    choose(w, "cell inside layer roi")

    roi.selected_data = {0}  # only the square around A
    run(qtbot, w)
    heat = viewer.layers["hirescam · img"].data
    assert heat[A].max() > 0.5 and heat[B].max() == 0 and not errors
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    region = widget_mod.shapes_region(roi, viewer.layers["img"])
    assert region.shape == (32, 32) and (region == mask).all()

    roi.selected_data = set()  # none selected: every shape (the ellipse covers B)
    run(qtbot, w)
    heat = viewer.layers["hirescam · img"].data
    assert heat[A].max() > 0.5 and heat[B].max() > 0.5 and not errors


def test_bad_target_regions_notify_and_change_nothing(viewer, qtbot, errors, warnings_shown):
    viewer.add_image(two_squares(), name="img")
    w = dock(viewer)
    use(w, seg_spec(), "seg")
    viewer.add_labels(np.ones((16, 16), np.int32), name="small")
    viewer.add_labels(np.zeros((32, 32), np.int32), name="blank")
    cells = viewer.add_labels(np.pad(np.ones((4, 4), np.int32), 14), name="cells")
    viewer.add_shapes([[[100, 100], [120, 120]]], shape_type="rectangle", name="far")
    viewer.add_shapes(name="nothing drawn")
    w.image.value = viewer.layers["img"]
    before = layer_names(viewer)

    choose(w, "cell inside layer small")
    assert w.run() is None
    assert "'small' has shape (16, 16)" in errors[-1] and "(32, 32)" in errors[-1]
    choose(w, "cell inside layer blank")
    assert w.run() is None and "no pixel" in errors[-1] and "'blank'" in errors[-1]
    cells.selected_label, cells.show_selected_label = 7, True
    choose(w, "cell inside layer cells")
    assert w.run() is None and "selected label 7" in errors[-1] and "show selected" in errors[-1]
    choose(w, "cell inside layer far")
    assert w.run() is None and "don't overlap the image 'img'" in errors[-1]
    choose(w, "cell inside layer nothing drawn")
    assert w.run() is None and "has no shapes" in errors[-1]
    assert layer_names(viewer) == before and len(errors) == 5

    # a class the model predicts nowhere: the run completes with a zero map and says why
    choose(w, "predicted edge")
    run(qtbot, w)
    assert len(errors) == 5, errors[5:]
    heat = viewer.layers["gradcam · img"].data
    assert np.isfinite(heat).all() and heat.max() == 0
    assert len(warnings_shown) == 1 and "'edge' has no pixels" in warnings_shown[0]
    assert len(errors) == 5

    # a classifier has no segmentation: the button is off, and the call says why
    w.model.value = "demo"
    assert not w.segment_button.enabled
    assert w.add_segmentation() is None and "classifier" in errors[-1]


# ---- the predicted segmentation -----------------------------------------------------------------

def test_add_segmentation_is_a_labels_layer_on_the_image(viewer, qtbot, errors):
    img = two_squares()
    stack = np.stack([img, np.zeros_like(img), img[::-1]])
    viewer.add_image(stack, name="stack", scale=(3, 0.5, 0.5), translate=(0, 2, 4))
    w = dock(viewer)
    spec = use(w, seg_spec(), "seg")
    viewer.dims.set_point(0, 6.0)  # plane 2
    run(qtbot, w, w.add_segmentation())
    seg = viewer.layers["segmentation · stack"]
    assert isinstance(seg, napari.layers.Labels) and not errors
    expected = ExplainJob(spec).segment(stack[2])
    assert seg.data.shape == (1, 32, 32) and (seg.data[0] == expected).all()
    assert set(np.unique(expected)) == {0, 1}  # cells on background
    np.testing.assert_allclose(seg.scale, (3, 0.5, 0.5))
    np.testing.assert_allclose(seg.translate, (6, 2, 4))  # placed at plane 2
    named = dict(zip(seg.features["index"], seg.features["class"]))
    assert named == {0: "background", 1: "cell", 2: "edge"}
    assert seg.colormap.map(np.array([0]))[0, 3] == 0  # background transparent
    assert seg.colormap.map(np.array([1]))[0, 3] == 1
    assert "cell" in w.status.value

    w.scope.value = "whole stack"  # the same layer, now the whole stack
    run(qtbot, w, w.add_segmentation())
    assert layer_names(viewer) == ["stack", "segmentation · stack"]
    seg = viewer.layers["segmentation · stack"]
    assert seg.data.shape == (3, 32, 32) and (seg.data == ExplainJob(spec).segment(stack)).all()
    np.testing.assert_allclose(seg.translate, (0, 2, 4))
    assert not errors


# ---- a vision transformer -----------------------------------------------------------------------

def test_vit_from_its_weights_explains_an_rgb_image(viewer, qtbot, tmp_path, errors):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(),
              str(weights))
    spec = ng.load_model("timm:vit_tiny_patch16_224", weights=weights)
    rgb = np.random.default_rng(0).random((224, 224, 3)).astype(np.float32)
    viewer.add_image(rgb, name="photo", rgb=True)
    w = dock(viewer)
    use(w, spec, "vit")
    assert not w.segment_button.enabled
    w.image.value = viewer.layers["photo"]
    run(qtbot, w)
    assert not errors
    heat = viewer.layers["gradcam · photo"]
    assert heat.data.shape == (224, 224) and np.isfinite(heat.data).all()
    assert heat.data.max() == pytest.approx(1.0)
    assert isinstance(viewer.layers["regions · photo"], napari.layers.Shapes)
    # the token grid (14 x 14 patches) explained at the norm before the last attention
    assert heat.metadata["napari_gradcam"]["target_layer"] == "blocks.11.norm1"
    ref = ng.explain(rgb, spec, device="cpu")
    np.testing.assert_allclose(heat.data, ref.heatmaps, atol=1e-4)


# ---- regions from layers placed elsewhere, multi-label heads, shapes by plane ------------------

def test_a_multilabel_segmentation_is_labelled_class_plus_one(viewer, qtbot, errors):
    img = two_squares()
    viewer.add_image(img, name="img")
    w = dock(viewer)
    spec = use(w, ng.load_model(TinySeg().eval(), class_names=CLASSES, name="ml",
                                output="multilabel"), "ml")
    run(qtbot, w, w.add_segmentation())
    seg = viewer.layers["segmentation · img"]
    expected = ExplainJob(spec).segment(img)
    assert (seg.data == expected).all() and not errors
    # sigmoid > 0.5: background outside the squares (value 1), cell inside them (value 2)
    assert seg.data[0, 0] == 1 and seg.data[12, 12] == 2
    named = dict(zip(seg.features["index"], seg.features["class"]))
    assert named == {0: "", 1: "background", 2: "cell", 3: "edge"}
    assert seg.colormap.map(np.array([0]))[0, 3] == 0  # nothing: transparent
    assert seg.colormap.map(np.array([2]))[0, 3] == 1


def test_a_whole_stack_labels_layer_gives_the_current_slice_its_plane(viewer, qtbot, errors):
    img = two_squares()
    stack = np.stack([img, img, img])
    viewer.add_image(stack, name="stack")
    w = dock(viewer)
    spec = use(w, seg_spec(), "seg")
    w.methods.value = ["hirescam"]
    labels = np.zeros((3, 32, 32), np.int32)
    labels[0][A] = 1  # plane 0: square A, plane 2: square B
    labels[2][B] = 1
    viewer.add_labels(labels, name="cells")
    w.image.value = viewer.layers["stack"]
    viewer.dims.set_point(0, 2)
    choose(w, "cell inside layer cells")
    run(qtbot, w)
    heat = viewer.layers["hirescam · stack"].data.reshape(32, 32)
    assert heat[B].max() > 0.5 and heat[A].max() == 0 and not errors
    ref = ExplainJob(spec, ["hirescam"], "cell", target_mask=labels[2] > 0).run(stack[2])
    np.testing.assert_allclose(heat, ref.heatmaps["hirescam"], atol=1e-5)


def test_the_segmentation_of_a_slice_is_a_target_region_at_its_plane(viewer, qtbot, errors):
    img = two_squares()
    stack = np.stack([np.zeros_like(img), img, img])
    viewer.add_image(stack, name="stack", scale=(3, 0.5, 0.5), translate=(0, 2, 4))
    w = dock(viewer)
    spec = use(w, seg_spec(), "seg")
    w.methods.value = ["hirescam"]
    viewer.dims.set_point(0, 6.0)  # plane 2
    run(qtbot, w, w.add_segmentation())
    seg = viewer.layers["segmentation · stack"]
    assert seg.data.shape == (1, 32, 32)
    choose(w, "cell inside layer segmentation · stack")  # the widget's own output, fed back
    run(qtbot, w)
    assert not errors
    heat = viewer.layers["hirescam · stack"].data.reshape(32, 32)
    ref = ExplainJob(spec, ["hirescam"], "cell", target_mask=seg.data[0] > 0).run(stack[2])
    np.testing.assert_allclose(heat, ref.heatmaps["hirescam"], atol=1e-5)
    # the whole stack: the region lies in plane 2 only
    w.scope.value = "whole stack"
    region = w.job().explain.target_mask
    assert region.shape == (3, 32, 32)
    assert not region[:2].any() and (region[2] == (seg.data[0] > 0)).all()
    # the same one-frame layer moved to plane 1, seen from plane 1: a region there too
    viewer.dims.set_point(0, 3.0)
    w.scope.value = "current slice"
    seg.translate = (3, 2, 4)
    assert (w.job().explain.target_mask == (seg.data[0] > 0)).all()
    viewer.dims.set_point(0, 0.0)  # plane 0: the layer isn't there
    assert w.run() is None and "no pixel" in errors[-1]


def test_labels_and_masks_in_other_geometry_are_matched_through_the_world(viewer, qtbot,
                                                                          errors):
    viewer.add_image(two_squares(), name="img", scale=(2, 2))
    w = dock(viewer)
    use(w, seg_spec(), "seg")
    lab = np.zeros((32, 32), np.int32)
    lab[A] = 1
    cells = viewer.add_labels(lab, name="cells", scale=(1, 1), translate=(40, 40))
    w.image.value = viewer.layers["img"]
    choose(w, "cell inside layer cells")
    # image pixel p lies at world 2p, the labels' pixel 2p - 40: A (8..15) under pixels 24..27
    expected = np.zeros((32, 32), bool)
    expected[24:28, 24:28] = True
    assert (w.job().explain.target_mask == expected).all()
    w.mask.value = cells  # a mask goes the same way
    assert (w.job().explain.mask == expected).all()
    w.mask.value = None
    run(qtbot, w)
    assert not errors
    # a rotation against the image: refused, naming both layers' scale and translate
    cells.rotate = 30
    before = layer_names(viewer)
    assert w.run() is None
    assert "rotated or sheared" in errors[-1] and "'cells' (scale (1.0, 1.0), translate " \
        "(40.0, 40.0)" in errors[-1] and "'img' (scale (2.0, 2.0)" in errors[-1]
    assert layer_names(viewer) == before


def test_shapes_are_rasterised_plane_by_plane_and_only_the_slice_explained():
    from napari.layers import Image, Shapes

    image = Image(np.zeros((4, 32, 32), np.float32))
    square = [[8, 8], [8, 15], [15, 15], [15, 8]]
    shapes = Shapes([[[1, *v] for v in square], [[3, *v] for v in square],
                     [[3, y + 12, x + 12] for y, x in square]], shape_type="rectangle", ndim=3)
    whole = widget_mod.shapes_region(shapes, image)
    assert whole.shape == (4, 32, 32) and whole.dtype == bool
    assert not whole[0].any() and not whole[2].any()
    assert whole[1].sum() == 64 and whole[3].sum() == 128
    one = widget_mod.shapes_region(shapes, image, offset=(1,))
    assert one.shape == (32, 32) and (one == whole[1]).all()
    outlines = widget_mod.shape_outlines(shapes, image, offset=(3,))
    assert list(outlines.planes) == [()] and len(outlines.planes[()][0]) == 2
    with pytest.raises(ValueError, match="lie on frames 1, 3; the run explains frame 2"):
        widget_mod.shape_outlines(shapes, image, offset=(2,))
