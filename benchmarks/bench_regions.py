"""find_regions vs the seed's OpenCV recipe, side by side in one run.

    python benchmarks/bench_regions.py [--maps 64] [--size 512] [--repeats 5]

64 heatmaps of 512 x 512 with 2 to 6 Gaussian blobs each (different sizes and heights, so
thresholds cut some blobs, merge others). Contenders, each over the whole set, in interleaved
rounds (median reported):

- the seed's recipe: scale to 0..155, JET colormap, to grey, threshold 127,
  external contours, the first one with more than 20 points, its bounding rectangle;
- the same without the colormap detour: threshold + findContours + boundingRect of every
  contour (the floor of "boxes from OpenCV"; raw contours, no holes, no heat statistics);
- ours: ``find_regions`` (boxes, exact and simplified valid polygons with holes, area, peak and
  mean heat), one thread and all threads.

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
    args = p.parse_args(argv)
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
    for fn in contenders.values():
        fn()
    times = {k: [] for k in contenders}
    order = list(contenders)
    for _ in range(args.repeats):
        random.Random(0).shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    per_map = {k: statistics.median(v) / args.maps * 1e3 for k, v in times.items()}

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
    print("| contender | ms per heatmap | / OpenCV threshold + contours |")
    print("|---|---|---|")
    for name, ms in per_map.items():
        print(f"| {name} | {ms:.3f} | {ms / ref:.2f} |" if ref else f"| {name} | {ms:.3f} | |")


if __name__ == "__main__":
    main()
