"""Library time of "every class found" vs one class vs the old way (one forward per class).

    python benchmarks/bench_targets.py [--images 32] [--size 384] [--rounds 5] [--device auto]

Images that each hold a disc, a square and a triangle (the demo model's three classes), held in
memory, explained in interleaved rounds (median reported) by:

- ``found``: ``ExplainJob(spec, "gradcam", "found").run`` - every class from one forward per
  batch, one gradient per class over the same graph;
- ``disc``: ``ExplainJob(spec, "gradcam", "disc").run`` - one class;
- ``per-class``: ``explain`` once per class (one forward and backward per class), then the same
  combination - how "found" was computed before the job.

All three include regions and rows (the job's summary), so the ratio found / disc is what a user
pays for explaining every class. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

import napari_gradcam as ng
from napari_gradcam.job import BatchResult, ExplainJob
from napari_gradcam.models.demo.synthetic import make_image


def images(n: int, size: int) -> np.ndarray:
    return np.stack([make_image(size, seed=30_000 + k, classes=[0, 1, 2]).image
                     for k in range(n)])


def per_class(job: ExplainJob, spec, stack, device) -> None:
    """The old way: one explain (forward + backward) per class, combined afterwards."""
    outs = [ng.explain(stack, spec, "gradcam", k, device=device) for k in range(3)]
    ids = np.stack([e.class_ids for e in outs], 1)
    scores = np.stack([e.scores for e in outs], 1)
    heat = {"gradcam": np.stack([e.heatmaps for e in outs], 1)}
    job.summarise(BatchResult(heat, ids, scores, scores > 0), (stack.shape[0],))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    spec = ng.load_model("demo")
    stack = images(args.images, args.size)
    found = ExplainJob(spec, "gradcam", "found", device=args.device)
    one = ExplainJob(spec, "gradcam", "disc", device=args.device)
    device = str(found.runner.device)
    contenders = {"found": lambda: found.run(stack), "disc": lambda: one.run(stack),
                  "per-class": lambda: per_class(found, spec, stack, device)}
    for fn in contenders.values():  # warm-up: kernels, allocator, batch size
        fn()
    times: dict = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.images} images of {args.size}^2, demo model, gradcam, {device} "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"median of {args.rounds} interleaved rounds")
    for name, t in med.items():
        print(f"  {name:<10} {t:8.3f} s   {t / med['disc']:5.2f}x disc")


if __name__ == "__main__":
    main()
