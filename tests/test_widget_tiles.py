"""The widget on multiscale (pyramid) layers and big images: the level explained, the tile
settings, the heat as a multiscale layer on the image, regions in level-0 pixels, progress in
tiles, cancel, live refused."""

import functools
import json

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from test_widget import dock, finish, layer_names, raw, rect_box

from napari_gradcam._napari.results import heat_pyramid, level_geometry
from napari_gradcam.models.demo.synthetic import background

pytestmark = pytest.mark.usefixtures("our_plugin")

SIDE = 1024  # level 1: the demo model's own scale (the disc as it was trained on)
DISC = (700, 300, 12)  # centre row, column and radius at level 1
SCALE, TRANSLATE = (0.5, 0.5), (10.0, 20.0)


@functools.lru_cache(maxsize=1)
def levels():
    """A 2048^2 slide as three levels (/1 /2 /4): one disc on the demo's noisy background at
    level 1; level 0 is it enlarged 2x (so level 1 is exactly its 2 x 2 mean)."""
    rng = np.random.default_rng(3)
    canvas = background(rng, (SIDE, SIDE), (1, 3)).astype(np.float32)
    rr, cc = np.mgrid[0:SIDE, 0:SIDE]
    d = DISC[2] - np.hypot(rr - DISC[0], cc - DISC[1])
    canvas = np.clip(canvas + 0.35 * np.clip(d + 0.5, 0, 1), 0, 1).astype(np.float32)
    level0 = np.kron(canvas, np.ones((2, 2), np.float32))
    level2 = canvas.reshape(SIDE // 2, 2, SIDE // 2, 2).mean(axis=(1, 3))
    return [level0, canvas, level2]


def add_slide(viewer, name="slide"):
    return viewer.add_image(levels(), multiscale=True, name=name, scale=SCALE,
                            translate=TRANSLATE, contrast_limits=(0, 1))


def slide_widget(viewer, level=1, tile=256, overlap=64):
    image = add_slide(viewer)
    w = dock(viewer)
    w.target.value = "disc"  # one class: no first pass over the tiles for the prediction
    w.level.value = level
    w.tile.value, w.overlap.value = tile, overlap
    return image, w


def test_level_choice_only_for_multiscale_layers_and_on_screen_follows_napari(viewer):
    plain = viewer.add_image(levels()[2], name="plain")
    w = dock(viewer)
    assert raw(w.image.value) is raw(plain)
    assert w.level.native.isHidden()
    image = add_slide(viewer)
    viewer.layers.selection.active = image
    assert raw(w.image.value) is raw(image) and not w.level.native.isHidden()
    texts = [w.level.native.itemText(i) for i in range(w.level.native.count())]
    assert texts == ["on screen", "0: 2048 x 2048", "1: 1024 x 1024", "2: 512 x 512"]
    assert w.level.value == "on screen"
    image.data_level = 2  # what napari sets as the user zooms out
    job = w.job()
    assert job.level == 2 and job.downsample == (4.0, 4.0)
    assert job.images is levels()[2]  # that level as the layer holds it: nothing else read
    image.data_level = 1
    job = w.job()
    assert job.level == 1 and job.images is levels()[1] and job.whole_slide
    w.level.value = 0
    assert w.job().level == 0 and w.job().downsample == (1.0, 1.0)
    viewer.layers.selection.active = plain
    assert w.level.native.isHidden() and w.job().level is None and not w.job().whole_slide


def test_a_level_explained_in_tiles_gives_a_multiscale_heat_on_the_image(viewer, qtbot,
                                                                          tmp_path):
    image, w = slide_widget(viewer)
    seen = []
    worker = w.run()
    assert worker is not None
    worker.yielded.connect(lambda p: seen.append((p.done, p.total, w.status.value)))
    finish(qtbot, w)
    assert layer_names(viewer) == ["slide", "gradcam · slide", "regions · slide",
                                   "labels · slide"]
    # progress in tiles: 1024 px in tiles of 256 stepping 192 -> 5 x 5 tiles
    assert seen and seen[-1][:2] == (25, 25)
    assert all(text.endswith("tiles") for *_n, text in seen if not text.startswith("cancel"))
    assert "level 1 (1024 x 1024)" in w.status.value
    assert "tiles of 256 x 256 px, overlap 64" in w.status.value

    heat = viewer.layers["gradcam · slide"]
    assert heat.multiscale
    assert [tuple(level.shape) for level in heat.data] == [(1024, 1024), (512, 512)]
    # level 1's downsample (2) times the image's scale; centred on the level-0 pixels it covers
    np.testing.assert_allclose(heat.scale, (1.0, 1.0))
    np.testing.assert_allclose(heat.translate, (10.25, 20.25))
    meta = heat.metadata["napari_gradcam"]
    assert meta["level"] == 1 and meta["downsample"] == [2.0, 2.0]

    # any heat pixel lies where the level-1 pixel it explains lies: napari draws level-1
    # pixel (r, c) of the image over level-0 pixels 2r .. 2r + 1 (centre 2r + 0.5)
    for p in [(0, 0), (700, 300), (1023, 5)]:
        np.testing.assert_allclose(heat.data_to_world(p),
                                   image.data_to_world(2 * np.array(p) + 0.5), atol=1e-9)
    # the hot object in the heat is where the disc is in the image, within a level-1 pixel
    h = np.asarray(heat.data[0])
    hot = np.argwhere(h >= 0.5 * h.max()).mean(axis=0)
    disc_level0 = np.array(DISC[:2]) * 2 + 0.5  # its centre in level-0 (centre) pixels
    world_hot = np.asarray(heat.data_to_world(hot))
    world_disc = np.asarray(image.data_to_world(disc_level0))
    assert np.abs(world_hot - world_disc).max() <= 2 * SCALE[0]  # one level-1 pixel

    # regions: on the image's own geometry, vertices in level-0 pixels
    shapes = viewer.layers["regions · slide"]
    np.testing.assert_allclose(shapes.scale, SCALE)
    np.testing.assert_allclose(shapes.translate, TRANSLATE)
    rects = [rect_box(d) for d, t in zip(shapes.data, shapes.shape_type) if t == "rectangle"]
    assert rects
    r, c, rad = DISC
    box = np.array(rects[0])
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)  # pixel corners, level 0
    assert abs(centre[0] - 2 * (r + 0.5)) <= 4 and abs(centre[1] - 2 * (c + 0.5)) <= 4
    assert 2 * rad <= box[2] - box[0] <= 8 * rad  # level-0 size: twice the level-1 disc
    assert shapes.features["area"][0] > 4 * np.pi * rad ** 2 * 0.5
    labels = viewer.layers["labels · slide"]
    np.testing.assert_allclose(labels.scale, SCALE)
    np.testing.assert_allclose(labels.translate, TRANSLATE)

    # saved for QuPath: the polygon in level-0 pixel corners (x = column, y = row)
    path = tmp_path / "regions.geojson"
    viewer.layers.selection.active = shapes
    viewer.layers.save(str(path), selected=True, plugin="napari-gradcam")
    features = json.loads(path.read_text())["features"]
    polygon = next(f for f in features if f["geometry"]["type"] == "Polygon")
    x, y = np.array(polygon["geometry"]["coordinates"][0], float).T
    assert abs((x.min() + x.max()) / 2 - 2 * (c + 0.5)) <= 4
    assert abs((y.min() + y.max()) / 2 - 2 * (r + 0.5)) <= 4
    assert 2 * rad <= x.max() - x.min() <= 8 * rad

    # new region settings: re-derived from the tiled heat, still in level-0 pixels
    w.threshold.value = 0.3
    finish(qtbot, w)
    wider = np.array(next(rect_box(d) for d, t in zip(shapes.data, shapes.shape_type)
                      if t == "rectangle"))
    assert wider[0] <= box[0] and wider[2] >= box[2] and abs(wider[0] - box[0]) < 40
    assert viewer.layers["gradcam · slide"].multiscale


