"""Pyramidal images in (OME-TIFF, SVS, TIFF, OME-Zarr, openslide), heat pyramids out
(OME-Zarr), hostile slide files, and napari opening both."""

import os
import shutil
import types

import numpy as np
import pytest
import tifffile
import zarr
from conftest import write_pyramid_tiff, write_svs

from napari_gradcam.pyramids import (
    AxesView,
    is_pyramid_file,
    open_pyramid,
    pick_level,
    write_heat_pyramid,
)


def same_region(pyr, pixels, k, rows=slice(100, 130), cols=slice(250, 300)):
    np.testing.assert_array_equal(np.asarray(pyr.level(k)[rows, cols]), pixels[k][rows, cols])


# ---- reading -----------------------------------------------------------------------------

def test_ome_tiff_opens_lazily_with_levels_downsamples_and_pixel_size(pyramid_tiff, slide_pixels):
    assert is_pyramid_file(pyramid_tiff)
    with open_pyramid(pyramid_tiff) as pyr:
        assert pyr.format == "ome-tiff"
        assert pyr.shapes == [(1536, 2048), (768, 1024), (384, 512)]
        assert pyr.downsamples == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
        assert pyr.mpp == (0.25, 0.25) and pyr.scale == (0.25, 0.25)
        assert pyr.channel_axis == 2 and pyr.rgb and pyr.axes == "YXS"
        # levels are zarr arrays read tile by tile, not pixels loaded at open
        assert all(isinstance(a, zarr.Array) for a in pyr.levels)
        assert pyr.levels[0].chunks[:2] == (256, 256)
        for k in range(3):
            same_region(pyr, slide_pixels, k)
        with pytest.raises(ValueError, match=r"level 5 doesn't exist; this image has levels "
                                             r"0-2 \(2048 x 1536, 1024 x 768, 512 x 384\)"):
            pyr.level(5)
        with pytest.raises(ValueError, match="level -1 doesn't exist"):
            pyr.level(-1)
        with pytest.raises(TypeError, match="whole number"):
            pyr.level(1.5)


def test_svs_levels_skip_the_thumbnail_and_read_the_mpp(svs_file, slide_pixels):
    with tifffile.TiffFile(svs_file) as tif:
        assert tif.is_svs and len(tif.series[0].levels) == 3
    assert is_pyramid_file(svs_file)
    with open_pyramid(svs_file) as pyr:
        assert pyr.format == "svs"
        assert pyr.shapes == [(1536, 2048), (768, 1024), (384, 512)]
        assert pyr.mpp == (0.252, 0.252)
        same_region(pyr, slide_pixels, 2, rows=slice(300, 384), cols=slice(0, 512))


def test_a_tiff_with_levels_is_a_pyramid_and_a_plain_tiff_one_level(tmp_path, slide_pixels):
    plain_levels = tmp_path / "levels.tif"
    with tifffile.TiffWriter(plain_levels, ome=False) as tw:
        tw.write(slide_pixels[0], subifds=2, tile=(256, 256), photometric="rgb")
        for lv in slide_pixels[1:]:
            tw.write(lv, subfiletype=1, tile=(256, 256), photometric="rgb")
    assert is_pyramid_file(plain_levels)
    with open_pyramid(plain_levels) as pyr:
        assert pyr.format == "tiff" and len(pyr) == 3 and pyr.mpp is None
        assert pyr.scale == (1.0, 1.0)
        same_region(pyr, slide_pixels, 1)

    one = tmp_path / "big.tif"
    tifffile.imwrite(one, slide_pixels[0], photometric="rgb")  # strips, no levels
    assert not is_pyramid_file(one)  # napari's own reader keeps plain TIFFs
    with open_pyramid(one) as pyr:
        assert len(pyr) == 1 and pyr.downsamples == [(1.0, 1.0)]
        assert isinstance(pyr.levels[0], zarr.Array)
        np.testing.assert_array_equal(pyr.level(0)[500:510, 7:9], slide_pixels[0][500:510, 7:9])
        with pytest.raises(ValueError, match=r"level 1 doesn't exist; this image has only "
                                             r"level 0 \(2048 x 1536\)"):
            pyr.level(1)


