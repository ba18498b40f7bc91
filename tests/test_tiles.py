"""Large images explained tile by tile: the tiling rules, the blended heat against the whole
image's, outputs in zarr, bounded memory, resuming, and refusals."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import zarr

import napari_gradcam as ng
from napari_gradcam.explain_arrays import layout, run_generator
from napari_gradcam.job import ExplainJob
from napari_gradcam.models.demo.synthetic import make_image
from napari_gradcam.tiles import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    Tiling,
    blend_window,
    check_tiling,
    iter_tiled,
    tile_origins,
)

TILING = Tiling((256, 256), (64, 64))
INTERIOR = slice(64, -64)  # the image's border: a tile's padding there has no neighbour


@pytest.fixture(scope="module")
def spec():
    return ng.load_model("demo")


@pytest.fixture(scope="module")
def image():
    """768 x 768: nine 256 px synthetic scenes, so objects lie all over the tiles."""
    img = np.zeros((768, 768), np.float32)
    for i in range(3):
        for j in range(3):
            img[i * 256:(i + 1) * 256, j * 256:(j + 1) * 256] = make_image(
                256, seed=10 + 3 * i + j, classes=[i % 3, j % 3]).image
    return img


def job(spec, method="gradcam", **kw):
    kw.setdefault("target", 0)
    kw.setdefault("device", "cpu")
    return ExplainJob(spec, method, **kw)


def interior_r(a, b) -> float:
    a, b = np.asarray(a)[INTERIOR, INTERIOR], np.asarray(b)[INTERIOR, INTERIOR]
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# ---- the tiling rules ---------------------------------------------------------------------------

def test_tile_origins_step_and_flush_last_tile():
    origins = tile_origins((768, 700), TILING)
    rows = sorted({r for r, _ in origins})
    cols = sorted({c for _, c in origins})
    assert rows == [0, 192, 384, 512]  # steps of tile - overlap, the last flush with the edge
    assert cols == [0, 192, 384, 444]
    assert origins == [(r, c) for r in rows for c in cols]
    covered = np.zeros((768, 700), bool)
    for r, c in origins:
        covered[r:r + 256, c:c + 256] = True
    assert covered.all()


def test_tile_origins_side_smaller_than_tile_is_one_tile():
    assert tile_origins((100, 600), TILING) == [(0, 0), (0, 192), (0, 344)]
    assert tile_origins((100, 80), TILING) == [(0, 0)]


def test_blend_window_gaussian_floored_and_separable():
    w = blend_window((64, 32))
    assert w.dtype == np.float32 and w.shape == (64, 32)
    assert w.min() > 0  # edges still count
    assert w.max() == pytest.approx(1.0, abs=0.01)
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)  # symmetric about the centre
    np.testing.assert_allclose(w, np.outer(w[:, 15], w[31]) / w[31, 15], rtol=1e-5)
    one = blend_window((128, 128))[64]  # sigma = 0.125 x 128 = 16 px
    expected = np.exp(-0.5 * (15.5 ** 2 - 0.5 ** 2) / 16 ** 2)  # centre at 63.5
    assert one[63 + 16] / one[63] == pytest.approx(expected, rel=1e-3)


def test_check_tiling_accepts_ints_and_pairs():
    assert check_tiling(512) == Tiling((512, 512), (DEFAULT_OVERLAP, DEFAULT_OVERLAP))
    assert check_tiling((256, 128), (32, 16)) == Tiling((256, 128), (32, 16))
    assert DEFAULT_TILE == 512 and DEFAULT_OVERLAP == 64


@pytest.mark.parametrize("tile, overlap, error, words", [
    (2.5, 64, TypeError, "whole number"),
    (True, 64, TypeError, "whole number"),
    ("big", 64, TypeError, "whole number"),
    (256, 8.0, TypeError, "whole number"),
    (0, 0, ValueError, "at least 1 pixel"),
    (256, -1, ValueError, "negative"),
    (256, 256, ValueError, "not smaller than tile"),
    ((256, 64), 64, ValueError, "not smaller than tile"),
])
def test_check_tiling_refuses(tile, overlap, error, words):
    with pytest.raises(error, match=words):
        check_tiling(tile, overlap)


# ---- against the whole image --------------------------------------------------------------------

@pytest.fixture(scope="module")
def as_trained(spec, image):
    """Grad-CAM, whole and in tiles of 256 (overlap 64)."""
    return job(spec, tile=None).run(image), job(spec, tile=256, overlap=64).run(image)


@pytest.mark.parametrize("method", ["cam", "gradcam", "layercam"])
def test_tiled_agrees_with_whole_image(spec, image, as_trained, method):
    """The demo model is local up to its pooling (its per-input divisor comes after it) and
    unscaled tiles take unit-length gradients, so every tile is weighted as the whole image."""
    whole, tiled = as_trained if method == "gradcam" else (
        job(spec, method, tile=None).run(image), job(spec, method, tile=256, overlap=64).run(image))
    heat = tiled.heatmaps[method]
    assert tiled.tiling == TILING and whole.tiling is None
    assert interior_r(whole.heatmaps[method], heat) >= 0.99
    assert heat.dtype == np.float32 and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert tiled.rows[0]["class"] == "disc" and 0 < tiled.rows[0]["probability"] < 1


def test_no_seams_at_tile_borders(as_trained):
    """The heat changes across a tile's border no more than across other rows and columns:
    a seam (tiles cut apart, or scaled each on its own) would show as a jump there."""
    heat = as_trained[1].heatmaps["gradcam"]
    borders = [r - 1 for r in (192, 256, 384, 448, 512, 640)]  # tiles start / end there
    for axis in (0, 1):
        step = np.abs(np.diff(heat, axis=axis)).mean(1 - axis)  # row r -> r + 1
        assert step[borders].max() <= np.percentile(np.delete(step, borders), 99)


def test_target_none_is_the_whole_image_class(spec, image):
    """One class for every tile: the argmax of the tiles' mean logits."""
    image = image[:512, :512]
    tiled = job(spec, ("gradcam", "cam"), target=None, tile=256).run(image)
    logits = []
    for r, c in tile_origins(image.shape, TILING):
        x = torch.from_numpy(image[r:r + 256, c:c + 256])[None, None]
        with torch.no_grad():
            logits.append(spec.module(x)[0].numpy())
    assert tiled.class_ids.tolist() == [int(np.argmax(np.mean(logits, 0)))]
    assert set(tiled.heatmaps) == {"gradcam", "cam"}
    assert tiled.regions_of("cam") is not None


