"""napari_gradcam.metrics: hand-checked faithfulness, sanity-check and agreement numbers, and
hostile inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

import napari_gradcam as ng
import napari_gradcam.metrics as M
from napari_gradcam.annotations import regions_to_annotations
from napari_gradcam.explain_arrays import Progress
from napari_gradcam.models.demo.synthetic import make_image

R = (slice(0, 2), slice(0, 4))  # the region the hand-made model scores


class RegionModel(nn.Module):
    """Logit 0 = the mean of the input over rows 0-1, columns 0-3 (through a 1x1 convolution of
    weight 1, so the model has a layer and parameters); logit 1 = 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.conv.weight)

    def forward(self, x):
        m = self.conv(x)[:, 0, R[0], R[1]].mean((1, 2))
        return torch.stack([m, torch.zeros_like(m)], 1)


def region_spec():
    return ng.ModelSpec(RegionModel().eval(), ["region", "zero"], intensity="none",
                        output="multilabel")


def sigmoid(v):
    return 1 / (1 + np.exp(-np.asarray(v, np.float64)))


IMAGE = ((np.arange(64).reshape(8, 8) + 1) / 64).astype(np.float32)
# hottest: row 0 of the region (4 px), then row 1 of it, then everything else (ties)
HEAT = np.full((8, 8), 0.1, np.float32)
HEAT[0, :4] = [0.9, 0.9, 0.9, 0.9]
HEAT[1, :4] = 0.5


def finite(result) -> bool:
    """Every float array of a result is free of NaN / inf."""
    return all(np.isfinite(v).all() for v in vars(result).values()
               if isinstance(v, np.ndarray) and v.dtype.kind == "f")


@pytest.fixture(scope="module")
def demo():
    spec = ng.load_model("demo")
    items = [make_image(96, seed=1_000_000 + i, n_objects=1) for i in (1, 2)]
    images = np.stack([it.image for it in items]).astype(np.float32)
    ex = ng.explain(images, spec, device="cpu")
    return spec, items, images, ex


# ---- deletion / insertion ------------------------------------------------------------------

def test_deletion_and_insertion_follow_the_hand_computed_curve():
    spec = region_spec()
    res = M.deletion_insertion(IMAGE, spec, HEAT, targets=0, steps=16, canvas="black",
                               device="cpu")
    x = IMAGE.astype(np.float64)
    full, row1 = x[R].mean(), x[1, :4].sum() / 8
    row0 = x[0, :4].sum() / 8
    # 64 px in 16 steps: 4 px a step; step 1 removes row 0 of the region, step 2 row 1
    want_del = np.r_[full, row1, np.zeros(15)]
    want_ins = np.r_[0.0, row0, np.full(15, full)]
    np.testing.assert_allclose(res.deletion_logits, want_del, atol=1e-6)
    np.testing.assert_allclose(res.insertion_logits, want_ins, atol=1e-6)
    np.testing.assert_allclose(res.deletion, sigmoid(want_del), atol=1e-6)
    np.testing.assert_allclose(res.fractions, np.arange(17) / 16)
    area = ((sigmoid(want_del)[1:] + sigmoid(want_del)[:-1]) / 2).sum() / 16
    assert res.deletion_auc == pytest.approx(area, abs=1e-6)
    assert res.insertion_auc > res.deletion_auc
    assert res.class_ids == 0 and res.deletion.shape == (17,)
    row = res.rows()[0]
    assert row["class"] == "region" and row["deletion_auc"] == pytest.approx(area, abs=1e-6)
    assert finite(res)


def test_heatmaps_follow_the_image_to_a_fixed_input_size():
    spec = region_spec()
    spec.input_size = (8, 8)  # the 16 x 16 image and its map are both shrunk to 8 x 8
    heat = np.zeros((16, 16), np.float32)
    heat[:4, :8] = 1.0  # the region (rows 0-1, columns 0-3 at the input size)
    res = M.deletion_insertion(np.ones((16, 16), np.float32), spec, heat, targets=0,
                               steps=16, device="cpu")
    np.testing.assert_allclose(res.deletion_logits[:3], [1.0, 0.5, 0.0], atol=1e-6)
    assert res.fractions[1] == 4 / 64  # steps count the input's pixels


