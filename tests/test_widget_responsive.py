"""The widget keeps the viewer responsive: one-time work (napari's shapes compile, imports) on a
background thread when it opens, models loaded off the UI thread, a run's result written one
layer per event-loop turn, re-runs setting only what changed. Mechanisms only: the stalls
themselves are measured by benchmarks/bench_ui.py, never asserted here."""

import threading

import numpy as np
import pytest

import napari_gradcam as ng
from napari_gradcam.models.demo.synthetic import make_image

napari = pytest.importorskip("napari")

from conftest import small_cnn
from test_widget import dock, finish, layer_names, raw, run

from napari_gradcam._napari import warmup
from napari_gradcam._napari import widget as widget_mod

pytestmark = pytest.mark.usefixtures("our_plugin")

SEED = 6  # a disc, a square and a triangle


def sample(viewer, size=128):
    item = make_image(size, seed=SEED, classes=[0, 1, 2])
    viewer.add_image(item.image, name="sample")
    return item


class FakeWorker:
    """Stands for a run's worker whose result is being written (it has returned)."""

    def __init__(self):
        self.quits = 0

    def quit(self):
        self.quits += 1


def layers_of(viewer):
    heat, regions = viewer.layers["gradcam · sample"], viewer.layers["regions · sample"]
    return np.array(heat.data), [np.array(d) for d in regions.data], list(regions.shape_type)


# ---- warm-up ------------------------------------------------------------------------------------

def test_warmup_runs_on_a_background_thread_and_touches_no_layer(viewer, qtbot):
    sample(viewer)
    before = layer_names(viewer)
    w = dock(viewer)
    assert warmup.wait(timeout=300), "the warm-up did not finish"
    assert warmup.done() and warmup.error is None
    assert warmup.ran_on is not None and warmup.ran_on is not threading.main_thread()
    assert warmup.ran_on.daemon  # never keeps napari from quitting
    assert warmup.start() is warmup.start()  # once per process, whatever opens the widget
    assert layer_names(viewer) == before  # no layer made, none touched (the proxy viewer
    assert w.run_button.enabled  # raises on writes from another thread)


def test_a_run_started_while_the_warmup_runs_waits_for_it_then_shows(viewer, qtbot,
                                                                     monkeypatch):
    """The result is held on the worker until the warm-up is done, so the UI thread never
    compiles napari's shapes itself; the run then ends with every layer."""

    class Gate(threading.Event):
        waited = False

        def wait(self, timeout=None):
            Gate.waited = True
            return super().wait(timeout)

    sample(viewer)
    w = dock(viewer)
    gate = Gate()
    monkeypatch.setattr(warmup, "_thread", threading.current_thread())  # "started"
    monkeypatch.setattr(warmup, "_done", gate)
    assert w.run() is not None
    qtbot.waitUntil(lambda: Gate.waited, timeout=60_000)
    qtbot.wait(50)
    assert w.running and "gradcam · sample" not in layer_names(viewer)  # held back
    gate.set()
    finish(qtbot, w)
    assert layer_names(viewer) == ["sample", "gradcam · sample", "regions · sample",
                                   "labels · sample"]
    assert len(viewer.layers["regions · sample"].data) > 0


def test_a_failing_warmup_is_recorded_and_never_blocks_a_run(monkeypatch):
    def broken():
        raise ImportError("no module named 'pandas'")

    monkeypatch.setattr(warmup, "_imports", broken)
    monkeypatch.setattr(warmup, "_done", threading.Event())
    monkeypatch.setattr(warmup, "error", None)
    monkeypatch.setattr(warmup, "_thread", threading.current_thread())
    warmup._run()
    assert isinstance(warmup.error, ImportError) and "pandas" in str(warmup.error)
    assert warmup.done() and warmup.wait(timeout=0)


# ---- models off the UI thread --------------------------------------------------------------------

