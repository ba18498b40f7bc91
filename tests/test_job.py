"""The one explain job: targets, methods, regions and rows for every front end."""

import numpy as np
import pytest

import napari_gradcam as ng
from napari_gradcam.job import ExplainJob, shift_index
from napari_gradcam.models.demo.synthetic import make_image

SIZE = 160


@pytest.fixture(scope="module")
def spec():
    return ng.load_model("demo")


@pytest.fixture(scope="module")
def stack():
    """Three images holding the three classes, then one holding nothing."""
    images = [make_image(SIZE, seed=s, classes=[0, 1, 2]).image for s in (6, 7, 8)]
    return np.stack(images + [make_image(SIZE, seed=3, n_objects=0).image])


def _old_found(images, spec, method, regions):
    """'Every class found' as it was built before the job: one explain per class, then the
    hottest class that counts per pixel, and the regions of the classes with a positive logit."""
    per_class = [ng.explain(images, spec, method, k, device="cpu") for k in range(3)]
    kept = np.stack([e.scores > 0 for e in per_class], -1)
    shown = np.max([e.heatmaps * kept[:, k, None, None] for k, e in enumerate(per_class)], 0)
    found = []
    for k, e in enumerate(per_class):
        found += [r for r in ng.find_regions(e.heatmaps, class_ids=e.class_ids, scores=e.scores,
                                             **regions) if r.score > 0]
    found.sort(key=lambda r: (r.index, r.class_id))
    return shown, found


def _boxes(regions):
    return [(r.index, r.class_id, r.bbox, r.area) for r in regions]


def test_found_equals_each_class_explained_separately(spec, stack):
    job = ExplainJob(spec, ["gradcam", "gradcam++"], "found", device="cpu", batch_size=4)
    res = job.run(stack)
    assert res.per_target["gradcam"].shape == (4, 3, SIZE, SIZE)
    assert res.class_ids.tolist() == [[0, 1, 2]] * 4
    for method in job.methods:
        shown, regions = _old_found(stack, spec, method, job.region_options)
        np.testing.assert_allclose(res.heatmaps[method], shown, atol=1e-5)
        if method == "gradcam":
            assert _boxes(res.regions) == _boxes(regions)
    assert res.kept[:3].any() and not res.kept[3].any()


def test_one_forward_per_method_per_batch(spec, stack):
    calls = []
    handle = spec.module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        job = ExplainJob(spec, ["gradcam", "hirescam"], "found", device="cpu", batch_size=2)
        job.run(stack)
    finally:
        handle.remove()
    # 2 batches x 2 methods (the demo model names its target layer: no probe forward)
    assert len(calls) == 2 * 2


def test_closing_the_generator_cancels_after_the_current_batch(spec, stack):
    calls = []
    handle = spec.module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        gen = ExplainJob(spec, "gradcam", device="cpu", batch_size=1).iter_run(stack)
        first = next(gen)
        gen.close()
    finally:
        handle.remove()
    assert (first.done, first.total) == (1, 4)
    assert len(calls) == 1  # the first batch; nothing after
    with pytest.raises(StopIteration):
        next(gen)


def test_rederive_equals_a_fresh_run(spec, stack):
    job = ExplainJob(spec, "gradcam", "found", device="cpu")
    res = job.run(stack)
    other = {"threshold": 0.3, "min_area": 40, "simplify": 2.0}
    fresh = ExplainJob(spec, "gradcam", "found", device="cpu", regions=other).run(stack)
    again = res.rederive(**other)
    assert _boxes(again.regions) == _boxes(fresh.regions) != _boxes(res.regions)
    assert again.rows == fresh.rows
    assert res.region_options["threshold"] == 0.5  # the original result is unchanged


def test_rows_for_images_with_nothing_found(spec, stack):
    res = ExplainJob(spec, "gradcam", "found", device="cpu").run(stack)
    last = [r for r in res.rows if r["index"] == [3]]
    best = float(res.scores[3].max())  # its best logit, and that class's probability
    assert last == [{"index": [3], "class": "", "class_id": -1, "score": best,
                     "probability": pytest.approx(1 / (1 + np.exp(-best))), "regions": 0}]
    first = [r for r in res.rows if r["index"] == [0]]
    assert [r["class"] for r in first] == [spec.class_names[k] for k in range(3)
                                           if res.kept[0, k]]
    assert sum(r["regions"] for r in res.rows) == len(res.regions)