# ---- outputs, memory, resuming ------------------------------------------------------------------

def test_zarr_out_equals_numpy(spec, image, as_trained, tmp_path):
    numpy_result = as_trained[1]
    zarr_result = job(spec, tile=256).run(image, out=tmp_path / "heat.zarr")
    heat = zarr_result.heatmaps["gradcam"]
    assert isinstance(heat, zarr.Array)
    np.testing.assert_allclose(heat[:], numpy_result.heatmaps["gradcam"], atol=1e-6)
    assert zarr.open_group(str(tmp_path / "heat.zarr"))["gradcam"].shape == image.shape
    assert len(zarr_result.regions) == len(numpy_result.regions) > 0
    again = zarr_result.rederive(threshold=0.3)
    assert len(again.regions) >= len(zarr_result.regions)
    assert again.heatmaps["gradcam"] is heat  # nothing read to show it


def test_explain_routes_through_tiles_into_a_zarr_array(spec, image, as_trained):
    out = zarr.create_array(store={}, shape=image.shape, dtype="float32", chunks=(256, 256))
    e = ng.explain(image, spec, "gradcam", target=0, device="cpu", tile=256, out=out)
    assert e.heatmaps is out and e.extra["tiling"] == TILING
    reference = as_trained[1].heatmaps["gradcam"]
    np.testing.assert_allclose(out[:], reference, atol=1e-6)
    assert int(e.class_ids) == 0


def test_auto_leaves_images_that_fit_whole(spec, image):
    assert job(spec).run(image).tiling is None
    slide = job(spec, tile="auto").run(image[:600, :600], whole_slide=True)
    assert slide.tiling == Tiling((512, 512), (64, 64))  # a level larger than a tile


def test_memory_stays_bounded(spec, tmp_path):
    """A zarr image of 2048 x 1024 into zarr heat: the host never holds the whole heat (the
    tiles' pass; the regions' band-wise reading is find_regions' own)."""
    scene = make_image(256, seed=4, classes=[0, 1, 2]).image
    src = zarr.create_array(store=str(tmp_path / "image.zarr"), shape=(2048, 1024),
                            dtype="float32", chunks=(256, 256))
    for r in range(0, 2048, 256):
        src[r:r + 256] = np.tile(scene, (1, 4))
    out = zarr.create_array(store=str(tmp_path / "heat.zarr"), shape=(2048, 1024),
                            dtype="float32", chunks=(128, 512))
    explainer = job(spec, tile=256, batch_size=2)
    lay = layout(src.shape, None, 2, in_channels=1)
    tracemalloc.start()
    try:
        done = run_generator(iter_tiled(explainer.runner, ["gradcam"], src, lay, TILING,
                                        {"gradcam": out}, target=0))
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2048 * 1024 * 4 * 0.75  # the whole float32 heat: 8 MB
    assert done[0].class_id == 0 and done[0].tiles_run == 55
    heat = out[:]
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0


