"""Running units through the model, with reading and writing overlapped.

Three stages overlap: a thread pool reads and decodes units ahead of the engine, the engine runs
batches gathered across units of the same shape on the device (one explain job: every target of
a batch, "found" included, from one forward pass), and a second pool cuts regions and writes
files. :func:`process_units` is the single-process run; cluster.py maps groups of
units over a dask.distributed cluster with the same function (one model per worker).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cam import EmptyTargetWarning
from ..job import BatchResult, ExplainJob
from .discover import Unit
from .explainer import check_segmentation_options, make_job
from .output import claim_output, held_run
from .read import _load
from .records import Record, _failed, is_done, load_record
from .settings import Options, run_settings
from .tiled import is_tiled, level_problem, remove_partial, run_tiled
from .write import _finish_safely, prepare_outputs, unit_offset

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    unit: Unit
    pixels: np.ndarray
    raw: np.ndarray  # (n, *spatial, channels)
    lead: tuple
    mask: np.ndarray | None
    t0: float
    volume: object = None  # a NIfTI / DICOM input's Volume (affine for its NIfTI outputs)
    # a segmentation model's region to explain: the spatial shape, or the leading shape plus it
    target: np.ndarray | None = None
    parts: list = field(default_factory=list)  # BatchResults of its images, in order
    labels: list = field(default_factory=list)  # predicted label maps of its images, in order
    done: int = 0

    def take(self, result: BatchResult, labels: np.ndarray | None = None) -> None:
        """The next images' results (and their predicted labels, when written)."""
        self.parts.append(result)
        if labels is not None:
            self.labels.append(labels)
        self.done += result.scores.shape[0]

    def targets(self, stop: int) -> np.ndarray | None:
        """The target masks of images ``done:stop``, one per image: (stop - done, *spatial)."""
        if self.target is None:
            return None
        spatial = self.raw.shape[1:-1]
        if tuple(self.target.shape) == tuple(spatial):  # one region for every image
            return np.repeat(self.target[None], stop - self.done, axis=0)
        return self.target.reshape(-1, *spatial)[self.done:stop]


def process_units(units: list[Unit], spec, out, opts: Options, *,
                  progress: Callable[[int, int, str], None] | None = None,
                  arrays: dict | None = None, clean: bool = True,
                  settings: str | None = None) -> list[Record]:
    """Run the pipeline over ``units`` (skipping those finished from the same source with the
    same settings, unless ``opts.overwrite``); returns a record per unit.
    ``progress(images_done, units_done, unit_key)`` after each unit.

    ``clean``: this process owns ``out``; unless it already holds it, it claims it for the
    call (:func:`claim_output`: the lock, the settings check, the names index, stale temporary
    files), with the settings :func:`run_settings` derives from ``opts`` and ``spec``. Dask
    workers pass ``clean=False`` and the client's ``settings`` digest: the client holds the
    folder for them."""
    out = Path(out)
    job = make_job(spec, opts)  # a bad method or target: said before anything is touched
    # target masks or label maps asked of a classifier: said before anything is read
    check_segmentation_options(job, any(u.target_mask for u in units),
                               opts.write_segmentation)
    run = held_run(out)
    if clean and run is None:
        with claim_output(out, run_settings(opts, None, spec),
                          overwrite=opts.overwrite) as run:
            return process_units(run.name(units), spec, out, opts, progress=progress,
                                 arrays=arrays)
    if settings is None:
        settings = run.digest if run is not None else ""
    if clean:
        prepare_outputs(units, out, opts.channel_axis, job.runner.dims, spec.in_channels,
                        segmentation=opts.write_segmentation)
    schedule = _Schedule(spec, out, opts, job, settings, progress, arrays)
    todo, tiled = [], []
    for unit in units:
        old = None if opts.overwrite else load_record(out, unit.key)
        if is_done(old, unit, settings):
            schedule.records[unit.key] = old
            remove_partial(out, unit)  # a run killed between its record and the clean-up
            continue
        problem = level_problem(unit, opts)
        if problem:
            schedule.fail(unit, problem)
        elif is_tiled(unit, spec, opts, job):
            tiled.append(unit)  # alone, in tiles: memory stays bounded, no refusal by size
        else:
            todo.append(unit)
    schedule.run(todo)
    for unit in tiled:  # one at a time: each fills the device's batches with its own tiles
        schedule.finished(run_tiled(unit, spec, out, opts, job, settings, arrays=arrays,
                                    on_tiles=getattr(progress, "tiles", None)))
    return [schedule.records[u.key] for u in units if u.key in schedule.records]


