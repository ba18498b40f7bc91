"""explain(): arrays of any layout in batches, preprocessing numbers, lazy reads, OOM back-off."""


import numpy as np
import pytest
import torch
from conftest import small_cnn

import napari_gradcam as ng
from napari_gradcam.explain_arrays import layout, preprocess
from napari_gradcam.models import ModelSpec

# The package re-exports the function explain(), which hides the module of the same name as an
# attribute; the module itself is the one in sys.modules.
import napari_gradcam.explain_arrays as batch_mod


def spec_for(module, in_channels=1, **kw):
    return ModelSpec(module, ["a", "b", "c"], in_channels, **kw)


def direct(module, images_nchw, method="gradcam", targets=None):
    res = ng.explain_batch(module, torch.as_tensor(images_nchw, dtype=torch.float32), method,
                           targets=targets)
    return res.heatmaps.numpy(), res.class_ids.numpy(), res.scores.numpy()


@pytest.fixture
def stack():
    return np.random.default_rng(0).random((2, 3, 24, 20), dtype=np.float32)


@pytest.mark.parametrize("batch_size", [None, 1, 4, 6])
def test_stack_equals_explaining_each_image(stack, batch_size):
    module = small_cnn()
    exp = ng.explain(stack, spec_for(module), batch_size=batch_size)
    assert exp.heatmaps.shape == (2, 3, 24, 20) and exp.heatmaps.dtype == np.float32
    assert exp.class_ids.shape == (2, 3) and exp.scores.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            h, c, s = direct(module, stack[i, j][None, None])
            np.testing.assert_allclose(exp.heatmaps[i, j], h[0], atol=1e-5)
            assert exp.class_ids[i, j] == c[0]
            np.testing.assert_allclose(exp.scores[i, j], s[0], rtol=1e-5)
    assert exp.method == "gradcam" and exp.class_names == ["a", "b", "c"]
    assert exp.target_layer  # the automatic choice is reported


def test_single_image_has_scalar_leading_shape():
    img = np.random.default_rng(1).random((32, 32), dtype=np.float32)
    exp = ng.explain(img, spec_for(small_cnn()), method="cam")
    assert exp.heatmaps.shape == (32, 32) and exp.class_ids.shape == () and exp.scores.shape == ()


def test_target_by_name_and_index_and_errors(stack):
    spec = spec_for(small_cnn())
    by_name = ng.explain(stack, spec, target="b")
    by_index = ng.explain(stack, spec, target=1)
    assert (by_name.class_ids == 1).all()
    np.testing.assert_array_equal(by_name.heatmaps, by_index.heatmaps)
    assert ng.explain(stack, spec, target="B").class_ids.flat[0] == 1  # case-insensitive
    with pytest.raises(ValueError, match="no class 'zebra'.*'a', 'b', 'c'"):
        ng.explain(stack, spec, target="zebra")
    with pytest.raises(ValueError, match="out of range"):
        ng.explain(stack, spec, target=3)


def test_uint_images_are_scaled_by_their_dtype_range():
    rng = np.random.default_rng(2)
    f = rng.random((2, 32, 32), dtype=np.float32)
    module = small_cnn()
    ref = ng.explain(f, spec_for(module))
    u16 = np.round(f * 65535).astype(np.uint16)
    u8 = np.round(f * 255).astype(np.uint8)
    for img, tol in ((u16, 1e-3), (u8, 0.05)):
        got = ng.explain(img, spec_for(module))
        np.testing.assert_allclose(got.heatmaps, ref.heatmaps, atol=tol)


