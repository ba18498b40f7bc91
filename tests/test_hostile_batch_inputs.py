"""The batch run against hostile inputs and options: NaN/inf pixels, weights and outputs,
options that make no sense (refused before any model loads), unreadable and linked folders,
multi-series TIFFs, corrupt masks, and images or models too large for the memory there is."""

import csv
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import napari_gradcam as ng
from napari_gradcam import memory
from napari_gradcam.batch import Options, collect_units, process_units, write_summary
from napari_gradcam.batch import read as batch_read
from napari_gradcam.cli import main
from napari_gradcam.models import ModelSpec
from napari_gradcam.models.demo.synthetic import make_image

tifffile = pytest.importorskip("tifffile")
iio = pytest.importorskip("imageio.v3")


def summary(out: Path) -> dict:
    with open(out / "summary.csv", newline="") as f:
        return {Path(r["file"]).name: r for r in csv.DictReader(f)}


def png(path: Path, seed: int = 0, size: int = 96) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, (make_image(size, seed=seed).image * 255).astype(np.uint8))
    return path


def assert_strict_json_everywhere(out: Path) -> None:
    """Every JSON file parses without NaN/Infinity constants; every score in the summary is
    finite."""
    def refuse(token):
        raise AssertionError(f"bare {token} in JSON")

    files = [p for p in out.rglob("*") if p.suffix in (".json", ".geojson")]
    assert files
    for p in files:
        json.loads(p.read_text(), parse_constant=refuse)
    with open(out / "summary.csv", newline="") as f:
        for row in csv.DictReader(f):
            assert row["score"] == "" or math.isfinite(float(row["score"]))


# ---- NaN / inf --------------------------------------------------------------------------------