def test_ome_zarr_channels_move_last_and_scale_gives_downsamples(ome_zarr_slide, slide_pixels):
    assert is_pyramid_file(ome_zarr_slide)
    with open_pyramid(ome_zarr_slide) as pyr:
        assert pyr.format == "ome-zarr"
        assert pyr.shapes == [(1536, 2048), (768, 1024), (384, 512)]
        assert pyr.downsamples == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
        assert pyr.mpp == (0.5, 0.5) and pyr.axes == "YXC" and pyr.channel_axis == 2
        assert pyr.rgb and isinstance(pyr.levels[0], AxesView)
        assert pyr.levels[0].shape == (1536, 2048, 3) and pyr.levels[0].chunks == (256, 256, 3)
        for k in range(3):
            same_region(pyr, slide_pixels, k)
        np.testing.assert_array_equal(pyr.level(0)[7], slide_pixels[0][7])
        np.testing.assert_array_equal(pyr.level(0)[:, 9, 2], slide_pixels[0][:, 9, 2])
        np.testing.assert_array_equal(np.asarray(pyr.level(2)), slide_pixels[2])


def test_openslide_reads_the_svs_as_tifffile_does(svs_file, slide_pixels):
    pytest.importorskip("openslide")
    with open_pyramid(svs_file, backend="openslide") as pyr:
        assert pyr.format == "openslide" and pyr.mpp == (0.252, 0.252)
        assert pyr.shapes == [(1536, 2048), (768, 1024), (384, 512)]
        assert pyr.downsamples == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
        same_region(pyr, slide_pixels, 1)
        same_region(pyr, slide_pixels, 2)
        assert pyr.level(1)[5, 7:9].shape == (2, 3)


def test_pick_level(pyramid_tiff):
    with open_pyramid(pyramid_tiff) as pyr:  # 0.25 µm at level 0
        assert pick_level(pyr) == 0
        assert pick_level(pyr, mpp=0.5) == 1
        assert pick_level(pyr, mpp=0.9) == 1
        assert pick_level(pyr, mpp=1.0) == 2
        assert pick_level(pyr, mpp=0.1) == 0
        assert pick_level(pyr, max_side=1024) == 1
        assert pick_level(pyr, max_side=100) == 2
        with pytest.raises(ValueError, match="positive"):
            pick_level(pyr, mpp=-1)


# ---- hostile files -----------------------------------------------------------------------

def cut(src, dst, size):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(size))
    return dst


