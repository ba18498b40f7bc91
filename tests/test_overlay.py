"""Overlay PNGs: the heat, and over it each region's box and polygon outline in its class colour
and one readable label per region, kept inside the image; volumes as MIP or mid plane."""

import csv
from dataclasses import replace

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

import napari_gradcam as ng
from napari_gradcam import render
from napari_gradcam.annotations import class_color
from napari_gradcam.render import (
    draw_regions,
    drawing_sizes,
    label_places,
    overlay_rgb,
    region_labels,
    volume_regions,
)

GREY = 100  # a base no class colour, label backing or text equals


def grey(h, w):
    return np.full((h, w, 3), GREY, np.uint8)


def blocks(shape, *boxes):
    """Heat 1 on each (r0, c0, r1, c1) block, else 0."""
    heat = np.zeros(shape, np.float32)
    for r0, c0, r1, c1 in boxes:
        heat[r0:r1, c0:c1] = 1
    return heat


def regions_of(heat, cid=0, **kw):
    kw = {"min_area": 1, "simplify": 0, **kw}
    return ng.find_regions(heat, class_ids=np.int64(cid), scores=np.float32(2.0), **kw)


def border(r0, c0, r1, c1, shape, width=1):
    """The pixels a box (max exclusive) is outlined on: its outermost ``width`` rows/cols."""
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m & ~binary_erosion(m, iterations=width, border_value=0)


def lit(rgb, colour):
    return (rgb == np.array(colour, np.uint8)).all(-1)


@pytest.mark.parametrize("width", [1, 3])
def test_box_and_outline_lie_exactly_on_the_region_pixels(width):
    """A rectangle is outlined on its own border pixels, not one pixel outside; an L-shaped
    region's polygon on its outermost pixels, its box on the box's border."""
    shape = (60, 80)
    heat = blocks(shape, (10, 15, 22, 31))
    heat[35:55, 40:46] = 1  # an L: a bar and a foot
    heat[49:55, 46:70] = 1
    found = regions_of(heat, cid=3)
    assert [r.bbox for r in found] == [(10, 15, 22, 31), (35, 40, 55, 70)]
    out = draw_regions(grey(*shape), found, line_width=width)
    expected = border(10, 15, 22, 31, shape, width) | border(35, 40, 55, 70, shape, width)
    expected |= (heat > 0) & ~binary_erosion(heat > 0, iterations=width, border_value=0)
    colour = class_color(3)
    assert np.array_equal(lit(out, colour), expected)  # exactly there: no pixel more or less
    assert np.array_equal(lit(out, (GREY,) * 3), ~expected)  # the rest is untouched
    assert lit(out, colour)[10, 15:31].all() and not lit(out, colour)[9, 15:31].any()
    assert not lit(out, colour)[10:22, 31].any() and not lit(out, colour)[22, 15:31].any()


def test_a_ring_is_outlined_on_its_outer_and_inner_edges():
    shape = (30, 30)
    heat = blocks(shape, (5, 5, 25, 25))
    heat[11:19, 11:19] = 0  # the hole
    found = regions_of(heat)
    assert len(found) == 1 and len(found[0].polygon.interiors) == 1
    out = draw_regions(grey(*shape), found)
    ring = heat > 0
    assert np.array_equal(lit(out, class_color(0)), ring & ~binary_erosion(ring))
    assert lit(out, class_color(0))[10, 11:19].all() and not lit(out, class_color(0))[11:19, 11:19].any()


def test_default_line_and_text_sizes_grow_with_the_image():
    assert drawing_sizes((256, 256)) == (1, 10)
    assert drawing_sizes((512, 512, 3)) == (1, 10)
    assert drawing_sizes((2048, 1600)) == (4, 31)


def test_a_box_at_the_image_edge_is_drawn_on_the_edge_pixels():
    shape = (20, 30)
    found = regions_of(blocks(shape, (0, 22, 20, 30)))
    out = draw_regions(grey(*shape), found)
    assert np.array_equal(lit(out, class_color(0)), border(0, 22, 20, 30, shape))


