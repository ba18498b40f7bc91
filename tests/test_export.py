"""Regions -> napari shapes -> exports -> read back: coordinates, formats, conventions."""

import csv
import json
import warnings

import numpy as np
import pytest
import shapely

import napari_gradcam as ng
from napari_gradcam.annotations import (
    annotations_to_shapes,
    polygon_to_vertices,
    regions_to_annotations,
    shapes_to_annotations,
    vertices_to_polygon,
)
from napari_gradcam.regions import rasterize

CLASSES = ["disc", "square", "triangle"]


def disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2).astype(np.float32)


@pytest.fixture
def stack_regions():
    """Two frames: a disc and a ring (with a hole) on frame 0, a square on frame 2."""
    h = np.zeros((3, 64, 64), np.float32)
    h[0] = disc((64, 64), (16, 16), 8) + disc((64, 64), (40, 40), 14) - disc((64, 64), (40, 40), 5)
    h[2, 10:30, 30:50] = 0.8
    return h, ng.find_regions(h, 0.5, class_ids=[0, 1, 2], scores=[3.0, 2.0, 1.5])


def test_napari_vertices_are_pixel_centres():
    (r,) = ng.find_regions(np.pad(np.ones((4, 6), np.float32), ((3, 0), (5, 0))), 0.5,
                           min_area=1)
    assert r.bbox == (3, 5, 7, 11)
    data, types, feats = annotations_to_shapes(regions_to_annotations([r]))
    assert types == ["rectangle", "polygon"]
    rect = data[0]
    # pixel corners at rows 3 and 7, cols 5 and 11 -> napari rows 2.5 / 6.5, cols 4.5 / 10.5
    assert sorted(set(rect[:, 0])) == [2.5, 6.5] and sorted(set(rect[:, 1])) == [4.5, 10.5]
    # napari's own rasterisation convention: a pixel (r, c) is inside if its centre is
    poly = data[1]
    assert poly[:, 0].min() == 2.5 and poly[:, 1].max() == 10.5


def test_hole_round_trips_through_napari_vertices():
    ring = shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)],
                           [[(2, 2), (4, 2), (4, 4), (2, 4)], [(6, 6), (8, 6), (8, 8), (6, 8)]])
    (verts,) = polygon_to_vertices(ring, index=(3,))
    assert (verts[:, 0] == 3).all()
    back = vertices_to_polygon(verts[:, 1:][:, ::-1] + 0.5)
    assert back.equals(ring) and len(back.interiors) == 2
    plain = vertices_to_polygon(np.array([[0, 0], [5, 0], [5, 5.0]]))
    assert plain.area == 12.5


def test_regions_shapes_annotations_round_trip(stack_regions):
    _, regions = stack_regions
    anns = regions_to_annotations(regions, CLASSES)
    data, types, feats = annotations_to_shapes(anns)
    assert len(data) == 2 * len(regions) and all(d.shape[1] == 3 for d in data)
    assert list(feats["kind"][:2]) == ["rectangle", "polygon"]
    assert list(feats["class"][:2]) == ["disc", "disc"]
    assert list(feats["index0"]) == [0, 0, 0, 0, 2, 2]
    assert feats["area"][0] == regions[0].area
    back = shapes_to_annotations(data, types, feats)
    for a, b in zip(anns, back):
        assert a.kind == b.kind and a.index == b.index
        assert a.geometry.equals(b.geometry)
        for key in ("class", "class_id", "region", "peak", "area"):
            assert a.properties[key] == b.properties[key]


def test_geojson_follows_qupath_conventions(tmp_path, stack_regions):
    _, regions = stack_regions
    path = ng.write_geojson(regions, tmp_path / "r.geojson", class_names=CLASSES)
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2 * len(regions)
    for f in doc["features"]:
        p, g = f["properties"], f["geometry"]
        assert p["objectType"] == "annotation"
        cls = p["classification"]
        assert cls["name"] in CLASSES
        assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255
                                               for c in cls["color"])
        assert all(isinstance(v, float) for v in p["measurements"].values())
        assert set(p["measurements"]) == {"score", "peak", "mean", "area"}
        assert g["type"] == "Polygon"
        for ring in g["coordinates"]:
            assert ring[0] == ring[-1]  # closed
            assert all(len(pt) == 2 for pt in ring)  # no third coordinate: planes go in "plane"
        assert g["plane"]["c"] == -1 and g["plane"]["t"] == 0
        assert g["plane"]["z"] == p["napari_gradcam"]["index"][0]
        if p["napari_gradcam"]["kind"] == "rectangle":
            ring = np.array(g["coordinates"][0])
            assert len(ring) == 5
            assert len(set(ring[:, 0])) == 2 and len(set(ring[:, 1])) == 2  # axis-aligned
    ring_feature = [f for f in doc["features"] if f["properties"]["napari_gradcam"]["kind"]
                    == "polygon" and len(f["geometry"]["coordinates"]) == 2]
    assert ring_feature, "the ring's hole is written as an interior ring"