def test_truncated_copy_is_named_truncated_at_open(tmp_path, pyramid_tiff, svs_file):
    full = os.path.getsize(pyramid_tiff)
    half = cut(pyramid_tiff, tmp_path / "half.ome.tif", full // 2)
    with pytest.raises(ValueError, match=rf"ends before level 0's tiles: it is truncated "
                                         rf"\({full // 2} of .*bytes\); copy it again"):
        open_pyramid(half)

    with tifffile.TiffFile(svs_file) as tif:  # cut inside level 1's tiles
        page = tif.series[0].levels[1].pages[0]
        start, end = min(page.dataoffsets), max(
            o + n for o, n in zip(page.dataoffsets, page.databytecounts))
        full = os.path.getsize(svs_file)
    size = (start + end) // 2
    short = cut(svs_file, tmp_path / "short.svs", size)
    with pytest.raises(ValueError, match=rf"ends before level 1's tiles: it is truncated "
                                         rf"\({size} of (at least )?\d+ bytes\); copy it again"):
        open_pyramid(short)


def test_not_a_tiff_named_svs_and_an_empty_file(tmp_path):
    bad = tmp_path / "random.svs"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    assert not is_pyramid_file(bad)
    with pytest.raises(ValueError, match=r"random.svs is not a TIFF slide \(no TIFF header\)"):
        open_pyramid(bad)
    empty = tmp_path / "empty.ome.tif"
    empty.touch()
    with pytest.raises(ValueError, match=r"not a TIFF slide \(empty\)"):
        open_pyramid(empty)
    with pytest.raises(FileNotFoundError, match="doesn't exist"):
        open_pyramid(tmp_path / "nothing.svs")
    with pytest.raises(ValueError, match="backend 'gdal'"):
        open_pyramid(bad, backend="gdal")


def test_jpeg_tiles_need_imagecodecs(tmp_path, slide_pixels, monkeypatch):
    pytest.importorskip("imagecodecs")
    path = write_svs(tmp_path / "jpeg.svs", slide_pixels, compression="jpeg")
    with open_pyramid(path) as pyr:  # with the codec: read, close to the pixels (lossy)
        diff = np.abs(np.asarray(pyr.level(1)[:256, :256], float)
                      - slide_pixels[1][:256, :256]).mean()
        assert diff < 8
    # the same file where imagecodecs is not installed
    monkeypatch.setattr(tifffile.tifffile, "imagecodecs", types.SimpleNamespace())
    with pytest.raises(ValueError, match=r"jpeg.svs has JPEG-compressed tiles .* install it "
                                         r"with pip install 'napari-gradcam\[slides\]'"):
        open_pyramid(path)


def test_levels_that_dont_shrink_are_refused(tmp_path, slide_pixels):
    path = tmp_path / "flat.ome.tif"
    write_pyramid_tiff(path, [slide_pixels[1], slide_pixels[1]])
    with pytest.raises(ValueError, match=r"level 1 \(1024 x 768\) is not smaller than level 0 "
                                         r"\(1024 x 768\); save it with levels that shrink"):
        open_pyramid(path)


@pytest.fixture
def zarr_copy(tmp_path, ome_zarr_slide):
    return shutil.copytree(ome_zarr_slide, tmp_path / "copy.ome.zarr")


def test_ome_zarr_without_multiscales_or_with_a_level_missing(tmp_path, zarr_copy):
    shutil.rmtree(zarr_copy / "s1")
    with pytest.raises(ValueError, match=r"lists level 1 at 's1' but that array is missing: "
                                         r"the copy is incomplete; copy the whole folder again"):
        open_pyramid(zarr_copy)

    (zarr_copy / ".zattrs").write_text('{"multiscales": "yes"}')
    assert not is_pyramid_file(tmp_path / "nowhere.zarr")
    with pytest.raises(ValueError, match="no valid OME-Zarr 'multiscales' metadata"):
        open_pyramid(zarr_copy)
    (zarr_copy / ".zattrs").write_text('{"multiscales": [{"datasets": [{"name": "s0"}]}]}')
    with pytest.raises(ValueError, match="'datasets' must list each level's 'path'"):
        open_pyramid(zarr_copy)
    (zarr_copy / ".zattrs").write_text("{}")
    assert not is_pyramid_file(zarr_copy)
    with pytest.raises(ValueError, match="no valid OME-Zarr 'multiscales' metadata"):
        open_pyramid(zarr_copy)

    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(ValueError, match="without zarr metadata"):
        open_pyramid(folder)


def test_ome_zarr_levels_that_dont_shrink_or_bad_scales(zarr_copy):
    import json

    meta = json.loads((zarr_copy / ".zattrs").read_text())
    bad = json.loads(json.dumps(meta))
    bad["multiscales"][0]["datasets"][1]["path"] = "s0"
    (zarr_copy / ".zattrs").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="level 1 .* is not smaller than level 0"):
        open_pyramid(zarr_copy)
    bad = json.loads(json.dumps(meta))
    bad["multiscales"][0]["datasets"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [1, 0, 0.5]}]
    (zarr_copy / ".zattrs").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not positive"):
        open_pyramid(zarr_copy)


# ---- writing heat pyramids ---------------------------------------------------------------

def heat_field(h, w):
    yy, xx = np.mgrid[:h, :w]
    return ((np.sin(yy / 37.0) * np.cos(xx / 23.0) + 1) / 2).astype(np.float32)


