"""The library against hostile and careless input: malformed GeoJSON, wrongly typed region
arguments, images smaller than a model can take, channel-last arrays with many channels, and
the mode of the files we write. Every input is made here, in tmp_path."""

import json
import math
import os
import re
import stat

import numpy as np
import pytest
import shapely
import torch
from torch import nn

import napari_gradcam as ng
from napari_gradcam.explain_arrays import layout
from napari_gradcam.export import FORMAT_KEY, _atomic_write, atomic_output

SQUARE = [[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]


def feature(geometry=None, properties=None, **extra):
    geometry = {"type": "Polygon", "coordinates": SQUARE} if geometry is None else geometry
    return {"type": "Feature", "geometry": geometry, "properties": properties or {}, **extra}


def collection(*features, **extra):
    return {"type": "FeatureCollection", "features": list(features), **extra}


def write(tmp_path, doc, name="bad.geojson"):
    path = tmp_path / name
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    elif isinstance(doc, str):
        path.write_text(doc, encoding="utf-8")
    else:
        path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def ours(**block):
    return {FORMAT_KEY: block}


# ---- read_geojson: one ValueError naming the file, the feature and what is wrong --------------

# (document, the feature position named or None for the file as a whole, words of the message)
MALFORMED = {
    "geometry as a string": (collection(feature(), feature("POLYGON((0 0, 1 0, 1 1, 0 0))")),
                             1, "geometry object"),
    "features not a list": ({"type": "FeatureCollection", "features": {"a": 1}}, None,
                            "must be a list"),
    "features [null]": ({"type": "FeatureCollection", "features": [None]}, 0, "null"),
    "a feature that is a number": (collection(feature(), 7), 1, "must be an object"),
    "properties as a list": (collection(feature(properties=[1, 2])), 0, "properties"),
    "classification as a string": (collection(feature(properties={"classification": "Tumor"})),
                                   0, "classification"),
    "classification name a number": (
        collection(feature(properties={"classification": {"name": 3}})), 0, "text"),
    "measurements a string": (collection(feature(properties={"measurements": "big"})), 0,
                              "measurements"),
    "plane z not an integer": (
        collection(feature({"type": "Polygon", "coordinates": SQUARE,
                            "plane": {"c": -1, "z": 1.5, "t": 0}})), 0, "integer"),
    "plane z a string": (
        collection(feature({"type": "Polygon", "coordinates": SQUARE,
                            "plane": {"z": "one"}})), 0, "integer"),
    "plane a list": (collection(feature({"type": "Polygon", "coordinates": SQUARE,
                                         "plane": [0, 1]})), 0, "plane"),
    "ring of 3 points": (collection(feature({"type": "Polygon",
                                             "coordinates": [[[0, 0], [4, 0], [0, 0]]]})),
                         0, "at least 4"),
    "unclosed ring": (collection(feature({"type": "Polygon",
                                          "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 4]]]})),
                      0, "not closed"),
    "coordinates as strings": (
        collection(feature({"type": "Polygon",
                            "coordinates": [[["0", "0"], ["4", "0"], ["4", "4"], ["0", "0"]]]})),
        0, "must be numbers"),
    "coordinates a string": (collection(feature({"type": "Polygon", "coordinates": "0 0 1 1"})),
                             0, "must be a list"),
    "a position of one number": (
        collection(feature({"type": "LineString", "coordinates": [[0], [1, 1]]})), 0,
        "position"),
    "unknown geometry type": (collection(feature({"type": "Circle", "coordinates": [0, 0]})),
                              0, "type"),
    "huge coordinates": (collection(feature({"type": "Polygon", "coordinates": [
        [[0, 0], [1e300, 0], [1e300, 1e300], [0, 0]]]})), 0, "finite pixel positions"),
    "an integer beyond any float": ('{"type": "FeatureCollection", "features": [{"type": '
                                    '"Feature", "properties": {}, "geometry": {"type": '
                                    '"LineString", "coordinates": [[0, 0], [1' + "0" * 400
                                    + ', 1]]}}]}', 0, "finite pixel positions"),
    "a polygon folded flat": (collection(feature({"type": "Polygon", "coordinates": [
        [[0, 0], [4, 0], [8, 0], [0, 0]]]})), 0, "encloses no area"),
    "round-trip index not a list": (collection(feature(properties=ours(kind="polygon",
                                                                       index=3))), 0, "index"),
    "round-trip index of text": (collection(feature(properties=ours(index=["a"]))), 0, "index"),
    "round-trip index negative": (collection(feature(properties=ours(index=[-2]))), 0, ">= 0"),
    "round-trip features not an object": (collection(feature(properties=ours(features=[1]))),
                                          0, "features"),
    "round-trip kind unknown": (collection(feature(properties=ours(kind="blob"))), 0, "kind"),
    "round-trip block a string": (collection(feature(properties={FORMAT_KEY: "x"})), 0,
                                  FORMAT_KEY),
    "scale [0, 0]": (collection(feature(), **{FORMAT_KEY: {"physical_units": True,
                                                            "scale": [0, 0]}}), None, "> 0"),
    "negative scale": (collection(feature(), **{FORMAT_KEY: {"physical_units": True,
                                                              "scale": [1, -2]}}), None, "> 0"),
    "NaN scale": ('{"type": "FeatureCollection", "features": [], "%s": {"physical_units": '
                  'true, "scale": [NaN, 1]}}' % FORMAT_KEY, None, "> 0"),
    "scale a string": (collection(feature(), **{FORMAT_KEY: {"scale": "1,1"}}), None,
                       "list of at least 2 numbers"),
    "physical_units without scale": (collection(feature(), **{FORMAT_KEY: {
        "physical_units": True}}), None, "no scale"),
    "file metadata a list": (collection(feature(), **{FORMAT_KEY: [1]}), None, "object"),
    "a top level of the wrong type": ({"type": "Topology"}, None, "FeatureCollection"),
    "a top level that is a number": ("42", None, "FeatureCollection"),
    "empty file": ("", None, "empty"),
    "not JSON": ("{nope", None, "not valid JSON"),
    "non-UTF-8 bytes": (b'{"type": "FeatureCollection", "features": [\xff\xfe]}', None,
                        "UTF-8"),
    "deeply nested JSON": ("[" * 100000 + "]" * 100000, None, "nests too deeply"),
    "a feature nested deeply": ('{"type": "FeatureCollection", "features": [{"type": "Feature",'
                                ' "geometry": {"type": "Polygon", "coordinates": '
                                + "[" * 500 + "]" * 500 + '}}]}', 0, "must be numbers"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_geojson_raises_one_value_error(tmp_path, case):
    doc, position, words = MALFORMED[case]
    path = write(tmp_path, doc)
    with pytest.raises(ValueError) as info:
        ng.read_geojson(path)
    message = str(info.value)
    assert type(info.value) is ValueError
    assert str(path) in message
    assert words in message, message
    if position is not None:
        assert f"feature {position}:" in message, message
    else:
        assert not re.search(r"feature \d+:", message), message


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_tokens_in_coordinates_are_refused(tmp_path, token):
    text = ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, '
            '"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [%s, 0], [4, 4], [0, 0]]]}'
            '}]}' % token)
    with pytest.raises(ValueError, match=r"feature 0: .*finite"):
        ng.read_geojson(write(tmp_path, text))


def test_self_intersecting_ring_is_repaired_and_kept(tmp_path):
    bow_tie = [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]
    path = write(tmp_path, collection(feature({"type": "Polygon", "coordinates": bow_tie})))
    (a,), _ = ng.read_geojson(path)
    assert a.geometry.is_valid and a.geometry.area == pytest.approx(8.0)
    assert a.geometry.geom_type == "MultiPolygon"


def test_tolerated_oddities_read(tmp_path):
    """What real files hold and is not an error: NaN measurements (QuPath writes them), text
    measurements (dropped), null geometry and points (skipped), integer-valued plane floats,
    a byte-order mark."""
    text = json.dumps(collection(
        feature(properties={"measurements": {"area": 3.0, "note": "x", "bad": None},
                            "classification": {"name": "cell", "color": [1, 2, 3]}}),
        feature({"type": "Polygon", "coordinates": SQUARE, "plane": {"c": -1, "z": 2.0,
                                                                     "t": 0}}),
        {"type": "Feature", "geometry": None, "properties": {}},
        feature({"type": "Point", "coordinates": [1, 2]}),
    )).replace('"bad": null', '"bad": NaN')
    path = tmp_path / "ok.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    (a, b), meta = ng.read_geojson(path)
    assert a.properties == {"kind": "polygon", "class": "cell", "area": 3.0}
    assert b.index == (2,) and meta == {}


# ---- writers: strict JSON only --------------------------------------------------------------

def test_writers_write_strict_json(tmp_path):
    heat = np.zeros((16, 16), np.float32)
    heat[4:10, 4:10] = 1.0
    (region,) = ng.find_regions(heat, 0.5, min_area=1, class_ids=0, scores=float("nan"))
    annotations = ng.annotations.regions_to_annotations([region], ["a"])
    for a in annotations:
        a.properties.update(peak=float("inf"), extra=np.array([1.0, np.nan]),
                            deep={"x": (np.float32("nan"), 2)})
    strict = {"NaN": None, "Infinity": None, "-Infinity": None}

    def parse_strict(path):
        return json.loads(path.read_text(), parse_constant=lambda c: strict[c] or 1 / 0)

    geo = ng.write_geojson(annotations, tmp_path / "r.geojson", class_names=["a"])
    doc = parse_strict(geo)  # no NaN / Infinity token anywhere
    props = doc["features"][0]["properties"]
    assert "peak" not in props["measurements"]
    assert props[FORMAT_KEY]["features"]["extra"] == [1.0, None]
    assert props[FORMAT_KEY]["features"]["deep"] == {"x": [None, 2]}
    coco = ng.write_coco(annotations, tmp_path / "c.json", class_names=["a"],
                         image_shape=(16, 16))
    assert parse_strict(coco)["annotations"][0]["attributes"]["peak"] is None
    back, _ = ng.read_geojson(geo)
    assert back[0].properties["score"] is None


def test_writers_refuse_non_finite_coordinates_and_bad_scale(tmp_path):
    with np.errstate(invalid="ignore"):
        bad = ng.annotations.Annotation(shapely.Polygon([(0, 0), (np.nan, 0), (1, 1)]))
    with pytest.raises(ValueError, match="shape 0 .*not finite"):
        ng.write_geojson([bad], tmp_path / "a.geojson")
    with pytest.raises(ValueError, match="shape 0 .*not finite"):
        ng.write_coco([bad], tmp_path / "a.json", image_shape=(8, 8))
    good = ng.annotations.Annotation(shapely.box(0, 0, 2, 2))
    for scale in ([0, 0], [1, -1], [float("nan"), 1]):
        with pytest.raises(ValueError, match="> 0"):
            ng.write_geojson([good], tmp_path / "a.geojson", scale=scale, physical_units=True)
    for scale in (["a", "b"], [10 ** 400, 1]):  # not numbers; too large for a float
        with pytest.raises(ValueError, match="pixel size"):
            ng.write_geojson([good], tmp_path / "a.geojson", scale=scale)
    assert not list(tmp_path.iterdir())  # nothing written, no temporary left


# ---- atomic writers honour the umask -----------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writers_give_the_mode_open_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        text = _atomic_write(tmp_path / "a.json", "{}")
        with atomic_output(tmp_path / "b.tif") as tmp:
            tmp.write_bytes(b"x")
        with open(tmp_path / "plain", "w"):
            pass
        geo = ng.write_geojson([], tmp_path / "c.geojson")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == expected
    for path in (text, tmp_path / "b.tif", geo):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.tif", "c.geojson",
                                                         "plain"]


# ---- find_regions argument checks --------------------------------------------------------------

HEAT = np.zeros((8, 8), np.float32)

BAD_ARGUMENTS = [
    (dict(threshold=None), TypeError, "number in"),
    (dict(threshold=True), TypeError, "number in"),
    (dict(threshold=False), TypeError, "number in"),
    (dict(threshold="abc"), ValueError, "otsu"),
    (dict(threshold=[0.5]), TypeError, "number in"),
    (dict(threshold=float("nan")), ValueError, "number in"),
    (dict(threshold=float("inf")), ValueError, "number in"),
    (dict(threshold=-1), ValueError, "number in"),
    (dict(threshold=2), ValueError, "number in"),
    (dict(threshold=2, threshold_mode="relative"), ValueError, "fraction"),
    (dict(threshold_mode="percent"), ValueError, "threshold_mode"),
    (dict(threshold_mode=None), ValueError, "threshold_mode"),
    (dict(threshold_mode=["absolute"]), ValueError, "threshold_mode"),
    (dict(min_area=float("nan")), ValueError, "whole number"),
    (dict(min_area=-1), ValueError, "whole number"),
    (dict(min_area="5"), TypeError, "whole number"),
    (dict(min_area=1.5), ValueError, "whole number"),
    (dict(min_area=None), TypeError, "whole number"),
    (dict(simplify=float("nan")), ValueError, "tolerance"),
    (dict(simplify=-1), ValueError, "tolerance"),
    (dict(simplify=float("inf")), ValueError, "tolerance"),
    (dict(simplify="x"), TypeError, "tolerance"),
    (dict(connectivity=True), ValueError, "connectivity"),
    (dict(workers=0), ValueError, "workers"),
    (dict(mask=np.ones((4, 4), bool)), ValueError, "spatial shape"),
    (dict(mask=np.full((8, 8), "a")), TypeError, "mask has dtype"),
    (dict(mask=np.ones((8, 8), complex)), TypeError, "mask has dtype"),
]


@pytest.mark.parametrize("kwargs, kind, words", BAD_ARGUMENTS,
                         ids=[repr(k) for k, _, _ in BAD_ARGUMENTS])
def test_find_regions_bad_arguments(kwargs, kind, words):
    with pytest.raises(kind, match=words):
        ng.find_regions(HEAT, **kwargs)


def test_find_regions_accepts_numbers_of_any_kind():
    heat = np.zeros((16, 16), np.float32)
    heat[2:8, 2:8] = 1
    ref = ng.find_regions(heat, 0.5, min_area=4, simplify=1.0)
    for kwargs in (dict(threshold=np.float64(0.5), min_area=4.0, simplify=np.float32(1)),
                   dict(threshold=torch.tensor(0.5), min_area=np.int64(4), simplify=1)):
        assert [r.bbox for r in ng.find_regions(heat, **kwargs)] == [r.bbox for r in ref]


@pytest.mark.parametrize("heatmaps, kind, words", [
    ("not an array", TypeError, "heatmaps has dtype"),
    (None, TypeError, "heatmaps has dtype"),
    ({"a": 1}, TypeError, "heatmaps has dtype"),
    ([[0.1, 0.2], [0.3]], TypeError, "heatmaps has dtype"),
    (np.zeros((4, 4), complex), TypeError, "heatmaps has dtype"),
    (np.zeros(4), ValueError, r"\(H, W\)"),
])
def test_find_regions_refuses_what_is_not_a_heatmap(heatmaps, kind, words):
    with pytest.raises(kind, match=words):
        ng.find_regions(heatmaps, 0.5)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_find_regions_refuses_non_finite_heat(value, mode):
    heat = np.zeros((2, 8, 8), np.float32)
    heat[1, 3, 3] = value
    with pytest.raises(ValueError, match=r"heatmaps\[1\] holds NaN or infinite"):
        ng.find_regions(heat, 0.5, threshold_mode=mode, workers=1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ng.find_regions(heat, "otsu")


# ---- images smaller than the model can take ------------------------------------------------------

def valid_net():
    """Convolutions without padding: needs 5 + 1 = 6 pixels a side (conv 5 -> 2, pool 2 -> 1)."""
    return nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


@pytest.fixture(scope="module")
def demo():
    return ng.load_model("demo")


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 100000)])
def test_too_small_images_say_the_minimum_size(demo, shape):
    image = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"needs at least 5 x 5 pixels") as info:
        ng.explain(image, demo, device="cpu")
    assert f"{shape[0]} x {shape[1]} pixels" in str(info.value)
    assert "Padding size" not in str(info.value)
    batch = torch.zeros((1, 1, *shape))
    with pytest.raises(ValueError, match=r"needs at least 5 x 5 pixels"):
        ng.explain_batch(demo.module, batch)
    assert ng.explain(np.random.rand(5, 5).astype(np.float32), demo,
                      device="cpu").heatmaps.shape == (5, 5)


def test_too_small_for_unpadded_convolutions():
    spec = ng.load_model(valid_net(), in_channels=1)
    with pytest.raises(ValueError, match=r"3 x 40 pixels.*at least 6 x 6 pixels"):
        ng.explain(np.zeros((3, 40), np.float32), spec, device="cpu")


def test_resnet_takes_tiny_images():
    """A torchvision resnet18 (1 channel) pads enough to run on any size: no error to give."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=3)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    spec = ng.load_model(model.eval(), in_channels=1)
    for shape in [(1, 1), (2, 2), (3, 300)]:
        exp = ng.explain(np.random.rand(*shape).astype(np.float32), spec, device="cpu")
        assert exp.heatmaps.shape == shape and np.isfinite(exp.heatmaps).all()


def test_errors_that_are_not_about_size_stay_as_they_are():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            raise RuntimeError("Output size is too small (but not because of the image)")

    with pytest.raises(RuntimeError, match="not because of the image"):
        ng.explain_batch(Broken().eval(), torch.zeros(1, 1, 2, 2), target_layer="conv")


# ---- channel-last arrays with more than 4 channels --------------------------------------------

def five_channel_net():
    return nn.Sequential(nn.Conv2d(5, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2)).eval()


def test_last_axis_matching_the_model_is_the_channel_axis():
    spec = ng.load_model(five_channel_net(), in_channels=5)
    rng = np.random.default_rng(0)
    image = rng.random((24, 20, 5), dtype=np.float32)
    exp = ng.explain(image, spec, device="cpu")
    assert exp.heatmaps.shape == (24, 20) and exp.class_ids.shape == ()
    stack = rng.random((3, 24, 20, 5), dtype=np.float32)
    exp = ng.explain(stack, spec, device="cpu")
    assert exp.heatmaps.shape == (3, 24, 20)
    np.testing.assert_allclose(exp.heatmaps[1], ng.explain(stack[1], spec,
                                                           device="cpu").heatmaps, atol=1e-5)


def test_many_channels_for_a_grey_model_say_how_to_pass_channel_axis():
    from conftest import small_cnn

    spec = ng.load_model(small_cnn(in_ch=1), in_channels=1)
    image = np.zeros((32, 32, 5), np.float32)
    with pytest.raises(ValueError, match=r"channel_axis=-1 if the last axis holds channels "
                                         r"\(this model takes 1\).*channel_axis=False"):
        ng.explain(image, spec, device="cpu")
    with pytest.raises(ValueError, match="5 channels"):  # the user said: channels
        ng.explain(image, spec, device="cpu", channel_axis=-1)
    exp = ng.explain(image, spec, device="cpu", channel_axis=False)  # 32 images of 32 x 5
    assert exp.heatmaps.shape == (32, 32, 5)


def test_layout_rule():
    assert layout((64, 64, 5), in_channels=5).channel_axis == 2
    assert layout((64, 64, 1)).channel_axis == 2  # a trailing axis of one is a channel axis
    assert layout((64, 64, 3), in_channels=1).channel_axis == 2  # RGB, as before
    assert layout((64, 64, 5)).channel_axis is None  # no model known: pixels, as before
    assert layout((64, 64, 32), in_channels=3).channel_axis is None  # a width, not channels
    assert layout((64, 64, 10, 5), spatial_dims=3, in_channels=5).channel_axis is None
    assert layout((64, 64, 64, 5), spatial_dims=3, in_channels=5).channel_axis == 3
    with pytest.raises(ValueError, match="channel_axis=-1"):
        layout((64, 64, 8), in_channels=1)
    assert layout((64, 64, 8), in_channels=1, channel_axis=False).lead == (64,)
    assert layout((10, 64, 8), in_channels=1).channel_axis is None  # 8 is not small beside 10
    assert math.prod(layout((100, 100, 5), in_channels=5).spatial) == 10000
