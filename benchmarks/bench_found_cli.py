"""``napari-gradcam batch --target found`` vs ``--target disc``, side by side in one run.

    python benchmarks/bench_found_cli.py [--images 48] [--size 384] [--rounds 3]

A folder of synthetic grey PNGs that each hold a disc, a square and a triangle (the demo
model's three classes), explained by the batch command in-process (``cli.main``, so the
interpreter's start-up is not counted; the model load is, in both contenders), each run into a
fresh output folder, in interleaved rounds (median reported). "found" explains every class with
a positive logit: with one forward per batch and one gradient per class it should cost about
one pass, not one pass per class. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_gradcam.cli import main as cli_main
from napari_gradcam.models.demo.synthetic import make_image


def make_folder(folder: Path, n: int, size: int) -> None:
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        img = make_image(size, seed=20_000 + k, classes=[0, 1, 2]).image
        iio.imwrite(folder / f"img{k:04d}.png", (img * 255).astype(np.uint8))


def run(folder: Path, out: Path, target: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    code = cli_main(["batch", str(folder), "--out", str(out), "--target", target, "--quiet",
                     "--device", "cpu" if not torch.cuda.is_available() else "cuda"])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"batch --target {target} exited {code}")
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-found-"))
    try:
        make_folder(tmp / "in", args.images, args.size)
        run(tmp / "in", tmp / "warm", "disc")  # imports, thread pools, layer discovery
        one, found = [], []
        for _ in range(args.rounds):
            one.append(run(tmp / "in", tmp / "one", "disc"))
            found.append(run(tmp / "in", tmp / "found", "found"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = statistics.median(one), statistics.median(found)
    print(f"# bench_found_cli: {args.images} PNGs of {args.size}^2 with all three classes, "
          "demo model, gradcam")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print("| contender | seconds (median) | rounds |")
    print("| --- | ---: | --- |")
    print(f"| batch --target disc | {a:.2f} | {', '.join(f'{v:.2f}' for v in one)} |")
    print(f"| batch --target found | {b:.2f} | {', '.join(f'{v:.2f}' for v in found)} |")
    print(f"\nfound / one class = {b / a:.2f}")


if __name__ == "__main__":
    main()
