"""Live mode: the widget explains the shown slice as the slider moves, from a bounded cache when
it has seen the slice before, one run in flight at a time (Xvfb in CI)."""

import numpy as np
import pytest
from torch import nn

import napari_gradcam as ng
from napari_gradcam._napari import widget as widget_mod
from napari_gradcam._napari.live import (
    NOTHING,
    SHOW,
    START,
    WAIT,
    LiveKey,
    LiveScheduler,
    ResultCache,
    pixels_token,
    result_nbytes,
)
from napari_gradcam._napari.widget import GradCamWidget

napari = pytest.importorskip("napari")

from conftest import sleepy_cnn, small_cnn
from test_widget import auto_device, dock, use

pytestmark = pytest.mark.usefixtures("our_plugin")

FRAMES = 3


def stack(frames=FRAMES, size=96, seed=0):
    """Frames that differ (each its own random blobs), so each has its own heatmap."""
    rng = np.random.default_rng(seed)
    return rng.random((frames, size, size)).astype(np.float32)


def go(viewer, frame):
    viewer.dims.current_step = (frame, *viewer.dims.current_step[1:])


def settle(qtbot, w):
    """Until live has nothing left to do: no run, no region re-derivation, no pending look."""
    qtbot.waitUntil(lambda: not w.running and w._region_worker is None
                    and not w._live_soon.pending and w._live.flight is None, timeout=60_000)


def heat(viewer, method="gradcam"):
    return viewer.layers[f"{method} · stack"]


def shown_frame(viewer, method="gradcam") -> int:
    """The frame the heatmap layer (one frame deep) is placed at."""
    return round(float(heat(viewer, method).translate[0]))


@pytest.fixture
def runs(monkeypatch):
    """The slice index of every run the widget starts (the model's job, not a re-derivation
    of regions)."""
    seen = []
    real = widget_mod.compute

    def counting(job):
        seen.append(tuple(job.offset))
        return (yield from real(job))

    monkeypatch.setattr(widget_mod, "compute", counting)
    return seen


@pytest.fixture
def live(viewer, qtbot, runs):
    """The demo model on a 3-frame stack, live ticked at frame 0 and settled."""
    data = stack()
    viewer.add_image(data, name="stack")
    w = dock(viewer)
    w.scope.value = "whole stack"
    go(viewer, 0)
    w.live.value = True
    settle(qtbot, w)
    return w, data


def expected(data, frame, method="gradcam"):
    return ng.explain(data[frame], ng.load_model("demo"), method=method,
                      device=auto_device()).heatmaps


# ---- the widget -------------------------------------------------------------------------------

def test_ticking_live_explains_the_shown_slice_at_once(viewer, qtbot, live, runs):
    w, data = live
    assert w.live.text == "live" and isinstance(w.live, widget_mod.CheckBox)
    assert runs == [(0,)]
    # live explains the shown slice: "whole stack" is replaced and the scope held meanwhile
    assert w.scope.value == "current slice" and not w.scope.enabled
    assert shown_frame(viewer) == 0
    np.testing.assert_allclose(heat(viewer).data[0], expected(data, 0), atol=1e-5)
    w.live.value = False
    assert w.scope.enabled  # a stack: the scope is the user's again


def test_a_slice_change_explains_that_slice(viewer, qtbot, live, runs):
    w, data = live
    go(viewer, 2)
    settle(qtbot, w)
    assert runs == [(0,), (2,)]
    assert shown_frame(viewer) == 2
    np.testing.assert_allclose(heat(viewer).data[0], expected(data, 2), atol=1e-5)
    regions = viewer.layers["regions · stack"]
    assert all(round(float(d[0, 0])) == 2 for d in regions.data)  # that frame's shapes only


def test_scrolling_back_comes_from_the_cache(viewer, qtbot, live, runs):
    w, data = live
    go(viewer, 1)
    settle(qtbot, w)
    first = heat(viewer).data.copy()
    go(viewer, 0)
    settle(qtbot, w)
    assert runs == [(0,), (1,)]  # no model run for frame 0 again
    assert shown_frame(viewer) == 0
    np.testing.assert_allclose(heat(viewer).data[0], expected(data, 0), atol=1e-5)
    assert w.status.value.endswith("(cached)")
    go(viewer, 1)
    settle(qtbot, w)
    assert runs == [(0,), (1,)]
    np.testing.assert_array_equal(heat(viewer).data, first)


