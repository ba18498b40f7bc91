"""Saving a Shapes layer and opening our files the way napari users do, without naming the
plugin: ``napari.save_layers`` / ``viewer.layers.save``, the *File > Save Selected Layers*
dialog, and ``viewer.open`` (needs a display: Xvfb in CI).

Every test runs in a registry holding napari's builtins before ours, the order an environment
usually lists them in: with ours first the tests would pass without the plugin doing anything.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_gradcam._napari import io

CLASSES = ["disc", "square"]


@pytest.fixture
def napari_first(npe2pm):
    """npe2's test plugin manager (the instance napari sees during the test) with napari's
    builtins registered first, then this plugin."""
    from npe2 import PluginManifest

    npe2pm.register(PluginManifest.from_distribution("napari"))
    npe2pm.register(PluginManifest.from_distribution("napari-gradcam"))
    assert list(npe2pm._manifests) == ["napari", "napari-gradcam"]
    return npe2pm


def first_writers(pm, n=1):
    return [w.command for w in pm.iter_compatible_writers(["shapes"])][:n]


def add_regions(viewer):
    """A regions layer as the widget makes it: a rectangle and a polygon with features."""
    data = [np.array([[2.0, 2.0], [2.0, 12.0], [10.0, 12.0], [10.0, 2.0]]),
            np.array([[20.0, 20.0], [20.0, 30.0], [28.0, 25.0]])]
    layer = viewer.add_shapes(
        data, shape_type=["rectangle", "polygon"], name="regions",
        features={"kind": ["box", "outline"], "class": CLASSES, "class_id": [0, 1],
                  "score": [2.5, 1.5]},
        metadata={io.META_KEY: {"role": "regions", "class_names": CLASSES,
                                "image_shape": [40, 40]}})
    viewer.layers.selection = {layer}
    return layer


def assert_geojson(path):
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    assert [f["properties"]["classification"]["name"] for f in doc["features"]] == CLASSES


def assert_coco(path):
    doc = json.loads(path.read_text())
    assert [c["name"] for c in doc["categories"]] == CLASSES
    assert len(doc["annotations"]) == 2 and doc["images"][0]["height"] == 40


def assert_our_csv(path):
    rows = list(csv.DictReader(path.open(newline="")))
    assert [r["class"] for r in rows] == CLASSES
    assert [float(r["score"]) for r in rows] == [2.5, 1.5]
    assert rows[0]["wkt"].startswith("POLYGON")


CHECK = {".geojson": assert_geojson, ".json": assert_coco, ".csv": assert_our_csv}


def test_first_use_of_the_plugin_puts_our_writers_first(napari_first, make_napari_viewer):
    """Before: napari's vertex CSV is the first Shapes writer (what the dialog preselects and
    what ``.csv`` gets). The first use of anything of ours through napari (the widget, a
    reader, here a sample) activates the plugin, and from then on ours lead; napari's stay
    offered after them."""
    from napari.plugins._npe2 import file_extensions_string_for_layers

    viewer = make_napari_viewer()
    layer = add_regions(viewer)
    assert first_writers(napari_first) == ["napari.write_shapes"]
    assert napari_first.get_writer("r.csv", ["shapes"])[0].command == "napari.write_shapes"

    viewer.open_sample("napari-gradcam", "synthetic-shapes")

    assert first_writers(napari_first, 3) == [
        "napari-gradcam.write_geojson", "napari-gradcam.write_coco", "napari-gradcam.write_csv"]
    assert napari_first.get_writer("r.csv", ["shapes"])[0].command == "napari-gradcam.write_csv"
    filters = file_extensions_string_for_layers([layer])[0].split(";;")
    assert filters[:3] == ["napari Grad-CAM QuPath GeoJSON (*.geojson)",
                           "napari Grad-CAM COCO JSON (*.json)",
                           "napari Grad-CAM CSV with features (*.csv)"]
    assert "napari builtins shapes (*.csv)" in filters
    # a second activation (napari never does it, but a re-enabled plugin would) changes nothing
    io.activate()
    assert first_writers(napari_first, 3)[0] == "napari-gradcam.write_geojson"


def test_save_without_naming_the_plugin_writes_our_formats(napari_first, make_napari_viewer,
                                                           tmp_path):
    viewer = make_napari_viewer()
    layer = add_regions(viewer)
    napari_first.activate("napari-gradcam")
    for ext, check in CHECK.items():
        a, b = tmp_path / f"a{ext}", tmp_path / f"b{ext}"
        assert napari.save_layers(str(a), [layer]) == [str(a)]
        assert viewer.layers.save(str(b), selected=True) == [str(b)]
        check(a)
        check(b)
    # a bare name gets the first writer's ending, as napari does for its own writers
    assert napari.save_layers(str(tmp_path / "bare"), [layer]) == [str(tmp_path / "bare.geojson")]
    assert_geojson(tmp_path / "bare.geojson")
    # napari's vertex CSV is still there by its command's name (npe2 matches ``plugin=`` as
    # the start of a writer's command, so plain "napari" would take "napari-gradcam..." too)
    (vertex,) = napari.save_layers(str(tmp_path / "v.csv"), [layer], plugin="napari.write_shapes")
    assert Path(vertex).read_text().startswith("index,shape-type,vertex-index")


def test_a_users_own_shapes_layer_keeps_napari_csv(napari_first, make_napari_viewer, tmp_path):
    """Our writers lead once the plugin is used, but a Shapes layer that is not ours (drawn by
    the user, opened from napari's CSV) still goes out in napari's vertex CSV, which napari
    reopens: the plugin changes nothing for layers it didn't make."""
    viewer = make_napari_viewer()
    napari_first.activate("napari-gradcam")
    mine = viewer.add_shapes([np.array([[1.0, 1.0], [1.0, 5.0], [4.0, 5.0]])],
                             shape_type="polygon", name="mine")
    path = tmp_path / "mine.csv"
    assert napari.save_layers(str(path), [mine]) == [str(path)]
    assert path.read_text().startswith("index,shape-type,vertex-index")
    (back,) = viewer.open(str(path), plugin="napari", layer_type="shapes")
    np.testing.assert_allclose(back.data[0], mine.data[0])


@pytest.fixture
def save_dialog(monkeypatch):
    """Replaces the file dialog napari's *Save Selected Layers* opens: ``typed`` is the name the
    user types, and the file type stays the one the dialog preselects (its first filter)."""
    from napari._qt import qt_viewer
    from qtpy.QtWidgets import QFileDialog

    shown = {}

    def answer(*args, filter, **kwargs):
        shown["filters"] = filter.split(";;")
        return shown["typed"], shown["filters"][0]

    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(answer))
    monkeypatch.setattr(qt_viewer, "get_save_history", lambda: [str(qt_viewer.Path.home())])
    monkeypatch.setattr(qt_viewer, "update_save_history", lambda path: None)

    def save(viewer, typed):
        shown["typed"] = str(typed)
        viewer.window._qt_viewer._save_layers_dialog(selected=True)
        return shown["filters"][0]

    save.shown = shown
    return save


