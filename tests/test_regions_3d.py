"""find_regions(ndim=3): 3D connected components checked against scipy.ndimage.label, their
per-plane polygons, masks (multiply / restrict), split_planes, label_image, hostile input."""

import numpy as np
import pytest
import shapely
from scipy import ndimage
from scipy.ndimage import gaussian_filter

from napari_gradcam import find_regions
from napari_gradcam.regions import Region, label_image, rasterize, split_planes


def blobs(shape, seed, sigma=1.5, keep=0.3):
    """Random smooth blobs: heat in [0, 1], about ``keep`` of the voxels >= 0.5."""
    rng = np.random.default_rng(seed)
    h = gaussian_filter(rng.normal(size=shape), sigma)
    thr = np.quantile(h, 1 - keep)
    return (0.5 * (h >= thr) + 0.4 * (h - h.min()) / (h.max() - h.min())).astype(np.float32)


def scipy_components(fg, connectivity):
    labels, _ = ndimage.label(fg, ndimage.generate_binary_structure(3, connectivity))
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels)):
        box = tuple(s.start for s in sl) + tuple(s.stop for s in sl)
        out.append((box, int((labels[sl] == i + 1).sum())))
    return sorted(out), labels


@pytest.mark.parametrize("connectivity", [1, 2, 3])
def test_components_boxes_and_voxels_match_scipy(connectivity):
    for seed in range(4):
        h = blobs((9, 23, 19), seed, sigma=rng_sigma(seed))
        fg = h >= 0.5
        rs = find_regions(h, 0.5, min_area=1, simplify=0, ndim=3, connectivity=connectivity)
        ref, labels = scipy_components(fg, connectivity)
        assert sorted((r.bbox, r.area) for r in rs) == ref
        assert all(r.ndim == 3 and r.index == () for r in rs)
        assert [r.label for r in rs] == list(range(1, len(rs) + 1))
        starts = [r.bbox[:3] for r in rs]
        assert starts == sorted(starts)  # first plane first, then top to bottom
        # the label map holds exactly scipy's components, one label per component
        ours = label_image(rs, h.shape)
        assert ((ours > 0) == fg).all()
        pairs = set(zip(ours[fg].tolist(), labels[fg].tolist()))
        assert len(pairs) == len(rs) == labels.max()
        for r in rs:
            m = ours == r.label
            assert r.peak == pytest.approx(h[m].max())
            assert r.mean == pytest.approx(h[m].mean(), rel=1e-5)


def rng_sigma(seed):
    return (0.8, 1.2, 2.0, 3.0)[seed % 4]


@pytest.mark.parametrize("simplify", [0, 1.0])
def test_polygons_in_every_plane(simplify):
    h = blobs((7, 40, 36), 11, sigma=2.5)
    fg = h >= 0.5
    rs = find_regions(h, 0.5, min_area=1, simplify=simplify, ndim=3, connectivity=3)
    labels = label_image(rs, h.shape)
    for r in rs:
        z0, r0, c0, z1, r1, c1 = r.bbox
        assert sorted(r.polygons) == [z for z in range(z0, z1) if (labels[z] == r.label).any()]
        counts = {z: int((labels[z] == r.label).sum()) for z in r.polygons}
        assert r.polygon is r.polygons[max(counts, key=counts.get)]
        for z, geom in r.polygons.items():
            assert geom.is_valid and not geom.is_empty
            exact = labels[z] == r.label
            mask = rasterize(geom, fg.shape[1:])
            if simplify == 0:
                assert (mask == exact).all()
                assert geom.area == exact.sum()
            else:
                assert (mask & exact).sum() / max((mask | exact).sum(), 1) >= 0.6
            minx, miny, maxx, maxy = geom.bounds
            assert r0 <= miny and c0 <= minx and maxy <= r1 and maxx <= c1


def test_plane_where_parts_join_elsewhere_is_a_multipolygon():
    h = np.zeros((3, 10, 12), np.float32)
    h[0, 2:8, 2:4] = 1  # two bars in plane 0 ...
    h[0, 2:8, 7:9] = 1
    h[1, 2:4, 2:9] = 1  # ... joined by a bridge in plane 1
    (r,) = find_regions(h, 0.5, min_area=1, simplify=0, ndim=3)
    assert r.bbox == (0, 2, 2, 2, 8, 9) and r.area == 12 + 12 + 14
    assert r.polygons[0].geom_type == "MultiPolygon" and r.polygons[0].area == 24
    assert r.polygons[1].equals(shapely.box(2, 2, 9, 4))
    assert r.polygon is r.polygons[0]
    planes = split_planes([r])
    assert [(p.index, p.bbox, p.area, p.label) for p in planes] == [
        ((0,), (2, 2, 8, 9), 24, 1), ((1,), (2, 2, 4, 9), 14, 1)]