def test_ties_go_in_row_major_order_and_the_blur_canvas_is_a_mirrored_gaussian():
    spec = region_spec()
    flat = np.zeros((8, 8), np.float32)  # every pixel ties: row-major order
    res = M.deletion_insertion(IMAGE, spec, flat, targets=0, steps=16, blur_sigma=1.0,
                               device="cpu")
    x = IMAGE.astype(np.float64)
    assert res.deletion_logits[1] == pytest.approx(x[1, :4].sum() / 8, abs=1e-6)
    blurred = gaussian_filter(x, 1.0, mode="mirror")
    assert res.insertion_logits[0] == pytest.approx(blurred[R].mean(), abs=1e-5)
    # step 1 reveals the 4 first pixels (row 0 of the region) on the blurred canvas
    b = blurred.copy()
    b[0, :4] = x[0, :4]
    assert res.insertion_logits[1] == pytest.approx(b[R].mean(), abs=1e-5)


def test_grad_cam_beats_random_maps_on_the_demo_model(demo):
    spec, _items, images, ex = demo
    rnd = np.random.default_rng(0).random(ex.heatmaps.shape).astype(np.float32)
    ours = M.deletion_insertion(images, spec, ex.heatmaps, steps=10, device="cpu")
    rand = M.deletion_insertion(images, spec, rnd, targets=ours.class_ids, steps=10,
                                device="cpu")
    np.testing.assert_array_equal(ours.class_ids, ex.class_ids)
    assert (ours.insertion_auc > rand.insertion_auc + 0.2).all()
    assert (ours.deletion_auc < rand.deletion_auc).all()
    assert ours.deletion.shape == (2, 11) and finite(ours)


def test_a_stack_gives_what_its_images_give_one_by_one(demo):
    spec, _items, images, ex = demo
    stack = M.deletion_insertion(images, spec, ex.heatmaps, steps=4, device="cpu",
                                 batch_size=3)
    for i in range(2):
        one = M.deletion_insertion(images[i], spec, ex.heatmaps[i], steps=4, device="cpu")
        np.testing.assert_allclose(stack.deletion_logits[i], one.deletion_logits, atol=1e-4)
        np.testing.assert_allclose(stack.insertion_logits[i], one.insertion_logits,
                                   atol=1e-4)


def test_the_generator_reports_progress_and_stops_when_closed():
    spec = region_spec()
    images = np.stack([IMAGE, IMAGE[::-1].copy(), IMAGE.T.copy()])
    seen = []
    res = M.deletion_insertion(images, spec, np.stack([HEAT] * 3), steps=4, device="cpu",
                               batch_size=1, progress=seen.append)
    assert [p.done for p in seen] == [1, 2, 3] and all(isinstance(p, Progress) for p in seen)
    assert res.deletion.shape == (3, 5) and len(res.rows()) == 3
    gen = M.iter_deletion_insertion(images, spec, np.stack([HEAT] * 3), steps=4,
                                    device="cpu", batch_size=1)
    assert next(gen).done == 1
    gen.close()  # stops between batches without an error


# ---- average drop / increase -----------------------------------------------------------------

def test_average_drop_is_the_hand_computed_percentage():
    spec = region_spec()
    half = np.full((8, 8), 0.5, np.float32)
    inside = np.zeros((8, 8), np.float32)
    inside[R] = 1.0
    res = M.average_drop_increase(np.stack([IMAGE, IMAGE]), spec, np.stack([half, inside]),
                                  targets=0, device="cpu")
    m = IMAGE.astype(np.float64)[R].mean()
    y, o = sigmoid(m), sigmoid(m / 2)  # black baseline: the image times the map
    np.testing.assert_allclose(res.drop, [(y - o) / y * 100, 0.0], atol=1e-5)
    np.testing.assert_array_equal(res.increase, [False, False])
    assert res.average_drop == pytest.approx((y - o) / y * 50, abs=1e-5)
    assert res.increase_in_confidence == 0.0
    assert res.rows()[0]["explained_probability"] == pytest.approx(o, abs=1e-6)


# ---- ROAD ---------------------------------------------------------------------------------------