def test_nan_pixels_fail_that_image_and_the_others_finish(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = make_image(96, seed=1).image.astype(np.float32)
    tifffile.imwrite(folder / "good.tif", good)
    bad = good.copy()
    bad[3, 4], bad[10, 10], bad[20, 5] = np.nan, np.inf, -np.inf
    tifffile.imwrite(folder / "bad.tif", bad)
    huge = good.astype(np.float64)
    huge[0, :2] = 1e300  # finite, but inf once the model reads it as float32
    tifffile.imwrite(folder / "huge.tif", huge)
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--quiet"]) == 1
    rows = summary(out)
    assert rows["good.tif"]["status"] == "ok"
    assert rows["bad.tif"]["status"] == "failed"
    assert "pixels contain NaN/inf at 3 positions" in rows["bad.tif"]["message"]
    assert "pixels exceed float32's range (about 3.4e38) at 2 positions" in \
        rows["huge.tif"]["message"]
    assert_strict_json_everywhere(out)


def _nan_weight_model(tmp_path) -> Path:
    from conftest import small_cnn
    from safetensors.torch import save_file

    net = small_cnn(in_ch=1, classes=3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["2.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    return path


def test_nan_weights_fail_every_image_naming_the_weights(tmp_path, caplog):
    from conftest import small_cnn

    spec = ng.load_model(small_cnn(in_ch=1, classes=3), weights=_nan_weight_model(tmp_path),
                         class_names=["a", "b", "c"], in_channels=1)
    units = collect_units([png(tmp_path / "in" / f"i{k}.png", k) for k in range(3)])
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="napari_gradcam"):
        records = process_units(units, spec, out, Options(device="cpu"))
    write_summary(records, out, spec.class_names)
    assert [r.status for r in records] == ["failed"] * 3
    assert all("the model's output is NaN/inf for it: check the weights (and mean/std)"
               in r.message for r in records)
    assert "NaN/inf weights in 2.weight (1)" in caplog.text  # where it came from
    assert_strict_json_everywhere(out)


class _NanForBright(torch.nn.Module):
    """A small CNN whose logits are NaN for images brighter than 0.5 on average (log of a
    negative number): the model, not the pixels, makes the NaN, and only for some images."""

    def __init__(self):
        super().__init__()
        from conftest import small_cnn

        self.net = small_cnn(in_ch=1, classes=2)

    def forward(self, x):
        return self.net(x) + torch.log(0.5 - x.mean(dim=(1, 2, 3)))[:, None]


def test_nan_output_fails_those_images_the_rest_of_the_batch_succeeds(tmp_path):
    spec = ModelSpec(_NanForBright().eval(), ["a", "b"], in_channels=1)
    folder = tmp_path / "in"
    folder.mkdir()
    for k, level in enumerate([0.1, 0.9, 0.2, 0.8]):
        img = np.full((32, 32), level, np.float32)
        img[8:16, 8:16] = 0.3
        tifffile.imwrite(folder / f"img{k}.tif", img)
    stack = np.stack([np.full((32, 32), v, np.float32) for v in (0.1, 0.9, 0.2)])
    tifffile.imwrite(folder / "stack.tif", stack, photometric="minisblack")
    out = tmp_path / "out"
    records = process_units(collect_units([folder]), spec, out,
                            Options(device="cpu", batch_size=8))
    write_summary(records, out, spec.class_names)
    status = {Path(r.source).name: r for r in records}
    assert {n for n, r in status.items() if r.status == "ok"} == {"img0.tif", "img2.tif"}
    assert "NaN/inf for it: check the weights" in status["img1.tif"].message
    assert "NaN/inf for it (image 1 of 3)" in status["stack.tif"].message
    assert_strict_json_everywhere(out)


def test_nan_mean_in_a_spec_is_named(tmp_path, caplog):
    from conftest import small_cnn

    spec = ModelSpec(small_cnn(in_ch=1, classes=2), ["a", "b"], in_channels=1,
                     mean=(float("nan"),))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="napari_gradcam"):
        records = process_units(collect_units([png(tmp_path / "a.png")]), spec, out,
                                Options(device="cpu"))
    assert records[0].status == "failed" and "check the weights (and mean/std)" in \
        records[0].message
    assert "non-finite mean (nan,)" in caplog.text


# ---- options ----------------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--threshold", "1.5"], "--threshold '1.5': give a number in [0, 1]"),
    (["--threshold", "nan"], "--threshold 'nan'"),
    (["--threshold", "-0.1"], "--threshold '-0.1'"),
    (["--threshold", "high"], "--threshold 'high'"),
    (["--min-area", "-1"], "--min-area '-1': give a whole number of pixels >= 0"),
    (["--min-area", "2.5"], "--min-area '2.5'"),
    (["--simplify", "nan"], "--simplify 'nan': give a tolerance in pixels >= 0"),
    (["--simplify", "-1"], "--simplify '-1'"),
    (["--simplify", "inf"], "--simplify 'inf'"),
    (["--part-size", "0"], "--part-size '0': give a whole number of images per unit >= 1"),
    (["--batch-size", "0"], "--batch-size '0'"),
    (["--batch-size", "many"], "--batch-size 'many'"),
    (["--workers", "0"], "--workers '0': give a whole number of threads >= 1"),
    (["--dask-local", "0"], "--dask-local '0'"),
    (["--device", "gpu7"], "--device 'gpu7'"),
    (["--mask", "{dir.__class__}"], "unknown field {dir.__class__}"),
    (["--mask", "{name[0]}.png"], "unknown field {name[0]}"),
    (["--mask", "{dir}/{label}_{id}.png"], "unknown fields {label}, {id}; the pattern may"),
    (["--mask", "{}.png"], "unknown field {}"),
    (["--mask", "{name!r}"], "{name!r} has a conversion or format spec"),
    (["--mask", "{stem:>{dir}}"], "has a conversion or format spec"),
    (["--mask", "{dir}/{name"], "literal brace"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[" ".join(b[0]) for b in BAD_OPTIONS])
def test_a_bad_option_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch,
                                                         extra, message):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("napari_gradcam.models.load_model", no_model)
    image = png(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["batch", str(image), "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"napari-gradcam: error: {extra[0]} ")
    assert message in err
    assert not out.exists()


def test_the_library_refuses_a_mask_pattern_that_reads_attributes(tmp_path):
    image = png(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"mask pattern '\{dir.__class__\}': unknown field"):
        collect_units([image], mask="{dir.__class__}")
    (tmp_path / "masks").mkdir()
    units = collect_units([image], mask="{dir}/masks/{stem}_m{{1}}.png")
    assert units[0].mask == str(tmp_path / "masks" / "a_m{1}.png")


def test_good_options_as_numbers_still_run(tmp_path):
    image = png(tmp_path / "a.png", size=96)
    out = tmp_path / "out"
    assert main(["batch", str(image), "--out", str(out), "--quiet", "--threshold", "otsu",
                 "--min-area", "4.0", "--simplify", "0", "--part-size", "2", "--batch-size",
                 "3", "--workers", "1"]) == 0
    assert summary(out)["a.png"]["status"] == "ok"


# ---- folders, TIFF series, masks ---------------------------------------------------------------

def test_an_unreadable_subfolder_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    png(folder / "a.png", 1)
    png(folder / "locked" / "b.png", 2)
    png(folder / "z" / "c.png", 3)
    locked = str(folder / "locked")
    real = os.scandir

    def scandir(path="."):  # what chmod 000 does for a user other than root
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--quiet"]) == 1
    rows = summary(out)
    assert rows["a.png"]["status"] == rows["c.png"]["status"] == "ok"
    assert rows["locked"]["status"] == "failed"
    assert "can't read this folder (PermissionError: Permission denied); give read access" in \
        rows["locked"]["message"]
    # an input folder that can't be listed at all: one failed row beside the other inputs
    out = tmp_path / "out2"
    assert main(["batch", locked, str(folder / "a.png"), "--out", str(out), "--quiet"]) == 1
    rows = summary(out)
    assert rows["a.png"]["status"] == "ok" and rows["locked"]["status"] == "failed"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_a_chmod_000_subfolder_is_reported(tmp_path):
    folder = tmp_path / "in"
    png(folder / "a.png", 1)
    png(folder / "locked" / "b.png", 2)
    (folder / "locked").chmod(0)
    try:
        out = tmp_path / "out"
        assert main(["batch", str(folder), "--out", str(out), "--quiet"]) == 1
        assert "can't read this folder" in summary(out)["locked"]["message"]
    finally:
        (folder / "locked").chmod(0o755)


def test_linked_folders_are_followed_and_a_loop_is_searched_once(tmp_path, caplog):
    folder = tmp_path / "in"
    png(folder / "a.png", 1)
    png(tmp_path / "elsewhere" / "b.png", 2)
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "sub").mkdir()
    png(folder / "sub" / "c.png", 3)
    (folder / "sub" / "back").symlink_to(folder, target_is_directory=True)  # a loop
    with caplog.at_level(logging.WARNING, logger="napari_gradcam"):
        units = collect_units([folder])
    assert sorted(Path(u.path).relative_to(folder).as_posix() for u in units) == [
        "a.png", "linked/b.png", "sub/c.png"]
    assert "leads to a folder already searched" in caplog.text
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--quiet"]) == 0
    assert sorted(summary(out)) == ["a.png", "b.png", "c.png"]


def test_a_multi_series_tiff_explains_the_first_and_says_the_rest_are_skipped(tmp_path,
                                                                              caplog):
    path = tmp_path / "multi.tif"
    tifffile.imwrite(path, (make_image(96, seed=2).image * 255).astype(np.uint8))
    tifffile.imwrite(path, np.zeros((16, 24, 3), np.uint8), append=True)
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16), append=True)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="napari_gradcam"):
        assert main(["batch", str(path), "--out", str(out), "--quiet"]) == 0
    row = summary(out)["multi.tif"]
    assert row["status"] == "ok"
    for text in (row["message"], caplog.text):
        assert "3 image series; only series 0 (96 x 96 uint8) is explained and series 1 " \
               "(16 x 24 x 3 uint8), 2 (8 x 8 uint16) are skipped" in text
    assert tifffile.imread(out / "heatmaps" / "multi.tif").shape == (96, 96)