def test_geojson_reads_back_exactly(tmp_path, stack_regions):
    _, regions = stack_regions
    data, types, feats = annotations_to_shapes(regions_to_annotations(regions, CLASSES))
    # a hand-drawn ellipse and path, with empty features, as a user would add
    data += [np.array([[2, 5.2, 5.1], [2, 5.2, 15.3], [2, 12.7, 15.3], [2, 12.7, 5.1]]),
             np.array([[0, 1.0, 1.0], [0, 20.25, 3.5], [0, 30.0, 9.0]])]
    types += ["ellipse", "path"]
    feats = {k: np.append(v, [np.nan, np.nan] if v.dtype != object else ["", ""])
             for k, v in feats.items()}
    anns = shapes_to_annotations(data, types, feats)
    path = ng.write_geojson(anns, tmp_path / "a.geojson", class_names=CLASSES)
    back, meta = ng.read_geojson(path)
    data2, types2, feats2 = annotations_to_shapes(back)
    assert types2 == types
    for a, b in zip(data, data2):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    feats["kind"][-2:] = ["ellipse", "path"]  # a shape's kind is its napari shape type
    feats["index0"][-2:] = [2, 0]  # and its plane is where its vertices are
    for key in feats:
        if feats[key].dtype == object:
            assert list(feats[key]) == list(feats2[key])
        else:
            np.testing.assert_array_equal(feats[key], feats2[key])


def test_geojson_physical_units_and_planes(tmp_path):
    a = ng.Annotation(shapely.box(1, 2, 3, 4), "rectangle", (4, 7), {"class": "x"})
    path = ng.write_geojson([a], tmp_path / "p.geojson", scale=[1, 2, 0.5, 0.25],
                            physical_units=True)
    f = json.loads(path.read_text())["features"][0]
    xs = {pt[0] for pt in f["geometry"]["coordinates"][0]}
    ys = {pt[1] for pt in f["geometry"]["coordinates"][0]}
    assert xs == {0.25, 0.75} and ys == {1.0, 2.0}
    assert f["geometry"]["plane"] == {"c": -1, "z": 7, "t": 4}
    (b,), meta = ng.read_geojson(path)
    assert b.geometry.equals(a.geometry) and b.index == (4, 7)
    assert meta["scale"] == [1, 2, 0.5, 0.25]
    with pytest.raises(ValueError, match="plane_axes"):
        ng.write_geojson([a], tmp_path / "q.geojson", plane_axes=["z"])


def test_reads_a_plain_qupath_export(tmp_path):
    doc = {"type": "FeatureCollection", "features": [{
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]],
                     "plane": {"c": -1, "z": 3, "t": 0}},
        "properties": {"objectType": "annotation",
                       "classification": {"name": "Tumor", "color": [200, 0, 0]},
                       "measurements": {"Area px^2": 16.0}}}]}
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(doc))
    (a,), _ = ng.read_geojson(path)
    assert a.index == (3,) and a.class_name == "Tumor" and a.geometry.area == 16
    assert a.properties["Area px^2"] == 16.0