def test_imputation_is_the_weighted_mean_of_the_neighbours():
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3) + 1
    centre = np.zeros((1, 3, 3), bool)
    centre[0, 1, 1] = True
    got = M.impute(x, centre, noise=0.0)
    axes, diag = 1 / 6, 1 / 12
    v = x[0, 0]
    want = axes * (v[0, 1] + v[1, 0] + v[1, 2] + v[2, 1]) + diag * (v[0, 0] + v[0, 2] + v[2, 0]
                                                                      + v[2, 2])
    assert got[0, 0, 1, 1] == pytest.approx(want, abs=1e-5)
    corner = np.zeros((1, 3, 3), bool)
    corner[0, 0, 0] = True  # only 3 neighbours inside: their weights are renormalised
    got = M.impute(x, corner, noise=0.0)
    want = (axes * (v[0, 1] + v[1, 0]) + diag * v[1, 1]) / (2 * axes + diag)
    assert got[0, 0, 0, 0] == pytest.approx(want, abs=1e-5)
    everything = np.ones((1, 3, 3), bool)  # nothing known: the normalisation's mean, 0
    assert np.all(M.impute(x, everything, noise=0.0) == 0)


def test_road_scores_the_change_of_the_target_and_combines_both_orders():
    spec = region_spec()
    res = M.road(IMAGE, spec, HEAT, targets=0, percentiles=(50, 90),
                 most_relevant_first="both", noise=0.0, device="cpu")
    assert res.morf.shape == (2,) and res.lerf.shape == (2,)
    # at the 90th percentile MoRF removes the 8 region pixels (heat >= 0.5): the region is
    # imputed from its neighbours, so logit 0 changes; LeRF keeps the region's pixels there
    assert res.lerf_logits[1] == pytest.approx(0.0, abs=1e-6)
    assert abs(res.morf_logits[1]) > 1e-3
    assert res.combined == pytest.approx((res.lerf.mean() - res.morf.mean()) / 2)
    # MoRF removes heat >= 0.5 (8 px), LeRF 1 - heat >= 0.9 (the 56 others): 50 % on average
    assert res.removed[1] == pytest.approx(0.5)
    row = res.rows()[0]
    assert set(row) >= {"road_morf", "road_lerf", "road_combined"} and finite(res)
    flat = M.road(IMAGE, spec, np.zeros((8, 8), np.float32), targets=0, percentiles=(10,),
                  noise=0.0, device="cpu")  # a flat map removes everything: no NaN
    assert np.isfinite(flat.morf).all() and flat.removed[0] == 1.0


# ---- sanity check -------------------------------------------------------------------------------

def test_cascade_decorrelates_grad_cam_and_leaves_the_model_alone(demo):
    spec, _items, images, ex = demo
    before = {k: v.clone() for k, v in spec.module.state_dict().items()}
    rng_before = torch.random.get_rng_state()
    res = M.sanity_check(images[:1], spec, "gradcam", device="cpu")
    after = spec.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng_before, torch.random.get_rng_state())
    assert res.stages[0] == "fc" and res.stages[-1] == "stem.0"
    assert res.maps.shape == (1, len(res.stages), 96, 96)
    np.testing.assert_allclose(res.original[0], ex.heatmaps[0], atol=1e-5)
    # the bar: Spearman < 0.3 after the full cascade (measured: -0.15 on this image)
    assert res.spearman[0, -1] < 0.3
    assert res.ssim[0, -1] < 0.6
    assert finite(res) and len(res.rows()) == len(res.stages)


def test_sanity_stages_batch_and_seed(demo):
    spec, _items, images, _ex = demo
    both = M.sanity_check(images, spec, stages=2, device="cpu", batch_size=2)
    assert both.stages == [both.layers[0][-1], "stem.0"] and both.spearman.shape == (2, 2)
    one = M.sanity_check(images[1], spec, stages=2, device="cpu")
    np.testing.assert_allclose(both.maps[1], one.maps, atol=1e-4)
    named = M.sanity_check(images[1], spec, stages=["fc", "down2.0"], device="cpu")
    assert named.layers[0] == ["fc"] and named.layers[1][-1] == "down2.0"
    again = M.sanity_check(images[1], spec, stages=2, seed=0, device="cpu")
    np.testing.assert_array_equal(again.maps, one.maps)  # seeded: reproducible