def test_heat_pyramid_reads_back_with_ome_zarr_and_open_pyramid(tmp_path):
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    heat = heat_field(600, 1000)
    out = write_heat_pyramid(heat, tmp_path / "heat.ome.zarr", downsample_of_heat=(4, 4),
                             min_side=100, chunks=128, name="gradcam")
    node = next(n for n in Reader(parse_url(str(out)))() if n.load(Multiscales))
    assert [d.shape for d in node.data] == [(600, 1000), (300, 500), (150, 250), (75, 125)]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[4.0, 4.0], [8.0, 8.0], [16.0, 16.0], [32.0, 32.0]]
    assert node.metadata["name"] == "gradcam"
    np.testing.assert_array_equal(np.asarray(node.data[0]), heat)

    with open_pyramid(out) as pyr:
        assert pyr.format == "ome-zarr" and len(pyr) == 4 and pyr.channel_axis is None
        assert pyr.downsamples == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0), (8.0, 8.0)]
        # level-0 heat pixels are 4 slide pixels wide; their centres lie at 1.5, 5.5, ...
        assert pyr.scale == (4.0, 4.0) and pyr.translate == (1.5, 1.5) and pyr.mpp is None
        expect = heat.reshape(300, 2, 500, 2).mean((1, 3))
        np.testing.assert_allclose(np.asarray(pyr.level(1)), expect, atol=1e-6)
        np.testing.assert_allclose(np.asarray(pyr.level(2)),
                                   expect.reshape(150, 2, 250, 2).mean((1, 3)), atol=1e-6)


def test_heat_pyramid_from_zarr_with_odd_sides_and_micrometres(tmp_path):
    heat = heat_field(301, 203)
    src = zarr.create_array(store=str(tmp_path / "src.zarr"), shape=heat.shape, chunks=(50, 50),
                            dtype="float32")
    src[:] = heat
    out = write_heat_pyramid(src, tmp_path / "odd.ome.zarr", downsample_of_heat=2, min_side=64,
                             chunks=64, mpp=0.25)
    with open_pyramid(out) as pyr:
        assert pyr.shapes == [(301, 203), (151, 102), (76, 51)]
        assert pyr.mpp == (0.5, 0.5) and pyr.scale == (0.5, 0.5)
        lv1 = np.asarray(pyr.level(1))
        # the last row / column averages the pixels that lie inside the image
        assert lv1[-1, 0] == pytest.approx(heat[300, 0:2].mean(), abs=1e-6)
        assert lv1[0, -1] == pytest.approx(heat[0:2, 202].mean(), abs=1e-6)
        assert lv1[-1, -1] == pytest.approx(heat[300, 202], abs=1e-6)
        np.testing.assert_allclose(lv1[:150, :101],
                                   heat[:300, :202].reshape(150, 2, 101, 2).mean((1, 3)),
                                   atol=1e-6)


class Exploding:
    """A heat array that fails after some reads (a crash in the middle of writing)."""

    def __init__(self, heat, reads):
        self.heat, self.reads = heat, reads
        self.shape, self.dtype = heat.shape, heat.dtype

    def __getitem__(self, key):
        self.reads -= 1
        if self.reads < 0:
            raise OSError("disk went away")
        return self.heat[key]