class _Schedule:
    """One :func:`process_units` call's units through the three stages: ``prefetch`` units
    read ahead on reader threads, small units gathered into one batch while their image shape
    and dtype agree and the batch fits (a stack as large as a batch runs alone, in batches),
    each unit's files written on writer threads as soon as its images are explained."""

    def __init__(self, spec, out: Path, opts: Options, job: ExplainJob, settings: str,
                 progress, arrays):
        self.spec, self.out, self.opts, self.job = spec, out, opts, job
        self.settings, self.progress, self.arrays = settings, progress, arrays
        self.records: dict[str, Record] = {}
        self.images_done = 0
        self.reads: deque[tuple[Unit, Future]] = deque()
        self.writes: list[Future] = []
        self.batch: list[_Pending] = []  # units gathered for the next forward
        self.gathered = 0  # images in self.batch

    def run(self, todo: list[Unit]) -> None:
        workers = max(1, self.opts.workers)
        self.readers = ThreadPoolExecutor(workers, thread_name_prefix="gradcam-read")
        self.writers = ThreadPoolExecutor(workers, thread_name_prefix="gradcam-write")
        self.queue = iter(todo)
        self.units_left = len(todo)
        try:
            self.fill()
            while self.reads:
                self.collect_writes()
                unit, fut = self.reads.popleft()
                self.fill()
                loaded = fut.result()
                if isinstance(loaded, Exception):  # the batch being gathered goes on without it
                    self.fail(unit, f"unreadable or unusable: {loaded}")
                    continue
                self.add(self.pending(unit, loaded))
            self.flush()
            for fut in self.writes:
                self.finished(fut.result())
        finally:
            self.readers.shutdown(wait=False, cancel_futures=True)
            self.writers.shutdown(wait=True)

    def fill(self) -> None:
        """Keep ``prefetch`` units being read."""
        while len(self.reads) < max(1, self.opts.prefetch):
            unit = next(self.queue, None)
            if unit is None:
                return
            self.reads.append((unit, self.readers.submit(
                _load, unit, self.spec, self.opts, self.job.runner.dims, self.arrays)))

    def collect_writes(self) -> None:
        """The records of the writes that have finished, without waiting for the others."""
        for fut in [f for f in self.writes if f.done()]:
            self.writes.remove(fut)
            self.finished(fut.result())

    def finished(self, rec: Record) -> None:
        self.records[rec.unit] = rec
        self.images_done += rec.image_count
        if self.progress is not None:
            self.progress(self.images_done, len(self.records), rec.unit)

    def fail(self, unit: Unit, message: str) -> None:
        self.finished(_failed(unit, self.out, message, self.settings))

    def pending(self, unit: Unit, loaded: tuple) -> _Pending:
        pixels, raw, lead, mask, volume, target = loaded
        return _Pending(unit, pixels, raw, lead, mask, time.perf_counter(), volume, target)

    def explain(self, raw: np.ndarray, targets: np.ndarray | None) -> tuple:
        """One batch through the job: its results and, with ``write_segmentation``, the
        predicted labels (n, *spatial) of its images (one more forward, without gradients).
        The engine's warning about empty regions is silenced: it numbers the images of this
        batch, which mixes units; each unit's own note (:meth:`ExplainJob.notes`) says it in
        the unit's terms, in its summary rows and on the log."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyTargetWarning)
            result = self.job.explain(raw) if targets is None else \
                self.job.explain(raw, target_masks=targets)
        labels = None
        if self.opts.write_segmentation:
            labels = np.asarray(self.job.segment(raw, channel_axis=-1))
            labels = labels.reshape(raw.shape[0], *labels.shape[-(raw.ndim - 2):])
        return result, labels

    def add(self, p: _Pending) -> None:
        """Gather ``p`` into the batch, first running the batch if ``p`` can't join it."""
        raw, n = p.raw, p.raw.shape[0]
        # The automatic batch size is chosen once, from the first unit: sized for the whole run
        # (each unit left holds at least one image), not for that unit alone, or a folder of
        # single images would run one image per forward pass.
        size = self.job.runner.size_for(raw.shape[1:-1], max(n, self.units_left))
        first = self.batch[0].raw if self.batch else None
        same = first is not None and first.shape[1:] == raw.shape[1:] and \
            first.dtype == raw.dtype and (self.batch[0].target is None) == (p.target is None)
        if self.batch and (not same or self.gathered + n > size):
            self.flush()
        if n >= size:  # a stack: its own batches
            self.run_stack(p, size)
            return
        self.batch.append(p)
        self.gathered += n

    def run_stack(self, p: _Pending, size: int) -> None:
        n = p.raw.shape[0]
        while p.done < n:
            stop = min(p.done + size, n)
            try:
                p.take(*self.explain(p.raw[p.done:stop], p.targets(stop)))
            except Exception as err:  # noqa: BLE001 - this unit fails, the run goes on
                self.fail(p.unit, f"the model failed on it: {err}")
                return
        self.submit_finish(p)

    def flush(self) -> None:
        """One forward over the gathered images; results scattered back to their units."""
        batch = self.batch
        self.batch, self.gathered = [], 0
        if not batch:
            return
        raw = np.concatenate([p.raw[p.done:] for p in batch]) if len(batch) > 1 else \
            batch[0].raw[batch[0].done:]
        targets = None
        if batch[0].target is not None:  # then every unit of the batch has one (see add)
            targets = np.concatenate([p.targets(p.raw.shape[0]) for p in batch])
        try:
            result, labels = self.explain(raw, targets)
        except Exception as err:  # noqa: BLE001 - the units in this batch fail, the run goes on
            for p in batch:
                self.fail(p.unit, f"the model failed on it: {err}")
            return
        pos = 0
        for p in batch:
            n = p.raw.shape[0] - p.done
            p.take(result.part(pos, pos + n), None if labels is None else labels[pos:pos + n])
            pos += n
            self.submit_finish(p)

    def submit_finish(self, p: _Pending) -> None:
        result = BatchResult.join(p.parts)
        # notes here, not on the writer thread: finding out whether the model segments may
        # run it once, which must not happen while the engine's hooks listen on this thread.
        # Only an empty region scores exactly 0, so other results need no notes (nor that run)
        notes = []
        if np.any(result.scores == 0):
            with warnings.catch_warnings():  # the probe's forward may find regions empty
                warnings.simplefilter("ignore", EmptyTargetWarning)
                notes = self.job.notes(result, p.lead, unit_offset(p.unit, p.lead))
        for note in notes:  # as failures are: one line per input, named as the summary does
            log.warning("%s: %s", p.unit.path or p.unit.name, note)
        self.writes.append(self.writers.submit(
            _finish_safely, p.unit, self.out, p.pixels, result, p.lead,
            p.mask, self.job, self.opts, time.perf_counter() - p.t0, self.settings,
            volume=p.volume, labels=np.concatenate(p.labels) if p.labels else None,
            notes=notes))


def iter_progress(total_units: int, quiet: bool) -> Callable:
    """A progress callback: a tqdm bar with images per second, or log lines when quiet. Its
    ``tiles(progress)`` tells of the tiles of a slide or large image explained so far (one
    input can take hours): in the bar's text, or a log line per tenth of its tiles."""
    t0 = time.perf_counter()
    if quiet:
        def report(images, units, key):
            log.info("%d/%d units, %d images, %.1f img/s (%s)", units, total_units, images,
                     images / max(time.perf_counter() - t0, 1e-9), key)

        said = {"tenth": -1}

        def tiles(p):
            tenth = 10 * p.done // max(p.total, 1)
            if tenth != said["tenth"]:
                said["tenth"] = tenth
                log.info("%d/%d tiles", p.done, p.total)

        report.tiles = tiles
        return report
    from tqdm import tqdm

    bar = tqdm(total=total_units, unit="unit", dynamic_ncols=True)

    def report(images, units, key):
        bar.n = units
        bar.set_postfix_str(f"{images} images, "
                            f"{images / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
        if units >= total_units:
            bar.close()

    def tiles(p):
        bar.set_postfix_str(f"{p.done}/{p.total} tiles")

    report.tiles = tiles
    return report