def test_connectivity_in_3d():
    h = np.zeros((4, 6, 6), np.float32)
    h[0, 1, 1] = 1
    h[1, 2, 1] = 1  # shares an edge with the first voxel
    h[2, 3, 2] = 1  # shares a corner only with the second
    sizes = {c: sorted(r.area for r in find_regions(h, 0.5, min_area=1, ndim=3,
                                                    connectivity=c)) for c in (1, 2, 3)}
    assert sizes == {1: [1, 1, 1], 2: [1, 2], 3: [3]}


def test_leading_axes_class_ids_and_scores_per_volume():
    h = np.zeros((2, 3, 5, 12, 12), np.float32)
    h[0, 1, 1:3, 2:6, 2:6] = 0.9
    h[1, 2, 0:5, 7:10, 1:4] = 0.8
    h[1, 2, 2, 1:3, 8:11] = 0.7
    rs = find_regions(h, 0.5, min_area=1, ndim=3, class_ids=np.arange(6).reshape(2, 3),
                      scores=np.arange(6).reshape(2, 3) / 10)
    assert [(r.index, r.bbox, r.area, r.class_id, r.score, r.label) for r in rs] == [
        ((0, 1), (1, 2, 2, 3, 6, 6), 32, 1, 0.1, 1),
        ((1, 2), (0, 7, 1, 5, 10, 4), 45, 5, 0.5, 1),
        ((1, 2), (2, 1, 8, 3, 3, 11), 6, 5, 0.5, 2),
    ]
    labels = label_image(rs, h.shape)
    assert labels.shape == h.shape and labels.dtype == np.int32
    assert ((labels > 0) == (h >= 0.5)).all()
    assert (labels[1, 2][h[1, 2] == 0.7] == 2).all()
    # split planes keep the label: the same label map
    assert (label_image(split_planes(rs), h.shape) == labels).all()
    # threads or not, the same regions
    one = find_regions(h, 0.5, min_area=1, ndim=3, workers=1)
    assert [(r.index, r.bbox) for r in one] == [(r.index, r.bbox) for r in rs]
    with pytest.raises(ValueError, match="come from 2 maps"):
        label_image(rs, h.shape[-3:])
    with pytest.raises(ValueError, match="outside shape"):
        label_image(rs, (2, 3, 5, 12, 9))


def test_min_area_counts_voxels():
    h = np.zeros((4, 8, 8), np.float32)
    h[:, 2:4, 2:4] = 1  # 16 voxels, never more than 4 in a plane
    assert [r.area for r in find_regions(h, 0.5, ndim=3)] == [16]
    assert find_regions(h, 0.5, min_area=17, ndim=3) == []


def test_2d_regions_label_image_and_split_planes_pass_through():
    h = np.zeros((2, 20, 20), np.float32)
    h[0, 2:6, 2:6] = 1
    h[0, 10:15, 10:15] = 1
    h[1, 5:9, 5:9] = 1
    rs = find_regions(h, 0.5, min_area=1)
    assert split_planes(rs) == rs
    labels = label_image(rs, h.shape)
    assert labels[0, 3, 3] == 1 and labels[0, 12, 12] == 2 and labels[1, 6, 6] == 1
    assert labels.sum() == 16 + 2 * 25 + 16
    # a hand-made region without runs: its polygon is rasterised
    hand = Region(index=(), bbox=(1, 1, 3, 4), polygon=shapely.box(1, 1, 4, 3), area=6,
                  peak=1.0, mean=1.0, threshold=0.5)
    assert label_image([hand], (5, 5)).sum() == 6


def test_mask_mode_multiply_computes_the_threshold_inside_the_mask():
    h = np.zeros((6, 20, 20), np.float32)
    h[1:4, 3:8, 3:8] = 0.4  # the region inside the mask
    h[2, 15:18, 15:18] = 1.0  # a hot spot outside it
    mask = np.zeros((6, 20, 20), bool)
    mask[:, :, :12] = True
    multiply = find_regions(h, 0.5, mask=mask, ndim=3, threshold_mode="relative")
    restrict = find_regions(h, 0.5, mask=mask, ndim=3, threshold_mode="relative",
                            mask_mode="restrict")
    assert [r.bbox for r in multiply] == [(1, 3, 3, 4, 8, 8)]
    assert multiply[0].threshold == pytest.approx(0.2)  # 0.5 x the heat inside the mask
    assert restrict == []  # 0.5 x the hot spot's 1.0 outside the mask: nothing inside reaches it
    # otsu: the same idea
    assert len(find_regions(h, "otsu", mask=mask, ndim=3)) == 1
    # an absolute threshold gives the same regions in both modes
    a = find_regions(h, 0.3, mask=mask, ndim=3)
    b = find_regions(h, 0.3, mask=mask, ndim=3, mask_mode="restrict")
    assert [(r.bbox, r.area) for r in a] == [(r.bbox, r.area) for r in b] == [
        ((1, 3, 3, 4, 8, 8), 75)]