def test_one_target_keeps_every_image(spec, stack):
    res = ExplainJob(spec, "gradcam", "disc", device="cpu").run(stack)
    assert res.heatmaps["gradcam"].shape == (4, SIZE, SIZE)
    np.testing.assert_array_equal(res.heatmaps["gradcam"], res.per_target["gradcam"][:, 0])
    assert [r["class"] for r in res.rows] == ["disc"] * 4 and res.kept.all()
    single = ExplainJob(spec, "gradcam", None, device="cpu").run(stack[0])
    assert single.heatmaps["gradcam"].shape == (SIZE, SIZE) and single.rows[0]["index"] == []


def test_mask_restricts_regions(spec, stack):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:, : SIZE // 2] = True
    free = ExplainJob(spec, "gradcam", "found", device="cpu").run(stack)
    masked = ExplainJob(spec, "gradcam", "found", device="cpu", mask=mask).run(stack)
    assert masked.regions and all(r.bbox[3] <= SIZE // 2 for r in masked.regions)
    assert any(r.bbox[3] > SIZE // 2 for r in free.regions)
    assert _boxes(free.rederive(mask=mask).regions) == _boxes(masked.regions)


def test_offset_shifts_indices(spec, stack):
    part = ExplainJob(spec, "gradcam", "found", device="cpu").run(stack[2:4], offset=(2,))
    whole = ExplainJob(spec, "gradcam", "found", device="cpu").run(stack)
    assert _boxes(part.regions) == [b for b in _boxes(whole.regions) if b[0][0] >= 2]
    assert [r["index"][0] for r in part.rows] == [r["index"][0] for r in whole.rows
                                                  if r["index"][0] >= 2]
    one = ExplainJob(spec, "gradcam", "found", device="cpu").run(stack[1], offset=(5, 1))
    assert {r.index for r in one.regions} == {(5, 1)}
    assert shift_index((3, 4), (10,)) == (13, 4) and shift_index((), (2, 3)) == (2, 3)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"methods": "gradkam"}, ValueError, "unknown CAM method 'gradkam'; choose one of"),
    ({"methods": []}, ValueError, "no method given"),
    ({"target": "zebra"}, ValueError, "no class 'zebra'; its classes are"),
    ({"target": 7}, ValueError, "class index 7 is out of range"),
    ({"device": "tpu"}, ValueError, "tpu"),
    ({"regions": {"threshold": -1}}, ValueError, "threshold"),
    ({"regions": {"mask": np.ones((2, 2))}}, ValueError, "pass the mask as mask="),
])
def test_bad_settings_say_what_to_change(spec, kwargs, error, words):
    with pytest.raises(error, match=words):
        ExplainJob(spec, **kwargs)


# ---- volumes and masks ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spec3d():
    """A 3D model whose Grad-CAM is the smoothed brightness (fixed weights, so the test does
    not depend on the random state other tests leave): bright blocks are its regions."""
    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.fill_(1 / 27)
        net[0].bias.zero_()
        net[4].weight.fill_(1.0)
        net[4].bias.zero_()
    return ng.load_model(net.eval(), class_names=["a", "b"])


def _blob_volumes():
    """Two 12 x 20 x 20 volumes with a bright cube each, at different places."""
    vols = np.zeros((2, 12, 20, 20), np.float32)
    vols[0, 2:6, 3:9, 4:10] = 1
    vols[1, 6:11, 10:17, 9:16] = 1
    return vols


def test_a_3d_model_gives_3d_regions_counted_per_volume(spec3d):
    vols = _blob_volumes()
    job = ExplainJob(spec3d, ("gradcam", "gradcampp"), None, device="cpu",
                     regions={"threshold": 0.3, "min_area": 1})
    res = job.run(vols)
    assert res.heatmaps["gradcam"].shape == vols.shape
    assert res.regions and all(r.ndim == 3 and len(r.index) == 1 for r in res.regions)
    for r in res.regions:  # the volume's own regions, from its own map
        again = ng.find_regions(res.per_target["gradcam"][r.index][0], 0.3, 1, ndim=3)
        assert r.bbox in [a.bbox for a in again]
    assert [row["regions"] for row in res.rows] == [
        sum(r.index == (i,) for r in res.regions) for i in range(2)]
    # one volume alone: the same regions, index ()
    alone = job.run(vols[1])
    assert [r.bbox for r in alone.regions] == [r.bbox for r in res.regions if r.index == (1,)]
    # plane-wise regions when asked: the plane follows the volume's index, rows still per volume
    flat = res.rederive(ndim=2)
    assert flat.regions and all(r.ndim == 2 and len(r.index) == 2 for r in flat.regions)
    assert [row["regions"] for row in flat.rows] == [
        sum(r.index[0] == i for r in flat.regions) for i in range(2)]
    shifted = ExplainJob(spec3d, "gradcam", None, device="cpu",
                         regions={"threshold": 0.3, "min_area": 1, "ndim": 2}).run(
        vols[1], offset=(4,))
    assert shifted.regions and {r.index[0] for r in shifted.regions} == {4}
    assert shifted.rows[0]["index"] == [4] and shifted.rows[0]["regions"] == len(shifted.regions)


