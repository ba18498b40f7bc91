"""One-time work that would otherwise freeze the viewer on the first Run, done on a background
thread as soon as the widget opens.

The first rectangle or polygon napari builds compiles its shape helpers with numba (seconds on a
small CPU, every time numba's on-disk cache is missing or stale). Done on the UI thread while the
first result layers are added, that compile is a multi-second freeze. Here the same shape models
are built, with no layer and no viewer, on a daemon thread; each run's worker waits for this to
finish before it hands its result to the UI thread (:func:`after_warmup`), so the UI thread never
meets a compile (numba compiles under one lock: a UI thread calling a function still being
compiled here would wait for it).

Only napari's data classes are touched (never a layer or a Qt object), so this is safe off the
main thread; an error here only means the UI thread compiles when it first needs to.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

_lock = threading.Lock()
_thread: threading.Thread | None = None
_done = threading.Event()
error: BaseException | None = None  # what stopped the warm-up, if anything did
ran_on: threading.Thread | None = None  # the thread the warm-up ran on (for tests)


def _shapes() -> None:
    """Build napari's rectangle and polygon models as the regions layer does (2D, and nD with
    the frame index first), which compiles every numba helper they call."""
    from napari.layers.shapes._shapes_models import Polygon, Rectangle

    box = np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float)
    poly = np.array([[0, 0], [0, 4], [3, 5], [4, 0]], float)
    for ndim in (2, 3):
        lead = np.zeros((4, ndim - 2))
        order = list(range(ndim))
        Rectangle(np.hstack([lead, box]), edge_width=2, dims_order=order, ndisplay=2)
        Polygon(np.hstack([lead, poly]), edge_width=2, dims_order=order, ndisplay=2)


def _empty_shapes() -> None:
    """napari's own warm-up: what its first empty Shapes layer (a run that found no region)
    compiles."""
    from napari.layers.shapes._accelerated_triangulate_dispatch import warmup_numba_cache

    warmup_numba_cache()


def _imports() -> None:
    """Modules napari imports on the UI thread when the first result layers are made: pandas
    (a Shapes layer's features table; about a second on a small CPU)."""
    import pandas  # noqa: F401


def _run() -> None:
    global error, ran_on
    ran_on = threading.current_thread()
    try:
        _imports()
        _shapes()
        _empty_shapes()
    except Exception as err:  # noqa: BLE001 - an optimisation: the UI thread compiles instead
        error = err
    finally:
        _done.set()


def start() -> threading.Thread:
    """Start the warm-up once per process (later calls return the same thread)."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_run, name="napari-gradcam warm-up", daemon=True)
            _thread.start()
        return _thread


def done() -> bool:
    return _done.is_set()


def wait(timeout: float | None = None) -> bool:
    """Block (a worker thread, never the UI thread) until the warm-up has finished; True when
    it has. Without a warm-up started there is nothing to wait for."""
    if _thread is None:
        return True
    return _done.wait(timeout)


def after_warmup(work):
    """``work`` (a generator function run by a napari worker) that, once its own work is done,
    waits for the whole warm-up before returning its result: the result then reaches the UI
    thread only when adding its layers compiles nothing, and the UI thread writes them without
    a compiling thread beside it holding the interpreter's lock half the time (measured: the
    first result's layers took twice as long to write while napari's own warm-up still ran).
    Closing it (Cancel) closes ``work``."""

    @functools.wraps(work)
    def waiting(*args, **kwargs):
        result = yield from work(*args, **kwargs)
        wait()
        return result

    return waiting