def test_mask_mode_in_2d_and_regions_only_inside_the_mask():
    h = np.zeros((30, 30), np.float32)
    h[5:12, 5:12] = 0.5
    h[20:25, 20:25] = 1.0  # outside the mask
    mask = np.zeros((30, 30), np.uint8)
    mask[:15, :15] = 2  # labels: > 0 counts
    (r,) = find_regions(h, 0.8, mask=mask, threshold_mode="relative")
    assert r.bbox == (5, 5, 12, 12) and r.threshold == pytest.approx(0.4)
    assert find_regions(h, 0.8, mask=mask, threshold_mode="relative", mask_mode="restrict") == []
    both = find_regions(h, 0.8, threshold_mode="relative")  # no mask: the hot spot alone
    assert [x.bbox for x in both] == [(20, 20, 25, 25)]
    with pytest.raises(ValueError, match="'multiply'.*'restrict'"):
        find_regions(h, 0.5, mask=mask, mask_mode="times")


def test_nan_in_a_volume_is_named():
    h = np.zeros((2, 4, 8, 8), np.float32)
    h[1, 2, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"heatmaps\[1\] holds NaN"):
        find_regions(h, 0.5, ndim=3)
    with pytest.raises(ValueError, match="the heatmap holds NaN"):
        find_regions(h[1], 0.5, ndim=3)


def test_empty_and_all_zero_volumes_have_no_regions():
    assert find_regions(np.zeros((0, 8, 8), np.float32), 0.5, ndim=3) == []
    assert find_regions(np.zeros((3, 0, 4, 8, 8), np.float32), 0.5, ndim=3) == []
    zero = np.zeros((5, 8, 8), np.float32)
    for kw in ({}, {"threshold_mode": "relative"}):
        assert find_regions(zero, 0.5, ndim=3, **kw) == []
    assert find_regions(zero, "otsu", ndim=3) == []
    assert label_image([], (5, 8, 8)).sum() == 0


def test_bad_ndim_shape_connectivity_and_mask():
    h = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"ndim=3 give \(Z, H, W\)"):
        find_regions(np.zeros((8, 8), np.float32), 0.5, ndim=3)
    for bad in (1, 4, True, "3"):
        with pytest.raises(ValueError, match="use 2 .* or 3"):
            find_regions(h, 0.5, ndim=bad)
    with pytest.raises(ValueError, match=r"connectivity=3 with ndim=2.*26"):
        find_regions(h, 0.5, connectivity=3)
    with pytest.raises(ValueError, match="connectivity=4 with ndim=3"):
        find_regions(h, 0.5, ndim=3, connectivity=4)
    with pytest.raises(ValueError, match=r"spatial shape \(4, 8, 8\)"):
        find_regions(h, 0.5, ndim=3, mask=np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="spatial shape"):
        find_regions(h[None], 0.5, ndim=3, mask=np.ones((2, 4, 8, 8), bool))
    with pytest.raises(TypeError, match="shape"):
        label_image([], None)


def pixel_union(fg2d):
    """The reference outline: the union of the foreground pixels' squares (slow, small maps)."""
    rr, cc = np.nonzero(fg2d)
    return shapely.union_all(shapely.box(cc, rr, cc + 1, rr + 1))


@pytest.mark.parametrize("ndim,connectivity", [(2, 1), (2, 2), (3, 1), (3, 2), (3, 3)])
def test_traced_outlines_equal_the_union_of_their_pixels(ndim, connectivity):
    # noise: concave rows, holes, holes touching the shell or each other at a corner, parts
    # touching diagonally, parts joined only in another plane; every plane of every region
    # must be the exact union of its pixels, valid, one Polygon per 4-connected part
    rng = np.random.default_rng(ndim * 10 + connectivity)
    for k in range(3):
        shape = (13, 17) if ndim == 2 else (4, 11, 13)
        h = rng.random(shape).astype(np.float32)
        rs = find_regions(h, (0.35, 0.5, 0.65)[k], min_area=1, simplify=0, ndim=ndim,
                          connectivity=connectivity)
        labels = label_image(rs, shape)
        for r in rs:
            planes = {0: r.polygon} if ndim == 2 else r.polygons
            for z, geom in planes.items():
                pixels = (labels if ndim == 2 else labels[z]) == (
                    r.label if ndim == 3 else rs.index(r) + 1)
                assert geom.is_valid, shapely.is_valid_reason(geom)
                assert geom.equals(pixel_union(pixels))
                _, n4 = ndimage.label(pixels)  # 4-connected parts
                assert len(shapely.get_parts(geom)) == n4
                assert geom.geom_type == ("Polygon" if n4 == 1 else "MultiPolygon")


