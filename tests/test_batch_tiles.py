"""The batch command on slides and large images: explained in tiles at a chosen pyramid level,
heat written as an OME-Zarr pyramid on the slide's level-0 grid, GeoJSON in level-0 pixels,
an interrupted tiled run resumed, and clear failures for bad tiling, levels and files."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import napari_gradcam.batch as batch_pkg
from napari_gradcam import memory
from napari_gradcam.batch import Options, collect_units, run_settings
from napari_gradcam.batch import tiled as batch_tiled
from napari_gradcam.cli import main
from napari_gradcam.export import read_geojson
from napari_gradcam.job import ExplainJob
from napari_gradcam.models import load_model
from napari_gradcam.models.demo.synthetic import make_image
from napari_gradcam.pyramids import open_pyramid, write_heat_pyramid
from napari_gradcam.regions import scale_regions

tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")
iio = pytest.importorskip("imageio.v3")

TILING = ["--tile", "256", "--overlap", "32"]


def picture(size: int, seed: int = 0) -> np.ndarray:
    """A grey uint8 image of ``size`` pixels a side made of the demo's 128-pixel scenes, so
    the demo model finds objects of the size it knows in every tile."""
    n = size // 128
    rows = [np.hstack([make_image(128, seed=seed + r * n + c).image for c in range(n)])
            for r in range(n)]
    return (np.clip(np.vstack(rows), 0, 1) * 255).astype(np.uint8)


def write_slide(path: Path, size: int = 1024, levels: int = 3, seed: int = 0) -> np.ndarray:
    """A pyramidal OME-TIFF: level 0, then its reduced levels as SubIFDs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = picture(size, seed)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(image, subifds=levels - 1, tile=(128, 128), metadata={"axes": "YX"})
        for k in range(1, levels):
            tif.write(image[::2 ** k, ::2 ** k], subfiletype=1, tile=(128, 128))
    return image


def summary(out: Path) -> dict:
    with open(out / "summary.csv", newline="") as f:
        return {Path(r["file"]).name: r for r in csv.DictReader(f)}


def batch(*args, out: Path, extra=()) -> int:
    return main(["batch", *map(str, args), "--out", str(out), "--quiet", "--device", "cpu",
                 *extra])


def boxes(geojson: Path) -> list:
    """(class, rounded bounds) of every rectangle, sorted."""
    annotations, _meta = read_geojson(geojson)
    return sorted((a.properties.get("class"), tuple(round(v, 3) for v in a.geometry.bounds))
                  for a in annotations if a.kind == "rectangle")


def outlines(what) -> list:
    """(class id, polygon bounds rounded to 1e-3) of regions, or of a GeoJSON's polygons."""
    if isinstance(what, Path):
        annotations, _meta = read_geojson(what)
        items = [(a.properties["class_id"], a.geometry) for a in annotations
                 if a.kind == "polygon"]
    else:
        items = [(r.class_id, r.polygon) for r in what]
    return sorted((c, tuple(round(float(v), 3) for v in g.bounds)) for c, g in items)


def direct(array, tile=256, overlap=32, whole_slide=True, target=None):
    """The same job the command runs, on the same pixels, in memory."""
    job = ExplainJob(load_model("demo"), "gradcam", target, device="cpu", tile=tile,
                     overlap=overlap)
    return job.run(array, whole_slide=whole_slide)


# ---- a slide at a level -------------------------------------------------------------------

def test_a_slide_at_level_1_gives_a_heat_pyramid_on_level_0_and_level_0_geojson(
        tmp_path, monkeypatch):
    slide = tmp_path / "in" / "slide.ome.tif"
    write_slide(slide)
    out = tmp_path / "out"
    monkeypatch.setattr(batch_tiled, "OVERLAY_SIDE", 200)
    assert batch(slide, *TILING, "--level", "1", "--overlay", out=out) == 0
    heat_path = out / "heatmaps" / "slide.ome.zarr"
    group = zarr.open_group(str(heat_path), mode="r")
    datasets = group.attrs["multiscales"][0]["datasets"]
    assert len(datasets) >= 2  # level 0 of the heat and at least one reduced level
    for k, d in enumerate(datasets):  # on the slide's level-0 grid: level-1 downsample x 2^k
        assert d["coordinateTransformations"][0]["scale"] == [2.0 * 2 ** k, 2.0 * 2 ** k]
    heat = np.asarray(group["0"])
    assert heat.shape == (512, 512) and heat.dtype == np.float32
    with open_pyramid(slide) as pyr:
        ref = direct(pyr.level(1))
    np.testing.assert_allclose(heat, np.asarray(ref.heatmaps["gradcam"]), atol=1e-5)
    assert ref.regions, "the demo scenes hold objects: the job finds regions"
    # GeoJSON: the level-1 regions times the level's downsample, with the level recorded
    geo = out / "geojson" / "slide.geojson"
    want = outlines(scale_regions(ref.regions, 2.0))
    got = outlines(geo)
    assert got == want
    assert max(b for _c, bounds in got for b in bounds) > 512  # beyond level 1's own pixels
    doc = json.loads(geo.read_text())
    ours = doc["features"][0]["properties"]["napari_gradcam"]["features"]
    assert ours["level"] == 1 and ours["downsample"] == [2.0, 2.0]
    row = summary(out)["slide.ome.tif"]
    assert row["status"] == "ok" and row["class"] in ("disc", "square", "triangle")
    assert "level 1 of 3" in row["message"] and "level-0 pixels" in row["message"]
    # COCO: the image is the slide at level 0, its boxes in level-0 pixels
    coco = json.loads((out / "coco.json").read_text())
    assert (coco["images"][0]["height"], coco["images"][0]["width"]) == (1024, 1024)
    # the overlay is drawn from a reduced copy, not the whole slide
    png = iio.imread(out / "overlays" / "slide.png")
    assert max(png.shape[:2]) <= 200 and png.ndim == 3
    # the partial heat is gone, and the heat pyramid opens as a pyramid
    assert not (out / ".napari-gradcam" / "partial" / "slide.zarr").exists()
    with open_pyramid(heat_path) as hp:
        assert len(hp.levels) == len(datasets)


