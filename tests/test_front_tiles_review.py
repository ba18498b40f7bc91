"""Slides as a pathology user meets them in the front ends: a slide with a pixel size (SVS,
OME-Zarr in micrometres) explained by the batch command and opened again in napari, the heat
pyramid, the GeoJSON and the slide on each other; evaluate on a folder holding a slide; the
widget on a slide opened by our reader, at the level on screen, and at another level after."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import slide_levels, write_svs

from napari_gradcam import memory
from napari_gradcam.cli import main
from napari_gradcam.export import read_geojson
from napari_gradcam.models.demo.synthetic import make_image

tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")

MPP = 0.252  # the SVS writer's microns per pixel


def grey_slide(half: int = 512, seed: int = 11):
    """A grey slide stored as RGB (as scanners write it) whose level 1 is a demo scene of
    ``half`` pixels a side (objects of the size the model knows): level 0 is it enlarged 2x.
    Returns the levels (level 0 first) and the scene's objects (boxes in level-1 pixels)."""
    scene = make_image(half, seed=seed, classes=[0, 1, 2])
    level1 = (scene.image * 255).astype(np.uint8)
    level0 = np.kron(level1, np.ones((2, 2), np.uint8))
    return slide_levels(np.repeat(level0[..., None], 3, axis=-1), 3), scene.objects


def reader_layer(path):
    from napari_gradcam._napari.io import get_pyramid_reader

    reader = get_pyramid_reader(str(path))
    assert reader is not None
    return reader(str(path))[0]


def world(kwargs, pixel):
    """Where napari puts ``pixel`` of a layer made with ``kwargs`` (scale, translate)."""
    return np.asarray(pixel, float) * np.asarray(kwargs["scale"]) + np.asarray(
        kwargs.get("translate", (0.0, 0.0)))


# ---- batch: a slide with a pixel size, opened again in napari -----------------------------