def test_a_corrupt_mask_says_it_cannot_be_read_not_install_pyav(tmp_path):
    image = png(tmp_path / "img" / "a.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    out = tmp_path / "out"
    assert main(["batch", str(image), "--out", str(out), "--quiet", "--mask",
                 str(tmp_path / "masks" / "{name}")]) == 1
    message = summary(out)["a.png"]["message"]
    assert "its mask" in message and "can't be read as an image" in message
    assert "pyav" not in message and "pip install" not in message


# ---- memory -----------------------------------------------------------------------------------

def test_a_huge_tiff_is_refused_from_its_header_with_the_numbers(tmp_path, monkeypatch):
    big = tmp_path / "in" / "huge.tif"
    big.parent.mkdir()
    # a sparse file: the header says 20000 x 20000 x 3, nothing is written or decoded
    mm = tifffile.memmap(big, shape=(20000, 20000, 3), dtype=np.uint8, photometric="rgb")
    del mm
    png(tmp_path / "in" / "small.png", 1)
    monkeypatch.setattr(memory, "available_host_memory", lambda: 8 * 10**9)
    decoded = []
    real = batch_read.read_unit
    monkeypatch.setattr(batch_read, "read_unit", lambda unit, *a, **k: decoded.append(unit.path) or
                        real(unit, *a, **k))
    out = tmp_path / "out"
    # --tile none: explained whole (by default an image too large for memory is tiled)
    assert main(["batch", str(tmp_path / "in"), "--out", str(out), "--quiet",
                 "--device", "cpu", "--tile", "none"]) == 1
    rows = summary(out)
    assert rows["small.png"]["status"] == "ok"
    message = rows["huge.tif"]["message"]
    assert "needs about" in message and "20000 x 20000 x 3 uint8 decoded: 1.2 GB" in message
    assert "8.0 GB is available; downscale it or cut it into tiles" in message
    assert str(big) not in decoded  # refused before decoding


def test_a_normal_image_is_refused_when_memory_is_short(tmp_path, monkeypatch):
    image = png(tmp_path / "a.png", size=128)
    monkeypatch.setattr(memory, "available_host_memory", lambda: 10**6)
    out = tmp_path / "out"
    assert main(["batch", str(image), "--out", str(out), "--quiet", "--device", "cpu"]) == 1
    message = summary(out)["a.png"]["message"]
    assert "128 x 128 uint8 decoded: 16 kB" in message and "1 MB is available" in message


def test_a_huge_model_input_size_is_refused_per_image(tmp_path, monkeypatch):
    demo = ng.load_model("demo")
    spec = ModelSpec(demo.module, list(demo.class_names), demo.in_channels, (16384, 16384),
                     demo.mean, demo.std, demo.target_layer, demo.intensity, "huge-input")
    monkeypatch.setattr(memory, "available_host_memory", lambda: 16 * 10**9)
    images = [png(tmp_path / f"{k}.png", k) for k in range(2)]
    records = process_units(collect_units(images), spec, tmp_path / "out", Options(device="cpu"))
    assert [r.status for r in records] == ["failed", "failed"]
    for r in records:
        assert "model input and activations at 16384 x 16384: 36.5 GB" in r.message
        assert "16.0 GB is available; use a model with a smaller input_size" in r.message


def test_the_estimate_fits_ordinary_images_and_counts_the_gpu_apart():
    from napari_gradcam.explain_arrays import layout

    lay = layout((512, 512, 3))
    need = memory.estimate((512, 512, 3), np.uint8, lay, 3)
    assert need.total < 100e6  # an ordinary image fits anywhere
    assert memory.refusal(need, 10**9) is None
    big = memory.estimate((1, 3, 16384, 16384), np.float32, layout((1, 3, 16384, 16384),
                                                                   channel_axis=1), 3)
    # on a GPU the model's part is compared with the GPU's free memory, the rest with the host's
    text = memory.refusal(big, host=10**12, device=8 * 10**9, device_name="GPU: test")
    assert "of GPU memory for the model at 16384 x 16384" in text and "GPU: test has 8.0 GB " \
        "free" in text and "--device cpu" in text
    assert memory.available_host_memory() > 0


def test_image_headers_are_read_without_decoding(tmp_path):
    iio.imwrite(tmp_path / "g.png", np.zeros((30, 40), np.uint8))
    iio.imwrite(tmp_path / "c.png", np.zeros((30, 40, 3), np.uint8))
    iio.imwrite(tmp_path / "d.png", np.zeros((30, 40), np.uint16))
    iio.imwrite(tmp_path / "c.jpg", np.zeros((30, 40, 3), np.uint8))
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((5, 30, 40), np.uint16))
    assert memory.image_header(tmp_path / "g.png") == ((30, 40), np.dtype(np.uint8))
    assert memory.image_header(tmp_path / "c.png") == ((30, 40, 3), np.dtype(np.uint8))
    assert memory.image_header(tmp_path / "d.png") == ((30, 40), np.dtype(np.uint16))
    assert memory.image_header(tmp_path / "c.jpg") == ((30, 40, 3), np.dtype(np.uint8))
    assert memory.image_header(tmp_path / "s.tif") == ((5, 30, 40), np.dtype(np.uint16))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert memory.image_header(tmp_path / "junk.png") is None