def test_a_bad_overlap_is_one_notification_and_changes_nothing(viewer, errors):
    _image, w = slide_widget(viewer, tile=256, overlap=256)
    before = layer_names(viewer)
    assert w.run() is None
    assert len(errors) == 1 and "overlap" in errors[0]
    assert layer_names(viewer) == before and not w.running


def test_a_mask_on_a_coarser_level_is_refused_in_one_sentence(viewer, errors):
    _image, w = slide_widget(viewer)
    viewer.add_labels(np.ones((2048, 2048), np.uint8), name="tissue", scale=SCALE,
                      translate=TRANSLATE)
    w.mask.value = viewer.layers["tissue"]
    before = layer_names(viewer)
    assert w.run() is None
    assert len(errors) == 1 and "level 0" in errors[0] and "'none'" in errors[0]
    assert layer_names(viewer) == before


def test_cancel_mid_tiles_leaves_the_layers_as_they_were(viewer, qtbot):
    _image, w = slide_widget(viewer, level=0, tile=128, overlap=0)  # 256 tiles of level 0
    w.batch_size.value = 1
    before = layer_names(viewer)
    worker = w.run()
    seen = []
    worker.yielded.connect(seen.append)
    qtbot.waitUntil(lambda: len(seen) >= 2, timeout=30_000)
    with qtbot.waitSignal(worker.finished, timeout=30_000):
        w.cancel_button.clicked()
    assert seen[-1].done < seen[-1].total == 256
    assert layer_names(viewer) == before and "cancelled" in w.status.value