def label_regions(shape, boxes, cid=0):
    heat = blocks(shape, *boxes)
    found = regions_of(heat, cid=cid)
    assert len(found) == len(boxes)
    return found


def text_pixels(rgb, place):
    y0, x0, y1, x1 = place
    return int((rgb[y0:y1, x0:x1] >= 230).all(-1).sum())


def test_labels_at_every_edge_and_corner_stay_whole_inside_the_image():
    h, w, s = 120, 300, 6
    corners = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s),  # corners
               (0, 147), (h - s, 147), (57, 0), (57, w - s)]  # edges
    boxes = [(r, c, r + s, c + s) for r, c in corners]
    found = label_regions((h, w), boxes)
    labels = ["disc 0.93"] * len(found)
    places = label_places((h, w), found, labels)
    lh, lw = places[0][2] - places[0][0], places[0][3] - places[0][1]
    assert lh >= 10 and lw > lh
    middle = label_regions((h, w), [(57, 147, 57 + s, 147 + s)])
    ref = draw_regions(grey(h, w), middle, ["disc 0.93"])
    whole = text_pixels(ref, label_places((h, w), middle, ["disc 0.93"])[0])
    assert whole > 20
    out = draw_regions(grey(h, w), found, labels)
    for region, place in zip(found, places):
        y0, x0, y1, x1 = place
        assert 0 <= y0 and y1 <= h and 0 <= x0 and x1 <= w
        assert (y1 - y0, x1 - x0) == (lh, lw)  # whole, not cut
        r0, _, r1, c1 = region.bbox
        assert y0 <= r1 and y1 >= r0 and x0 <= c1  # beside its region
        # all of its text shows (a pixel or two may differ where a line runs under the text)
        assert abs(text_pixels(out, place) - whole) <= 2
        patch = out[y0:y1, x0:x1]
        bar = lit(patch, class_color(0))[:, 0]
        assert bar.all()  # the class-coloured bar at its left
        assert ((patch <= 60).all(-1)).sum() > patch.shape[0] * patch.shape[1] // 3  # dark
    for i, a in enumerate(places):  # none on another
        for b in places[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def test_overlapping_labels_are_thinned_keeping_the_larger_regions():
    """A small region just left of a larger one's label: above, inside or below its box, its
    label would cover that label, so it is left out; its lines stay."""
    shape = (120, 200)
    lh = label_places(shape, label_regions(shape, [(60, 60, 70, 70)]), ["big 0.90"])[0]
    lh = lh[2] - lh[0]
    top = 2 * lh + 5  # the larger region's label: rows lh + 5 .. top
    heat = blocks(shape, (top, 30, top + 30, 70), (lh + 7, 20, lh + 9, 24),
                  (100, 150, 110, 160))  # and one far away, which keeps its label
    found = regions_of(heat)
    big, small, far = (next(r for r in found if r.bbox[1] == c) for c in (30, 20, 150))
    assert big.area > far.area > small.area
    names = {id(big): "big 0.90", id(small): "small 0.80", id(far): "far 0.70"}
    labels = [names[id(r)] for r in found]
    places = {id(r): p for r, p in zip(found, label_places(shape, found, labels))}
    assert places[id(small)] is None
    assert places[id(big)][:2] == (lh + 5, 30) and places[id(far)] is not None
    drawn = draw_regions(grey(*shape), found, labels)
    assert text_pixels(drawn, places[id(big)]) > 20 and text_pixels(drawn, places[id(far)]) > 20
    assert lit(drawn, class_color(0))[border(*small.bbox, shape)].all()  # its lines stay


def test_a_label_larger_than_the_image_is_left_out_and_the_lines_stay():
    found = regions_of(blocks((12, 12), (2, 2, 8, 8)))
    assert label_places((12, 12), found, ["a-very-long-class 0.99"]) == [None]
    out = draw_regions(grey(12, 12), found, ["a-very-long-class 0.99"])
    assert np.array_equal(lit(out, class_color(0)), border(2, 2, 8, 8, (12, 12)))


def test_no_regions_leaves_the_heat_only():
    rng = np.random.default_rng(0)
    image, heat = rng.random((40, 50)), rng.random((40, 50))
    rgb = overlay_rgb(image, heat)
    assert np.array_equal(draw_regions(rgb, []), rgb)
    assert np.array_equal(draw_regions(rgb, [], []), rgb)


@pytest.mark.parametrize("image", [
    np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8),  # RGB
    np.random.default_rng(2).integers(0, 65536, (64, 64), dtype=np.uint16),  # 16-bit
], ids=["rgb", "uint16"])
def test_rgb_and_16_bit_images_get_their_boxes(image):
    heat = blocks((64, 64), (20, 20, 30, 34))
    found = regions_of(heat, cid=1)
    out = draw_regions(overlay_rgb(image, heat), found, region_labels(found, [], ["a", "b"]))
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    assert lit(out, class_color(1))[border(20, 20, 30, 34, (64, 64))].all()
    assert text_pixels(out, label_places((64, 64), found, ["b 2.00"])[0]) > 10


