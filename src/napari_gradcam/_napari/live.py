"""Live mode's bookkeeping: which explanation the viewer should show now, a bounded cache of
the ones already computed, and the rule "at most one run in flight plus the latest wanted".

Kept apart from the widget so it can be tested without a viewer: the widget reads its controls
into a :class:`LiveKey` and asks the :class:`LiveScheduler` what to do with it (show a cached
result, start a run, or wait for the run in flight to stop); the scheduler never touches Qt or
layers itself. Only :class:`Debounce` knows about Qt (a single-shot timer).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

# The cache's bounds. A cached slice holds its heatmaps as float32: one map per method, and per
# target ("every class found" keeps one per class) plus the combined map, so a 512 x 512 slice
# with one method and one class is about 2 MiB. 256 MiB keeps ~100 such slices: a stack's
# worth to scroll back and forth through, and a small part of a laptop's memory. The count
# bound keeps the small entries (each also holds its job: the slice's view of the layer, the
# model's spec) from piling up on a long stack of tiny images.
MAX_ENTRIES = 256
MAX_BYTES = 256 * 2**20
# Pixels of a slice in memory are hashed into its key (an edited image is not served stale);
# hashing costs ~1 ms per MiB, so a slice larger than this is known by its array's identity.
HASH_LIMIT = 256 * 2**20


def pixels_token(images: Any, data: Any) -> Hashable:
    """What identifies the pixels explained: a digest of the slice when it is a NumPy array in
    memory (an edit in place, followed by the layer's refresh, gives a new token), else the
    layer's data object (a dask / zarr array is read lazily: hashing it would read it)."""
    if isinstance(images, np.ndarray) and images.nbytes <= HASH_LIMIT:
        return ("pixels", images.shape, images.dtype.str, array_digest(images))
    return ("array", type(data).__name__, id(data), tuple(getattr(images, "shape", ())))


def array_digest(array: np.ndarray) -> bytes:
    """A 128-bit digest of an array's values (its shape and dtype go in the key beside it)."""
    a = np.ascontiguousarray(array)
    return hashlib.blake2b(a.view(np.uint8).reshape(-1), digest_size=16).digest()


def region_token(target_mask: Any, outlines: Any) -> Hashable:
    """What identifies a segmentation target's region: a digest of its pixels (a Labels
    layer's, already matched to the image) or of the Shapes outlines (read, not yet
    rasterised); None when the target has no region."""
    if target_mask is not None:
        m = np.asarray(target_mask)
        return ("mask", m.shape, array_digest(m))
    if outlines is not None:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(tuple(outlines.shape)).encode())
        for plane in sorted(outlines.planes):
            vertices, types = outlines.planes[plane]
            h.update(repr((plane, list(types))).encode())
            for v in vertices:
                h.update(np.ascontiguousarray(v, dtype=np.float64).tobytes())
        return ("outlines", h.digest())
    return None


@dataclass(frozen=True)
class LiveKey:
    """Everything that changes a slice's heatmaps (the region settings and the mask only
    change what is derived from them, so they are not part of it: a cached result gets its
    regions again instead)."""

    layer: Hashable  # the image layer's unique_id
    pixels: Hashable  # pixels_token of the slice explained
    index: tuple  # the slice's leading indices (() for a single image)
    model: str  # the model's name in the list (a re-load drops its entries)
    spec: int  # id() of its ModelSpec (the cached results hold the spec, so it stays unique)
    methods: tuple
    target: Hashable  # None (the prediction), "found", a class index or name
    target_layer: str
    device: str
    region: Hashable = None  # region_token of a segmentation target's region
    region_layer: Hashable = None  # the unique_id of the Labels / Shapes layer it comes from
    channel_axis: Hashable = None