def test_spearman_of_a_flat_map_is_zero_not_nan():
    a = np.random.default_rng(0).random((2, 5, 5))
    rho, constant = M.spearman(a, np.stack([a[0], np.zeros((5, 5))]))
    assert rho[0] == pytest.approx(1.0) and rho[1] == 0.0
    np.testing.assert_array_equal(constant, [False, True])


# ---- agreement ----------------------------------------------------------------------------------

def _heat_and_mask():
    heat = np.zeros((10, 10), np.float32)
    heat[2, 3] = 1.0
    heat[2, 4] = 0.6
    heat[8, 8] = 0.4
    mask = np.zeros((10, 10), bool)
    mask[1:4, 2:6] = True
    return heat, mask


def test_pointing_energy_iou_dice_by_hand():
    heat, mask = _heat_and_mask()
    res = M.agreement(heat, mask, threshold=0.5)
    assert res.pointing and res.distance == 0.0 and tuple(res.peak) == (2, 3)
    assert res.energy == pytest.approx(1.6 / 2.0)
    # heat >= 0.5: 2 px, both inside the 12-px annotation
    assert res.iou == pytest.approx(2 / 12) and res.dice == pytest.approx(4 / 14)
    far = np.zeros((10, 10), np.float32)
    far[2, 9] = 1.0  # 4 px right of column 5
    assert not M.agreement(far, mask, tolerance=3).pointing
    hit = M.agreement(far, mask, tolerance=4)
    assert hit.pointing and hit.distance == pytest.approx(4.0)
    ell = np.zeros((10, 10), bool)  # an L: its box holds more heat than its pixels
    ell[8, 2:9] = True  # holds (8, 8); its box (rows 2-8, columns 2-8) also the peak
    ell[2:9, 2] = True
    assert M.agreement(heat, ell, energy="mask").energy == pytest.approx(0.4 / 2.0)
    assert M.agreement(heat, ell).energy == pytest.approx(2.0 / 2.0)


def test_an_image_without_annotation_is_flagged_and_left_out_of_the_means():
    heat, mask = _heat_and_mask()
    res = M.agreement(np.stack([heat, heat]), np.stack([mask, np.zeros_like(mask)]))
    np.testing.assert_array_equal(res.annotated, [True, False])
    rows = res.rows()
    assert rows[1]["annotated"] is False and rows[1]["iou"] is None and rows[1]["pointing"] \
        is None
    s = res.summary()
    assert s["annotated"] == 1 and s["pointing_game"] == 1.0 and s["iou"] == pytest.approx(2 / 12)
    assert finite(res)
    with pytest.raises(ValueError, match="no annotated pixel"):
        M.agreement(heat, np.zeros_like(mask))


def test_regions_geojson_and_coco_give_the_mask_numbers(tmp_path):
    heat, mask = _heat_and_mask()
    stack = np.stack([heat, heat[::-1].copy()])
    masks = np.stack([mask, mask[::-1].copy()])
    want = M.agreement(stack, masks, regions=True)
    regions = ng.find_regions(masks.astype(np.float32), threshold=0.5, min_area=0, simplify=0)
    from_regions = M.agreement(stack, regions, regions=True)
    gj = ng.write_geojson(regions, tmp_path / "a.geojson")
    coco = ng.write_coco(regions, tmp_path / "a.json", image_shape=masks.shape)
    for got in (from_regions, M.agreement(stack, gj, regions=True),
                M.agreement(stack, str(coco), regions=True),
                M.agreement(stack, json.loads(gj.read_text()), regions=True),
                M.agreement(stack, json.loads(coco.read_text()), regions=True)):
        for name in ("pointing", "energy", "iou", "dice", "region_iou", "region_dice"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name))
    # regions=True: find_regions' defaults drop regions under 16 px (here the 2 hot pixels)
    np.testing.assert_array_equal(want.region_iou, [0, 0])
    # the exact regions of the thresholded map are its pixels: the threshold's IoU and Dice
    exact = ng.find_regions(stack, threshold=0.5, min_area=0, simplify=0)
    res = M.agreement(stack, masks, regions=exact)
    np.testing.assert_allclose(res.region_iou, res.iou)
    np.testing.assert_allclose(res.region_dice, res.dice)