def test_coco_loads_and_scores_ap_one(tmp_path, stack_regions):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    h, regions = stack_regions
    path = ng.write_coco(regions, tmp_path / "c.json", class_names=CLASSES, image_shape=h.shape)
    doc = json.loads(path.read_text())
    assert [im["id"] for im in doc["images"]] == [1, 2, 3]
    assert [c["id"] for c in doc["categories"]] == [1, 2, 3]
    assert [a["id"] for a in doc["annotations"]] == list(range(1, len(regions) + 1))
    for ann, r in zip(doc["annotations"], regions):
        r0, c0, r1, c1 = r.bbox
        assert ann["bbox"] == [c0, r0, c1 - c0, r1 - r0]
        assert ann["iscrowd"] == 0 and ann["area"] > 0
        assert ann["category_id"] == r.class_id + 1
        if len(getattr(r.polygon, "interiors", [])):
            assert isinstance(ann["segmentation"], dict)  # RLE keeps the hole
            assert ann["area"] == r.area
        else:
            assert all(len(p) >= 6 for p in ann["segmentation"])
    gt = COCO(str(path))
    for ann in doc["annotations"]:  # the masks pycocotools decodes are the regions' pixels
        m = gt.annToMask(gt.anns[ann["id"]]).astype(bool)
        r = regions[ann["id"] - 1]
        assert abs(int(m.sum()) - r.area) <= 0.05 * r.area
    dets = [dict(a, score=1.0) for a in doc["annotations"]]
    for iou_type in ("bbox", "segm"):
        dt = gt.loadRes(json.loads(json.dumps(dets)))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)


def test_coco_without_image_shape_warns_and_guesses(tmp_path):
    a = ng.Annotation(shapely.box(1, 2, 30, 40), "rectangle", (), {})
    with pytest.warns(UserWarning, match="image_shape"):
        path = ng.write_coco([a], tmp_path / "c.json")
    doc = json.loads(path.read_text())
    assert doc["images"][0]["width"] == 30 and doc["images"][0]["height"] == 40
    assert doc["categories"] == [{"id": 1, "name": "unlabelled", "supercategory": "object"}]


def test_csv_rows(tmp_path, stack_regions):
    _, regions = stack_regions
    path = ng.write_csv(regions, tmp_path / "r.csv", class_names=CLASSES)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2 * len(regions)
    first = rows[0]
    assert first["kind"] == "rectangle" and first["class"] == "disc" and first["index0"] == "0"
    r0, c0, r1, c1 = regions[0].bbox
    assert (float(first["min_row"]), float(first["min_col"]),
            float(first["max_row"]), float(first["max_col"])) == (r0, c0, r1, c1)
    assert shapely.from_wkt(rows[1]["wkt"]).equals(regions[0].polygon)
    assert float(first["peak"]) == pytest.approx(regions[0].peak)


def test_yolo_files(tmp_path, stack_regions):
    h, regions = stack_regions
    files = ng.write_yolo(regions, tmp_path / "labels", image_shape=h.shape, class_names=CLASSES)
    assert [f.name for f in files] == ["image_0.txt", "image_1.txt", "image_2.txt"]
    assert files[1].read_text() == ""
    lines = files[2].read_text().split()
    cls, xc, yc, w, hh = lines[0], *map(float, lines[1:5])
    assert cls == "2"
    assert (xc, yc, w, hh) == pytest.approx((40 / 64, 20 / 64, 20 / 64, 20 / 64))


def test_empty_layer_writes_valid_empty_files(tmp_path):
    from napari_gradcam._napari import io

    attrs = {"shape_type": [], "features": {}, "metadata": {}, "scale": [1, 1],
             "name": "empty"}
    for writer, name in [(io.write_geojson_layer, "e.geojson"), (io.write_coco_layer, "e.json"),
                         (io.write_csv_layer, "e.csv")]:
        (out,) = writer(str(tmp_path / name), [], attrs)
        assert (tmp_path / name).exists()
    assert json.loads((tmp_path / "e.geojson").read_text())["features"] == []
    assert json.loads((tmp_path / "e.json").read_text())["annotations"] == []
    (layer,) = io.read_geojson_layer(tmp_path / "e.geojson")
    assert layer[0] == [] and layer[2] == "shapes"