def test_a_slides_heat_and_geojson_lie_on_the_slide_opened_in_micrometres(tmp_path):
    levels, objects = grey_slide()
    svs = write_svs(tmp_path / "slide.svs", levels)
    out = tmp_path / "out"
    assert main(["batch", str(svs), "--model", "demo", "--tile", "256", "--level", "1",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0

    _levels, slide_kw, _ = reader_layer(svs)
    heat_levels, heat_kw, _ = reader_layer(out / "heatmaps" / "slide.ome.zarr")
    np.testing.assert_allclose(slide_kw["scale"], (MPP, MPP))
    assert heat_kw.get("units") == slide_kw["units"] == ("micrometer", "micrometer")
    # heat pixel (r, c) explains level-1 pixel (r, c), which napari draws over level-0 pixels
    # 2r .. 2r + 1 of the slide (centre 2r + 0.5): the same place in micrometres
    for p in [(0, 0), (100, 37), (511, 511)]:
        np.testing.assert_allclose(world(heat_kw, p), world(slide_kw, 2 * np.array(p) + 0.5),
                                   atol=1e-9)
    # and its hot spot is on an object of the slide
    heat = np.asarray(heat_levels[0])
    hot = np.unravel_index(np.argmax(heat), heat.shape)
    assert any(o.mask[hot] for o in objects)

    # GeoJSON: level-0 pixels for QuPath, with the pixel size recorded beside them so our
    # reader puts the shapes on the slide in micrometres
    annotations, meta = read_geojson(out / "geojson" / "slide.geojson")
    assert meta["physical_units"] is False
    np.testing.assert_allclose(meta["scale"], (MPP, MPP))
    boxes = [a.geometry.bounds for a in annotations if a.kind == "rectangle"]
    assert boxes
    for x0, y0, x1, y1 in boxes:  # each box is around an object's level-0 box
        assert any(abs(x0 - 2 * o.box[1]) <= 8 and abs(y0 - 2 * o.box[0]) <= 8
                   and abs(x1 - 2 * o.box[3]) <= 8 and abs(y1 - 2 * o.box[2]) <= 8
                   for o in objects), (x0, y0, x1, y1)
    from napari_gradcam._napari.io import read_geojson_layer

    _shapes, shapes_kw, _ = read_geojson_layer(str(out / "geojson" / "slide.geojson"))[0]
    np.testing.assert_allclose(shapes_kw["scale"], slide_kw["scale"])


def test_a_slide_without_a_pixel_size_keeps_its_heat_and_geojson_in_pixels(tmp_path):
    levels, _objects = grey_slide(256)
    path = tmp_path / "plain.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=2, tile=(128, 128), photometric="rgb",
                  metadata={"axes": "YXS"})
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, tile=(128, 128), photometric="rgb")
    out = tmp_path / "out"
    assert main(["batch", str(path), "--model", "demo", "--tile", "256", "--level", "1",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    _l, slide_kw, _ = reader_layer(path)
    _h, heat_kw, _ = reader_layer(out / "heatmaps" / "plain.ome.zarr")
    assert "units" not in heat_kw and "units" not in slide_kw
    np.testing.assert_allclose(world(heat_kw, (3, 4)), world(slide_kw, (6.5, 8.5)))
    _annotations, meta = read_geojson(out / "geojson" / "plain.geojson")
    assert meta["scale"] is None


# ---- evaluate: a folder holding a slide -------------------------------------------------

def ome_zarr(path: Path, levels, mpp: float = 0.5) -> Path:
    pytest.importorskip("ome_zarr")
    from conftest import _ngff04

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_multiscale

        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        write_multiscale([lv.transpose(2, 0, 1) for lv in levels], group, fmt=_ngff04(),
                         axes=[{"name": "c", "type": "channel"},
                               {"name": "y", "type": "space", "unit": "micrometer"},
                               {"name": "x", "type": "space", "unit": "micrometer"}],
                         coordinate_transformations=[
                             [{"type": "scale", "scale": [1.0, mpp * 2 ** k, mpp * 2 ** k]}]
                             for k in range(len(levels))],
                         storage_options={"chunks": (3, 128, 128)})
    return path


def small_slide_folder(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    scene = make_image(128, seed=4, n_objects=2)
    grey = (scene.image * 255).astype(np.uint8)
    ome_zarr(folder / "slide.ome.zarr", slide_levels(np.repeat(grey[..., None], 3, -1), 2))
    return folder


def test_evaluate_reads_a_slide_in_a_folder_as_one_image(tmp_path, capsys):
    from napari_gradcam.evaluate import evaluate
    from napari_gradcam.models import load_model

    folder = small_slide_folder(tmp_path)
    result = evaluate([folder], load_model("demo"), ["gradcam"], metrics=["deletion"],
                      steps=4, device="cpu")
    assert result.failed == []
    assert [(r["image"], r["method"]) for r in result.rows] == [("slide", "gradcam")]
    assert 0.0 <= result.rows[0]["deletion_auc"] <= 1.0


def test_evaluate_refuses_a_slide_too_large_to_hold_in_one_sentence(tmp_path, monkeypatch,
                                                                    capsys):
    folder = small_slide_folder(tmp_path)
    monkeypatch.setattr(memory, "available_host_memory", lambda: 1000)
    code = main(["evaluate", str(folder), "--model", "demo", "--out", str(tmp_path / "ev"),
                 "--metrics", "deletion", "--steps", "4", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    assert "slide.ome.zarr" in err and "128 x 128 pixels" in err
    assert "napari-gradcam batch" in err and "leave it out" in err
    assert "can't read this folder" not in err
    assert err.count("leave it out") == 1


# ---- the widget on a slide opened by our reader ---------------------------------------------

def _heat_and_image_aligned(heat, image, downsample):
    for p in [(0, 0), (40, 170), (255, 3)]:
        np.testing.assert_allclose(heat.data_to_world(p),
                                   image.data_to_world(downsample * np.array(p)
                                                       + (downsample - 1) / 2), atol=1e-9)


@pytest.mark.usefixtures("our_plugin")
def test_widget_on_an_svs_opened_by_our_reader_at_the_level_on_screen(viewer, qtbot,
                                                                      tmp_path):
    pytest.importorskip("napari")
    from test_widget import dock, finish, layer_names, rect_box

    levels, objects = grey_slide(256)
    svs = write_svs(tmp_path / "slide.svs", levels)
    [image] = viewer.open(str(svs), plugin="napari-gradcam")
    assert image.multiscale and image.rgb
    np.testing.assert_allclose(image.scale, (MPP, MPP))
    w = dock(viewer)
    w.target.value = "disc"
    w.tile.value, w.overlap.value = 128, 32
    image.data_level = 1  # what napari sets for the zoom; "on screen" follows it
    assert w.level.value == "on screen"
    assert w.run() is not None
    finish(qtbot, w)
    heat = viewer.layers["gradcam · slide"]
    assert heat.multiscale and tuple(heat.data[0].shape) == (256, 256)
    _heat_and_image_aligned(heat, image, 2)
    shapes = viewer.layers["regions · slide"]
    # every layer in the image's units (napari drops units from the view when they differ)
    assert {tuple(map(str, layer.units)) for layer in viewer.layers} == {
        ("micrometer", "micrometer")}
    np.testing.assert_allclose(shapes.scale, image.scale)
    discs = [o for o in objects if o.class_id == 0]
    rects = [rect_box(d) for d, t in zip(shapes.data, shapes.shape_type) if t == "rectangle"]
    assert rects and discs
    # vertices in level-0 pixels: on a disc's level-0 box
    r0, c0, r1, c1 = rects[0]
    assert any(abs((r0 + r1) / 2 - (o.box[0] + o.box[2])) <= 6
               and abs((c0 + c1) / 2 - (o.box[1] + o.box[3])) <= 6 for o in discs)

    # saved for QuPath: level-0 pixels, not micrometres (the pixel size only recorded)
    path = tmp_path / "regions.geojson"
    viewer.layers.selection.active = shapes
    viewer.layers.save(str(path), selected=True, plugin="napari-gradcam")
    doc = json.loads(path.read_text())
    x, y = np.array(doc["features"][0]["geometry"]["coordinates"][0], float).T
    assert abs((x.min() + x.max()) / 2 - (c0 + c1) / 2) <= 1
    assert abs((y.min() + y.max()) / 2 - (r0 + r1) / 2) <= 1

    # another level: the same heat layer, now that level's pyramid, still on the image
    w.level.value = 2
    assert w.run() is not None
    finish(qtbot, w)
    assert layer_names(viewer).count("gradcam · slide") == 1
    heat = viewer.layers["gradcam · slide"]
    assert heat.multiscale and tuple(heat.data[0].shape) == (128, 128)
    assert heat.metadata["napari_gradcam"]["level"] == 2
    _heat_and_image_aligned(heat, image, 4)


@pytest.mark.usefixtures("our_plugin")
def test_widget_tiles_a_large_plain_image_into_one_heat_of_its_size(viewer, qtbot):
    pytest.importorskip("napari")
    from test_widget import dock, finish

    canvas = np.zeros((3000, 3000), np.float32)
    scene = make_image(512, seed=21, n_objects=3)
    canvas[2400:2912, 100:612] = scene.image  # across tile seams (tiles of 512 step 448)
    image = viewer.add_image(canvas, name="big")
    w = dock(viewer)
    w.target.value = "disc"
    w.tile.value, w.overlap.value = 512, 64
    assert w.run() is not None
    finish(qtbot, w, timeout=120_000)
    heat = viewer.layers["gradcam · big"]
    assert not heat.multiscale and heat.data.shape == (3000, 3000)
    np.testing.assert_allclose(heat.translate, image.translate)
    assert "tiles of 512 x 512 px, overlap 64" in w.status.value
    data = np.asarray(heat.data)
    assert float(data.max()) == pytest.approx(1.0) and float(data.min()) == pytest.approx(0.0)
    hot = np.unravel_index(np.argmax(data), data.shape)
    assert 2400 <= hot[0] < 2912 and 100 <= hot[1] < 612


def test_an_ome_zarr_in_millimetres_opens_in_micrometres_as_labelled(tmp_path):
    levels, _objects = grey_slide(128)
    path = ome_zarr(tmp_path / "mm.ome.zarr", levels, mpp=0.0005)
    group = zarr.open_group(str(path), mode="r+")
    attrs = group.attrs.asdict()
    ms = attrs["multiscales"][0]
    for axis in ms["axes"][1:]:
        axis["unit"] = "millimeter"
    for k, d in enumerate(ms["datasets"]):
        d["coordinateTransformations"].append(
            {"type": "translation", "translation": [0.0, 0.01, 0.02]})
    group.attrs.update(attrs)
    _levels, kwargs, _ = reader_layer(path)
    assert kwargs["units"] == ("micrometer", "micrometer")
    np.testing.assert_allclose(kwargs["scale"], (0.5, 0.5))
    np.testing.assert_allclose(kwargs["translate"], (10.0, 20.0))
