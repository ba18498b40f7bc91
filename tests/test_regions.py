"""find_regions: exact boxes, polygons that rasterise back to the thresholded pixels, masks,
stacks, thresholds, connectivity."""

from pathlib import Path

import numpy as np
import pytest
import shapely
from scipy.ndimage import gaussian_filter

from napari_gradcam import find_regions
from napari_gradcam.regions import rasterize

CHEST = Path(__file__).resolve().parent / "data" / "chest-xray"  # copied from shared/data


def disc(shape, centre, radius, value=1.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.float32)
    out[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2] = value
    return out


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def region_mask(region, shape):
    return rasterize(region.polygon, shape)


def test_disc_exact_box_area_and_outline():
    h = disc((64, 80), (30, 40), 10)
    fg = h >= 0.5
    (r,) = find_regions(h, 0.5, simplify=0)
    rows, cols = np.nonzero(fg)
    assert r.bbox == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
    assert r.area == fg.sum()
    assert r.polygon.area == fg.sum()  # the exact pixel outline
    assert (region_mask(r, h.shape) == fg).all()
    assert r.index == () and r.class_id is None
    assert r.peak == 1.0 and r.mean == 1.0
    box = r.box
    assert box.bounds == (r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2])


def test_simplified_polygon_stays_close_and_has_fewer_vertices():
    h = disc((128, 128), (64, 60), 30)
    fg = h >= 0.5
    exact = find_regions(h, 0.5, simplify=0)[0].polygon
    (r,) = find_regions(h, 0.5, simplify=1.0)
    assert r.polygon.is_valid
    assert shapely.get_num_coordinates(r.polygon) < shapely.get_num_coordinates(exact) / 3
    assert iou(region_mask(r, h.shape), fg) >= 0.95


def test_ring_keeps_its_hole():
    h = disc((60, 60), (30, 30), 15) - disc((60, 60), (30, 30), 6)
    fg = h >= 0.5
    for tol in (0, 1.0):
        (r,) = find_regions(h, 0.5, simplify=tol)
        assert r.polygon.geom_type == "Polygon" and len(r.polygon.interiors) == 1
        assert r.polygon.is_valid
        assert iou(region_mask(r, h.shape), fg) >= (1.0 if tol == 0 else 0.95)
    assert r.area == fg.sum()


def test_regions_touching_the_border():
    h = np.zeros((30, 40), np.float32)
    h[:5, :7] = 0.9  # top-left corner
    h[20:, 35:] = 0.8  # bottom-right corner
    h[10:14, 15:40] = 0.7  # right edge
    rs = find_regions(h, 0.5, min_area=1, simplify=0)
    assert [r.bbox for r in rs] == [(0, 0, 5, 7), (10, 15, 14, 40), (20, 35, 30, 40)]
    for r in rs:
        assert r.polygon.is_valid
        assert r.polygon.bounds == (r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2])
        assert r.polygon.area == r.area


def test_specks_and_min_area():
    h = np.zeros((20, 20), np.float32)
    h[5, 5] = 0.9
    h[10:14, 10:14] = 0.9
    assert [r.area for r in find_regions(h, 0.5, min_area=1)] == [1, 16]
    assert [r.area for r in find_regions(h, 0.5)] == [16]  # default min_area = 16
    speck = find_regions(h, 0.5, min_area=1, simplify=1.0)[0]
    # a single pixel stays a unit square: valid, three or more distinct vertices
    assert speck.polygon.equals(shapely.box(5, 5, 6, 6))


def test_concave_shape_exact():
    h = np.zeros((30, 30), np.float32)
    h[5:25, 5:10] = 1
    h[5:25, 20:25] = 1
    h[20:25, 5:25] = 1  # a U: rows with two runs
    fg = h >= 0.5
    (r,) = find_regions(h, 0.5, simplify=0)
    assert r.polygon.is_valid and r.polygon.area == fg.sum() == r.area
    assert (region_mask(r, h.shape) == fg).all()
    assert shapely.get_num_coordinates(r.polygon) == 9  # 8 corners, closed