def test_napari_writer_and_reader_adapters(tmp_path, stack_regions):
    from napari_gradcam._napari import io

    _, regions = stack_regions
    data, types, feats = annotations_to_shapes(regions_to_annotations(regions, CLASSES))
    attrs = {"shape_type": types, "features": feats, "scale": [2.0, 0.5, 0.5],
             "axis_labels": ("t", "y", "x"),
             "metadata": {"napari_gradcam": {"class_names": CLASSES,
                                             "image_shape": [3, 64, 64]}}, "name": "r"}
    path = str(tmp_path / "r.geojson")
    assert io.write_geojson_layer(path, data, attrs) == [path]
    doc = json.loads(open(path).read())
    assert doc["features"][0]["geometry"]["plane"] == {"c": -1, "z": 0, "t": 0}
    assert doc["features"][-1]["geometry"]["plane"]["t"] == 2  # the axis labelled t
    assert io.get_reader(path) is io.read_geojson_layer and io.get_reader("x.tif") is None
    ((data2, kwargs, kind),) = io.read_geojson_layer(path)
    assert kind == "shapes" and kwargs["scale"] == [2.0, 0.5, 0.5]
    for a, b in zip(data, data2):
        np.testing.assert_array_equal(a, b)
    assert list(kwargs["features"]["class"]) == list(feats["class"])
    io.write_coco_layer(str(tmp_path / "r.json"), data, attrs)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert len(doc["images"]) == 3 and doc["images"][0]["file_name"] == "r_0.png"


def test_user_drawn_shapes_without_features_export(tmp_path):
    data = [np.array([[1.0, 1.0], [1.0, 9.0], [7.0, 9.0], [7.0, 1.0]]),
            np.array([[10.0, 10.0], [20.0, 10.0], [15.0, 20.0]])]
    anns = shapes_to_annotations(data, ["rectangle", "polygon"], None)
    assert anns[0].geometry.area == 48 and anns[1].kind == "polygon"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc = json.loads(ng.write_coco(anns, tmp_path / "u.json").read_text())
    assert len(doc["annotations"]) == 2
    assert {c["name"] for c in doc["categories"]} == {"unlabelled"}
    gj = json.loads(ng.write_geojson(anns, tmp_path / "u.geojson").read_text())
    assert "classification" not in gj["features"][0]["properties"]


def test_polygons_rasterise_back_after_export(tmp_path):
    h = disc((80, 80), (40, 40), 20) - disc((80, 80), (40, 40), 6)
    (r,) = ng.find_regions(h, 0.5, simplify=0)
    path = ng.write_geojson(regions_to_annotations([r], kinds=("polygon",)), tmp_path / "x.geojson")
    (b,), _ = ng.read_geojson(path)
    assert (rasterize(b.geometry, h.shape) == (h >= 0.5)).all()


def test_3d_regions_export_plane_by_plane_and_group_again(tmp_path):
    """A 3D region is written as its part in every plane it crosses: GeoJSON planes (z), COCO
    images per plane (loads with pycocotools), CSV rows; every part names its region's label
    and voxels, so the parts group back into the region."""
    from pycocotools.coco import COCO

    heat = np.zeros((6, 20, 20), np.float32)
    heat[1:4, 2:8, 3:9] = 1.0  # a block over planes 1..3
    heat[4, 12:16, 12:18] = 0.9  # a slab on plane 4
    regions = ng.find_regions(heat, 0.5, min_area=1, ndim=3, class_ids=1, scores=2.0)
    assert sorted(r.label for r in regions) == [1, 2]
    block = next(r for r in regions if r.bbox[0] == 1)

    ng.write_geojson(regions, tmp_path / "r.geojson", class_names=CLASSES)
    doc = json.loads((tmp_path / "r.geojson").read_text())
    planes = {}
    for f in doc["features"]:
        m = f["properties"]["measurements"]
        planes.setdefault(m["region_label"], set()).add(f["geometry"]["plane"]["z"])
        assert f["geometry"]["plane"]["c"] == -1
        if m["region_label"] == block.label:
            assert m["volume"] == block.area == 3 * 6 * 6 and m["area"] == 36
    assert planes == {block.label: {1, 2, 3}, 3 - block.label: {4}}

    ng.write_coco(regions, tmp_path / "c.json", class_names=CLASSES, image_shape=heat.shape)
    coco = COCO(str(tmp_path / "c.json"))
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) == 4
    for ann in coco.loadAnns(coco.getAnnIds()):
        z = int(coco.loadImgs(ann["image_id"])[0]["file_name"][len("image_"):-4])
        assert z in planes[ann["attributes"]["region_label"]]
        assert ann["category_id"] == 2

    ng.write_csv(regions, tmp_path / "r.csv", class_names=CLASSES)
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8  # a rectangle and a polygon per plane part
    assert {(r["region_label"], r["index0"]) for r in rows} == {
        (str(block.label), "1"), (str(block.label), "2"), (str(block.label), "3"),
        (str(3 - block.label), "4")}