def test_method_and_target_changes_run_again_a_threshold_change_only_rederives(
        viewer, qtbot, live, runs):
    w, data = live
    w.methods.value = ["gradcam++"]
    settle(qtbot, w)
    assert runs == [(0,), (0,)]
    np.testing.assert_allclose(heat(viewer, "gradcam++").data[0],
                               expected(data, 0, "gradcam++"), atol=1e-5)
    w.target.value = "disc"
    settle(qtbot, w)
    assert runs == [(0,), (0,), (0,)]
    assert set(viewer.layers["regions · stack"].features["class"]) <= {"disc"}

    go(viewer, 1)  # explained at the old threshold, then left
    settle(qtbot, w)
    go(viewer, 0)
    settle(qtbot, w)
    assert runs == [(0,), (0,), (0,), (1,)]
    w.threshold.value = 0.05  # nearly everything is hot
    settle(qtbot, w)
    assert runs == [(0,), (0,), (0,), (1,)]  # regions again from the heatmap, no model run
    assert w._last.explained.region_options["threshold"] == pytest.approx(0.05)
    # frame 1 comes from the cache with regions found at 0.5: found again at 0.05
    go(viewer, 1)
    settle(qtbot, w)
    assert runs == [(0,), (0,), (0,), (1,)]
    assert w._last.job.offset == (1,)
    assert w._last.explained.region_options["threshold"] == pytest.approx(0.05)
    regions = viewer.layers["regions · stack"]
    assert len(regions.data) >= 1 and all(round(float(d[0, 0])) == 1 for d in regions.data)


def test_a_stale_run_is_cancelled_and_never_shown(viewer, qtbot, runs, monkeypatch):
    data = stack(frames=10)
    viewer.add_image(data, name="stack")
    w = dock(viewer)
    use(w, sleepy_cnn(0.4, in_ch=1, classes=3), "slow")
    shown = []
    real = GradCamWidget._on_result

    def recording(self, result):
        shown.append(tuple(result.job.offset))
        real(self, result)

    monkeypatch.setattr(GradCamWidget, "_on_result", recording)
    go(viewer, 0)
    w.live.value = True  # frame 0's run starts now ...
    assert w.running and w._live.flight.key.index == (0,)
    for frame in range(1, 10):  # ... and a drag over nine slices happens while it runs
        go(viewer, frame)
    settle(qtbot, w)
    assert runs == [(0,), (9,)]  # one run in flight plus the latest wanted, not ten
    assert shown == [(9,)]  # frame 0's result never reached the layers
    assert shown_frame(viewer) == 9
    assert not w.status.value.startswith("cancelled")


def test_a_removed_layer_and_a_reloaded_model_drop_their_entries(viewer, qtbot, live,
                                                                  errors):
    w, _data = live
    go(viewer, 1)
    settle(qtbot, w)
    other = viewer.add_image(stack(seed=1), name="other")
    w.image.value = other
    settle(qtbot, w)
    ours = viewer.layers["stack"].unique_id
    assert sum(k.layer == ours for k in w._live.cache) == 2
    assert sum(k.layer == other.unique_id for k in w._live.cache) == 1

    viewer.layers.remove("stack")
    assert [k.layer for k in w._live.cache] == [other.unique_id]

    use(w, ng.load_model("demo"), "demo")  # the same name loaded again
    settle(qtbot, w)
    assert all(k.spec == id(w._loaded().spec) for k in w._live.cache)
    viewer.layers.remove("other")  # no image left: live waits quietly
    settle(qtbot, w)
    assert not len(w._live.cache) and errors == []
    assert w.live.value and w.status.value == "live: open or select an image layer"