def test_stack_with_regions_on_some_frames():
    stack = np.zeros((5, 40, 40), np.float32)
    stack[1] = disc((40, 40), (10, 10), 5)
    stack[3] = disc((40, 40), (30, 25), 6) + disc((40, 40), (8, 30), 4)
    rs = find_regions(stack, 0.5, class_ids=[0, 1, 2, 1, 0], scores=np.arange(5) * 1.5)
    assert [r.index for r in rs] == [(1,), (3,), (3,)]
    assert [r.class_id for r in rs] == [1, 1, 1]
    assert [r.score for r in rs] == [1.5, 4.5, 4.5]
    assert rs[1].bbox[0] < rs[2].bbox[0]  # top to bottom within a frame
    # threads or not, the same regions
    one = find_regions(stack, 0.5, workers=1)
    assert [(r.index, r.bbox, r.area) for r in one] == [(r.index, r.bbox, r.area) for r in rs]


def test_3d_heatmaps_give_regions_per_plane():
    vol = np.zeros((2, 4, 32, 32), np.float32)
    vol[1, 2] = disc((32, 32), (16, 16), 6)
    (r,) = find_regions(vol, 0.5)
    assert r.index == (1, 2)


def test_threshold_modes():
    h = 0.6 * disc((40, 40), (20, 20), 10) + 0.3 * disc((40, 40), (20, 20), 14)
    absolute = find_regions(h, 0.5)
    relative = find_regions(h, 0.5, threshold_mode="relative")  # 0.5 x 0.9 = 0.45
    low_rel = find_regions(h, 0.2, threshold_mode="relative")  # 0.18: the outer disc
    otsu = find_regions(h, "otsu")
    assert absolute[0].area == relative[0].area == (h >= 0.45).sum()
    assert low_rel[0].area == (h >= 0.18).sum()
    assert relative[0].threshold == pytest.approx(0.45)
    assert otsu[0].area in ((h >= 0.3).sum(), (h >= 0.9).sum())
    assert find_regions(np.zeros((10, 10), np.float32), "otsu") == []
    assert find_regions(np.zeros((10, 10), np.float32), 0.5, threshold_mode="relative") == []


def test_connectivity():
    h = np.zeros((20, 20), np.float32)
    h[2:6, 2:6] = 1
    h[6:10, 6:10] = 1  # touches the first square at one corner only
    four = find_regions(h, 0.5, min_area=1)
    eight = find_regions(h, 0.5, min_area=1, connectivity=2)
    assert len(four) == 2 and all(r.polygon.geom_type == "Polygon" for r in four)
    assert len(eight) == 1 and eight[0].area == 32 and eight[0].polygon.is_valid
    assert eight[0].polygon.area == 32


def test_peak_and_mean():
    rng = np.random.default_rng(0)
    h = gaussian_filter(rng.random((64, 64)), 3).astype(np.float32)
    h = (h - h.min()) / (h.max() - h.min())
    for r in find_regions(h, 0.6, min_area=1, simplify=0):
        m = region_mask(r, h.shape)
        assert r.peak == pytest.approx(h[m].max())
        assert r.mean == pytest.approx(h[m].mean(), rel=1e-5)


def test_mask_restricts_regions():
    h = disc((50, 50), (25, 25), 20)
    mask = np.zeros((50, 50), np.uint8)
    mask[:, :20] = 3  # a label image: > 0 counts
    (r,) = find_regions(h, 0.5, mask=mask)
    assert r.bbox[3] == 20
    assert not (region_mask(r, h.shape) & (mask == 0)).any()
    stack = np.stack([h, h])
    full = np.stack([mask > 0, np.zeros((50, 50), bool)])
    rs = find_regions(stack, 0.5, mask=full)
    assert [x.index for x in rs] == [(0,)]
    with pytest.raises(ValueError, match="spatial shape"):
        find_regions(h, 0.5, mask=np.ones((10, 10), bool))


