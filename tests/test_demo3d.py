"""The 3D demo model: its synthetic volumes, the bundled weights, the sample and ``demo --3d``."""

import csv

import numpy as np
import pytest
import torch

import napari_gradcam as ng
from napari_gradcam.models import load_model
from napari_gradcam.models.demo3d import WEIGHTS, demo3d_spec
from napari_gradcam.models.demo3d import train as demo3d_train
from napari_gradcam.models.demo3d.synthetic import (
    CLASS_NAMES,
    make_batch,
    make_volume,
    sample_volume,
)


def grown(box, by=2):
    return tuple(v - by for v in box[:3]) + tuple(v + by for v in box[3:])


def inside(point, box):
    return all(box[i] <= point[i] < box[i + 3] for i in range(3))


# ---- generator -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [32, (40, 64, 96), 96])
def test_generator_contract(shape):
    rng = np.random.default_rng(0)
    dims = (shape,) * 3 if np.isscalar(shape) else shape
    counts = []
    for _ in range(12):
        item = make_volume(shape, rng)
        assert item.volume.shape == dims and item.volume.dtype == np.float32
        assert 0 <= item.volume.min() and item.volume.max() <= 1
        assert 0 <= len(item.objects) <= 3
        counts.append(len(item.objects))
        union = np.zeros(dims, int)
        for o in item.objects:
            union += o.mask
            idx = np.nonzero(o.mask)
            assert o.box == tuple(int(i.min()) for i in idx) + tuple(int(i.max()) + 1 for i in idx)
            assert all(0 <= o.box[i] and o.box[i + 3] <= dims[i] for i in range(3))  # inside
            z0, r0, c0, z1, r1, c1 = o.box
            shell = np.zeros(dims, bool)
            shell[max(z0 - 3, 0):z1 + 3, max(r0 - 3, 0):r1 + 3, max(c0 - 3, 0):c1 + 3] = True
            shell &= ~o.mask
            assert item.volume[o.mask].mean() > item.volume[shell].mean() + 0.1  # brighter
        assert union.max() <= 1  # no overlap
        np.testing.assert_array_equal(
            item.labels, [float(any(o.class_id == c for o in item.objects)) for c in range(3)])
    assert len(set(counts)) >= 2


def test_generator_is_deterministic_and_refuses_other_sizes():
    a, b = make_volume(40, seed=5), make_volume(40, seed=5)
    np.testing.assert_array_equal(a.volume, b.volume)
    assert [o.box for o in a.objects] == [o.box for o in b.objects]
    volumes, labels, objects = make_batch(3, (32, 40, 48), seed=1)
    assert volumes.shape == (3, 32, 40, 48) and labels.shape == (3, 3) and len(objects) == 3
    forced = make_volume(64, seed=1, classes=[2, 0])
    assert sorted(o.class_id for o in forced.objects) == [0, 2]
    for bad in (31, 97, (48, 48), (32, 32, 200)):
        with pytest.raises(ValueError, match="32 to 96 voxels"):
            make_volume(bad, seed=0)


def test_shapes_are_what_their_class_says():
    """Spheres fill ~52 % of their box, axis-aligned cubes ~100 %, cones ~26 %."""
    fill = {c: [] for c in CLASS_NAMES}
    rng = np.random.default_rng(3)
    for _ in range(15):
        for o in make_volume(64, rng, classes=[0, 1, 2]).objects:
            z0, r0, c0, z1, r1, c1 = o.box
            fill[o.class_name].append(o.mask.sum() / ((z1 - z0) * (r1 - r0) * (c1 - c0)))
    assert 0.4 < np.mean(fill["sphere"]) < 0.6
    assert np.mean(fill["cube"]) > 0.95
    assert 0.15 < np.mean(fill["cone"]) < 0.35


# ---- the bundled model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo3d():
    return load_model("demo3d")