def test_labels_say_class_and_probability_else_the_score():
    found = regions_of(blocks((30, 30), (2, 2, 8, 8), (20, 20, 26, 26)))
    found = [found[0], replace(found[1], class_id=1)]
    rows = [{"index": [], "class": "disc", "class_id": 0, "score": 2.58, "probability": 0.9298},
            {"index": [], "class": "seg", "class_id": 1, "score": 41.5}]  # no probability
    assert region_labels(found, rows, ["disc", "seg"]) == ["disc 0.93", "seg 41.50"]
    assert region_labels(found, [], ["disc"]) == ["disc 2.00", "1 2.00"]  # own score, no name
    unclassed = ng.find_regions(blocks((30, 30), (2, 2, 8, 8)), min_area=1)
    assert region_labels(unclassed, rows, ["disc"]) == [None]
    stacked = [replace(found[0], index=(3,))]
    rows3 = [{**rows[0], "index": [2], "probability": 0.1},
             {**rows[0], "index": [3], "probability": 0.5}]
    assert region_labels(stacked, rows3, ["disc"]) == ["disc 0.50"]


def test_hostile_drawing_inputs_say_what_to_change():
    found = regions_of(blocks((10, 10), (2, 2, 5, 5)))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) RGB.*overlay_rgb"):
        draw_regions(np.zeros((10, 10)), found)
    with pytest.raises(ValueError, match="2 labels for 1 regions: give one label"):
        draw_regions(grey(10, 10), found, ["a", "b"])
    with pytest.raises(ValueError, match="'side'.*'mip' or 'mid'"):
        volume_regions(found, "side", 0)


def test_without_a_scalable_font_the_bitmap_font_is_enlarged(monkeypatch):
    from PIL import ImageFont

    bitmap = ImageFont.load_default_imagefont()

    def old_pillow(size=None):
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return bitmap

    render._font.cache_clear()
    render._text_mask.cache_clear()
    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    try:
        small = render._text_mask("disc 0.93", 11)
        large = render._text_mask("disc 0.93", 33)
        assert large.shape == (small.shape[0] * 3, small.shape[1] * 3) and small.max() > 0.9
        found = regions_of(blocks((100, 200), (50, 50, 60, 60)))
        out = draw_regions(grey(100, 200), found, ["disc 0.93"], font_size=22)
        assert text_pixels(out, label_places((100, 200), found, ["disc 0.93"], 22)[0]) > 20
    finally:
        render._font.cache_clear()
        render._text_mask.cache_clear()


# ---- volumes ---------------------------------------------------------------------------------

def volume_case():
    heat = np.zeros((16, 64, 64), np.float32)
    heat[6:11, 20:30, 6:20] = 1  # crosses the middle plane (8)
    heat[8, 24:26, 6:8] = 0  # a notch in the middle plane only
    heat[0:4, 44:54, 30:44] = 1  # does not
    found = ng.find_regions(heat, ndim=3, min_area=1, simplify=0, class_ids=np.int64(2),
                            scores=np.float32(1.5))
    return heat, sorted(found, key=lambda r: r.bbox[1])  # by row