# ---- resume -------------------------------------------------------------------------------

def _count_tiles(monkeypatch, stop_after=None) -> list:
    """Patch the command's progress so that each batch of tiles is counted (and, after
    ``stop_after`` batches, Ctrl-C is pressed)."""
    seen = []
    real = batch_pkg.iter_progress

    def progress(total, quiet):
        report = real(total, quiet)

        def tiles(p):
            seen.append(p.done)
            if stop_after is not None and len(seen) >= stop_after:
                raise KeyboardInterrupt

        report.tiles = tiles
        return report

    monkeypatch.setattr(batch_pkg, "iter_progress", progress)
    return seen


def test_an_interrupted_tiled_run_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    slide = tmp_path / "in" / "slide.ome.tif"
    write_slide(slide)
    # one tile per batch, one class given (no first pass to find it): level 2 (256 x 256)
    # in 128-pixel tiles is 3 bands of 3 tiles
    args = (slide, "--tile", "128", "--overlap", "16", "--level", "2", "--target", "disc",
            "--batch-size", "1")
    whole = tmp_path / "whole"
    full = _count_tiles(monkeypatch)
    assert batch(*args, out=whole) == 0
    assert len(full) == 9
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _count_tiles(m, stop_after=7)  # Ctrl-C in the last band: two bands are written
        assert batch(*args, out=out) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert (out / ".napari-gradcam" / "partial" / "slide.zarr").exists()
    assert not (out / "heatmaps" / "slide.ome.zarr").exists()
    again = _count_tiles(monkeypatch)
    assert batch(*args, out=out) == 0
    assert 0 < len(again) < len(full)  # went on from the partial heat, not from the start
    np.testing.assert_allclose(np.asarray(zarr.open_group(str(out / "heatmaps" /
                                                             "slide.ome.zarr"))["0"]),
                               np.asarray(zarr.open_group(str(whole / "heatmaps" /
                                                              "slide.ome.zarr"))["0"]),
                               atol=1e-5)
    assert boxes(out / "geojson" / "slide.geojson") == \
        boxes(whole / "geojson" / "slide.geojson")
    assert not (out / ".napari-gradcam" / "partial" / "slide.zarr").exists()
    done = _count_tiles(monkeypatch)
    assert batch(*args, out=out) == 0 and done == []  # finished: skipped


# ---- bad input ----------------------------------------------------------------------------

def test_an_overlap_not_smaller_than_the_tile_is_refused_before_anything(tmp_path, capsys):
    slide = tmp_path / "slide.ome.tif"
    write_slide(slide, size=256, levels=2)
    out = tmp_path / "out"
    assert batch(slide, "--tile", "256", "--overlap", "256", out=out) == 2
    err = capsys.readouterr().err
    assert "--overlap 256 is not smaller than --tile 256" in err and "overlap below" in err
    assert not out.exists()
    for flags, words in ((["--tile", "0"], "--tile '0': give a tile side"),
                         (["--overlap", "-1"], "--overlap '-1': give a whole number"),
                         (["--tile", "big"], "'auto'"),
                         (["--level", "-1"], "--level '-1': give a pyramid level")):
        assert batch(slide, *flags, out=out) == 2
        assert words in capsys.readouterr().err
    assert not out.exists()