def test_demo3d_loads_offline_with_its_spec(demo3d):
    assert demo3d.class_names == list(CLASS_NAMES) and demo3d.name == "demo3d"
    assert demo3d.in_channels == 1 and demo3d.input_size is None
    assert demo3d.target_layer == "features" and not demo3d.module.training
    first = next(m for m in demo3d.module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    assert isinstance(first, torch.nn.Conv3d)  # how the package knows it explains volumes
    assert WEIGHTS.stat().st_size <= 2 * 2**20
    with pytest.raises(ValueError, match="arguments="):
        load_model("demo3d", arguments={"width": 4})


def test_demo3d_takes_any_size_from_32_to_96(demo3d):
    with torch.inference_mode():
        for shape in ((32, 32, 32), (33, 47, 95), (96, 40, 57)):
            assert demo3d.module(torch.rand(1, 1, *shape)).shape == (1, 3)


@pytest.fixture(scope="module")
def fixed_set():
    return [make_volume(s, seed=777_000 + i) for i, s in enumerate([48, 56, 40, 64] * 4)]


def test_demo3d_classifies_seeded_volumes(demo3d, fixed_set):
    with torch.inference_mode():
        p = np.stack([torch.sigmoid(demo3d.module(torch.from_numpy(v.volume)[None, None]))[0]
                      for v in fixed_set])
    truth = np.stack([v.labels for v in fixed_set]) > 0.5
    assert ((p > 0.5) == truth).mean() >= 0.9


def test_grad_cam_peaks_inside_the_objects(demo3d, fixed_set):
    """Pointing game: each present class's 3D Grad-CAM peaks on an object of that class."""
    hits = []
    for item in [sample_volume()] + fixed_set[:6]:
        for cid in sorted({o.class_id for o in item.objects}):
            heat = ng.explain(item.volume, demo3d, "gradcam", target=cid, device="cpu").heatmaps
            assert heat.shape == item.volume.shape
            peak = np.unravel_index(int(heat.argmax()), heat.shape)
            hits.append(any(inside(peak, grown(o.box)) for o in item.objects
                            if o.class_id == cid))
    assert len(hits) >= 8 and np.mean(hits) >= 0.85


def test_training_smoke(tmp_path, demo3d):
    model = demo3d_train.train(steps=2, batch=1, log_every=0, threads=None)
    path = demo3d_train.save(model, tmp_path / "w.safetensors")
    assert path.with_suffix(".safetensors.json").exists()
    spec = demo3d_spec(path)  # the bundled architecture takes the new weights
    assert spec.class_names == demo3d.class_names


# ---- sample and demo --3d --------------------------------------------------------------------

def test_sample_volume():
    from napari_gradcam._napari.sample_data import synthetic_volume

    ((vol, kwargs, kind),) = synthetic_volume()
    assert kind == "image" and vol.shape == (48, 64, 64) and vol.dtype == np.float32
    assert kwargs["name"] and kwargs["axis_labels"] == ("z", "y", "x")
    assert sorted(o.class_name for o in sample_volume().objects) == sorted(CLASS_NAMES)


def test_demo_3d_headless_writes_3d_results(tmp_path, capsys):
    from napari_gradcam.cli import main

    out = tmp_path / "out"
    assert main(["demo", "--3d", "--headless", str(out), "--device", "cpu"]) == 0
    assert "written" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert sorted(r["class"] for r in rows) == sorted(CLASS_NAMES)
    assert all(r["status"] == "ok" and int(r["regions"]) >= 1 for r in rows)
    import tifffile

    (heat,) = list((out / "heatmaps").iterdir())
    assert tifffile.imread(heat).shape[-3:] == (48, 64, 64)


def test_demo_3d_refuses_stack_too(capsys):
    from napari_gradcam.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--3d", "--stack", "--headless", "x"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_demo_3d_window_runs_demo3d_on_the_volume(make_napari_viewer_proxy, qtbot):
    from napari_gradcam._napari.demo import open_demo

    viewer = make_napari_viewer_proxy()
    _viewer, w, worker = open_demo(viewer, volume=True, device="cpu")
    assert worker is not None and w.model.value == "demo3d"
    assert viewer.dims.ndisplay == 3
    qtbot.waitUntil(lambda: not w.running and w._region_worker is None, timeout=60_000)
    heat = [lay for lay in viewer.layers if lay.name.startswith("gradcam · ")]
    assert len(heat) == 1 and heat[0].data.shape == (48, 64, 64)
    regions = [lay for lay in viewer.layers if lay.name.startswith("regions · ")]
    assert regions and set(regions[0].features["class"]) == set(CLASS_NAMES)