def test_preprocess_numbers():
    raw = np.array([[[[0], [128]], [[255], [64]]]], np.uint8)  # (1, 2, 2, 1)
    spec = spec_for(small_cnn(in_ch=3), 3, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    x = preprocess(raw, spec, torch.device("cpu"))
    assert x.shape == (1, 3, 2, 2)
    v = raw[0, ..., 0] / 255.0
    np.testing.assert_allclose(x[0, 0].numpy(), (v - 0.5) / 0.5, atol=1e-6)
    np.testing.assert_allclose(x[0, 1].numpy(), (v - 0.25) / 0.25, atol=1e-6)
    np.testing.assert_allclose(x[0, 2].numpy(), v, atol=1e-6)
    # per-image min-max
    spec.intensity = "minmax"
    x = preprocess(raw.astype(np.float32) * 3 + 7, spec, torch.device("cpu"))
    np.testing.assert_allclose(x[0, 2].numpy(), (raw[0, ..., 0] - 0) / 255.0, atol=1e-6)
    spec.intensity = "sideways"
    with pytest.raises(ValueError, match="intensity"):
        preprocess(raw, spec, torch.device("cpu"))


def test_channel_adaptation():
    rng = np.random.default_rng(3)
    grey = rng.random((2, 28, 28), dtype=np.float32)
    one = small_cnn(in_ch=1)
    three = small_cnn(in_ch=3)
    ref1 = ng.explain(grey, spec_for(one)).heatmaps
    # grey stored as RGB feeds a 1-channel model
    rgb_grey = np.repeat(grey[..., None], 3, -1)
    np.testing.assert_allclose(ng.explain(rgb_grey, spec_for(one)).heatmaps, ref1, atol=1e-6)
    # grey feeds a 3-channel model by repetition
    ref3 = ng.explain(rgb_grey, spec_for(three, 3)).heatmaps
    np.testing.assert_allclose(ng.explain(grey, spec_for(three, 3)).heatmaps, ref3, atol=1e-6)
    # RGBA loses alpha
    rgba = np.concatenate([rgb_grey, rng.random((2, 28, 28, 1), dtype=np.float32)], -1)
    np.testing.assert_allclose(ng.explain(rgba, spec_for(three, 3)).heatmaps, ref3, atol=1e-6)
    # channel axis first, named explicitly
    chw = np.moveaxis(rgb_grey, -1, 1)
    np.testing.assert_allclose(ng.explain(chw, spec_for(three, 3), channel_axis=1).heatmaps,
                               ref3, atol=1e-6)
    # errors that say what to do
    with pytest.raises(ValueError, match="RGBA.*convert it to greyscale"):
        ng.explain(rgba, spec_for(one))
    colour = rng.random((28, 28, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="colour RGB.*greyscale"):
        ng.explain(colour, spec_for(one))
    with pytest.raises(ValueError, match="2-channel"):
        ng.explain(rng.random((2, 28, 28), dtype=np.float32), spec_for(three, 3), channel_axis=0)


def test_layout_guess_and_errors():
    assert layout((5, 64, 64)).channel_axis is None
    assert layout((64, 64, 3)).channel_axis == 2
    assert layout((64, 64, 3), channel_axis=False).lead == (64,)
    assert layout((2, 8, 64, 64), channel_axis=1).lead == (2,)
    with pytest.raises(ValueError, match="empty"):
        layout((0, 64, 64))
    with pytest.raises(ValueError, match="at least"):
        layout((64,))
    with pytest.raises(ValueError, match="channel_axis=5"):
        layout((4, 64, 64), channel_axis=5)


def test_input_size_resizes_and_maps_come_back_at_image_size():
    img = np.zeros((40, 60), np.float32)
    img[10:20, 40:50] = 1
    module = small_cnn()
    exp = ng.explain(img, spec_for(module, input_size=(32, 32)))
    assert exp.heatmaps.shape == (40, 60)
    x = preprocess(img[None, ..., None], spec_for(module, input_size=(32, 32)),
                   torch.device("cpu"))
    assert x.shape == (1, 1, 32, 32)
    h = direct(module, x.numpy())[0][0]
    back = torch.nn.functional.interpolate(torch.from_numpy(h)[None, None], size=(40, 60),
                                           mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(exp.heatmaps, back, atol=1e-5)


class LazyStack:
    """An array-like that refuses to be loaded whole and records every read."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    @property
    def ndim(self):
        return self.data.ndim

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole array was loaded")


def test_lazy_arrays_are_read_batch_by_batch(stack):
    module = small_cnn()
    lazy = LazyStack(stack)
    exp = ng.explain(lazy, spec_for(module), batch_size=2)
    ref = ng.explain(stack, spec_for(module))
    np.testing.assert_allclose(exp.heatmaps, ref.heatmaps, atol=1e-6)
    assert len(lazy.reads) == 4  # rows of 3 frames in batches of 2: [0:2] [2:3] [0:1] [1:3]


def test_dask_array_and_zarr_output(stack, tmp_path):
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    module = small_cnn()
    lazy = da.from_array(stack, chunks=(1, 1, 24, 20))
    out = zarr.open(str(tmp_path / "heat.zarr"), mode="w", shape=stack.shape, dtype="f4")
    exp = ng.explain(lazy, spec_for(module), batch_size=4, out=out)
    ref = ng.explain(stack, spec_for(module))
    assert exp.heatmaps is out
    np.testing.assert_allclose(out[:], ref.heatmaps, atol=1e-6)
    with pytest.raises(ValueError, match="out has shape"):
        ng.explain(stack, spec_for(module), out=np.zeros((2, 3), np.float32))


def test_out_of_memory_halves_the_batch_and_retries(stack, monkeypatch):
    module = small_cnn()
    real = batch_mod.explain_batch
    sizes = []

    def picky(module, batch, *a, **k):
        sizes.append(batch.shape[0])
        if batch.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(module, batch, *a, **k)

    monkeypatch.setattr(batch_mod, "explain_batch", picky)
    seen = []
    exp = ng.explain(stack, spec_for(module), batch_size=6, progress=seen.append)
    ref = ng.explain(stack, spec_for(module), batch_size=1)
    np.testing.assert_allclose(exp.heatmaps, ref.heatmaps, atol=1e-6)
    assert sizes[:8] == [6, 3] + [1] * 6  # halved until it fits, then kept small
    assert seen[-1].done == 6 and seen[-1].batch_size <= 2

    def hopeless(module, batch, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(batch_mod, "explain_batch", hopeless)
    with pytest.raises(MemoryError, match="single image.*device='cpu'"):
        ng.explain(stack, spec_for(module), batch_size=2)


def test_closing_the_generator_stops_at_the_next_batch(stack):
    calls = []
    module = small_cnn()
    module.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    gen = ng.iter_explain(stack, spec_for(module), batch_size=1)
    first = next(gen)
    assert first.done == 1 and first.total == 6
    before = len(calls)  # the explained batch (and the automatic layer search's probe)
    gen.close()
    assert len(calls) == before


def test_three_d_model_explains_volumes():
    module = small_cnn(dims=3)
    vols = np.random.default_rng(4).random((3, 8, 16, 16), dtype=np.float32)
    exp = ng.explain(vols, spec_for(module), method="gradcam++")
    assert exp.heatmaps.shape == (3, 8, 16, 16) and exp.class_ids.shape == (3,)
    h, c, _ = direct(module, vols[1][None, None], "gradcam++")
    np.testing.assert_allclose(exp.heatmaps[1], h[0], atol=1e-5)


def test_demo_model_explains_the_synthetic_stack():
    from napari_gradcam.models.demo.synthetic import make_stack

    stack, labels, objects = make_stack(6, 128, seed=11)
    exp = ng.explain(stack, ng.load_model("demo"), device="cpu")
    for i, objs in enumerate(objects):
        if not objs:
            continue
        assert labels[i][exp.class_ids[i]]  # the predicted class is in the image
        peak = np.unravel_index(exp.heatmaps[i].argmax(), exp.heatmaps[i].shape)
        assert any(o.box[0] - 2 <= peak[0] < o.box[2] + 2 and o.box[1] - 2 <= peak[1] < o.box[3] + 2
                   for o in objs if o.class_id == exp.class_ids[i])


def test_bad_arguments():
    spec = spec_for(small_cnn())
    img = np.zeros((16, 16), np.float32)
    with pytest.raises(ValueError, match="method"):
        ng.explain(img, spec, method="nocam")
    with pytest.raises(ValueError, match="batch_size"):
        ng.explain(img, spec, batch_size=0)
    with pytest.raises(TypeError, match="ModelSpec"):
        ng.explain(img, small_cnn())
    with pytest.raises(TypeError, match="dtype"):
        ng.explain(np.array([["a"] * 16] * 16), spec)