def result_nbytes(result: Any) -> int:
    """The bytes a cached widget result holds of its own: the JobResult's arrays (the slice
    itself is a view of the layer's data and not counted); regions, as shapely polygons, at a
    rough 1 KiB each."""
    explained = getattr(result, "explained", result)
    total = 0
    for group in ("heatmaps", "per_target"):
        for array in (getattr(explained, group, None) or {}).values():
            total += int(getattr(array, "nbytes", 0))
    for name in ("class_ids", "scores", "kept", "probabilities", "mask"):
        total += int(getattr(getattr(explained, name, None), "nbytes", 0) or 0)
    return total + 1024 * len(getattr(explained, "regions", ()) or ())


class ResultCache:
    """Results by :class:`LiveKey`, least recently used dropped first once there are more than
    ``max_entries`` or they hold more than ``max_bytes`` (see :data:`MAX_BYTES`). An entry
    larger than the whole bound is not kept at all."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES,
                 size: Callable[[Any], int] = result_nbytes):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"the live cache needs room for one result; got max_entries="
                             f"{max_entries}, max_bytes={max_bytes}: give both >= 1.")
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self._size = size
        self._items: OrderedDict = OrderedDict()  # key -> (value, bytes)
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    def __iter__(self):
        return iter(list(self._items))

    def keys(self) -> list:
        """The keys, least recently used first."""
        return list(self._items)

    def get(self, key):
        """The value cached under ``key`` (now the most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key, value) -> bool:
        """Cache ``value``; returns whether it was kept (False: larger than the bound)."""
        self.pop(key)
        nbytes = int(self._size(value))
        if nbytes > self.max_bytes:
            return False
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
            _key, (_value, dropped) = self._items.popitem(last=False)
            self.nbytes -= dropped
        return True

    def pop(self, key):
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.nbytes -= item[1]
        return item[0]

    def drop(self, predicate: Callable[[LiveKey], bool]) -> int:
        """Drop every entry whose key ``predicate`` accepts; returns how many."""
        gone = [k for k in self._items if predicate(k)]
        for k in gone:
            self.pop(k)
        return len(gone)

    def drop_layer(self, uid) -> int:
        """A layer left the viewer: its results (and those whose target region it held) go."""
        return self.drop(lambda k: k.layer == uid or k.region_layer == uid)

    def drop_model(self, name: str) -> int:
        """The model called ``name`` was loaded again: its old results go."""
        return self.drop(lambda k: k.model == name)

    def clear(self):
        self._items.clear()
        self.nbytes = 0


# what the scheduler tells the widget to do with the key it was given
NOTHING = "nothing"  # it is on screen already (or failed / was cancelled: wait for a change)
SHOW = "show"  # show the cached result (decision.result)
START = "start"  # start a run for it
WAIT = "wait"  # a run is in flight (its own, or a stale one winding down): ask again when done


@dataclass
class Decision:
    action: str
    result: Any = None


@dataclass
class Flight:
    key: LiveKey
    worker: Any  # has .quit()
    stale: bool = False  # quit: another slice / setting is wanted now, or the user cancelled
    by_user: bool = False  # quit by the user's Cancel


