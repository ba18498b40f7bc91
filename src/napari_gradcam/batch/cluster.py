"""Scaling the batch pipeline out with dask.distributed (no home-made scheduler).

Units (files, zarr index ranges) are grouped and mapped over the cluster's workers; each task
runs :func:`~napari_gradcam.batch.schedule.process_units` on its group and returns the records. A
worker process loads the model once (the first task that needs it) and keeps it for the next
tasks. Workers write each unit's files into the output folder themselves, so that folder must
be reachable from every worker (a shared filesystem; automatic for a local cluster). The client
collects the records and writes summary.csv and coco.json.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from .discover import Unit
from .output import claim_output, held_run
from .records import Record
from .schedule import process_units
from .settings import Options, run_settings
from .write import prepare_outputs

_MODELS: dict = {}  # per worker process: model key -> ModelSpec
_LOCK = threading.Lock()
MODEL_LOADS = 0  # how many times this process loaded a model (tests read it on the workers)


def model_key(model: dict) -> tuple:
    """The same model however its defaults were spelled ({"trust_code": False} = {})."""
    return tuple(sorted((k, str(v)) for k, v in model.items() if v not in (None, False)))


def worker_model(model: dict):
    """The model for ``load_model(**model)``, loaded once per process."""
    global MODEL_LOADS
    key = model_key(model)
    with _LOCK:
        if key not in _MODELS:
            from ..models import load_model

            args = dict(model)
            _MODELS[key] = load_model(args.pop("source"), **args)
            MODEL_LOADS += 1
        return _MODELS[key]


def run_group(units: list[Unit], model: dict, out: str, opts: Options,
              settings: str = "") -> list[Record]:
    """One dask task: the single-process pipeline on a group of units. The client holds the
    output folder (its lock, its settings, its names), so the task neither locks nor cleans;
    its records carry the client's ``settings`` digest."""
    return process_units(units, worker_model(model), Path(out), opts, clean=False,
                         settings=settings)


def make_client(scheduler: str | None = None, local_workers: int | None = None,
                device: str = "auto"):
    """A dask.distributed Client: to an existing scheduler, or a local cluster of N workers
    (one per GPU with dask-cuda when the device is CUDA and dask-cuda is installed)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("scaling out needs the optional package 'distributed': "
                         "pip install distributed (or napari-gradcam[dask]).") from None
    if scheduler:
        return Client(scheduler)
    if str(device).startswith("cuda"):
        try:
            from dask_cuda import LocalCUDACluster

            return Client(LocalCUDACluster(n_workers=local_workers))
        except ImportError:
            pass
    return Client(LocalCluster(n_workers=local_workers, threads_per_worker=1,
                               processes=True, dashboard_address=None))


def groups_of(units: list[Unit], n_workers: int) -> list[list[Unit]]:
    """Contiguous groups, about four per worker, so that workers stay busy to the end."""
    count = max(1, min(len(units), 4 * max(1, n_workers)))
    size = -(-len(units) // count)
    return [units[i:i + size] for i in range(0, len(units), size)]


def process_on_cluster(client, units: list[Unit], model: dict, out, opts: Options, *,
                       spatial_dims: int = 2, in_channels: int | None = None,
                       progress: Callable[[int, int, str], None] | None = None) -> list[Record]:
    """Map groups of units over the cluster; records in the units' order. The client holds
    the output folder for the whole job (:func:`~napari_gradcam.batch.output.claim_output`),
    claiming it here unless this process already does (as the CLI). ``in_channels``: the
    model's, for the heatmap arrays' shape (None: read from the model, loaded here)."""
    out = Path(out).resolve()
    run = held_run(out)
    if run is None:
        settings = run_settings(opts, model, worker_model(model))
        with claim_output(out, settings, overwrite=opts.overwrite) as run:
            return process_on_cluster(client, run.name(units), model, out, opts,
                                      spatial_dims=spatial_dims, in_channels=in_channels,
                                      progress=progress)
    from distributed import as_completed

    if in_channels is None:
        in_channels = worker_model(model).in_channels
    prepare_outputs(units, out, opts.channel_axis, spatial_dims, in_channels,
                    segmentation=opts.write_segmentation)
    n_workers = len(client.scheduler_info().get("workers", {})) or 1
    futures = client.map(run_group, groups_of(units, n_workers), model=model, out=str(out),
                         opts=opts, settings=run.digest, pure=False)
    records: dict = {}
    images = 0
    for fut in as_completed(futures):
        for rec in fut.result():
            records[rec.unit] = rec
            images += rec.image_count
            if progress is not None:
                progress(images, len(records), rec.unit)
    return [records[u.key] for u in units if u.key in records]


__all__ = ["make_client", "process_on_cluster", "run_group", "worker_model"]
