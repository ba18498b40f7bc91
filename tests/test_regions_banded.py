"""find_regions on maps read band by band (zarr, memmap, dask, large NumPy): the same regions
as on the whole map, across band seams; bounded memory; scale_regions."""

import tracemalloc

import numpy as np
import pytest

import napari_gradcam.regions as regions_module
from napari_gradcam.regions import find_regions, label_image, scale_regions

zarr = pytest.importorskip("zarr")


def blobs(shape, n, seed, sigma=(3.0, 12.0)):
    """A float32 heat in [0, 1] of ``n`` Gaussian blobs: many cross any band seam."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.float32)
    for _ in range(n):
        y, x = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        s = rng.uniform(*sigma)
        out += (rng.uniform(0.3, 1.0) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2)
                                                / (2 * s * s))).astype(np.float32)
    return out / out.max()


def as_zarr(a, chunks=(16, 64)):
    z = zarr.create_array(store={}, shape=a.shape, chunks=chunks[-a.ndim:] if a.ndim <= 2
                          else (1,) * (a.ndim - 2) + chunks, dtype=a.dtype)
    z[:] = a
    return z


def as_memmap(a, path):
    m = np.memmap(path, dtype=a.dtype, mode="w+", shape=a.shape)
    m[:] = a
    m.flush()
    return m


def assert_same(whole, banded, simplified=False):
    """Same regions in the same order; polygons equal (symmetric difference of zero area),
    or with simplification within a small part of the region."""
    assert len(banded) == len(whole)
    for a, b in zip(whole, banded):
        assert b.index == a.index and b.bbox == a.bbox and b.area == a.area
        assert b.peak == a.peak and b.mean == pytest.approx(a.mean, rel=1e-12)
        assert b.threshold == a.threshold
        assert (b.class_id, b.score) == (a.class_id, a.score)
        assert b.polygon.is_valid
        diff = a.polygon.symmetric_difference(b.polygon).area
        if simplified:
            assert diff <= 0.02 * a.area
        else:
            assert diff == 0 and b.polygon.area == a.area
        assert np.array_equal(np.asarray(b._runs), np.asarray(a._runs))


HEAT = blobs((200, 300), 60, seed=1)


@pytest.mark.parametrize("connectivity", [1, 2])
def test_zarr_memmap_and_dask_bands_give_the_whole_maps_regions(connectivity, tmp_path):
    heat = HEAT
    lazy = {"zarr": as_zarr(heat), "memmap": as_memmap(heat, tmp_path / "heat.f4")}
    dask = pytest.importorskip("dask.array")
    lazy["dask"] = dask.from_array(heat, chunks=(50, 100))
    for simplify in (0, 1.0):
        whole = find_regions(heat, 0.4, min_area=4, simplify=simplify,
                             connectivity=connectivity)
        # many regions, many of them across seams of 7- and 16-row bands
        assert len(whole) > 20
        assert sum(r.bbox[2] - r.bbox[0] > 16 for r in whole) >= 5
        for arr in lazy.values():
            for rows in (7, 16):
                banded = find_regions(arr, 0.4, min_area=4, simplify=simplify,
                                      connectivity=connectivity, band_rows=rows)
                assert_same(whole, banded, simplified=simplify > 0)
    # one-row bands: every row is a seam
    assert_same(find_regions(heat, 0.4, simplify=0, connectivity=connectivity),
                find_regions(lazy["zarr"], 0.4, simplify=0, connectivity=connectivity,
                             band_rows=1))


def test_u_shapes_whose_arms_meet_in_a_later_band_are_one_region():
    heat = np.zeros((80, 120), np.float32)
    heat[5:60, 10:14] = 1  # U: two arms joined only by the bottom bar (rows 56..59)
    heat[5:60, 40:44] = 1
    heat[56:60, 10:44] = 1
    # W (a chain of merges): arms a, b, c; a and b meet at rows 30..31, b and c at rows 70..71
    heat[2:32, 60:63] = 1
    heat[2:72, 75:78] = 1
    heat[2:72, 90:93] = 1
    heat[30:32, 60:78] = 1
    heat[70:72, 75:93] = 1
    # a ring across several bands: one region with one hole
    heat[62:78, 10:40] = 1
    heat[66:74, 16:34] = 0
    whole = find_regions(heat, 0.5, min_area=1, simplify=0)
    assert len(whole) == 3
    for rows in (3, 7, 16):
        banded = find_regions(as_zarr(heat), 0.5, min_area=1, simplify=0, band_rows=rows)
        assert_same(whole, banded)
    w, u, ring = banded  # top to bottom (W from row 2, U from row 5), then left to right
    assert u.bbox == (5, 10, 60, 44) and u.area == 2 * 55 * 4 + 4 * 26
    assert w.bbox == (2, 60, 72, 93)
    assert ring.bbox == (62, 10, 78, 40) and len(ring.polygon.interiors) == 1
    assert ring.area == 16 * 30 - 8 * 18


def test_objects_on_seam_rows_and_corners_across_a_seam():
    heat = np.zeros((30, 40), np.float32)
    heat[6, 2:12] = 1  # the last row of band 0 (7-row bands)
    heat[7, 15:25] = 1  # the first row of band 1
    heat[13:15, 30:35] = 1  # band 1's last row and band 2's first: one region
    heat[20, 5] = heat[21, 6] = 1  # diagonal neighbours across the seam at row 20 / 21
    z = as_zarr(heat, chunks=(7, 40))
    for connectivity in (1, 2):
        whole = find_regions(heat, 0.5, min_area=1, simplify=0, connectivity=connectivity)
        banded = find_regions(z, 0.5, min_area=1, simplify=0, connectivity=connectivity,
                              band_rows=7)
        assert_same(whole, banded)
        assert [r.bbox for r in banded][:3] == [(6, 2, 7, 12), (7, 15, 8, 25), (13, 30, 15, 35)]
        corner = banded[3:]
        if connectivity == 1:
            assert [r.area for r in corner] == [1, 1]
        else:
            (joined,) = corner
            assert joined.area == 2 and joined.polygon.geom_type == "MultiPolygon"


def test_min_area_applies_to_the_merged_region_not_its_band_pieces():
    heat = np.zeros((40, 40), np.float32)
    heat[3:18, 5:7] = 1  # 30 pixels in pieces of 8, 14, 8 across 7-row bands
    heat[25:30, 20:22] = 1  # 10 pixels: below min_area whole
    (kept,) = find_regions(as_zarr(heat), 0.5, min_area=16, simplify=0, band_rows=7)
    assert kept.area == 30 and kept.bbox == (3, 5, 18, 7)
    assert_same(find_regions(heat, 0.5, min_area=16, simplify=0), [kept])


@pytest.mark.parametrize("threshold, mode", [(0.5, "relative"), ("otsu", "absolute")])
def test_relative_and_otsu_thresholds_come_from_the_whole_map(threshold, mode):
    heat = 0.6 * HEAT
    heat[190:196, 10:16] = 0.9  # the maximum lies in the last band only
    whole = find_regions(heat, threshold, threshold_mode=mode, simplify=0)
    banded = find_regions(as_zarr(heat), threshold, threshold_mode=mode, simplify=0,
                          band_rows=16)
    assert_same(whole, banded)  # the same float threshold, to the bit
    if mode == "relative":
        assert banded[0].threshold == pytest.approx(0.45)
    else:  # Otsu's threshold from the summed band histograms = skimage's on the whole map
        from skimage.filters import threshold_otsu

        assert banded[0].threshold == float(threshold_otsu(heat))


@pytest.mark.parametrize("mode", ["multiply", "restrict"])
def test_masks_lazy_and_full_shape_work_band_by_band(mode):
    stack = np.stack([HEAT, blobs((200, 300), 40, seed=2)])
    mask = np.zeros((200, 300), bool)
    mask[30:170, 50:260] = True
    full = np.stack([mask, ~mask])
    for m in (mask, full):
        for threshold, tmode in ((0.3, "absolute"), (0.6, "relative"), ("otsu", "absolute")):
            kw = {"threshold": threshold, "threshold_mode": tmode, "mask_mode": mode,
                  "simplify": 0, "class_ids": [3, 5], "scores": [0.9, 0.2]}
            whole = find_regions(stack, mask=m, **kw)
            banded = find_regions(as_zarr(stack), mask=as_zarr(m), band_rows=16, **kw)
            assert_same(whole, banded)
            assert {r.index for r in banded} == {(0,), (1,)}
            assert [r.class_id for r in banded] == [3 if r.index == (0,) else 5 for r in banded]
            inside = m if m.ndim == 2 else None
            for r in banded:
                allowed = inside if inside is not None else full[r.index[0]]
                assert allowed[r._runs[:, 0], r._runs[:, 1]].all()


def test_nan_in_a_band_is_refused_naming_its_rows():
    heat = HEAT.copy()
    heat[23, 100] = np.nan
    for mode in ("absolute", "relative"):
        with pytest.raises(ValueError, match=r"rows 20 to 29 \(first at row 23\).*nan_to_num"):
            find_regions(as_zarr(heat), 0.5, threshold_mode=mode, band_rows=10)
    heat[23, 100] = np.inf
    with pytest.raises(ValueError, match=r"heatmaps\[1\] holds NaN or infinite values in rows "
                                         r"20 to 29"):
        find_regions(as_zarr(np.stack([HEAT, heat])), "otsu", band_rows=10)


@pytest.mark.parametrize("bad, error, words", [
    (0, ValueError, "rows >= 1"), (-3, ValueError, "rows >= 1"),
    (2.5, TypeError, "whole number of rows"), ("7", TypeError, "whole number of rows"),
    (True, TypeError, "whole number of rows"),
])
def test_band_rows_is_validated(bad, error, words):
    with pytest.raises(error, match=words):
        find_regions(HEAT, 0.5, band_rows=bad)


def test_band_rows_with_3d_components_is_refused():
    with pytest.raises(ValueError, match="bands apply to 2D maps"):
        find_regions(np.zeros((3, 20, 20), np.float32), 0.5, ndim=3, band_rows=8)


def test_large_maps_go_band_by_band_on_their_own(monkeypatch):
    calls = []
    real = regions_module._banded_regions

    def spy(heatmaps, index, mask, rows, *args):
        calls.append(rows)
        return real(heatmaps, index, mask, rows, *args)

    monkeypatch.setattr(regions_module, "_banded_regions", spy)
    monkeypatch.setattr(regions_module, "BAND_PIXELS", 3000)  # 10 rows of 300
    monkeypatch.setattr(regions_module, "BANDED_ABOVE", 30_000)
    whole = find_regions(HEAT[:50], 0.4, simplify=0)  # 15,000 pixels: in memory, whole
    assert calls == []
    assert_same(whole, find_regions(as_zarr(HEAT[:50], chunks=(5, 300)), 0.4, simplify=0))
    assert calls == [10]  # lazy and above a band: banded, in whole chunk rows
    assert_same(find_regions(HEAT, 0.4, simplify=0, band_rows=200),  # forced
                find_regions(HEAT, 0.4, simplify=0))  # 60,000 in memory: banded
    assert calls == [10, 200, 10]


def test_memory_stays_bounded_on_a_large_zarr_map():
    height, width = 4000, 3000
    z = zarr.create_array(store={}, shape=(height, width), chunks=(256, 1024), dtype="f4")
    tile = blobs((500, width), 40, seed=3, sigma=(8.0, 30.0))
    for r in range(0, height, 500):
        z[r : r + 500] = np.roll(tile, r, axis=1)
    del tile
    tracemalloc.start()
    try:
        found = find_regions(z, 0.5, workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(found) > 100
    assert any(r.bbox[0] < 500 < r.bbox[2] for r in found)  # objects across seams
    map_bytes = height * width * 4
    assert peak < 0.25 * map_bytes  # about 0.16 with 256-row bands (whole chunk rows)


def test_scale_regions_to_level_zero_pixels():
    heat = np.zeros((20, 30), np.float32)
    heat[2:6, 3:9] = 1
    heat[10:15, 20:22] = 0.8
    found = find_regions(heat, 0.5, min_area=1, simplify=0, class_ids=4, scores=0.7)
    scaled = scale_regions(found, 4)
    for a, b in zip(found, scaled):
        assert b.bbox == tuple(4 * v for v in a.bbox)
        assert b.area == 16 * a.area and b.polygon.area == 16 * a.polygon.area
        assert (b.peak, b.mean, b.class_id, b.score, b.index) == (
            a.peak, a.mean, a.class_id, a.score, a.index)
    # the exact outlines rasterise to the level-0 pixels of the level-k ones
    assert np.array_equal(label_image(scaled, (80, 120)),
                          np.kron(label_image(found, (20, 30)), np.ones((4, 4), np.int32)))
    (first, _) = scale_regions(found, (2, 3))  # rows, cols
    assert first.bbox == (4, 9, 12, 27) and first.area == 6 * 24
    assert first.polygon.bounds == (9.0, 4.0, 27.0, 12.0)
    odd = scale_regions(found, 1.5)[1]  # a box that covers the scaled outline
    minx, miny, maxx, maxy = odd.polygon.bounds
    assert odd.bbox == (15, 30, 23, 33) and (miny, minx, maxy, maxx) == (15, 30, 22.5, 33)
    assert found[0].bbox == (2, 3, 6, 9)  # the given regions are unchanged


def test_scale_regions_keeps_the_planes_of_3d_regions():
    vol = np.zeros((4, 10, 10), np.float32)
    vol[1:3, 2:5, 3:7] = 1
    (r,) = find_regions(vol, 0.5, ndim=3, min_area=1, simplify=0)
    (s,) = scale_regions([r], (2, 4))
    assert s.bbox == (1, 4, 12, 3, 10, 28) and s.area == r.area * 8
    assert set(s.polygons) == {1, 2} and s.polygons[1].area == 12 * 8
    assert s.label == r.label


@pytest.mark.parametrize("bad, error, words", [
    (0, ValueError, "finite and > 0"), (-2, ValueError, "finite and > 0"),
    (float("inf"), ValueError, "finite and > 0"), (float("nan"), ValueError, "finite"),
    ((1, 0), ValueError, "finite and > 0"), ((1, 2, 3), ValueError, "has 3 values"),
    ("2", TypeError, "pyramid level's downsample"), (None, TypeError, "a number > 0"),
    (True, TypeError, "a number > 0"),
])
def test_scale_regions_refuses_bad_factors(bad, error, words):
    found = find_regions(HEAT, 0.5)
    with pytest.raises(error, match=words):
        scale_regions(found, bad)


def test_scale_regions_refuses_what_is_not_a_region():
    with pytest.raises(TypeError, match="give Region objects"):
        scale_regions([(0, 0, 4, 4)], 2)
