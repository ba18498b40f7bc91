"""Tiled explanation, edge cases: a resumed run where earlier bands reach past the next one,
intensity "minmax" scaled over the whole image rather than per tile, and tiles with NaN
pixels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import napari_gradcam as ng
from napari_gradcam.job import ExplainJob
from napari_gradcam.models.demo.synthetic import make_image
from napari_gradcam.tiles import Tiling, tile_origins


@pytest.fixture(scope="module")
def spec():
    return ng.load_model("demo")


def scenes(height: int, width: int, side: int = 64) -> np.ndarray:
    """Small synthetic scenes side by side, so every tile holds objects."""
    img = np.zeros((height, width), np.float32)
    for i in range(0, height, side):
        for j in range(0, width, side):
            s = make_image(96, seed=i * 7 + j, classes=[(i // side) % 3]).image
            img[i:i + side, j:j + side] = s[:min(side, height - i), :min(side, width - j)]
    return img


def job(spec, tile, overlap, **kw):
    kw.setdefault("target", 0)
    return ExplainJob(spec, "gradcam", device="cpu", batch_size=1, tile=tile,
                      overlap=overlap, **kw)


@pytest.mark.parametrize("height, tile, overlap", [
    (150, 64, 40),   # an overlap over half the tile: three bands reach some rows
    (165, 64, 16),   # the last band flush with the edge, 5 rows below the one before
])
def test_resume_after_any_batch_equals_the_uninterrupted_run(spec, tmp_path, height, tile,
                                                             overlap):
    """Interrupted after every possible batch and resumed, the heat is the uninterrupted
    run's: the rerun must start from the first band whose tiles reach the first unwritten row,
    which can lie more than one band back."""
    img = scenes(height, 48)
    rows = sorted({r for r, _c in tile_origins(img.shape, Tiling((tile, tile),
                                                                  (overlap, overlap)))})
    assert any(rows[b] + tile > rows[b + 2] for b in range(len(rows) - 2))  # the case at hand
    reference = job(spec, tile, overlap).run(img, out=tmp_path / "ref.zarr", resume_key="k")
    want = reference.heatmaps["gradcam"][:]
    for k in range(1, len(rows) + 1):
        where = tmp_path / f"cut{k}.zarr"
        gen = job(spec, tile, overlap).iter_run(img, out=where, resume_key="k")
        for _ in range(k):
            next(gen)
        gen.close()
        resumed = job(spec, tile, overlap).run(img, out=where, resume_key="k")
        np.testing.assert_allclose(resumed.heatmaps["gradcam"][:], want, atol=1e-6,
                                   err_msg=f"resumed after {k} tiles")
        assert resumed.rows[0]["score"] == pytest.approx(reference.rows[0]["score"], rel=1e-5)


def test_minmax_intensity_uses_the_whole_image_range(spec):
    """A model that scales each image by its own range sees every tile scaled by the whole
    image's range: the same heat as the image pre-scaled once for a model that scales
    nothing. Scaled per tile, a faint tile would look as bright as the brightest."""
    img = scenes(96, 160)
    img[:, 96:] *= 0.3  # a faint half
    img = img * 5 + 2
    per_image = copy.copy(spec)
    per_image.intensity = "minmax"
    as_is = copy.copy(spec)
    as_is.intensity = "none"
    tiled = job(per_image, 64, 16).run(img).heatmaps["gradcam"]
    scaled = (img - img.min()) / (img.max() - img.min())
    expected = job(as_is, 64, 16).run(scaled).heatmaps["gradcam"]
    np.testing.assert_allclose(tiled, expected, atol=1e-5)
    assert tiled.max() == pytest.approx(1.0)


def test_a_nan_tile_does_not_blank_the_image(spec):
    """NaN pixels in one corner: the tiles that hold them add no heat, the rest of the image
    keeps its heat, and the score and class come from the tiles with finite scores."""
    img = scenes(192, 192)
    clean = job(spec, 64, 16).run(img)
    holed = img.copy()
    holed[:20, :20] = np.nan  # in the tiles at (0, 0) only
    res = job(spec, 64, 16).run(holed)
    heat = res.heatmaps["gradcam"]
    assert np.isfinite(heat).all() and heat.max() == pytest.approx(1.0)
    far = (slice(64, None), slice(64, None))  # beyond the NaN tile's reach
    r = np.corrcoef(heat[far].ravel(), clean.heatmaps["gradcam"][far].ravel())[0, 1]
    assert r > 0.99
    assert np.isfinite(res.rows[0]["score"]) and np.isfinite(res.rows[0]["probability"])
    found = job(spec, 64, 16, target=None).run(holed).class_ids.ravel()[0]
    assert found == job(spec, 64, 16, target=None).run(img).class_ids.ravel()[0]


def test_resume_after_a_stop_while_scaling_equals_the_uninterrupted_run(spec, tmp_path,
                                                                       monkeypatch):
    """A run stopped in the last pass (the heat scaled to [0, 1] chunk by chunk, in place),
    after a chunk was written and before its progress was stored, resumes to the
    uninterrupted run's heat: no chunk is scaled twice. The scratch rows are gone after."""
    import zarr

    from napari_gradcam import tiles

    img = scenes(200, 64)
    want = job(spec, 64, 16).run(img, out=tmp_path / "ref.zarr",
                                 resume_key="k").heatmaps["gradcam"][:]
    save = tiles._save_progress

    class Stop(BaseException):
        pass

    def stop_in_the_second_chunk(store, key, state):
        mine = state["images"]["0"]
        if mine.get("phase") == "normalise" and mine.get("rows", 0) >= 64:
            raise Stop
        save(store, key, state)

    monkeypatch.setattr(tiles, "_save_progress", stop_in_the_second_chunk)
    with pytest.raises(Stop):
        job(spec, 64, 16).run(img, out=tmp_path / "heat.zarr", resume_key="k")
    monkeypatch.setattr(tiles, "_save_progress", save)
    resumed = job(spec, 64, 16).run(img, out=tmp_path / "heat.zarr", resume_key="k")
    np.testing.assert_allclose(resumed.heatmaps["gradcam"][:], want, atol=1e-6)
    assert sorted(zarr.open_group(str(tmp_path / "heat.zarr")).keys()) == ["gradcam"]