# ---- the model's channels ---------------------------------------------------------------------

def test_a_small_last_axis_equal_to_the_models_channels_is_channels_not_width(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                 torch.nn.Linear(8, 3))
    spec = ng.load_model(module, class_names=["a", "b", "c"])
    assert spec.in_channels == 2
    image = np.random.default_rng(0).random((64, 64, 2), dtype=np.float32)
    tifffile.imwrite(tmp_path / "two.tif", image)
    out = tmp_path / "out"
    units = collect_units([tmp_path / "two.tif"], in_channels=spec.in_channels)
    records = process_units(units, spec, out, Options(device="cpu"))
    assert [r.status for r in records] == ["ok"], records[0].message
    assert records[0].image_count == 1 and list(records[0].shape) == [64, 64]
    heat = tifffile.imread(out / "heatmaps" / "two.tif")
    want = ng.explain(image, spec, device="cpu").heatmaps
    assert heat.shape == want.shape == (64, 64)
    np.testing.assert_allclose(heat, want, atol=1e-5)

    # read in parts (a zarr stack): the heatmap array is shaped as the reader sees the axes
    zarr = pytest.importorskip("zarr")
    stack = np.stack([image, image[::-1]])
    zarr.open(str(tmp_path / "s.zarr"), mode="w", shape=stack.shape, dtype="f4")[:] = stack
    units = collect_units([tmp_path / "s.zarr"], in_channels=spec.in_channels)
    assert [(u.kind, u.start, u.stop) for u in units] == [("parts", 0, 2)]
    records = process_units(units, spec, tmp_path / "out2", Options(device="cpu"))
    assert [r.status for r in records] == ["ok"], records[0].message
    heat = zarr.open(str(tmp_path / "out2" / "heatmaps" / "s.zarr"), mode="r")[:]
    np.testing.assert_allclose(heat, ng.explain(stack, spec, device="cpu").heatmaps, atol=1e-5)


def test_mask_files_beside_the_images_are_not_inputs(tmp_path):
    """--mask '{dir}/{stem}_mask.png' over a folder holding a.png and a_mask.png: the mask is
    a's, not an image of its own (the same for --target-mask); named on the command line it
    is still an input."""
    png(tmp_path / "a.png", seed=1)
    png(tmp_path / "a_mask.png", seed=2)
    pattern = "{dir}/{stem}_mask.png"
    assert [u.name for u in collect_units([tmp_path])] == ["a", "a_mask"]
    for kw in ({"mask": pattern}, {"target_mask": pattern}):
        units = collect_units([tmp_path], **kw)
        assert [u.name for u in units] == ["a"]
    named = collect_units([tmp_path / "a.png", tmp_path / "a_mask.png"], mask=pattern)
    assert [u.name for u in named] == ["a", "a_mask"]
