"""Timing helpers shared by the benchmarks that compare ours, the inference floor and peers
side by side in one run."""

from __future__ import annotations

import random
import statistics
import time

import torch


def sync(device) -> None:
    """Wait for the device's queued work, so a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(contenders: dict, repeats: int, device, budget: float) -> dict:
    """Median seconds per contender over ``repeats`` shuffled rounds, after one warm-up call
    each (allocator, cuDNN, layer discovery); a contender over ``budget`` seconds in all stops
    after 3 rounds."""
    for fn in contenders.values():
        fn()
        sync(device)
    times = {k: [] for k in contenders}
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)  # no contender always runs right after the same one
        for name in order:
            if len(times[name]) >= 3 and sum(times[name]) > budget:
                continue
            sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peer_version() -> str:
    """pytorch-grad-cam's installed version ("absent" without it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grad-cam")  # the package has no __version__
    except PackageNotFoundError:
        return "absent"