def test_save_dialog_preselects_geojson_and_follows_the_typed_name(
        napari_first, make_napari_viewer, save_dialog, tmp_path):
    viewer = make_napari_viewer()
    add_regions(viewer)
    # what users met: napari's CSV preselected, so a typed .geojson went to napari's writer
    with pytest.raises(OSError, match="Plugin 'napari' .*did not return any written paths"):
        save_dialog(viewer, tmp_path / "x.geojson")
    assert save_dialog.shown["filters"][0] == "napari builtins shapes (*.csv)"

    napari_first.activate("napari-gradcam")
    for ext, check in CHECK.items():
        path = tmp_path / f"regions{ext}"
        assert save_dialog(viewer, path) == "napari Grad-CAM QuPath GeoJSON (*.geojson)"
        check(path)  # regions.csv under "QuPath GeoJSON" is our CSV, not GeoJSON named .csv
    save_dialog(viewer, tmp_path / "bare")
    assert_geojson(tmp_path / "bare.geojson")
    save_dialog(viewer, tmp_path / "UPPER.CSV")
    assert_our_csv(tmp_path / "UPPER.CSV")


def test_save_dialog_names_the_endings_for_a_name_we_cannot_write(
        napari_first, make_napari_viewer, save_dialog, tmp_path):
    viewer = make_napari_viewer()
    add_regions(viewer)
    napari_first.activate("napari-gradcam")
    with pytest.raises(ValueError, match=r"cannot write 'regions.txt'.*\.geojson.*\.json.*\.csv"
                                         r".*end the file name"):
        save_dialog(viewer, tmp_path / "regions.txt")
    assert list(tmp_path.iterdir()) == []