class LiveScheduler:
    """At most one run in flight plus the latest wanted. The widget calls :meth:`decide`
    with the key its controls give now; when a run is in flight for another key it is quit
    (its result, if it still arrives, is cached but not shown) and the widget asks again once
    it has finished (:meth:`finished`), with whatever is wanted by then: a drag over ten
    slices starts at most two runs, not ten."""

    def __init__(self, cache: ResultCache | None = None):
        self.cache = cache if cache is not None else ResultCache()
        self.flight: Flight | None = None
        # the key last settled: shown, or failed, or cancelled by the user; it is not run
        # again until something changes (a failing model would otherwise loop)
        self.settled: LiveKey | None = None
        self._said: set = set()  # error messages already shown since the last success

    def decide(self, key: LiveKey, force: bool = False) -> Decision:
        """What to do for ``key``; ``force`` (Run pressed): show or run it even if it is
        what was last settled (a retry after an error)."""
        if self.flight is not None and self.flight.key != key and not self.flight.stale:
            self.flight.stale = True
            self.flight.worker.quit()
        if self.flight is not None and self.flight.key == key and not self.flight.stale:
            return Decision(WAIT)
        if key == self.settled and not force:
            return Decision(NOTHING)
        hit = self.cache.get(key)
        if hit is not None:
            self.settled = key
            return Decision(SHOW, hit)
        if self.flight is not None:  # a stale run is stopping: one run at a time
            return Decision(WAIT)
        return Decision(START)

    def started(self, key: LiveKey, worker) -> None:
        self.flight = Flight(key, worker)

    def returned(self, worker, key: LiveKey, result) -> bool:
        """A run's result arrived: cached in any case; returns whether to show it (it is the
        run in flight and still wanted)."""
        self.cache.put(key, result)
        current = self.flight is not None and self.flight.worker is worker
        if current and not self.flight.stale:
            self.settled = key
            self._said.clear()
            return True
        return False

    def failed(self, worker) -> bool:
        """A run failed: returns whether it was the wanted one (its error then says so; a
        stale one's error is nobody's business). Its key is settled, not retried."""
        if self.flight is None or self.flight.worker is not worker or self.flight.stale:
            return False
        self.settled = self.flight.key
        return True

    def cancelled(self) -> None:
        """The user pressed Cancel: the slice it was for is not run again by itself."""
        if self.flight is not None:
            self.settled = self.flight.key
            self.flight.stale = self.flight.by_user = True

    def abandon(self, predicate: Callable[[LiveKey], bool]) -> bool:
        """Quit the run in flight if ``predicate`` accepts its key (its image left the viewer:
        its result is of no use); returns whether it did."""
        f = self.flight
        if f is None or f.stale or not predicate(f.key):
            return False
        f.stale = True
        f.worker.quit()
        return True

    def is_stale(self, worker) -> bool:
        """Whether ``worker`` was quit by live mode itself (not by the user)."""
        f = self.flight
        return f is not None and f.worker is worker and f.stale and not f.by_user

    def finished(self, worker) -> bool:
        """A run ended (returned, failed or aborted); returns whether it was live's (then ask
        again: the latest wanted may differ)."""
        if self.flight is None or self.flight.worker is not worker:
            return False
        self.flight = None
        return True

    def should_say(self, message: str) -> bool:
        """Whether to show an error: each message once until a run succeeds (scrolling a
        stack with a model that fails gives one notification, not one per slice)."""
        if message in self._said:
            return False
        self._said.add(message)
        return True

    def reset(self) -> None:
        """Live was ticked on: everything is wanted afresh (errors said again)."""
        self.settled = None
        self._said.clear()


class Debounce:
    """A single-shot Qt timer: calls ``fn`` once the events queued now are handled, however
    often :meth:`__call__` was called meanwhile (a burst of slider steps, a model change that
    resets several controls)."""

    def __init__(self, fn: Callable[[], None], delay_ms: int = 0, parent=None):
        from qtpy.QtCore import QTimer

        # owned by ``parent`` (the widget): closing the viewer deletes it, so a pending look
        # never fires into a widget that is gone
        self._timer = QTimer(parent)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(fn)
        self.delay_ms = delay_ms
        self._last = float("-inf")  # when fn last ran (it calls stop() first)

    def leads(self, window_ms: float) -> bool:
        """Whether a call may run ``fn`` at once rather than after the queued events: nothing
        is pending and ``fn`` last ran ``window_ms`` ago or more (the first step of a drag is
        explained before the viewer repaints the bare slice; the steps that follow it closely
        are folded into one look by the timer)."""
        return not self.pending and (time.perf_counter() - self._last) * 1000 >= window_ms

    def __call__(self, delay_ms: int | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # its widget was deleted: nothing to look at
            self._timer.start(self.delay_ms if delay_ms is None else delay_ms)

    def stop(self) -> None:
        self._last = time.perf_counter()
        with contextlib.suppress(RuntimeError):
            self._timer.stop()

    @property
    def pending(self) -> bool:
        try:
            return self._timer.isActive()
        except RuntimeError:
            return False