def test_annotation_class_filters_shapes_and_labels():
    heat, mask = _heat_and_mask()
    labels = mask.astype(np.int32) * 2
    labels[7:10, 7:10] = 1
    assert M.agreement(heat, labels, annotation_class=2).pointing
    assert not M.agreement(heat, labels, annotation_class=1, tolerance=0).pointing


# ---- hostile inputs ---------------------------------------------------------------------------

def test_bad_inputs_say_what_to_change(tmp_path):
    spec = region_spec()
    with pytest.raises(ValueError, match="heatmaps have shape"):
        M.deletion_insertion(IMAGE, spec, np.zeros((4, 4)), device="cpu")
    nan = HEAT.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.road(IMAGE, spec, nan, device="cpu")
    with pytest.raises(ValueError, match="out of range"):
        M.average_drop_increase(IMAGE, spec, HEAT, targets=5, device="cpu")
    with pytest.raises(ValueError, match="no class 'lung'"):
        M.deletion_insertion(IMAGE, spec, HEAT, targets="lung", device="cpu")
    with pytest.raises(ValueError, match="targets has shape"):
        M.deletion_insertion(np.stack([IMAGE] * 2), spec, np.stack([HEAT] * 2),
                             targets=[0, 1, 0], device="cpu")
    with pytest.raises(ValueError, match="steps"):
        M.deletion_insertion(IMAGE, spec, HEAT, steps=0, device="cpu")
    with pytest.raises(ValueError, match="baseline='purple'"):
        M.deletion_insertion(IMAGE, spec, HEAT, baseline="purple", device="cpu")
    with pytest.raises(ValueError, match="percentiles"):
        M.road(IMAGE, spec, HEAT, percentiles=(150,), device="cpu")
    with pytest.raises(ValueError, match="out of range"):
        M.sanity_check(IMAGE, spec, targets=7, device="cpu")
    with pytest.raises(ValueError, match="no parameters"):
        M.sanity_check(IMAGE, ng.ModelSpec(nn.Sequential(nn.Flatten()), ["a"]),
                       device="cpu")
    heat, mask = _heat_and_mask()
    with pytest.raises(ValueError, match="annotation mask has shape"):
        M.agreement(heat, mask[:5])
    with pytest.raises(ValueError, match="empty list"):
        M.agreement(heat, [])
    with pytest.raises(ValueError, match="outside the heatmaps' leading shape"):
        M.agreement(np.stack([heat, heat]), [ng.Annotation(
            __import__("shapely").box(1, 1, 4, 4), index=(5,))])
    with pytest.raises(ValueError, match="10 x 10"):
        M.agreement(heat, {"images": [{"id": 1, "height": 20, "width": 20}],
                           "annotations": [], "categories": []})
    with pytest.raises(TypeError, match="annotations of type"):
        M.agreement(heat, 3)
    empty = tmp_path / "empty.geojson"
    empty.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(ValueError, match="holds no shape"):
        M.agreement(heat, empty)


# ---- found in review: outlines, flat maps, hostile pixels and files ------------------------

def _disc(size=40, centre=(20, 18), radius=9):
    yy, xx = np.mgrid[:size, :size]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2).astype(np.float32)


def test_our_geojson_annotates_each_regions_outline_not_its_box(tmp_path):
    """Our GeoJSON holds a rectangle and a polygon per region: the region's pixels are its
    outline's, so its own export agrees with it exactly, as its COCO export does."""
    disc = _disc()
    regions = ng.find_regions(disc, threshold=0.5, min_area=0, simplify=0)
    gj = ng.write_geojson(regions, tmp_path / "r.geojson")
    coco = ng.write_coco(regions, tmp_path / "r.json", image_shape=disc.shape)
    kinds = [f["properties"]["napari_gradcam"]["kind"]
             for f in json.loads(gj.read_text())["features"]]
    assert sorted(kinds) == ["polygon", "rectangle"]
    for given in (gj, json.loads(gj.read_text()), str(coco), regions_to_annotations(regions)):
        got = M.agreement(disc, given, threshold=0.5)
        assert float(got.iou) == 1.0 and float(got.dice) == 1.0
    # a rectangle without an outline beside it is still a box
    box = M.annotation_masks(regions_to_annotations(regions, kinds=("rectangle",)), (),
                             disc.shape)[0]
    assert box.sum() > disc.sum()