def test_diagonal_touches_and_holes_open_at_a_corner():
    # a 3x3 ring whose hole touches the outside at a corner: one Polygon with a hole touching
    # its shell at a point (not a self-touching shell); a checkerboard: 4-connected, every
    # pixel a region; 8-connected, one MultiPolygon of single pixels
    ring = np.zeros((6, 6), np.float32)
    ring[1:4, 1:4] = 1
    ring[2, 2] = 0
    ring[3, 3] = 0
    (r,) = find_regions(ring, 0.5, min_area=1, simplify=0)
    assert r.polygon.geom_type == "Polygon" and r.polygon.is_valid
    assert len(r.polygon.interiors) == 1 and r.polygon.area == 7
    board = (np.indices((5, 5)).sum(0) % 2 == 0).astype(np.float32)
    assert len(find_regions(board, 0.5, min_area=1, simplify=0)) == 13
    (r,) = find_regions(board, 0.5, min_area=1, simplify=0, connectivity=2)
    assert r.polygon.geom_type == "MultiPolygon" and len(r.polygon.geoms) == 13
    assert r.polygon.is_valid and r.polygon.area == 13


def test_large_percolating_volume_outlines_rasterise_back_exactly():
    # large enough (many thousand boundary edges per plane) for the vectorised ring ordering,
    # foreground percolating through the volume; every plane rasterises back to its pixels
    h = np.random.default_rng(5).random((4, 96, 128)).astype(np.float32)
    fg = h >= 0.5
    (r,) = [r for r in find_regions(h, 0.5, min_area=1000, simplify=0, ndim=3)]
    labels = label_image([r], h.shape)
    for z, geom in r.polygons.items():
        assert geom.is_valid
        assert (rasterize(geom, fg.shape[1:]) == (labels[z] == 1)).all()
        assert geom.area == (labels[z] == 1).sum()


def test_cycle_order_walks_every_cycle_of_a_permutation():
    from napari_gradcam.regions import _cycle_order

    rng = np.random.default_rng(0)
    for n, cycles in ((10, 1), (200_000, 1), (200_000, 3000), (120_000, 30_000)):
        # random cycles of random lengths, including ones of length 1
        perm = rng.permutation(n)
        cuts = np.sort(rng.choice(np.arange(1, n), cycles - 1, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [n]]))
        begin = np.repeat(np.concatenate([[0], cuts]), lengths)
        step = begin + (np.arange(n) - begin + 1) % np.repeat(lengths, lengths)
        succ = np.empty(n, np.int64)
        succ[perm] = perm[step]
        walk, head = _cycle_order(succ)
        assert np.array_equal(np.sort(walk), np.arange(n)) and head[0]
        assert head.sum() == cycles
        assert (succ[walk[:-1]] == walk[1:])[~head[1:]].all()  # inside a cycle: its order
        ends = np.append(np.flatnonzero(head)[1:], n) - 1
        assert (succ[walk[ends]] == walk[head]).all()  # each closes on its first element


@pytest.mark.parametrize("ndim", [2, 3])
def test_simplified_outlines_keep_every_part_and_hole(ndim):
    # ring-by-ring simplification: small holes and parts keep their chamfered shape instead of
    # vanishing; every simplified outline is valid, with the exact one's parts and holes
    rng = np.random.default_rng(3)
    shape = (40, 48) if ndim == 2 else (5, 40, 48)
    h = gaussian_filter(rng.random(shape), 1.2).astype(np.float32)
    h = (h - h.min()) / (h.max() - h.min())
    kw = {"min_area": 1, "ndim": ndim, "connectivity": 1}
    exact, simple = (find_regions(h, 0.5, simplify=t, **kw) for t in (0, 1.5))

    def geoms(rs):
        return [g for r in rs for g in ([r.polygon] if ndim == 2 else r.polygons.values())]

    exact, simple = np.array(geoms(exact)), np.array(geoms(simple))
    assert shapely.is_valid(simple).all()
    for a, b in zip(exact, simple):
        assert len(shapely.get_parts(a)) == len(shapely.get_parts(b))
        assert (shapely.get_num_interior_rings(shapely.get_parts(a)).sum()
                == shapely.get_num_interior_rings(shapely.get_parts(b)).sum())
    assert shapely.get_num_coordinates(simple).sum() < shapely.get_num_coordinates(exact).sum()
    assert shapely.get_num_interior_rings(shapely.get_parts(exact)).sum() > 0  # holes tested