def test_set_model_by_name_loads_and_probes_on_a_worker(viewer, qtbot, monkeypatch):
    seen = {}
    real_probe = widget_mod.probe_layers

    def load(source, trust_code=False):
        seen["load"] = threading.current_thread()
        return ng.load_model(small_cnn(), class_names=["a", "b", "c"], name="named")

    def probe(spec):
        seen["probe"] = threading.current_thread()
        return real_probe(spec)

    sample(viewer, 96)
    w = dock(viewer)
    monkeypatch.setattr(widget_mod, "load_model", load)
    monkeypatch.setattr(widget_mod, "probe_layers", probe)
    assert w.set_model("some-architecture", name="named") is None  # loading, not loaded
    assert w.loading and not w.run_button.enabled
    assert w.wait_until_ready(), "the model did not load"
    main = threading.main_thread()
    assert seen["load"] is not main and seen["probe"] is not main
    assert w.model.value == "named" and w.run_button.enabled


# ---- results written in steps ------------------------------------------------------------------

def test_a_result_is_written_one_step_per_turn_and_the_run_ends_with_the_last(viewer, qtbot):
    """Written in steps, a result gives the same layers as written at once, and the run
    counts as running until its last step (its worker's finish waits for it)."""
    sample(viewer)
    w = dock(viewer)
    w.methods.value = ["gradcam", "gradcam++"]
    run(qtbot, w)
    staged = layers_of(viewer)
    result = w._last
    heat_pp = np.array(viewer.layers["gradcam++ · sample"].data)
    viewer.layers["gradcam · sample"].data = np.zeros_like(staged[0])
    viewer.layers["regions · sample"].data = []
    w._worker = FakeWorker()  # the run whose result this is
    w._on_result(result)
    # first heatmap written, then the rest: the second heatmap, the regions' steps (glyphs,
    # layer, shown, shapes, features, labels, 3D boxes, side by side) and the status line
    assert w.running and len(w._applying) == 1 + 8 + 1
    np.testing.assert_array_equal(viewer.layers["gradcam · sample"].data, staged[0])
    assert len(viewer.layers["regions · sample"].data) == 0
    w._on_finished()  # the worker ends before its result is written: the run goes on
    assert w.running
    qtbot.waitUntil(lambda: not w.running, timeout=10_000)
    assert not w._applying and w.run_button.enabled and not w.cancel_button.enabled
    again = layers_of(viewer)
    np.testing.assert_array_equal(again[0], staged[0])
    np.testing.assert_array_equal(viewer.layers["gradcam++ · sample"].data, heat_pp)
    assert again[2] == staged[2]
    for a, b in zip(again[1], staged[1]):
        np.testing.assert_array_equal(a, b)
    # written at once (no run going: a cached result), the same layers again, in place
    regions = raw(viewer.layers["regions · sample"])
    w._on_result(result)
    assert not w._applying and not w.running
    assert raw(viewer.layers["regions · sample"]) is regions
    assert layer_names(viewer) == ["sample", "gradcam · sample", "gradcam++ · sample",
                                   "regions · sample", "labels · sample"]
    np.testing.assert_array_equal(layers_of(viewer)[0], staged[0])


def test_cancel_while_a_result_is_written_leaves_every_layer_from_that_result(viewer, qtbot):
    sample(viewer)
    w = dock(viewer)
    run(qtbot, w)
    first = w._last
    first_layers = layers_of(viewer)
    w.target.value = "square"
    run(qtbot, w)
    assert not np.array_equal(layers_of(viewer)[0], first_layers[0])
    worker = w._worker = FakeWorker()
    w._on_result(first)
    w.cancel()  # too late to stop: the result is there, and is written whole
    w._on_finished()
    qtbot.waitUntil(lambda: not w.running, timeout=10_000)
    assert worker.quits == 1
    now = layers_of(viewer)
    np.testing.assert_array_equal(now[0], first_layers[0])
    assert now[2] == first_layers[2] and len(now[1]) == len(first_layers[1])
    assert w._last is first and "cancelling" not in w.status.value
    assert "regions" in w.status.value  # the result's status line, not a stale one


def test_a_new_result_finishes_writing_the_one_before(viewer, qtbot):
    sample(viewer)
    w = dock(viewer)
    run(qtbot, w)
    first = w._last
    w.target.value = "square"
    run(qtbot, w)
    second, second_layers = w._last, layers_of(viewer)
    w._worker = FakeWorker()
    w._on_result(first)  # being written ...
    w._worker = None
    w._on_result(second)  # ... when another (a cached one) is shown: both whole, in order
    assert not w._applying
    now = layers_of(viewer)
    np.testing.assert_array_equal(now[0], second_layers[0])
    assert now[2] == second_layers[2] and w._last is second