class Counting:
    """Tiles put through the model (the runner's explain calls)."""

    def __init__(self, job):
        self.n = 0
        original = job.runner.explain

        def explain(batch, *args, **kw):
            self.n += batch.shape[0] if args[1] == job.methods[0] else 0
            return original(batch, *args, **kw)

        job.runner.explain = explain


def test_interrupted_run_resumes(spec, image, tmp_path):
    image = image[:512]  # three bands of four tiles
    full = job(spec, tile=256, batch_size=2)
    counted = Counting(full)
    reference = full.run(image, out=tmp_path / "ref.zarr", resume_key="a")
    total = counted.n
    assert total == 12

    first = job(spec, tile=256, batch_size=2)
    gen = first.iter_run(image, out=tmp_path / "heat.zarr", resume_key="a")
    for _ in range(5):  # 10 tiles: two bands of four written, the third begun
        next(gen)
    gen.close()
    again = job(spec, tile=256, batch_size=2)
    counted = Counting(again)
    resumed = again.run(image, out=tmp_path / "heat.zarr", resume_key="a")
    assert counted.n < total  # the written bands are not run again (the last one is, once)
    np.testing.assert_allclose(resumed.heatmaps["gradcam"][:],
                               reference.heatmaps["gradcam"][:], atol=1e-5)
    assert resumed.rows[0]["score"] == pytest.approx(reference.rows[0]["score"], rel=1e-5)

    other = job(spec, tile=256, batch_size=2)
    counted = Counting(other)
    other.run(image, out=tmp_path / "heat.zarr", resume_key="b")  # other settings: start over
    assert counted.n == total


# ---- regions across seams -----------------------------------------------------------------------

def test_object_across_a_tile_border_is_one_region(spec):
    img = make_image(512, seed=1, classes=[]).image.copy()
    yy, xx = np.mgrid[:512, :512]
    img[(np.abs(yy - 224) <= 12) & (np.abs(xx - 224) <= 12)] += 0.4  # a square across borders
    tiled = job(spec, target=1, tile=256, overlap=64).run(img)
    boxes = [r.bbox for r in tiled.regions]
    assert len(boxes) == 1
    r0, c0, r1, c1 = boxes[0]
    assert r0 < 224 < r1 and c0 < 224 < c1  # on the square, across the borders at 192 / 256
    assert r0 < 256 and r1 > 192
    assert len(job(spec, target=1, tile=None).run(img).regions) == 1


# ---- refusals -----------------------------------------------------------------------------------

def test_tile_smaller_than_the_model_takes(spec):
    img = np.random.default_rng(0).random((64, 64), np.float32)
    with pytest.raises(ValueError, match=r"smaller than this model can take.*give tile=\d+"):
        job(spec, tile=2, overlap=0).run(img)


@pytest.mark.parametrize("kw, error, words", [
    ({"tile": 256, "overlap": 256}, ValueError, "not smaller than tile"),
    ({"tile": 25.6}, TypeError, "whole number"),
    ({"tile": "huge"}, ValueError, "'auto', None"),
    ({"tile": 256, "target": "found"}, ValueError, "one class"),
])
def test_job_refuses_bad_tiles(spec, kw, error, words):
    with pytest.raises(error, match=words):
        job(spec, **kw)


def test_found_is_refused_when_auto_tiles(spec, image):
    with pytest.raises(ValueError, match="one class"):
        job(spec, target="found").run(image, whole_slide=True)


def test_3d_model_refuses_tiles():
    spec3d = ng.load_model("demo3d")
    with pytest.raises(ValueError, match="3-D volumes"):
        ExplainJob(spec3d, "gradcam", tile=64, device="cpu")
    with pytest.raises(ValueError, match="3-D volumes"):
        ng.explain(np.zeros((32, 32, 32), np.float32), spec3d, tile=64, device="cpu")


def test_explain_refuses_bad_tiles(spec, image):
    with pytest.raises(TypeError, match="whole number"):
        ng.explain(image, spec, tile=2.5, device="cpu")
    with pytest.raises(ValueError, match="not smaller than tile"):
        ng.explain(image, spec, tile=128, overlap=128, device="cpu")