def test_a_flat_heatmap_points_nowhere():
    """Its argmax would be pixel (0, 0): an annotation there must not make it a hit."""
    ann = np.zeros((20, 20), bool)
    ann[:3, :3] = True
    got = M.agreement(np.stack([np.zeros((20, 20)), np.full((20, 20), 0.7)]), ann)
    assert not got.pointing.any() and got.flat.all()
    assert [r["flat"] for r in got.rows()] == [True, True]
    assert got.summary()["pointing_game"] == 0.0 and got.summary()["flat_maps"] == 2
    hot = np.zeros((20, 20))
    hot[1, 1] = 1
    assert bool(M.agreement(hot, ann).pointing) and not bool(M.agreement(hot, ann).flat)


def test_images_with_nan_or_inf_are_refused_by_every_metric():
    spec = region_spec()
    for bad in (np.nan, np.inf):
        images = np.stack([IMAGE, IMAGE])
        images[1, 3, 3] = bad
        heat = np.stack([HEAT, HEAT])
        for run in (lambda: M.deletion_insertion(images, spec, heat, steps=2, device="cpu"),
                    lambda: M.road(images, spec, heat, device="cpu"),
                    lambda: M.average_drop_increase(images, spec, heat, device="cpu"),
                    lambda: M.sanity_check(images, spec, device="cpu")):
            with pytest.raises(ValueError, match="image 1 holds NaN or infinite values; give "
                                                 "finite pixels"):
                run()


def test_an_image_smaller_than_the_model_says_its_smallest_size(demo):
    spec, _items, images, ex = demo
    tiny = images[0, :1, :1]
    for run in (lambda: M.deletion_insertion(tiny, spec, ex.heatmaps[0, :1, :1], steps=2,
                                             device="cpu"),
                lambda: M.road(tiny, spec, ex.heatmaps[0, :1, :1], device="cpu"),
                lambda: M.average_drop_increase(tiny, spec, ex.heatmaps[0, :1, :1],
                                                device="cpu")):
        with pytest.raises(ValueError, match="smaller than this model can take: it needs at "
                                             "least"):
            run()


def test_road_noise_of_an_image_is_its_own(demo):
    """An image's ROAD scores are the same alone and anywhere in a stack."""
    spec, _items, images, ex = demo
    both = M.road(images, spec, ex.heatmaps, percentiles=(30, 70), device="cpu")
    swapped = M.road(images[::-1].copy(), spec, ex.heatmaps[::-1].copy(),
                     percentiles=(30, 70), device="cpu")
    alone = M.road(images[1], spec, ex.heatmaps[1], percentiles=(30, 70), device="cpu")
    np.testing.assert_array_equal(both.morf_logits[1], alone.morf_logits)
    np.testing.assert_array_equal(both.morf_logits[1], swapped.morf_logits[0])
    with pytest.raises(ValueError, match="noise='a': give the imputation noise"):
        M.road(images[1], spec, ex.heatmaps[1], noise="a", device="cpu")


@pytest.mark.parametrize("change, words", [
    ({"bbox": [1, float("nan"), 3, 3]}, "has no readable segmentation or bbox (its bbox holds "
                                        "NaN"),
    ({"segmentation": [[1, 1, float("inf"), 1, 4, 4]]}, "has no readable segmentation or bbox"),
    ({"categories": 5}, "'categories' is int; write it as a list"),
    ({"image_id": [1]}, "image_id is [1]; write ids as numbers"),
    ({"images": [{"id": [1], "height": 10, "width": 10}]}, "id is [1]; write ids as numbers"),
    ({"images": [{"id": 1, "height": "10", "width": "10"}]},
     "height and width are '10' and '10'; write them as whole numbers"),
])
def test_malformed_coco_says_what_to_change(change, words):
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}
    doc = {"images": [{"id": 1, "height": 10, "width": 10}], "annotations": [ann],
           "categories": [{"id": 1, "name": "x"}]}
    for key, value in change.items():
        (doc if key in doc else ann)[key] = value
        if key == "segmentation":
            del ann["bbox"]
    with pytest.raises(ValueError) as info:
        M.agreement(np.zeros((10, 10)), doc)
    assert words in str(info.value)