def test_auto_tiles_refuse_an_overlap_not_smaller_than_the_chosen_tile(spec):
    """With tile "auto" the tile is the model's input size; an overlap at least that large is
    refused with the tile named (clamped, the tiles would step by one pixel)."""
    sized = copy.copy(spec)
    sized.input_size = (96, 96)
    img = scenes(200, 200)
    explainer = ExplainJob(sized, "gradcam", target=0, device="cpu", tile="auto", overlap=100)
    with pytest.raises(ValueError, match=r"not smaller than the tile chosen.*96 x 96.*overlap="):
        explainer.run(img, whole_slide=True)
    fine = ExplainJob(sized, "gradcam", target=0, device="cpu", tile="auto", overlap=32)
    assert fine.run(img, whole_slide=True).tiling == Tiling((96, 96), (32, 32))


class BrightDark(torch.nn.Module):
    """A segmentation network that sees pixel by pixel (3 x 3 body): class 1 where the image
    is bright, class 2 where it is dark, background elsewhere."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.head = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.body.weight.zero_()
            self.body.weight[1, 0, 1, 1], self.body.weight[2, 0, 1, 1] = 4.0, -4.0
            self.body.bias.copy_(torch.tensor([0.5, -2.0, -2.0]))
            self.head.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_segmentation_gradcam_in_tiles_matches_the_whole_image():
    """Grad-CAM of a class's region: a tile holding a sliver of the region gets the same
    channel weights as one inside it (pooled weights of unit length), so the tiled heat is
    the whole image's; and target None picks the class over the largest area."""
    from napari_gradcam.models import ModelSpec

    seg = ModelSpec(BrightDark().eval(), ["background", "bright", "dark"], 1, intensity="none")
    img = np.zeros((160, 200), np.float32)
    img[30:130, 20:170] = 1.0  # bright, across tile borders
    img[5:20, 175:195] = -1.0  # dark, small
    whole = ExplainJob(seg, "gradcam", target=None, device="cpu", tile=None).run(img)
    tiled = ExplainJob(seg, "gradcam", target=None, device="cpu", tile=64, overlap=16).run(img)
    assert tiled.class_ids.ravel().tolist() == whole.class_ids.ravel().tolist() == [1]
    np.testing.assert_allclose(tiled.heatmaps["gradcam"], whole.heatmaps["gradcam"], atol=1e-4)
    assert len(tiled.regions) == len(whole.regions) == 1


def test_explain_in_tiles_refuses_a_target_mask_of_another_shape(spec):
    img = scenes(128, 128)
    with pytest.raises(ValueError, match=r"target mask has shape \(64, 64\); give the images' "
                                         r"spatial shape \(128, 128\)"):
        ng.explain(img, spec, "gradcam", target=0, device="cpu", tile=64, overlap=16,
                   target_mask=np.ones((64, 64), bool))