def test_live_on_a_multiscale_layer_is_refused_in_one_sentence(viewer, qtbot, errors):
    _image, w = slide_widget(viewer)
    w.live.value = True
    qtbot.waitUntil(lambda: w.status.value.startswith("live:"), timeout=5_000)
    assert "multiscale" in w.status.value and "untick live" in w.status.value
    assert len(errors) == 1 and not w.running and layer_names(viewer) == ["slide"]


def test_heat_pyramid_halves_until_the_coarsest_level_fits():
    heat = np.arange(1000 * 600, dtype=np.float32).reshape(1000, 600)
    levels = heat_pyramid(heat, max_side=256)
    assert [lv.shape for lv in levels] == [(1000, 600), (500, 300), (250, 150)]
    np.testing.assert_allclose(levels[1], heat.reshape(500, 2, 300, 2).mean(axis=(1, 3)))
    odd = heat_pyramid(np.ones((3, 513, 5), np.float32), max_side=300)
    assert [lv.shape for lv in odd] == [(3, 513, 5), (3, 257, 3)]
    np.testing.assert_allclose(odd[1], 1.0)  # an odd edge averaged with itself
    # a lazy (zarr) heat: halved band by band, the same numbers
    zarr = pytest.importorskip("zarr")
    lazy = zarr.create_array(store={}, shape=heat.shape, chunks=(128, 128), dtype="f4")
    lazy[:] = heat
    np.testing.assert_allclose(heat_pyramid(lazy, max_side=256, band=64)[2], levels[2])


def test_level_geometry_puts_a_level_pixel_over_the_level0_pixels_it_covers(viewer):
    image = add_slide(viewer)
    geo = level_geometry(image, (4.0, 4.0))
    heat = viewer.add_image(np.zeros((512, 512), np.float32), **geo)
    # level-2 pixel (r, c) covers level-0 pixels 4r .. 4r + 3: centre 4r + 1.5
    for p in [(0, 0), (3, 7), (511, 200)]:
        np.testing.assert_allclose(heat.data_to_world(p),
                                   image.data_to_world(4 * np.array(p) + 1.5), atol=1e-9)
    assert level_geometry(image, (1.0, 1.0)) == {"scale": SCALE, "translate": TRANSLATE}