@pytest.mark.parametrize("path", sorted((CHEST / "lung-masks").glob("*.png")),
                         ids=lambda p: p.stem)
def test_lung_masks_from_the_chest_xray_set(path):
    from PIL import Image

    lungs = np.asarray(Image.open(path).convert("L")) > 127
    assert lungs.shape == (512, 512) and 0 < lungs.mean() < 0.6
    heat = disc((512, 512), (256, 256), 200) * 0.9 + 0.05  # heat over both lungs and between
    exact = find_regions(heat, 0.5, mask=lungs, simplify=0)
    assert len(exact) >= 2  # left and right lung, cut apart by the mediastinum
    covered = np.zeros_like(lungs)
    for r in exact:
        m = region_mask(r, lungs.shape)
        assert not (m & ~lungs).any()  # never outside the lungs
        covered |= m
    assert (covered == (lungs & (heat >= 0.5))).all()
    # simplified outlines may cut across the lung border by a fraction of a pixel here and there
    for r in find_regions(heat, 0.5, mask=lungs):
        m = region_mask(r, lungs.shape)
        assert (m & ~lungs).sum() < 0.01 * r.area


def test_polygons_follow_random_regions():
    """Exact before simplification, IoU >= 0.95 after simplify=1.0, always valid, never fewer
    than three distinct vertices: over a seeded sample of irregular regions."""
    rng = np.random.default_rng(7)
    worst = 1.0
    count = 0
    for k in range(25):
        h = gaussian_filter(rng.normal(size=(96, 96)), rng.uniform(2, 8))
        h = ((h - h.min()) / (h.max() - h.min())).astype(np.float32)
        thr = float(rng.uniform(0.3, 0.7))
        fg = h >= thr
        exact = find_regions(h, thr, min_area=1, simplify=0)
        simple = find_regions(h, thr, min_area=1, simplify=1.0)
        assert [r.bbox for r in exact] == [r.bbox for r in simple]
        union = np.zeros_like(fg)
        for e, s in zip(exact, simple):
            me, ms = region_mask(e, fg.shape), region_mask(s, fg.shape)
            assert me.sum() == e.area
            union |= me
            worst = min(worst, iou(me, ms))
            for r in (e, s):
                assert r.polygon.is_valid and not r.polygon.is_empty
                for part in shapely.get_parts(r.polygon):
                    assert len(set(part.exterior.coords)) >= 3
            count += 1
        assert (union == fg).all()  # together the regions are exactly the thresholded pixels
    assert count > 100
    assert worst >= 0.95


def test_accepts_torch_and_dask():
    torch = pytest.importorskip("torch")
    da = pytest.importorskip("dask.array")
    h = np.stack([disc((32, 32), (16, 16), 6), disc((32, 32), (8, 8), 5)])
    ref = [(r.index, r.bbox) for r in find_regions(h, 0.5)]
    assert [(r.index, r.bbox) for r in find_regions(torch.from_numpy(h), 0.5)] == ref
    assert [(r.index, r.bbox) for r in find_regions(da.from_array(h, chunks=1), 0.5)] == ref


def test_bad_arguments():
    h = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="number in"):
        find_regions(h, 1.5)
    with pytest.raises(ValueError, match="otsu"):
        find_regions(h, "triangle")
    with pytest.raises(ValueError, match="threshold_mode"):
        find_regions(h, 0.5, threshold_mode="percent")
    with pytest.raises(ValueError, match="connectivity"):
        find_regions(h, 0.5, connectivity=4)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        find_regions(np.zeros(5), 0.5)
    with pytest.raises(ValueError, match="class_ids"):
        find_regions(np.zeros((3, 8, 8)), 0.5, class_ids=[1, 2])