def test_an_edited_image_is_explained_again(viewer, qtbot, live, runs):
    w, data = live
    layer = viewer.layers["stack"]
    layer.data[0] = data[0][::-1].copy()  # the pixels changed in place, then shown
    layer.refresh()
    go(viewer, 1)
    settle(qtbot, w)
    go(viewer, 0)
    settle(qtbot, w)
    assert runs == [(0,), (1,), (0,)]  # not served from the cache
    np.testing.assert_allclose(heat(viewer).data[0], expected(layer.data, 0), atol=1e-5)


class Failing(nn.Module):
    """Takes the blank probe (so it loads), fails on a real image as models do."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()

    def forward(self, x):
        if x.abs().sum() > 0:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (1x8 and 9x3)")
        return self.net(x)


def test_a_model_error_is_said_once_and_live_stays_on(viewer, qtbot, errors, runs):
    viewer.add_image(stack(), name="stack")
    w = dock(viewer)
    use(w, Failing(), "broken")
    go(viewer, 0)
    w.live.value = True
    settle(qtbot, w)
    for frame in (1, 2, 0):
        go(viewer, frame)
        settle(qtbot, w)
    # each slice tried once as the slider reaches it (a failed one is not retried by
    # itself: no loop), and one notification for them all
    assert runs == [(0,), (1,), (2,), (0,)]
    assert len(errors) == 1 and "mat1 and mat2" in errors[0]
    assert w.live.value and w.status.value.startswith("live: ") and "mat1" in w.status.value
    assert "gradcam · stack" not in [layer.name for layer in viewer.layers]
    w.run()  # Run retries the shown slice
    settle(qtbot, w)
    assert runs[-1] == (0,) and len(errors) == 1


def test_a_bad_setting_in_live_is_one_notification(viewer, qtbot, live, errors, runs):
    w, _data = live
    w.methods.value = []
    settle(qtbot, w)
    go(viewer, 1)
    settle(qtbot, w)
    go(viewer, 2)
    settle(qtbot, w)
    assert len(errors) == 1 and "no method chosen" in errors[0]
    assert runs == [(0,)] and w.live.value


def test_unticking_stops_following_the_slider(viewer, qtbot, live, runs):
    w, _data = live
    w.live.value = False
    go(viewer, 2)
    settle(qtbot, w)
    w.methods.value = ["gradcam++"]
    settle(qtbot, w)
    assert runs == [(0,)]
    assert shown_frame(viewer) == 0


def test_run_while_a_model_loads_waits_for_it(viewer, qtbot, runs):
    viewer.add_image(stack(), name="stack")
    go(viewer, 0)
    _dock, w = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM")
    w.live.value = True  # the demo model may still be loading: live waits for it
    assert w.wait_until_ready()
    settle(qtbot, w)
    assert runs == [(0,)] and shown_frame(viewer) == 0


# ---- the cache and the scheduler, without a viewer -----------------------------------------------

def key(index, **kw):
    fields = {"layer": "L", "pixels": ("p", index), "index": (index,), "model": "demo",
              "spec": 1, "methods": ("gradcam",), "target": (False, None),
              "target_layer": "auto", "device": "auto"}
    fields.update(kw)
    return LiveKey(**fields)


def test_cache_drops_the_least_recently_used_by_count_and_by_bytes():
    cache = ResultCache(max_entries=3, max_bytes=100, size=lambda v: v)
    for i in range(3):
        cache.put(key(i), 10)
    assert cache.get(key(0)) == 10  # now the most recently used
    cache.put(key(3), 10)
    assert key(1) not in cache and {key(0), key(2), key(3)} == set(cache.keys())
    cache.put(key(4), 85)  # 115 bytes: the oldest go until it fits
    assert cache.keys() == [key(3), key(4)] and cache.nbytes == 95
    assert not cache.put(key(5), 101) and key(5) not in cache  # larger than the whole bound
    assert cache.drop_layer("L") == 2 and not len(cache) and cache.nbytes == 0


def test_cache_refuses_a_bound_with_no_room():
    with pytest.raises(ValueError, match="room for one result.*>= 1"):
        ResultCache(max_entries=0)
    with pytest.raises(ValueError, match="max_bytes=0"):
        ResultCache(max_bytes=0)


def test_cache_drops_a_model_and_a_region_layer():
    cache = ResultCache(size=lambda v: 1)
    cache.put(key(0), "a")
    cache.put(key(1, model="other"), "b")
    cache.put(key(2, region_layer="S"), "c")
    assert cache.drop_model("other") == 1 and cache.drop_layer("S") == 1
    assert cache.keys() == [key(0)]


def test_result_bytes_count_the_heatmaps():
    from napari_gradcam.job import ExplainJob

    result = ExplainJob(ng.load_model("demo"), ["gradcam", "gradcam++"]).run(
        stack(frames=2))
    maps = sum(a.nbytes for a in result.heatmaps.values()) + \
        sum(a.nbytes for a in result.per_target.values())
    assert maps <= result_nbytes(result) < maps + 4096 + 1024 * len(result.regions)


def test_pixels_token_sees_an_edit_in_place_and_lazy_arrays_by_identity():
    a = np.zeros((4, 8), np.float32)
    before = pixels_token(a, a)
    assert pixels_token(a.copy(), a) == before  # the same values: the same slice
    a[1, 2] = 1
    assert pixels_token(a, a) != before
    dask = pytest.importorskip("dask.array")
    lazy = dask.zeros((2, 4, 8))
    assert pixels_token(lazy[0], lazy) == pixels_token(lazy[0], lazy)
    assert pixels_token(lazy[0], lazy) != pixels_token(lazy[0], dask.zeros((2, 4, 8)))


class Worker:
    def __init__(self):
        self.quits = 0

    def quit(self):
        self.quits += 1


def test_scheduler_one_run_in_flight_plus_the_latest():
    s = LiveScheduler()
    assert s.decide(key(0)).action == START
    w0 = Worker()
    s.started(key(0), w0)
    assert s.decide(key(0)).action == WAIT and w0.quits == 0  # its own run: let it go on
    for i in range(1, 10):  # a drag: the run in flight is quit once, nothing else starts
        assert s.decide(key(i)).action == WAIT
    assert w0.quits == 1 and s.is_stale(w0)
    assert not s.returned(w0, key(0), "r0")  # slipped past its quit: cached, not shown
    assert s.finished(w0)
    assert s.decide(key(9)).action == START
    w9 = Worker()
    s.started(key(9), w9)
    assert s.returned(w9, key(9), "r9") and s.finished(w9)
    assert s.decide(key(9)).action == NOTHING  # on screen already
    hit = s.decide(key(0))
    assert hit.action == SHOW and hit.result == "r0"
    assert s.decide(key(9), force=True).action == SHOW


def test_scheduler_failures_and_cancel_are_not_retried_by_themselves():
    s = LiveScheduler()
    w = Worker()
    s.started(key(0), w)
    assert s.failed(w) and s.finished(w)
    assert s.decide(key(0)).action == NOTHING  # a failing model would otherwise loop
    assert s.decide(key(0), force=True).action == START  # Run retries
    assert s.should_say("boom") and not s.should_say("boom") and s.should_say("other")
    w1 = Worker()
    s.started(key(1), w1)
    s.cancelled()
    assert not s.is_stale(w1)  # the user's cancel, not live's: it says "cancelled"
    assert s.finished(w1) and s.decide(key(1)).action == NOTHING
    s.reset()  # live ticked again: wanted afresh, errors said again
    assert s.should_say("boom") and s.decide(key(1)).action == START


# ---- the image removed, edited, or scrolled through whole ----------------------------------------

def test_an_image_removed_mid_run_gets_no_layers_and_no_cache_entry(viewer, qtbot, runs):
    viewer.add_image(stack(), name="stack")
    w = dock(viewer)
    use(w, sleepy_cnn(0.5), "slow")
    go(viewer, 0)
    w.live.value = True
    qtbot.waitUntil(lambda: w.running, timeout=10_000)
    worker = w._worker
    viewer.layers.remove("stack")
    assert worker.abort_requested  # the run for it is asked to stop at once
    settle(qtbot, w)
    qtbot.wait(100)
    assert [layer.name for layer in viewer.layers] == []
    assert len(w._live.cache) == 0 and w._last is None
    # a result that still arrives for a removed image is neither written nor cached
    from napari_gradcam.job import JobResult

    gone = viewer.add_image(stack(), name="gone")
    job = w.job()
    viewer.layers.remove(gone)
    w.live.value = False
    w._on_live_result(None, w._live_key(job), widget_mod.Result(job, JobResult.__new__(
        JobResult)))
    assert len(w._live.cache) == 0 and [layer.name for layer in viewer.layers] == []
    assert w.status.value == "the image 'gone' was removed during the run; nothing to show"


def test_replacing_the_image_data_explains_it_again_and_frees_the_old(viewer, qtbot, live,
                                                                      runs):
    w, _data = live
    layer = viewer.layers["stack"]
    go(viewer, 1)
    settle(qtbot, w)
    assert all(isinstance(w._live.cache.get(k), widget_mod.Cached) for k in w._live.cache)
    new = stack(seed=5)
    layer.data = new  # a new array: explained again without touching the slider
    settle(qtbot, w)
    assert runs == [(0,), (1,), (1,)]
    np.testing.assert_allclose(heat(viewer).data[0], expected(new, 1), atol=1e-5)
    assert [k.index for k in w._live.cache] == [(1,)]  # the old pixels' entries went
    # a cached slice keeps its heatmaps, not the job with its view of the layer's pixels
    assert all(set(vars(w._live.cache.get(k))) == {"explained", "seconds"}
               for k in w._live.cache)
    # an edit in place followed by refresh(), the slider left where it is: explained again
    layer.data[1] = layer.data[1][::-1].copy()
    layer.refresh()
    settle(qtbot, w)
    assert runs == [(0,), (1,), (1,), (1,)]
    np.testing.assert_allclose(heat(viewer).data[0], expected(layer.data, 1), atol=1e-5)
    # a layer no longer chosen is no longer followed
    other = viewer.add_image(stack(seed=2), name="other")
    w.image.value = other
    settle(qtbot, w)
    n = len(runs)
    layer.data = stack(seed=3)
    settle(qtbot, w)
    assert len(runs) == n


def test_a_3d_models_volume_is_hashed_once_and_the_slider_builds_no_job(viewer, qtbot, runs,
                                                                        monkeypatch):
    viewer.add_image(np.random.default_rng(0).random((6, 32, 32)).astype(np.float32),
                     name="vol")
    w = dock(viewer)
    use(w, small_cnn(dims=3, width=4), "c3d")
    hashed, jobs = [], []
    real_token, real_job = widget_mod.pixels_token, GradCamWidget.job
    monkeypatch.setattr(widget_mod, "pixels_token",
                        lambda *a: hashed.append(1) or real_token(*a))
    monkeypatch.setattr(GradCamWidget, "job", lambda self: jobs.append(1) or real_job(self))
    w.live.value = True
    settle(qtbot, w)
    assert runs == [()] and len(hashed) == 1
    looked = len(jobs)
    for z in range(6):  # the whole volume is explained: the plane shown changes nothing
        viewer.dims.set_point(0, z)
    settle(qtbot, w)
    assert len(jobs) == looked and runs == [()]
    w.methods.value = ["gradcam", "layercam"]  # a new look at the same pixels: no new digest
    settle(qtbot, w)
    assert len(hashed) == 1 and runs == [(), ()]
    viewer.layers["vol"].data = np.zeros((6, 32, 32), np.float32)  # an edit: hashed again
    settle(qtbot, w)
    assert len(hashed) == 2 and runs == [(), (), ()]


def test_scheduler_abandons_the_run_of_a_removed_layer():
    class Worker:
        quits = 0

        def quit(self):
            self.quits += 1

    s = LiveScheduler()
    worker = Worker()
    s.started(key(0), worker)
    assert not s.abandon(lambda k: k.layer == "another")
    assert s.abandon(lambda k: k.layer == key(0).layer) and worker.quits == 1
    assert s.is_stale(worker) and not s.abandon(lambda k: True)  # quit once
