"""find_regions vs the seed's OpenCV recipe, and 3D regions vs SciPy, side by side in one run.

    python benchmarks/bench_regions.py [--maps 64] [--size 512] [--repeats 5]
                                       [--volume 128 256 256] [--only 2d|3d|banded]
                                       [--banded-size 8192] [--blobs 2000]

64 heatmaps of 512 x 512 with 2 to 6 Gaussian blobs each (different sizes and heights, so
thresholds cut some blobs, merge others). Contenders, each over the whole set, in interleaved
rounds (median reported):

- the seed's recipe: scale to 0..155, JET colormap, to grey, threshold 127,
  external contours, the first one with more than 20 points, its bounding rectangle;
- the same without the colormap detour: threshold + findContours + boundingRect of every
  contour (the floor of "boxes from OpenCV"; raw contours, no holes, no heat statistics);
- ours: ``find_regions`` (boxes, exact and simplified valid polygons with holes, area, peak and
  mean heat), one thread and all threads.

3D: one smooth heatmap volume (--volume, default 128 x 256 x 256, Gaussian blobs as above),
``find_regions(..., ndim=3)`` (boxes, voxel counts, heat statistics and a simplified polygon in
every plane of every region) vs ``scipy.ndimage.label`` (6-connectivity, as ours by default)
+ ``find_objects`` on the same threshold (boxes only), interleaved rounds, median. Then the
same on a "hard" volume of the same shape: uniform noise smoothed by a Gaussian (sigma 6),
normalised to [0, 1]: its foreground at 0.5 is not blob-like but a few large tangled
components with holes, crossing every plane with many parts (the worst realistic case for
the per-plane outlines).

Banded (``--only banded``): one 8192 x 8192 heat (--banded-size) with ~2000 Gaussian blobs
(--blobs), as a tiled explanation of a slide leaves it, in a zarr array on disk (512 x 512
chunks): ``find_regions`` on it (band by band, bounded memory) vs on the same heat as a NumPy
array (whole map at once), time (median of interleaved rounds) and peak memory the call
allocates (tracemalloc: NumPy's and Python's allocations, one more call each), with the
regions checked equal.

OpenCV is a benchmark-only dependency (``pip install opencv-python-headless``). A benchmark, not
a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import numpy as np
import shapely

from napari_gradcam import find_regions

try:
    import cv2
except ImportError:  # pragma: no cover
    cv2 = None


def heatmaps(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    out = np.zeros((n, size, size), np.float32)
    for k in range(n):
        for _ in range(rng.integers(2, 7)):
            y, x = rng.integers(size // 12, size - size // 12, 2)
            s = rng.uniform(size / 64, size / 16)
            out[k] += rng.uniform(0.4, 1.0) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))
        out[k] /= out[k].max()
    return out


def volume(shape, seed: int = 0) -> np.ndarray:
    """A smooth 3D heatmap: 5 to 12 anisotropic Gaussian blobs of different sizes and heights."""
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    out = np.zeros(shape, np.float32)
    for _ in range(rng.integers(5, 13)):
        d2 = 0
        for g, s in zip(grids, shape):
            c = rng.uniform(s / 12, s - s / 12)
            w = rng.uniform(s / 12, s / 5)
            d2 = d2 + ((g - c) / w) ** 2
        out += (rng.uniform(0.4, 1.0) * np.exp(-d2 / 2)).astype(np.float32)
    return out / out.max()


def hard_volume(shape, seed: int = 0, sigma: float = 6.0) -> np.ndarray:
    """Smoothed uniform noise in [0, 1]: tangled, non-blob foreground at 0.5."""
    from scipy import ndimage

    v = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape, dtype=np.float32),
                                sigma)
    return (v - v.min()) / (v.max() - v.min())


def scipy_boxes(v: np.ndarray, threshold: float):
    from scipy import ndimage

    labels, _ = ndimage.label(v >= threshold)
    return ndimage.find_objects(labels)


def timed(contenders: dict, repeats: int) -> dict:
    """Median seconds of each contender over interleaved rounds (after one warm-up call)."""
    for fn in contenders.values():
        fn()
    times = {k: [] for k in contenders}
    order = list(contenders)
    for _ in range(repeats):
        random.Random(0).shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_3d(shape, threshold: float, repeats: int, case: str = "blobs") -> None:
    v = volume(tuple(shape)) if case == "blobs" else hard_volume(tuple(shape))
    cpus = os.cpu_count() or 1
    contenders = {
        "scipy.ndimage.label + find_objects": lambda: scipy_boxes(v, threshold),
        "ours, ndim=3": lambda: find_regions(v, threshold, ndim=3, workers=1),
        "ours, ndim=3, simplify=0": lambda: find_regions(v, threshold, ndim=3, workers=1,
                                                         simplify=0),
    }
    med = timed(contenders, repeats)
    regions = find_regions(v, threshold, ndim=3)
    planes = sum(len(r.polygons) for r in regions)
    print(f"## {case}: one volume of {' x '.join(map(str, shape))}, threshold {threshold}; "
          f"{platform.machine()}, {cpus} CPUs; median of {repeats} interleaved rounds")
    print(f"{len(regions)} 3D regions (min_area 16), {planes} plane polygons; "
          f"{int((v >= threshold).sum())} voxels above the threshold")
    print()
    ref = med["scipy.ndimage.label + find_objects"]
    print("| contender | ms per volume | / scipy label + find_objects |")
    print("|---|---|---|")
    for name, sec in med.items():
        print(f"| {name} | {sec * 1e3:.1f} | {sec / ref:.2f} |")
    print()


def blob_heat(size: int, blobs: int, seed: int = 0) -> np.ndarray:
    """A (size, size) float32 heat in [0, 1]: ``blobs`` Gaussian blobs of 6 to 40 pixels'
    sigma and random heights, each drawn in its own window (so the map is cheap to make)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size), np.float32)
    for _ in range(blobs):
        s = rng.uniform(6, 40)
        y, x = rng.uniform(0, size, 2)
        r = int(4 * s)
        y0, y1 = max(0, int(y) - r), min(size, int(y) + r + 1)
        x0, x1 = max(0, int(x) - r), min(size, int(x) + r + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] += (rng.uniform(0.4, 1.0) * np.exp(
            -((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))).astype(np.float32)
    return out / out.max()


def bench_banded(size: int, blobs: int, threshold: float, repeats: int) -> None:
    import tempfile
    import tracemalloc

    import zarr

    heat = blob_heat(size, blobs)
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        z = zarr.create_array(store=f"{tmp}/heat.zarr", shape=heat.shape, chunks=(512, 512),
                              dtype="f4")
        z[:] = heat
        contenders = {
            "NumPy, whole map": lambda: find_regions(heat, threshold),
            # the banded algorithm without the reads: what zarr's decompression adds
            "NumPy, banded (band_rows=512)": lambda: find_regions(heat, threshold,
                                                                  band_rows=512),
            "zarr, banded (auto bands)": lambda: find_regions(z, threshold),
            "zarr, banded, 1 thread": lambda: find_regions(z, threshold, workers=1),
        }
        med = timed(contenders, repeats)
        peaks, found = {}, {}
        for name, fn in contenders.items():
            tracemalloc.start()
            found[name] = fn()
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    whole = found["NumPy, whole map"]
    same = all(len(r) == len(whole) and all(
        a.bbox == b.bbox and a.area == b.area and a.polygon.equals(b.polygon)
        for a, b in zip(whole, r)) for r in found.values())
    mib = heat.nbytes / 2**20
    print(f"## banded: one {size} x {size} heat ({mib:.0f} MiB float32), {blobs} blobs, "
          f"threshold {threshold}; {platform.machine()}, {cpus} CPUs; median of {repeats} "
          "interleaved rounds")
    print(f"{len(whole)} regions; banded regions equal to the whole map's: {same}")
    print()
    print("| contender | s | peak MiB allocated by the call | / map's float32 size |")
    print("|---|---|---|---|")
    for name, sec in med.items():
        print(f"| {name} | {sec:.2f} | {peaks[name] / 2**20:.0f} | "
              f"{peaks[name] / heat.nbytes:.2f} |")
    print()


def seed_recipe(h: np.ndarray):
    img = (h * 155).astype(np.uint8)
    grey = cv2.cvtColor(cv2.applyColorMap(img, cv2.COLORMAP_JET), cv2.COLOR_BGR2GRAY)
    _, binary = cv2.threshold(grey, 127, 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    for c in contours:
        if len(c) > 20:
            return cv2.boundingRect(c), c
    return None


def opencv_boxes(h: np.ndarray, threshold: float = 0.5):
    binary = (h >= threshold).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [cv2.boundingRect(c) for c in contours]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--maps", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--volume", type=int, nargs=3, default=[128, 256, 256])
    p.add_argument("--only", choices=["2d", "3d", "banded"])
    p.add_argument("--banded-size", type=int, default=8192)
    p.add_argument("--blobs", type=int, default=2000)
    args = p.parse_args(argv)
    if args.only == "banded":
        bench_banded(args.banded_size, args.blobs, args.threshold, args.repeats)
        return
    if args.only != "2d":
        for case in ("blobs", "hard"):
            bench_3d(args.volume, args.threshold, args.repeats, case)
    if args.only == "3d":
        return
    hs = heatmaps(args.maps, args.size)
    cpus = os.cpu_count() or 1

    contenders = {
        "ours, 1 thread": lambda: find_regions(hs, args.threshold, workers=1),
        f"ours, {cpus} threads": lambda: find_regions(hs, args.threshold, workers=cpus),
        "ours, 1 thread, simplify=0": lambda: find_regions(hs, args.threshold, workers=1,
                                                           simplify=0),
    }
    if cv2 is not None:
        contenders["seed recipe (OpenCV, JET, first contour)"] = lambda: [seed_recipe(h)
                                                                          for h in hs]
        contenders["OpenCV threshold + findContours + boundingRect"] = lambda: [
            opencv_boxes(h, args.threshold) for h in hs]
    per_map = {k: sec / args.maps * 1e3 for k, sec in timed(contenders, args.repeats).items()}

    regions = find_regions(hs, args.threshold)
    polys = np.array([r.polygon for r in regions], dtype=object)
    exact = np.array([r.polygon for r in find_regions(hs, args.threshold, simplify=0)],
                     dtype=object)
    print(f"## {args.maps} heatmaps of {args.size} x {args.size}, threshold {args.threshold}; "
          f"{platform.machine()}, {cpus} CPUs; median of {args.repeats} interleaved rounds")
    print(f"{len(regions)} regions; all polygons valid: {bool(shapely.is_valid(polys).all())}; "
          f"vertices per polygon: {shapely.get_num_coordinates(polys).mean():.1f} simplified, "
          f"{shapely.get_num_coordinates(exact).mean():.1f} exact; "
          f"holes: {int(shapely.get_num_interior_rings(polys).sum())}")
    print()
    ref = per_map.get("OpenCV threshold + findContours + boundingRect")
    seed = per_map.get("seed recipe (OpenCV, JET, first contour)")
    print("| contender | ms per heatmap | / OpenCV threshold + contours | / seed recipe |")
    print("|---|---|---|---|")
    for name, ms in per_map.items():
        ratios = [f"{ms / x:.2f}" if x else "" for x in (ref, seed)]
        print(f"| {name} | {ms:.3f} | {' | '.join(ratios)} |")


if __name__ == "__main__":
    main()