def test_a_2d_model_on_a_volume_explains_plane_by_plane(spec):
    vol = np.stack([make_image(96, seed=s, classes=[1]).image for s in (1, 2, 3)])
    res = ExplainJob(spec, "gradcam", 1, device="cpu").run(vol)
    assert res.heatmaps["gradcam"].shape == vol.shape
    assert all(r.ndim == 2 for r in res.regions) and len(res.rows) == 3
    with pytest.raises(ValueError, match="explains 2D images"):
        ExplainJob(spec, "gradcam", 1, regions={"ndim": 3})


def test_mask_multiply_masks_the_heatmap_and_thresholds_inside(spec, stack):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:, : SIZE // 2] = True
    options = {"threshold": 0.6, "threshold_mode": "relative"}
    multiply = ExplainJob(spec, "gradcam", "found", device="cpu", mask=mask,
                          regions=options).run(stack)
    restrict = ExplainJob(spec, "gradcam", "found", device="cpu", mask=mask,
                          regions={**options, "mask_mode": "restrict"}).run(stack)
    heat = multiply.heatmaps["gradcam"]
    assert np.all(heat[..., SIZE // 2:] == 0)
    np.testing.assert_array_equal(heat[..., : SIZE // 2],
                                  restrict.heatmaps["gradcam"][..., : SIZE // 2])
    assert np.any(restrict.heatmaps["gradcam"][..., SIZE // 2:] > 0)
    for res in (multiply, restrict):
        assert all(r.bbox[3] <= SIZE // 2 for r in res.regions)
    # the relative threshold: of the hottest pixel inside the mask, or of the whole map
    for r in multiply.regions:
        inside = multiply.per_target["gradcam"][r.index][r.class_id][:, : SIZE // 2]
        assert r.threshold == pytest.approx(0.6 * inside.max(), rel=1e-6)
    # rederive switches modes without the model
    again = restrict.rederive(mask_mode="multiply")
    np.testing.assert_array_equal(again.heatmaps["gradcam"], heat)
    assert _boxes(again.regions) == _boxes(multiply.regions)
    assert np.array_equal(restrict.rederive(mask=None).heatmaps["gradcam"],
                          ExplainJob(spec, "gradcam", "found", device="cpu").run(
                              stack).heatmaps["gradcam"])


def test_3d_regions_of_every_class_found_get_one_label_each(spec3d):
    """Each class's map numbers its regions from 1; a volume's label map and boxes need one id
    per region across classes."""
    vols = _blob_volumes()
    res = ExplainJob(spec3d, "gradcam", "found", device="cpu",
                     regions={"threshold": 0.3, "min_area": 1}).run(vols)
    for v in range(2):
        mine = [r for r in res.regions if r.index == (v,)]
        assert len({r.class_id for r in mine}) == 2  # both classes: same map, same blobs
        assert [r.label for r in mine] == list(range(1, len(mine) + 1))
    labels = ng.label_image([r for r in res.regions if r.index == (1,)], vols.shape[1:])
    last = [r for r in res.regions if r.index == (1,)][-1]
    z0, r0, c0, z1, r1, c1 = last.bbox
    where = np.argwhere(labels == last.label)
    assert where.min(0).tolist() == [z0, r0, c0] and (where.max(0) + 1).tolist() == [z1, r1, c1]


def test_a_volume_mask_with_plane_wise_regions_of_several_volumes(spec3d):
    vols = _blob_volumes()
    mask = np.zeros(vols.shape[1:], bool)
    mask[:, :, :12] = True
    res = ExplainJob(spec3d, "gradcam", None, device="cpu", mask=mask,
                     regions={"threshold": 0.3, "min_area": 1, "ndim": 2}).run(vols)
    assert res.regions and all(r.bbox[3] <= 12 for r in res.regions)
    assert {r.index[0] for r in res.regions} == {0, 1}
    assert _boxes(res.rederive(ndim=3).regions) == _boxes(
        ExplainJob(spec3d, "gradcam", None, device="cpu", mask=mask,
                   regions={"threshold": 0.3, "min_area": 1}).run(vols).regions)


# ---- probabilities -----------------------------------------------------------------------------

def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def _softmax_spec(spec):
    """The demo model read as a softmax head (one class per image)."""
    return copy_with(spec, output="softmax")


def test_probabilities_follow_the_head(spec):
    from napari_gradcam.job import probabilities

    logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(probabilities(spec, logits), _sigmoid(logits), rtol=1e-6)
    soft = probabilities(_softmax_spec(spec), logits)
    e = np.exp(logits)
    np.testing.assert_allclose(soft, e / e.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(soft.sum(-1), 1, rtol=1e-6)
    # no "output": one channel is multi-label (a sigmoid), several a softmax
    unsaid = copy_with(spec, output=None)
    np.testing.assert_allclose(probabilities(unsaid, [[3.0]]), _sigmoid([[3.0]]), rtol=1e-6)
    np.testing.assert_allclose(probabilities(unsaid, [[3.0, 3.0]]), [[0.5, 0.5]], rtol=1e-6)
    # huge logits stay finite
    assert np.isfinite(probabilities(_softmax_spec(spec), [[1e4, -1e4, 0.0]])).all()


def copy_with(spec, **changes):
    import copy

    out = copy.copy(spec)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def test_the_bundled_demo_is_multilabel(spec):
    assert spec.output == "multilabel"
    assert ng.load_model("demo3d").output == "multilabel"


def test_rows_carry_the_probability_beside_the_logit(spec, stack):
    found = ExplainJob(spec, "gradcam", "found", device="cpu", batch_size=2).run(stack)
    for r in found.rows:
        if r["class_id"] >= 0:
            assert r["probability"] == pytest.approx(_sigmoid(r["score"]), rel=1e-5)
            assert r["probability"] > 0.5  # found: a positive logit
    nothing = [r for r in found.rows if r["class_id"] < 0]
    assert nothing and all(0 <= r["probability"] <= 0.5 for r in nothing)
    # one target, batches of two: every image's own probability
    one = ExplainJob(spec, "gradcam", None, device="cpu", batch_size=2).run(stack)
    assert len(one.rows) == len(stack)
    for r in one.rows:
        assert r["probability"] == pytest.approx(_sigmoid(r["score"]), rel=1e-5)
    # rederive keeps them
    again = one.rederive(threshold=0.7)
    assert [r["probability"] for r in again.rows] == [r["probability"] for r in one.rows]


def test_a_softmax_head_gets_a_softmax_over_every_class(spec, stack):
    soft = _softmax_spec(spec)
    every = ExplainJob(soft, "gradcam", "found", device="cpu").run(stack)
    expected = np.exp(every.scores.astype(np.float64))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(every.probabilities, expected, rtol=1e-4)
    # one target: the job keeps only the explained class's logit, yet the probability is the
    # same softmax over every class (seen in the same forward)
    for target in (None, 2):
        one = ExplainJob(soft, ["gradcam", "gradcam++"], target, device="cpu",
                         batch_size=3).run(stack)
        for i, r in enumerate(one.rows):
            assert r["probability"] == pytest.approx(expected[i, r["class_id"]], rel=1e-4)


def test_probability_costs_no_extra_forward(spec, stack):
    calls = []
    handle = spec.module.register_forward_hook(lambda *a: calls.append(1))
    try:
        ExplainJob(_softmax_spec(spec), ["gradcam", "gradcam++"], None, device="cpu",
                   batch_size=len(stack)).run(stack)
    finally:
        handle.remove()
    assert len(calls) == 2  # one per method


def test_logits_of_retried_parts_give_no_probability_rather_than_a_wrong_one():
    from napari_gradcam.job import _captured

    a, b = np.zeros((4, 3)), np.ones((2, 3))
    np.testing.assert_array_equal(_captured([a], 4), a)
    # a static-batch model's last part is padded with copies: cut back to the images
    np.testing.assert_array_equal(_captured([b, np.full((2, 3), 2.0)], 3),
                                  np.concatenate([b, np.full((1, 3), 2.0)]))
    # a part that ran out of memory (4 rows) was kept before its halves were retried
    assert _captured([a, b, b], 4) is None
    assert _captured([b], 4) is None and _captured([], 2) is None


def test_segmentation_rows_have_no_probability():
    from test_job_segmentation import _image, _spec

    res = ExplainJob(_spec(), "gradcam", "found", device="cpu").run(_image())
    assert res.rows and all("probability" not in r for r in res.rows)
    assert np.isnan(res.probabilities).all()


def test_regions_of_each_method_follow_that_methods_heatmap():
    """Every method's regions come from its own maps with the first method's options."""
    spec = ng.load_model("demo")
    image = make_image(128, seed=6, classes=[0, 1, 2]).image
    result = ExplainJob(spec, ["gradcam", "eigencam"], regions={"threshold": 0.6}).run(image)
    assert result.regions_of("gradcam") is result.regions
    eigen = result.regions_of("eigencam")
    again = ExplainJob(spec, ["eigencam"], regions={"threshold": 0.6}).run(image)
    assert [r.bbox for r in eigen] == [r.bbox for r in again.regions]
    with pytest.raises(ValueError, match="was not run"):
        result.regions_of("scorecam")