def test_volume_views_project_every_region_or_keep_those_crossing_the_middle():
    heat, found = volume_case()
    mip = volume_regions(found, "mip")
    assert [r.bbox for r in mip] == [(20, 6, 30, 20), (44, 30, 54, 44)]
    mid = volume_regions(found, "mid", 8)
    assert [r.bbox for r in mid] == [(20, 6, 30, 20)]
    assert mid[0].polygon.equals(found[0].polygons[8])  # its outline in that plane
    assert mid[0].polygon.area == 10 * 14 - 4
    assert mip[0].polygon.area == 10 * 14  # the notch is filled by the other planes
    assert volume_regions(found, "mid", 12) == []
    # a 3D model's plane-wise regions: the plane last in their index
    planes = ng.find_regions(heat, min_area=1, class_ids=np.int64(2))
    assert {r.index for r in volume_regions(planes, "mid", 8)} == {(8,)}
    assert len(volume_regions(planes, "mip")) == len(planes)


def outside_labels(shape, places):
    free = np.ones(shape, bool)
    for p in places:
        if p is not None:
            free[p[0]:p[2], p[1]:p[3]] = False
    return free


@pytest.mark.parametrize("mode", ["mip", "mid"])
def test_volume_overlay_png_draws_the_projected_or_crossing_regions(tmp_path, mode):
    import imageio.v3 as iio

    from napari_gradcam.batch.discover import Unit
    from napari_gradcam.batch.write import _write_volume_overlays

    heat, found = volume_case()
    image = np.random.default_rng(3).random(heat.shape).astype(np.float32)
    rows = [{"index": [], "class": "c", "class_id": 2, "score": 1.5, "probability": 0.8176}]
    _write_volume_overlays(Unit("", "vol", "array"), tmp_path, image, heat, (), (), found,
                           rows, ["a", "b", "c"], mode)
    png = iio.imread(tmp_path / "overlays" / "vol.png")
    assert png.shape == (64, 64, 3)
    shown = volume_regions(found, mode, 8)
    labels = region_labels(shown, rows, ["a", "b", "c"])
    assert labels == ["c 0.82"] * (2 if mode == "mip" else 1)
    places = label_places(png.shape, shown, labels)
    assert all(p is not None for p in places)
    free = outside_labels(png.shape[:2], places)
    on = lit(png, class_color(2))
    assert on[border(20, 6, 30, 20, (64, 64)) & free].all()
    assert on[border(44, 30, 54, 44, (64, 64)) & free].all() == (mode == "mip")
    assert not on[border(43, 29, 55, 45, (64, 64)) & free].any()  # not one pixel outside
    assert not on[border(19, 5, 31, 21, (64, 64)) & free].any()
    if mode == "mid":  # the notch in the middle plane is outlined
        assert on[24:26, 8].all() and on[26, 6:8].all()
    else:
        assert not on[24:26, 8].any()
    for place in places:
        assert text_pixels(png, place) > 10


def test_a_part_of_a_stack_draws_each_frame_s_own_regions(tmp_path):
    """Images 10..12 of a stack: a region indexed (11,) is drawn on ``stack_11.png`` only,
    labelled from that frame's row."""
    import imageio.v3 as iio

    from napari_gradcam.batch.discover import Unit
    from napari_gradcam.batch.write import _write_overlays

    heat = np.stack([blocks((40, 60), (5, 5, 9, 9))] * 3)
    found = [replace(r, index=(11,)) for r in regions_of(heat[1], cid=4)]
    rows = [{"index": [i], "class": "e", "class_id": 4, "score": 1.0, "probability": p}
            for i, p in ((10, 0.1), (11, 0.6), (12, 0.3))]
    _write_overlays(Unit("", "stack", "parts", 10, 13), tmp_path, heat, heat, (3,), (10,),
                    found, rows, ["a", "b", "c", "d", "e"])
    drawn = {i: lit(iio.imread(tmp_path / "overlays" / f"stack_{i}.png"), class_color(4))
             for i in (10, 11, 12)}
    assert not drawn[10].any() and not drawn[12].any()
    assert drawn[11][border(5, 5, 9, 9, (40, 60))].all()
    assert region_labels(found, rows, list("abcde")) == ["e 0.60"]