def test_heat_pyramid_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "heat.ome.zarr"
    first = heat_field(300, 300)
    write_heat_pyramid(first, path, min_side=64, chunks=64)
    with pytest.raises(OSError, match="disk went away"):
        write_heat_pyramid(Exploding(1 - first, reads=5), path, min_side=64, chunks=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.ome.zarr"]  # no leftovers
    with open_pyramid(path) as pyr:  # the old pyramid, whole
        np.testing.assert_array_equal(np.asarray(pyr.level(0)), first)
        assert len(pyr) == 3

    write_heat_pyramid(1 - first, path, min_side=64, chunks=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.ome.zarr"]
    with open_pyramid(path) as pyr:
        np.testing.assert_array_equal(np.asarray(pyr.level(0)), 1 - first)
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700

    fresh = tmp_path / "new.ome.zarr"
    with pytest.raises(OSError):
        write_heat_pyramid(Exploding(first, reads=2), fresh, min_side=64, chunks=64)
    assert not fresh.exists()


def test_heat_pyramid_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"one 2D heatmap \(H, W\), not shape \(2, 8, 8\)"):
        write_heat_pyramid(np.zeros((2, 8, 8), np.float32), tmp_path / "a.ome.zarr")
    with pytest.raises(ValueError, match="downsample_of_heat must be two positive numbers"):
        write_heat_pyramid(np.zeros((8, 8), np.float32), tmp_path / "a.ome.zarr",
                           downsample_of_heat=(0, 1))
    taken = tmp_path / "file.ome.zarr"
    taken.write_text("x")
    with pytest.raises(ValueError, match="is a file; an OME-Zarr pyramid is a folder"):
        write_heat_pyramid(np.zeros((8, 8), np.float32), taken)
    assert taken.read_text() == "x"
    with pytest.raises(ValueError, match="translate must be two finite numbers"):
        write_heat_pyramid(np.zeros((8, 8), np.float32), tmp_path / "b.ome.zarr",
                           translate=(0, float("nan")))


def test_heat_pyramid_follows_a_slide_whose_origin_is_not_zero(tmp_path):
    """A slide placed at (10, 20) micrometres: its heat's pixel centres lie on the slide's."""
    path = write_heat_pyramid(np.zeros((64, 64), np.float32), tmp_path / "h.ome.zarr",
                              downsample_of_heat=(2, 2), mpp=0.5, translate=(10, 20),
                              min_side=32)
    pyr = open_pyramid(path)
    # heat pixel 0 covers slide pixels 0-1: its centre is at slide pixel 0.5 = 0.25 um
    assert pyr.scale == pytest.approx((1.0, 1.0))
    assert pyr.translate == pytest.approx((10.25, 20.25))


# ---- napari ------------------------------------------------------------------------------

def test_reader_claims_pyramids_only(tmp_path, svs_file, ome_zarr_slide, slide_pixels):
    from napari_gradcam._napari.io import get_pyramid_reader, read_pyramid_layer

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, slide_pixels[2])
    assert get_pyramid_reader(str(plain)) is None
    assert get_pyramid_reader(str(tmp_path)) is None  # a folder that is not OME-Zarr
    assert get_pyramid_reader([str(svs_file)]) is None
    assert get_pyramid_reader(str(svs_file)) is read_pyramid_layer
    assert get_pyramid_reader(str(ome_zarr_slide)) is read_pyramid_layer

    ((levels, kwargs, kind),) = read_pyramid_layer(str(svs_file))
    assert kind == "image" and len(levels) == 3
    assert kwargs["multiscale"] and kwargs["rgb"] and kwargs["name"] == "slide"
    assert kwargs["scale"] == (0.252, 0.252)
    assert kwargs["metadata"]["downsamples"] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
    assert kwargs["metadata"]["pyramid"] == str(svs_file)


@pytest.mark.usefixtures("our_plugin")
def test_napari_opens_a_slide_and_its_heat_pyramid_aligned(make_napari_viewer, tmp_path,
                                                           pyramid_tiff, ome_zarr_slide):
    pytest.importorskip("napari")
    viewer = make_napari_viewer()
    (slide,) = viewer.open(str(pyramid_tiff), plugin="napari-gradcam")
    assert slide.multiscale and slide.rgb and len(slide.data) == 3
    np.testing.assert_allclose(slide.scale, (0.25, 0.25))
    assert slide.metadata["downsamples"] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]

    # heat of the slide's level 1 (768 x 1024), written on the slide's level-0 grid
    heat = heat_field(768, 1024)
    out = write_heat_pyramid(heat, tmp_path / "heat.ome.zarr", downsample_of_heat=(2, 2),
                             mpp=0.25, min_side=128)
    (layer,) = viewer.open(str(out), plugin="napari-gradcam")
    assert layer.multiscale and not layer.rgb and len(layer.data) == 4
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    # the heat's pixels are two slide pixels: its corners are the slide's corners in the world
    np.testing.assert_allclose(layer.data_to_world((-0.5, -0.5)),
                               slide.data_to_world((-0.5, -0.5)))
    np.testing.assert_allclose(layer.data_to_world((767.5, 1023.5)),
                               slide.data_to_world((1535.5, 2047.5)))
    np.testing.assert_allclose(layer.data_to_world((0, 0)), slide.data_to_world((0.5, 0.5)))

    (zslide,) = viewer.open(str(ome_zarr_slide), plugin="napari-gradcam")
    assert zslide.multiscale and zslide.rgb and zslide.data[0].shape == (1536, 2048, 3)
    np.testing.assert_allclose(zslide.scale, (0.5, 0.5))