def test_tiles_for_a_3d_model_are_refused_with_the_jobs_sentence(tmp_path, capsys):
    volume = tmp_path / "v.tif"
    tifffile.imwrite(volume, np.zeros((16, 32, 32), np.uint8))
    assert batch(volume, "--model", "demo3d", "--tile", "128", out=tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "--tile 128: tiles are 2-D" in err and "--tile none" in err


def test_a_bad_level_or_file_fails_that_input_only(tmp_path, capsys):
    folder = tmp_path / "in"
    write_slide(folder / "good.ome.tif")
    cut = folder / "cut.ome.tif"
    write_slide(cut, seed=9)
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    iio.imwrite(folder / "plain.png", picture(128))
    out = tmp_path / "out"
    assert batch(folder, *TILING, "--level", "2", "--target", "disc", out=out) == 1
    rows = summary(out)
    assert rows["good.ome.tif"]["status"] == "ok"
    assert (out / "heatmaps" / "good.ome.zarr").is_dir()
    assert rows["cut.ome.tif"]["status"] == "failed"
    assert "truncated" in rows["cut.ome.tif"]["message"]
    assert rows["plain.png"]["status"] == "failed"
    assert "--level 2 asks for a pyramid level, but this input is not a pyramid" in \
        rows["plain.png"]["message"]
    err = capsys.readouterr().err
    assert "failed: " in err and "cut.ome.tif" in err and "plain.png" in err
    # a level the slide doesn't have: named with the levels it has
    out7 = tmp_path / "out7"
    assert batch(folder / "good.ome.tif", *TILING, "--level", "7", "--target", "disc",
                 out=out7) == 1
    message = summary(out7)["good.ome.tif"]["message"]
    assert "level 7 doesn't exist" in message and "levels 0-2" in message


# ---- large plain images, discovery, settings ------------------------------------------------

def test_a_big_plain_tiff_is_read_lazily_in_tiles_not_refused(tmp_path, monkeypatch):
    big = tmp_path / "big.tif"
    image = picture(384, seed=3)
    tifffile.imwrite(big, image, tile=(128, 128))
    # too little memory to explain it whole: without tiles it would be refused
    monkeypatch.setattr(memory, "available_host_memory", lambda: 5 * 10**6)
    out = tmp_path / "out"
    assert batch(big, *TILING, "--target", "square", out=out) == 0
    heat = np.asarray(zarr.open_group(str(out / "heatmaps" / "big.ome.zarr"))["0"])
    ref = direct(image, whole_slide=False, target="square")
    np.testing.assert_allclose(heat, np.asarray(ref.heatmaps["gradcam"]), atol=1e-5)
    assert outlines(out / "geojson" / "big.geojson") == outlines(ref.regions)
    assert summary(out)["big.tif"]["status"] == "ok"
    # with --tile none the same image is refused for its size, with the way out named
    none = tmp_path / "none"
    assert batch(big, "--tile", "none", out=none) == 1
    message = summary(none)["big.tif"]["message"]
    assert "needs about" in message and "leave out --tile none" in message


def test_slides_are_found_as_one_input_each(tmp_path):
    folder = tmp_path / "in"
    write_slide(folder / "a.ome.tif", size=256, levels=2)
    write_heat_pyramid(np.zeros((300, 300), np.float32), folder / "b.ome.zarr")
    iio.imwrite(folder / "c.png", picture(128))
    tifffile.imwrite(folder / "d.tif", picture(128))
    units = {u.name: u.kind for u in collect_units([folder])}
    assert units == {"a": "slide", "b": "slide", "c": "file", "d": "file"}
    # given by name, an OME-Zarr folder is one slide too, not a folder to search
    [unit] = collect_units([folder / "b.ome.zarr"])
    assert (unit.kind, unit.name) == ("slide", "b")


def test_tile_overlap_and_level_are_settings_of_the_run(tmp_path, capsys):
    spec = load_model("demo")
    base = run_settings(Options(), {"source": "demo"}, spec)
    assert "tile" not in base and "overlap" not in base and "level" not in base
    changed = run_settings(Options(tile=256, overlap=32, level=1), {"source": "demo"}, spec)
    assert (changed["tile"], changed["overlap"], changed["level"]) == (256, 32, 1)
    slide = tmp_path / "slide.ome.tif"
    write_slide(slide, size=256, levels=2)
    out = tmp_path / "out"
    assert batch(slide, *TILING, "--target", "disc", out=out) == 0
    assert batch(slide, "--tile", "256", "--overlap", "48", "--target", "disc", out=out) == 2
    assert "--overlap 32 -> 48" in capsys.readouterr().err


def test_a_colour_slide_for_a_grey_model_fails_before_its_first_tile(tmp_path, monkeypatch,
                                                                     capsys):
    """Grey background first, colour only in the last tiles: refused from the smallest level
    before any tile runs, with the sentence ordinary colour images get."""
    grey = picture(512)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[384:, 384:, 0] = 255  # a red corner, reached only by the last tile
    path = tmp_path / "in" / "colour.ome.tif"
    path.parent.mkdir()
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(rgb, subifds=1, tile=(128, 128), photometric="rgb", metadata={"axes": "YXS"})
        tif.write(rgb[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb")
    seen = _count_tiles(monkeypatch)
    assert batch(path, "--model", "demo", "--tile", "128", "--target", "disc",
                 out=tmp_path / "out") == 1
    assert seen == []
    assert "colour RGB" in capsys.readouterr().err + (tmp_path / "out" / "summary.csv").read_text()