# ---- the CLI ---------------------------------------------------------------------------------

def test_cli_overlay_draws_the_regions_with_their_labels(tmp_path, monkeypatch):
    """``batch img.tif --model demo --overlay`` on a 16-bit TIFF: the PNG holds every GeoJSON
    box in its class colour, labelled with the class and the summary's probability."""
    import imageio.v3 as iio
    import tifffile

    from napari_gradcam.batch import write
    from napari_gradcam.cli import main
    from napari_gradcam.export import read_geojson
    from napari_gradcam.samples import sample_image

    tifffile.imwrite(tmp_path / "img.tif", (sample_image() * 65535).astype(np.uint16))
    drawn = []
    real = write.draw_regions

    def spy(rgb, regions, labels=None, **kw):
        drawn.append((list(regions), list(labels)))
        return real(rgb, regions, labels, **kw)

    monkeypatch.setattr(write, "draw_regions", spy)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "img.tif"), "--model", "demo", "--overlay",
                 "--target", "found", "--out", str(out), "--quiet"]) == 0
    png = iio.imread(out / "overlays" / "img.png")
    assert png.shape == (256, 256, 3)
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    annotations, _ = read_geojson(out / "geojson" / "img.geojson")
    boxes = []
    for a in annotations:
        if a.kind == "rectangle":
            c0, r0, c1, r1 = a.geometry.bounds
            boxes.append((round(r0), round(c0), round(r1), round(c1), a.class_id))
    assert len(drawn) == 1
    regions, labels = drawn[0]
    assert len(boxes) == len(regions) == sum(int(r["regions"]) for r in rows) >= 2
    assert sorted(boxes) == sorted((*r.bbox, r.class_id) for r in regions)
    assert sorted(labels) == sorted(f"{r['class']} {float(r['probability']):.2f}" for r in rows
                                    for _ in range(int(r["regions"])))
    places = label_places(png.shape, regions, labels)
    assert all(p is not None for p in places)
    free = outside_labels(png.shape[:2], places)
    for *box, cid in boxes:
        assert lit(png, class_color(cid))[border(*box, png.shape[:2]) & free].all()
    for place in places:
        assert text_pixels(png, place) > 20


def test_overlay_help_says_what_is_drawn(capsys):
    from napari_gradcam.cli import main

    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "box and polygon outline in its class colour" in text
    assert "one label per region" in text


def test_an_island_in_a_hole_is_drawn_whatever_the_order_of_the_parts():
    """The overlay rasterises as agreement and the exports do: a part lying in another
    part's hole is drawn, first or last."""
    import shapely

    ring = shapely.Polygon([(0, 0), (30, 0), (30, 30), (0, 30)],
                           [[(8, 8), (22, 8), (22, 22), (8, 22)]])
    island = shapely.box(12, 12, 18, 18)
    base = regions_of(blocks((40, 40), (0, 0, 30, 30)))[0]
    drawn = []
    for parts in ([island, ring], [ring, island]):
        region = replace(base, polygon=shapely.MultiPolygon(parts), bbox=(0, 0, 0, 0))
        out = draw_regions(grey(40, 40), [region], [None], line_width=1)
        drawn.append(lit(out, class_color(0)))
    np.testing.assert_array_equal(drawn[0], drawn[1])
    assert drawn[0][12, 12:18].all() and not drawn[0][14:16, 14:16].any()  # its outline


def test_a_label_shows_no_number_that_is_not_finite():
    found = regions_of(blocks((30, 30), (2, 2, 8, 8)))
    nan_row = [{"index": [], "class_id": 0, "probability": float("nan"), "score": 3.0}]
    assert region_labels(found, nan_row, ["disc"]) == ["disc 3.00"]
    neither = [{"index": [], "class_id": 0, "probability": float("nan"),
                "score": float("nan")}]
    assert region_labels([replace(found[0], score=float("nan"))], neither,
                         ["disc"]) == ["disc"]
    assert render.shown_score({"probability": None, "score": float("inf")}) is None
