"""Tiled Grad-CAM over a synthetic whole slide vs tiled plain inference vs a hand-written
pytorch-grad-cam tiling, side by side in one run.

    python benchmarks/bench_tiles.py                      # 4096^2 slide, 3 interleaved rounds
    python benchmarks/bench_tiles.py --size 20000         # the whole-slide case (see below)
    python benchmarks/bench_tiles.py --device cuda --size 20000 --json tiles.json
    python benchmarks/bench_tiles.py --size 2048 --rounds 1 --no-peer   # a quick check

The slide is a grey uint8 zarr array (chunks 1024^2, zarr's default compression) drawn from the
demo model's data contract (blurred noise, discs, squares and triangles brighter than it),
written chunk by chunk so that no process ever holds the whole slide; every pixel depends on its
position and the seed only, so a smaller slide is the top-left corner of a larger one. Its
generation is timed apart and counted nowhere; ``--workdir`` keeps slides for later runs.

Every contender reads the same tiles (``--tile`` 512, ``--overlap`` 64, MONAI's layout: steps of
tile - overlap, the last tile flush with the edge) from the zarr slide in batches of the same
size on the same device, preprocessed by the package's own ``preprocess``, the next batch read
on a helper thread while the device works on this one:

- ``inference`` (the floor): the demo model's forward under ``torch.inference_mode`` over every
  tile batch, nothing kept or written;
- ``ours``: ``ng.explain(slide, spec, "gradcam", target=..., tile=..., overlap=..., out=zarr
  array on disk)``: Grad-CAM of every tile, Gaussian blending across overlaps, the heat written
  band by band into the zarr array, normalised once over the whole slide;
- ``ours, target=None``: the same with the class left to the model (one forward-only pass over
  the tiles first to pick the slide's class), for information;
- ``pytorch-grad-cam`` (the peer, 1.5.7, what a user would write by hand): its ``GradCAM`` on
  the same layer called per tile batch (each tile's map min-max scaled on its own, as it does),
  blended with a NumPy Gaussian window into whole-slide NumPy accumulators, then written into a
  zarr array. Its accumulators hold the whole slide, so it runs on a slide of ``--peer-size``
  (default 4096, the top-left corner of the same slide).

Throughput is slide megapixels (H x W, overlap not counted) per second. Up to ``--inline-max``
(8192) a side the contenders run in one process, in shuffled interleaved rounds after a warm-up
on a small slide (medians); above it (the whole-slide case), each contender runs once in a fresh
process and the peer, ours and the floor also on the ``--peer-size`` slide. A fresh process
reports its whole peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``, nothing
subtracted) and, for context, its baseline after importing torch and loading the model;
``--memory`` measures the small case that way too. Targets: ours / inference throughput >= 0.9;
the 20,000^2 slide's peak memory < 2 GB on the CPU.

This is a benchmark, not a test: it asserts nothing and is never run by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import zarr
from scipy.ndimage import gaussian_filter

import napari_gradcam as ng
from napari_gradcam._device import describe_device, resolve_device
from napari_gradcam.explain_arrays import auto_batch_size, preprocess, resolve_target
from napari_gradcam.models.demo.synthetic import CLASS_NAMES, _extent, _signed_distance

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import peer_version, sync

# The peer is optional (without it the table shows ours vs the floor) and imported only where
# it runs: it brings OpenCV and more (~300 MiB resident), which would swell the other
# contenders' memory in their fresh processes.
HAVE_PEER = importlib.util.find_spec("pytorch_grad_cam") is not None

MIB = 1 << 20

# ---- the synthetic slide ------------------------------------------------------------------------
# Noise is drawn in blocks seeded by their position, so that any window of it (a chunk and the
# halo its blur needs) is the same wherever it is cut from: no seams at chunk borders. One object
# at most per cell, fully inside it (objects never overlap, they do cross tile borders).

GENERATOR = 1  # bump when the pixels change, so that kept slides are made again
CHUNK = 1024
BLOCK = 128
CELL = 256
SIGMA = 2.0
HALO = 8
MEAN, STD = 0.4, 0.08
OBJECT_SHARE = 0.5  # of the cells
SEED_OFFSET = 1 << 20  # SeedSequence takes non-negative integers; halos reach below 0


def _noise_std(sigma: float) -> float:
    """Standard deviation of unit white noise after ``gaussian_filter(sigma)``."""
    delta = np.zeros((8 * int(sigma) + 9,) * 2)
    delta[delta.shape[0] // 2, delta.shape[1] // 2] = 1
    return float(np.sqrt((gaussian_filter(delta, sigma) ** 2).sum()))


def _noise(seed: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """White noise over rows r0:r1, columns c0:c1 of the slide's infinite plane."""
    out = np.empty((r1 - r0, c1 - c0), np.float32)
    for bi in range(r0 // BLOCK, (r1 - 1) // BLOCK + 1):
        for bj in range(c0 // BLOCK, (c1 - 1) // BLOCK + 1):
            block = np.random.default_rng(
                [seed, bi + SEED_OFFSET, bj + SEED_OFFSET]).standard_normal(
                (BLOCK, BLOCK), np.float32)
            y0, x0 = bi * BLOCK, bj * BLOCK
            ys, xs = max(r0, y0), max(c0, x0)
            ye, xe = min(r1, y0 + BLOCK), min(c1, x0 + BLOCK)
            out[ys - r0:ye - r0, xs - c0:xe - c0] = block[ys - y0:ye - y0, xs - x0:xe - x0]
    return out


def _cell_object(seed: int, ci: int, cj: int):
    """The object of cell (ci, cj), or None: (class, size, angle, centre row, col, brightness,
    softness), drawn like the demo model's training data."""
    rng = np.random.default_rng([seed, 7, ci, cj])
    if rng.random() >= OBJECT_SHARE:
        return None
    cid = int(rng.integers(0, 3))
    kind = CLASS_NAMES[cid]
    size = {"disc": rng.uniform(5, 14), "square": rng.uniform(10, 26),
            "triangle": rng.uniform(12, 28)}[kind]
    radius = _extent(kind, size)
    cy = ci * CELL + rng.uniform(radius + 3, CELL - radius - 3)
    cx = cj * CELL + rng.uniform(radius + 3, CELL - radius - 3)
    return (cid, size, rng.uniform(0, 2 * np.pi), cy, cx, rng.uniform(0.2, 0.45),
            rng.uniform(0, 1))


def slide_pixels(seed: int, size: tuple[int, int], r0: int, r1: int, c0: int, c1: int):
    """uint8 pixels of rows r0:r1, columns c0:c1 of the slide of ``size``; and how many objects
    of each class lie in them."""
    noise = _noise(seed, r0 - HALO, r1 + HALO, c0 - HALO, c1 + HALO)
    image = MEAN + (STD / _noise_std(SIGMA)) * gaussian_filter(noise, SIGMA)[
        HALO:-HALO, HALO:-HALO]
    counts = [0, 0, 0]
    rows, cols = size[0] // CELL, size[1] // CELL  # whole cells only: objects stay inside
    for ci in range(r0 // CELL, min(rows, -(-r1 // CELL))):
        for cj in range(c0 // CELL, min(cols, -(-c1 // CELL))):
            obj = _cell_object(seed, ci, cj)
            if obj is None:
                continue
            cid, side, angle, cy, cx, bright, soft = obj
            radius = _extent(CLASS_NAMES[cid], side)
            y0, y1 = max(int(cy - radius) - 2, r0), min(int(cy + radius) + 3, r1)
            x0, x1 = max(int(cx - radius) - 2, c0), min(int(cx + radius) + 3, c1)
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            d = _signed_distance(CLASS_NAMES[cid], side, angle, yy + 0.5 - cy, xx + 0.5 - cx)
            alpha = np.clip(0.5 + d / soft, 0, 1) if soft > 1e-3 else (d >= 0).astype(float)
            image[y0 - r0:y1 - r0, x0 - c0:x1 - c0] += bright * alpha
            counts[cid] += 1
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), counts


def _write_chunk_row(path: str, seed: int, i: int) -> list[int]:
    """Write one row of chunks (a 1024-row band, chunk by chunk) into the slide at ``path``."""
    arr = zarr.open_array(path, mode="r+")
    h, w = arr.shape
    counts = [0, 0, 0]
    r0, r1 = i * CHUNK, min(h, (i + 1) * CHUNK)
    for c0 in range(0, w, CHUNK):
        c1 = min(w, c0 + CHUNK)
        pixels, n = slide_pixels(seed, (h, w), r0, r1, c0, c1)
        arr[r0:r1, c0:c1] = pixels
        counts = [a + b for a, b in zip(counts, n)]
    return counts


def make_slide(path: Path, size: int, seed: int = 0, workers: int | None = None):
    """The slide (size x size, uint8) as a zarr array at ``path``, written band by band on
    ``workers`` processes; reused when a complete one of the same size, seed and generator is
    there. Returns (array, seconds spent generating, objects per class)."""
    if path.exists():
        with contextlib.suppress(Exception):
            arr = zarr.open_array(str(path), mode="r")
            a = dict(arr.attrs)
            if (a.get("complete") and a.get("seed") == seed and a.get("generator") == GENERATOR
                    and tuple(arr.shape) == (size, size)):
                return arr, 0.0, a["objects"]
        shutil.rmtree(path)
    t0 = time.perf_counter()
    arr = zarr.open_array(str(path), mode="w", shape=(size, size), chunks=(CHUNK, CHUNK),
                          dtype="uint8")  # zarr 2 and 3 alike
    bands = range(-(-size // CHUNK))
    # worker processes pay ~5 s each to start (they import this module, torch included):
    # worth it for whole slides only
    chunks = len(bands) ** 2
    workers = workers or (min(os.cpu_count() or 1, len(bands)) if chunks >= 100 else 1)
    if workers > 1:
        import multiprocessing as mp

        # spawn: forking a process that has started torch's thread pools can hang
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            per_band = list(pool.map(_write_chunk_row, [str(path)] * len(bands),
                                     [seed] * len(bands), bands))
    else:
        per_band = [_write_chunk_row(str(path), seed, i) for i in bands]
    objects = [int(sum(b[k] for b in per_band)) for k in range(3)]
    arr.attrs.update(complete=True, seed=seed, generator=GENERATOR, objects=objects)
    return zarr.open_array(str(path), mode="r"), time.perf_counter() - t0, objects


# ---- the contenders -----------------------------------------------------------------------------


def tile_batches(slide, origins, tile, batch: int, pending: int = 1):
    """(origins, raw (n, th, tw, 1) uint8) batch by batch, read from the lazy slide by the
    engine's own ``read_tiles`` (the tiles of a batch that share a row cut from one read), the
    next batch read on a helper thread (as the engine reads ahead)."""
    from napari_gradcam.explain_arrays import layout
    from napari_gradcam.tiles import read_tiles

    lay = layout(tuple(slide.shape), False, 2, in_channels=1)

    def read(part):
        return read_tiles(slide, lay, (), part, tile)

    parts = [origins[i:i + batch] for i in range(0, len(origins), batch)]
    with ThreadPoolExecutor(1, thread_name_prefix="bench-read") as pool:
        queue = [pool.submit(read, p) for p in parts[:pending]]
        for k, part in enumerate(parts):
            raw = queue.pop(0).result()
            if k + pending < len(parts):
                queue.append(pool.submit(read, parts[k + pending]))
            yield part, raw


def gaussian_window(th: int, tw: int, scale: float = 0.125) -> np.ndarray:
    """The window a user would write for blending: a separable Gaussian, sigma = scale x side."""
    gy = np.exp(-0.5 * ((np.arange(th) - (th - 1) / 2) / (scale * th)) ** 2)
    gx = np.exp(-0.5 * ((np.arange(tw) - (tw - 1) / 2) / (scale * tw)) ** 2)
    return np.outer(gy, gx).astype(np.float32)


class Bench:
    """Everything the contenders share: the model, the tiling, the batch size, the device."""

    def __init__(self, args):
        from napari_gradcam.tiles import check_tiling, tile_origins

        self.args = args
        self.device = resolve_device(args.device)
        self.spec = ng.load_model("demo")
        self.spec.module.eval().to(self.device)
        self.tiling = check_tiling(args.tile, args.overlap)
        self.tile_origins = tile_origins
        self.target = resolve_target(args.target, self.spec.class_names)
        self.batch = args.batch_size or (
            32 if self.device.type == "cuda"
            else auto_batch_size(self.tiling.tile, self.device, 1 << 20))

    def origins(self, slide) -> list:
        return self.tile_origins(tuple(slide.shape[:2]), self.tiling)

    def tile_of(self, slide) -> tuple[int, int]:
        """The tile's size on this slide (a side smaller than the tile is one tile of it)."""
        return tuple(min(t, s) for t, s in zip(self.tiling.tile, slide.shape[:2]))

    def out_array(self, slide, path: Path):
        # the codec of the heat arrays the package makes itself (the CLI's partial heat, a
        # temporary heat): Blosc-LZ4, about half zstd's cost for a heat written once and
        # read back once to scale it
        from zarr.codecs import BloscCodec

        return zarr.create_array(str(path), shape=tuple(slide.shape[:2]),
                                 chunks=(CHUNK, CHUNK), dtype="float32", overwrite=True,
                                 compressors=BloscCodec(cname="lz4", clevel=1,
                                                        shuffle="bitshuffle"))

    # (a) the floor
    def inference(self, slide, out=None, progress=None):
        model, spec, device = self.spec.module, self.spec, self.device
        origins = self.origins(slide)
        done = 0
        for part, raw in tile_batches(slide, origins, self.tile_of(slide), self.batch):
            x = preprocess(raw, spec, device)
            with torch.inference_mode():
                model(x)
            done += len(part)
            if progress:
                progress(done, len(origins))
        sync(device)

    # (b) and (c): ours
    def ours(self, slide, out, progress=None, target=...):
        target = self.target if target is ... else target
        cb = None if progress is None else (lambda p: progress(p.done, p.total))
        return ng.explain(slide, self.spec, "gradcam", target=target, batch_size=self.batch,
                          device=self.device, tile=self.tiling.tile,
                          overlap=self.tiling.overlap, out=out, progress=cb)

    def ours_auto(self, slide, out, progress=None):
        return self.ours(slide, out, progress, target=None)

    # (d) the peer, as a user would tile it by hand
    def peer(self, slide, out, progress=None):
        th, tw = self.tile_of(slide)
        h, w = slide.shape[:2]
        acc = np.zeros((h, w), np.float32)
        weight = np.zeros((h, w), np.float32)
        win = gaussian_window(th, tw)
        layer = self.spec.module.get_submodule(self.spec.target_layer)
        origins = self.origins(slide)
        done = 0
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with pgc.GradCAM(model=self.spec.module, target_layers=[layer]) as cam:
            for part, raw in tile_batches(slide, origins, (th, tw), self.batch):
                x = preprocess(raw, self.spec, self.device)
                maps = cam(input_tensor=x,
                           targets=[ClassifierOutputTarget(self.target)] * len(part))
                for (r, c), m in zip(part, maps):
                    acc[r:r + th, c:c + tw] += m * win
                    weight[r:r + th, c:c + tw] += win
                done += len(part)
                if progress:
                    progress(done, len(origins))
        np.divide(acc, weight, out=acc)
        out[...] = acc
        return acc


CONTENDERS = {
    "inference": "tiled inference (floor)",
    "ours": "ours: tiled Grad-CAM, target given",
    "ours_auto": "ours: tiled Grad-CAM, target=None",
    "peer": "pytorch-grad-cam per tile + NumPy blend",
}


def _progress_printer(name: str):
    """A progress callback that prints every ~10% of the tiles to stderr (long passes)."""
    last = [-1]

    def show(done, total):
        step = 10 * done // max(total, 1)
        if step != last[0]:
            last[0] = step
            print(f"  {name}: {done}/{total} tiles", file=sys.stderr, flush=True)

    return show


def rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MIB if sys.platform == "darwin" else 1024)


def child(args) -> None:
    """One contender, one pass, in this fresh process; prints RESULT {json}."""
    bench = Bench(args)  # torch imported, the model loaded and on the device
    if bench.device.type == "cuda":
        torch.zeros(1, device=bench.device)  # the CUDA context is part of the baseline
    if args.child == "peer":
        import pytorch_grad_cam  # noqa: F401 - its library is part of the peer's baseline
    base = rss_mib()
    slide = zarr.open_array(args.slide, mode="r")
    out = None if args.child == "inference" else bench.out_array(slide, Path(args.out))
    fn = getattr(bench, args.child)
    t0 = time.perf_counter()
    fn(slide, out, progress=_progress_printer(args.child))
    sync(bench.device)
    seconds = time.perf_counter() - t0
    res = {"seconds": seconds, "peak_rss_mib": rss_mib(), "baseline_rss_mib": base}
    if bench.device.type == "cuda":
        res["peak_cuda_mib"] = torch.cuda.max_memory_allocated(bench.device) / MIB
    print("RESULT " + json.dumps(res), flush=True)


def in_child(args, name: str, slide_path: Path, out_path: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--slide", str(slide_path),
           "--out", str(out_path), "--device", args.device, "--tile", str(args.tile),
           "--overlap", str(args.overlap), "--target", str(args.target),
           "--batch-size", str(args.batch_size or 0)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"the {name} pass failed (exit status {proc.returncode}): {proc.stdout[-2000:]}")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(out_path)  # the heat of a whole slide is large: gone once measured
    return json.loads(lines[-1][len("RESULT "):])


def interleaved_passes(bench, jobs: dict, rounds: int) -> dict:
    """Seconds per contender over ``rounds`` shuffled rounds: {name: [seconds, ...]}."""
    times = {k: [] for k in jobs}
    order = list(jobs)
    shuffle = random.Random(0).shuffle
    for k in range(rounds):
        shuffle(order)
        for name in order:
            sync(bench.device)
            t0 = time.perf_counter()
            jobs[name]()
            sync(bench.device)
            times[name].append(time.perf_counter() - t0)
        print(f"  round {k + 1}/{rounds}: " + ", ".join(
            f"{n} {times[n][-1]:.2f} s" for n in jobs), file=sys.stderr, flush=True)
    return times


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096, help="slide side in pixels (default 4096)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per batch, the same for all (default: the engine's automatic "
                        "size on the CPU, 32 on CUDA)")
    p.add_argument("--target", default="disc", help="the class explained (default disc)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds in the in-process case (default 3)")
    p.add_argument("--inline-max", type=int, default=8192,
                   help="largest side timed in one process; above it each contender runs once "
                        "in a fresh process (default 8192)")
    p.add_argument("--peer-size", type=int, default=4096,
                   help="the peer's slide side in the whole-slide case (default 4096; 0: no "
                        "small slide)")
    p.add_argument("--no-peer", action="store_true", help="leave pytorch-grad-cam out")
    p.add_argument("--no-auto-target", action="store_true",
                   help="leave out ours with target=None")
    p.add_argument("--memory", action="store_true",
                   help="in-process case: also one pass of the floor and of ours in fresh "
                        "processes for their peak memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None,
                   help="where slides and heat go (kept; slides reused); default a temporary "
                        "folder removed at the end")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    p.add_argument("--slide", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size == 0:
        args.batch_size = None
    if args.child:
        return child(args)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-tiles-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    bench = Bench(args)
    peer_ok = HAVE_PEER and not args.no_peer
    whole = args.size > args.inline_max
    slide, gen_s, objects = make_slide(work / f"slide-{args.size}-s{args.seed}.zarr",
                                       args.size, args.seed)
    print(f"slide {args.size}^2 uint8 ready: {'reused' if gen_s == 0 else f'{gen_s:.1f} s'} "
          f"(objects {dict(zip(CLASS_NAMES, objects))})", file=sys.stderr, flush=True)
    mpix = args.size * args.size / 1e6
    n_tiles = len(bench.origins(slide))
    results: dict[str, dict] = {}
    small = None
    agreement = None

    if not whole:
        warm, _, _ = make_slide(work / f"slide-{1024}-s{args.seed}.zarr", 1024, args.seed)
        names = ["inference", "ours"] + ([] if args.no_auto_target else ["ours_auto"]) + (
            ["peer"] if peer_ok else [])
        outs = {n: bench.out_array(slide, work / f"heat-{n}.zarr") for n in names}
        warm_out = bench.out_array(warm, work / "heat-warm.zarr")
        for n in names:  # warm-up: layer discovery, allocator, oneDNN / cuDNN plans
            getattr(bench, n)(warm, warm_out)
        jobs = {n: (lambda n=n: getattr(bench, n)(slide, outs[n])) for n in names}
        times = interleaved_passes(bench, jobs, args.rounds)
        for n, ts in times.items():
            med = statistics.median(ts)
            results[n] = {"seconds": med, "rounds": ts, "mpix_per_s": mpix / med,
                          "slide": args.size}
        if peer_ok:
            agreement = pearson(np.asarray(outs["ours"][...]), np.asarray(outs["peer"][...]))
        if args.memory:
            for n in ("inference", "ours"):
                res = in_child(args, n, work / f"slide-{args.size}-s{args.seed}.zarr",
                               work / f"heat-child-{n}.zarr")
                results[n].update({k: v for k, v in res.items() if k != "seconds"})
    else:
        slide_path = work / f"slide-{args.size}-s{args.seed}.zarr"
        names = ["inference", "ours"] + ([] if args.no_auto_target else ["ours_auto"])
        for n in names:
            print(f"{n}: one pass over {n_tiles} tiles in a fresh process", file=sys.stderr,
                  flush=True)
            res = in_child(args, n, slide_path, work / f"heat-{n}.zarr")
            res.update(mpix_per_s=mpix / res["seconds"], slide=args.size)
            results[n] = res
        if args.peer_size:
            psize = min(args.peer_size, args.size)
            ppath = work / f"slide-{psize}-s{args.seed}.zarr"
            pslide, _, _ = make_slide(ppath, psize, args.seed)
            small = {"size": psize, "tiles": len(bench.origins(pslide)), "results": {}}
            for n in ["inference", "ours"] + (["peer"] if peer_ok else []):
                print(f"{n}: one pass over the {psize}^2 slide in a fresh process",
                      file=sys.stderr, flush=True)
                res = in_child(args, n, ppath, work / f"heat-small-{n}.zarr")
                res.update(mpix_per_s=psize * psize / 1e6 / res["seconds"], slide=psize)
                small["results"][n] = res

    report(args, bench, results, small, agreement, gen_s, objects, n_tiles, whole)


def report(args, bench, results, small, agreement, gen_s, objects, n_tiles, whole) -> None:
    dev = describe_device(bench.device)
    th, tw = bench.tiling.tile
    oh, ow = bench.tiling.overlap
    how = (f"median of {args.rounds} interleaved rounds in one process" if not whole
           else "one pass each, each in a fresh process")
    print(f"## Tiled Grad-CAM vs tiled inference, demo model, {args.size} x {args.size} uint8 "
          f"zarr slide, tiles {th} x {tw}, overlap {oh}, {n_tiles} tiles, batch {bench.batch}, "
          f"{dev}")
    print(f"torch {torch.__version__}, zarr {zarr.__version__}, pytorch-grad-cam "
          f"{peer_version()}, {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"CPUs, {torch.get_num_threads()} torch threads; {how}; class explained: "
          f"{CLASS_NAMES[bench.target]}; slide generation "
          f"{'reused' if gen_s == 0 else f'{gen_s:.1f} s'} (not counted), objects "
          f"{dict(zip(CLASS_NAMES, objects))}")
    print()

    def table(res: dict, size: int):
        mem = any("peak_rss_mib" in r for r in res.values())
        base = res.get("inference")
        head = "| contender | time (s) | MPix/s | / inference (throughput) |"
        rule = "|---|---|---|---|"
        if mem:
            head += " peak memory (MiB) | baseline: torch + model (MiB) |"
            rule += "---|---|"
            if any("peak_cuda_mib" in r for r in res.values()):
                head += " peak CUDA memory (MiB) |"
                rule += "---|"
        print(head)
        print(rule)
        for n, label in CONTENDERS.items():
            if n not in res:
                continue
            r = res[n]
            ratio = f"{r['mpix_per_s'] / base['mpix_per_s']:.2f}" if base else ""
            row = f"| {label} | {r['seconds']:.2f} | {r['mpix_per_s']:.2f} | {ratio} |"
            if mem:
                row += (f" {r['peak_rss_mib']:.0f} | {r['baseline_rss_mib']:.0f} |"
                        if "peak_rss_mib" in r else " | |")
                if "peak_cuda_mib" in head and "peak_cuda_mib" in r:
                    row += f" {r['peak_cuda_mib']:.0f} |"
            print(row)

    table(results, args.size)
    if small:
        print()
        print(f"The same on the {small['size']}^2 corner of the slide ({small['tiles']} tiles; "
              "the peer's accumulators hold the whole slide):")
        print()
        table(small["results"], small["size"])
    print()
    verdicts = []
    if "ours" in results and "inference" in results:
        ratio = results["ours"]["mpix_per_s"] / results["inference"]["mpix_per_s"]
        verdicts.append(f"ours / inference throughput = {ratio:.2f} (target >= 0.9: "
                        f"{'met' if ratio >= 0.9 else 'not met'})")
    peak = results.get("ours", {}).get("peak_rss_mib")
    if peak is not None:
        verdicts.append(f"ours' peak memory {peak:.0f} MiB = {peak * MIB / 1e9:.2f} GB on "
                        f"{args.size}^2 (target < 2 GB on the CPU: "
                        f"{'met' if peak * MIB < 2e9 else 'not met'})")
    if agreement is not None:
        verdicts.append(f"Pearson r of ours' heat vs the peer's (per-tile normalised) blend: "
                        f"{agreement:.3f}")
    for v in verdicts:
        print(v)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "size": args.size, "tile": [th, tw], "overlap": [oh, ow], "tiles": n_tiles,
            "batch_size": bench.batch, "device": dev, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "torch_threads": torch.get_num_threads(), "mode": how,
            "generation_s": gen_s, "objects": objects, "results": results,
            "small_slide": small, "pearson_ours_peer": agreement, "verdicts": verdicts,
        }, indent=1))


if __name__ == "__main__":
    main()