def test_activate_leaves_an_unfamiliar_registry_alone(monkeypatch):
    """A future npe2 that indexes writers differently keeps its own order (and napari still
    saves through ``plugin="napari-gradcam"``) instead of failing the plugin's activation."""
    import npe2

    class Index:
        _writers = ("not", "a", "list")

    class Manager:
        _contrib = Index()

    monkeypatch.setattr(npe2.PluginManager, "instance", staticmethod(lambda: Manager))
    io.activate()
    assert Index._writers == ("not", "a", "list")
    Index._writers = [("shapes", 1, 2, object())]  # entries npe2 0.10 would not make
    io.activate()
    assert len(Index._writers) == 1


def test_open_from_python(napari_first, make_napari_viewer, tmp_path):
    """A bare ``viewer.open`` uses napari's builtin reader (napari's default, not a choice a
    plugin can change) and says which reader can; ``plugin=None`` or our name opens it."""
    viewer = make_napari_viewer()
    napari.save_layers(str(tmp_path / "r.geojson"), [add_regions(viewer)])
    path = str(tmp_path / "r.geojson")
    with pytest.raises(ValueError, match=r"Given reader 'napari' is not a compatible reader.*"
                                         r"Available readers .* are: \['napari-gradcam'\]"):
        viewer.open(path)
    for plugin in (None, "napari-gradcam"):
        (layer,) = viewer.open(path, plugin=plugin)
        assert layer._type_string == "shapes" and len(layer.data) == 2
        assert list(layer.features["class"]) == CLASSES
        np.testing.assert_array_equal(layer.features["score"], [2.5, 1.5])


def test_a_folder_or_a_trailing_dot_as_the_file_name(tmp_path):
    """A name that is an existing folder is refused in one sentence (never a raw
    IsADirectoryError); an unwritable place says why; "regions." gets one dot."""
    layer = napari.layers.Shapes(
        [np.array([[2.0, 2.0], [2.0, 12.0], [10.0, 12.0], [10.0, 2.0]])],
        shape_type=["rectangle"],
        features={"kind": ["box"], "class": ["disc"], "class_id": [0], "score": [2.5]},
        metadata={io.META_KEY: {"role": "regions", "class_names": CLASSES,
                                "image_shape": [40, 40]}})
    data, attrs, _ = layer.as_layer_data_tuple()
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    for name in ("dir.csv", "dir.csv/"):
        with pytest.raises(ValueError, match="can't write dir.csv: a folder of that name is "
                                             "there; choose another folder or name"):
            io.write_csv_layer(str(tmp_path / "dir.csv") + name[7:], data, attrs)
    with pytest.raises(ValueError, match=r"can't write x.geojson: .*; choose another folder "
                                         "or name"):
        io.write_geojson_layer(str(tmp_path / "a-file" / "x.geojson"), data, attrs)
    assert io.write_geojson_layer(str(tmp_path / "regions."), data, attrs) == \
        [str(tmp_path / "regions.geojson")]
    assert json.loads((tmp_path / "regions.geojson").read_text())["type"] == \
        "FeatureCollection"