# ---- re-runs set only what changed --------------------------------------------------------------

def test_rerun_sets_no_unchanged_geometry_and_never_shows_an_empty_regions_layer(viewer,
                                                                                 qtbot):
    sample(viewer)
    w = dock(viewer)
    run(qtbot, w)
    heat, regions = viewer.layers["gradcam · sample"], viewer.layers["regions · sample"]
    fired = []
    for layer in (heat, regions):
        for name in ("scale", "translate", "affine", "contrast_limits"):
            emitter = getattr(layer.events, name, None)
            if emitter is not None:
                emitter.connect(lambda e, name=name: fired.append(name))
    actions = []
    regions.events.data.connect(lambda e: actions.append(str(e.action)))
    w.target.value = "square"
    run(qtbot, w)
    assert fired == []
    assert "added" in actions  # the clear between two results is never announced
    assert not {"removing", "removed"} & set(actions)
    assert set(regions.features["class"]) == {"square"}
    # a changed geometry is set
    viewer.layers["sample"].scale = (2.0, 2.0)
    run(qtbot, w)
    assert "scale" in fired
    np.testing.assert_array_equal(heat.scale, (2.0, 2.0))
    np.testing.assert_array_equal(regions.scale, (2.0, 2.0))


def test_rerun_that_finds_no_region_empties_the_regions_layer(viewer, qtbot):
    sample(viewer)
    w = dock(viewer)
    run(qtbot, w)
    regions = viewer.layers["regions · sample"]
    assert len(regions.data) > 0
    actions = []
    regions.events.data.connect(lambda e: actions.append(str(e.action)))
    w.min_area.value = 10**8  # no region is that large
    finish(qtbot, w)
    actions.clear()
    run(qtbot, w)
    assert len(regions.data) == 0 and len(regions.features) == 0
    assert "removed" in actions  # announced: the viewer draws the empty layer
    assert raw(viewer.layers["regions · sample"]) is raw(regions)


# ---- glyphs, labels and unchanged re-runs ------------------------------------------------------

def test_the_label_glyphs_are_rendered_in_steps_before_the_labels_are_drawn(viewer, qtbot,
                                                                            monkeypatch):
    from napari_gradcam._napari import results

    sample(viewer)
    w = dock(viewer)
    fonts = results.canvas_fonts(w.native)
    assert fonts, "the docked widget's window has a canvas with a glyph cache"
    seen = {}
    real_label = results.label_regions

    def label(layer, layers=None):  # the labels step: every glyph its text draws is there
        texts = [t for t in layer.features["label"] if t]
        seen["missing"] = results.missing_glyphs(results.canvas_fonts(w.native), texts)
        seen["texts"] = texts
        real_label(layer, layers)

    monkeypatch.setattr(results, "label_regions", label)
    run(qtbot, w)
    assert seen["texts"] and seen["missing"] == []
    assert all(c in fonts[0]._glyphs for c in "".join(seen["texts"]))


def test_glyphs_render_within_the_budget_and_a_widget_outside_a_viewer_has_none(qtbot):
    from qtpy.QtWidgets import QWidget

    from napari_gradcam._napari import results

    class Font:  # a glyph cache as napari's: rendering a character stores it
        def __init__(self):
            self._glyphs = {}

        def __getitem__(self, char):
            self._glyphs[char] = object()
            return self._glyphs[char]

    font = Font()
    pairs = results.missing_glyphs([font], ["ab"])
    assert {c for _f, c in pairs} == set("ab") | set(results._ALWAYS_DRAWN)
    left = results.render_glyphs(pairs, budget=0.0)  # out of time: one glyph per turn
    assert len(left) == len(pairs) - 1 and len(font._glyphs) == 1
    assert results.render_glyphs(left, budget=10.0) == []
    assert results.missing_glyphs([font], ["ab"]) == []
    alone = QWidget()
    qtbot.addWidget(alone)
    assert results.canvas_fonts(alone) == []  # no viewer: the glyphs are drawn as needed
    assert results.canvas_fonts(object()) == []


