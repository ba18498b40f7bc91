"""The synthetic data contract, the bundled demo model, its training script."""

import numpy as np
import pytest
import torch

import napari_gradcam as ng
from napari_gradcam.models import load_model
from napari_gradcam.models.demo import train as demo_train
from napari_gradcam.models.demo.synthetic import CLASS_NAMES, make_batch, make_image, make_stack


def grown(box, by=2):
    return (box[0] - by, box[1] - by, box[2] + by, box[3] + by)


def inside(point, box):
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


# ---- generator -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [96, 128, (100, 300), 512])
def test_generator_contract(shape):
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(40):
        item = make_image(shape, rng)
        h, w = (shape, shape) if np.isscalar(shape) else shape
        assert item.image.shape == (h, w) and item.image.dtype == np.float32
        assert 0 <= item.image.min() and item.image.max() <= 1
        assert 0 <= len(item.objects) <= 3
        counts.append(len(item.objects))
        union = np.zeros((h, w), int)
        for o in item.objects:
            union += o.mask
            rows, cols = np.nonzero(o.mask)
            assert o.box == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
            r0, c0, r1, c1 = o.box
            assert r0 >= 0 and c0 >= 0 and r1 <= h and c1 <= w  # fully inside
            assert not o.mask[0].any() and not o.mask[-1].any()
            # brighter than the background around it
            ring = np.zeros_like(o.mask)
            ring[max(r0 - 4, 0):r1 + 4, max(c0 - 4, 0):c1 + 4] = True
            ring &= ~o.mask
            assert item.image[o.mask].mean() > item.image[ring].mean() + 0.1
        assert union.max() <= 1  # no overlap
        np.testing.assert_array_equal(
            item.labels, [float(any(o.class_id == c for o in item.objects)) for c in range(3)])
    assert set(counts) == {0, 1, 2, 3}


def test_object_sizes_follow_the_contract():
    rng = np.random.default_rng(1)
    sizes = {c: [] for c in CLASS_NAMES}
    for _ in range(150):
        for o in make_image(256, rng).objects:
            r0, c0, r1, c1 = o.box
            sizes[o.class_name].append(max(r1 - r0, c1 - c0))
    assert 10 <= min(sizes["disc"]) and max(sizes["disc"]) <= 30  # radius 5 to 14
    assert 9 <= min(sizes["square"]) and max(sizes["square"]) <= 28  # side 10 to 26
    assert 10 <= min(sizes["triangle"]) and max(sizes["triangle"]) <= 30  # side 12 to 28


def test_generator_is_deterministic_and_makes_stacks():
    a = make_image(128, seed=5)
    b = make_image(128, seed=5)
    np.testing.assert_array_equal(a.image, b.image)
    assert [o.box for o in a.objects] == [o.box for o in b.objects]
    stack, labels, objects = make_stack(16, 128, seed=3)
    assert stack.shape == (16, 128, 128) and labels.shape == (16, 3) and len(objects) == 16
    forced = make_image(200, seed=1, classes=[2, 2, 0])
    assert sorted(o.class_id for o in forced.objects) == [0, 2, 2]
    with pytest.raises(ValueError, match="96 to 512"):
        make_image(64, seed=0)


# ---- the shipped model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def test_demo_loads_offline_with_its_spec(demo):
    assert demo.class_names == list(CLASS_NAMES)
    assert demo.in_channels == 1 and demo.target_layer == "features"
    n_bytes = sum(p.numel() * p.element_size() for p in demo.module.state_dict().values())
    assert n_bytes <= 2 * 2**20
    assert not demo.module.training


@pytest.fixture(scope="module")
def fixed_set():
    return make_batch(48, 128, seed=777_000)


def test_demo_classifies_a_fixed_set(demo, fixed_set):
    images, labels, _ = fixed_set
    with torch.inference_mode():
        p = torch.sigmoid(demo.module(torch.from_numpy(images)[:, None])).numpy()
    assert ((p > 0.5) == (labels > 0.5)).mean() >= 0.95


def class_heatmaps(model, images, objects, method):
    """(heatmap, objects of its class) for every class present in every image."""
    for img, objs in zip(images, objects):
        classes = sorted({o.class_id for o in objs})
        if not classes:
            continue
        x = torch.from_numpy(img)[None, None].expand(len(classes), -1, -1, -1).contiguous()
        maps = ng.explain_batch(model, x, method, target_layer="features",
                                targets=classes).heatmaps.numpy()
        for heat, cid in zip(maps, classes):
            yield heat, [o for o in objs if o.class_id == cid]


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam"])
def test_demo_heatmaps_land_on_the_objects(demo, fixed_set, method):
    """Pointing game: each class's heatmap peaks on an object of that class."""
    images, _, objects = fixed_set
    hits = []
    for heat, mine in class_heatmaps(demo.module, images, objects, method):
        peak = np.unravel_index(int(heat.argmax()), heat.shape)
        hits.append(any(inside(peak, grown(o.box)) for o in mine))
    assert len(hits) > 30
    assert np.mean(hits) >= 0.9


def iou(a, b):
    r0, c0, r1, c1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_demo_grad_cam_boxes_match_the_objects(demo, fixed_set):
    """CorLoc@0.5 with find_regions at its default threshold, on the fixed set."""
    images, _, objects = fixed_set
    hits = []
    for heat, mine in class_heatmaps(demo.module, images, objects, "gradcam"):
        boxes = [r.bbox for r in ng.find_regions(heat, 0.5)]
        hits += [any(iou(b, o.box) >= 0.5 for b in boxes) for o in mine]
    assert np.mean(hits) >= 0.85


def test_training_smoke(tmp_path):
    model = demo_train.train(steps=3, batch=4, log_every=0)
    path = demo_train.save(model, tmp_path / "w.safetensors")
    assert path.exists() and path.with_suffix(".safetensors.json").exists()
    spec = load_model("demo")
    from safetensors.torch import load_file

    spec.module.load_state_dict(load_file(str(path)))  # same architecture as the shipped one


def test_load_model_from_a_module_with_overrides():
    from conftest import small_cnn

    spec = load_model(small_cnn(in_ch=2, classes=3), class_names=["a", "b", "c"],
                      mean=[0.5, 0.5], std=[0.2, 0.2], target_layer="3")
    assert spec.class_names == ["a", "b", "c"] and spec.in_channels == 2
    assert spec.mean == (0.5, 0.5) and spec.target_layer == "3"
    with pytest.raises(ValueError, match="one name per output"):
        load_model(small_cnn(classes=3), class_names=["a", "b"])
    with pytest.raises(ValueError, match="'resnet-9000.pt' does not exist"):
        load_model("resnet-9000.pt")


def test_sample_data():
    from napari_gradcam._napari.sample_data import synthetic_image, synthetic_stack

    ((img, kwargs, kind),) = synthetic_image()
    assert kind == "image" and img.shape == (256, 256) and kwargs["name"]
    ((stack, kwargs, kind),) = synthetic_stack()
    assert stack.shape == (16, 192, 192) and kwargs["axis_labels"] == ("t", "y", "x")