def test_a_rerun_places_the_labels_once_and_an_unchanged_result_redraws_nothing(viewer, qtbot,
                                                                                monkeypatch):
    from napari_gradcam._napari import results

    sample(viewer)
    w = dock(viewer)
    run(qtbot, w)
    regions = viewer.layers["regions · sample"]
    labels = results.labels_of(raw(regions))
    texts = list(labels.text.values)
    placed, events = [], []
    real_place = results.place_labels
    monkeypatch.setattr(results, "place_labels", lambda layer: (placed.append(layer),
                                                                real_place(layer)))
    for emitter in (regions.events.data, regions.events.features):
        emitter.connect(lambda e: events.append(e.type))
    run(qtbot, w)  # the same image and settings: the same regions
    assert placed == [regions]  # once, after the shapes and the features table
    assert events == [] and list(labels.text.values) == texts
    placed.clear()
    w.target.value = "square"  # another result: written, and labelled once
    run(qtbot, w)
    assert placed == [regions] and "data" in events and "features" in events
    assert set(regions.features["class"]) == {"square"}
    assert [t for t in labels.text.values if t] and \
        all(t.startswith("square") for t in labels.text.values if t)


def test_a_new_regions_layer_is_shown_once_made_and_a_hidden_one_stays_hidden(viewer, qtbot):
    sample(viewer)
    w = dock(viewer)
    run(qtbot, w)
    regions = viewer.layers["regions · sample"]
    assert regions.visible and len(regions.data)
    regions.visible = False  # the user hid it: a re-run leaves it hidden
    w.target.value = "square"
    run(qtbot, w)
    assert not regions.visible and set(regions.features["class"]) == {"square"}


def test_steps_that_take_no_time_are_written_with_the_step_before(viewer, qtbot):
    import time

    from napari_gradcam._napari.results import AGAIN

    sample(viewer)
    w = dock(viewer)
    done, again = [], [2]

    def slow(name):
        def step():
            time.sleep(0.01)
            done.append(name)
        return step

    def quick(name):
        return lambda: done.append(name)

    def twice():  # wants two more turns
        done.append("twice")
        again[0] -= 1
        return AGAIN if again[0] >= 0 else None

    w._applying = [slow("a"), quick("b"), quick("c"), slow("d"), twice, quick("e")]
    w._apply_next()
    assert done == ["a"]  # a step that took time: the rest wait for the next frame
    w._apply_timer.stop()
    w._apply_next()
    assert done == ["a", "b", "c", "d"]  # the quick ones ran with the next
    w._apply_timer.stop()
    w._apply_now()
    assert done == ["a", "b", "c", "d", "twice", "twice", "twice", "e"]
    assert w._applying == []


def close_widget(w):
    """What closing the viewer does to the widget: Qt deletes its controls at once (a run or
    a model load in flight still reports afterwards)."""
    from qtpy import sip

    sip.delete(w.native)


def test_closing_mid_load_or_mid_run_touches_no_deleted_control(viewer, qtbot):
    from qtpy.QtCore import QThreadPool

    # workers left running by earlier tests of the session (slow models being cancelled) can
    # hold every thread of Qt's shared pool on a 2-core machine: give this test's load its own
    pool = QThreadPool.globalInstance()
    pool.setMaxThreadCount(max(pool.maxThreadCount(), pool.activeThreadCount() + 4))
    viewer.add_image(make_image(96, seed=SEED, classes=[0]).image, name="img")
    # the start-up model load in flight
    _dock, w = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM")
    (loader,) = w._loaders
    ended = []  # queued from the worker's thread: connected before the events are handled
    loader.finished.connect(lambda: ended.append("load"))
    close_widget(w)
    # a warm process may finish the load before the connection above: wait on its state
    qtbot.waitUntil(lambda: not loader.is_running, timeout=60_000)
    assert w._closed and loader.abort_requested
    # a run in flight (waiting for a slow model): asked to stop, its end writes nothing
    w2 = widget_mod.GradCamWidget(viewer)  # the dock's name is taken by the first
    from conftest import sleepy_cnn

    w2.set_model(sleepy_cnn(0.5), name="slow")
    assert w2.wait_until_ready()
    worker = w2.run()
    assert worker is not None
    worker.finished.connect(lambda: ended.append("run"))
    before = layer_names(viewer)
    close_widget(w2)
    qtbot.waitUntil(lambda: "run" in ended, timeout=60_000)
    qtbot.wait(50)
    assert w2._closed and worker.abort_requested
    assert layer_names(viewer) == before == ["img"]
