"""Train the 3D demo model from scratch, deterministically by seed.

    python -m napari_gradcam.models.demo3d.train                 # the shipped weights, 2 CPU threads
    python -m napari_gradcam.models.demo3d.train --device cuda   # the same recipe on a GPU
    python -m napari_gradcam.models.demo3d.train --steps 5 --out /tmp/w.safetensors  # smoke test

On two idle cores of the development VM the recipe took 0.37 s a step, 12.7 minutes in all (the
shipped weights); on a GPU under 3 minutes (the synthetic volumes are made on the CPU either
way). A GPU's convolution sums differ from a CPU's in the last bits, and so do a CPU's with
another thread count, so each gives slightly different weights of about the same quality.

Volumes come from the synthetic generator, batch by batch, with seeds 0, 1, 2, ... (the 3D
localisation benchmark uses seeds from 2,000,000 on, calibration 500,000 on: training never sees
either). Each batch has one shape, its three sides drawn independently from SIDES (the model
pads any other size to a multiple of 8 itself), with about as many voxels per step whatever the
shape. Loss: multi-label binary cross-entropy on the class logits, plus GATE_WEIGHT x binary
cross-entropy of the class-agnostic foreground gate (model.py) against the objects' masks at 1/2
resolution. AdamW, one-cycle learning rate, the head at HEAD_LR times the trunk's (the 2D demo's
recipe, demo/recipe.py). Then the class biases are calibrated on held-apart volumes of all sizes
(``calibrate``). Writes safetensors plus a JSON sidecar.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ..demo import recipe
from .model import Demo3dNet
from .synthetic import CLASS_NAMES, MAX_SIDE, MIN_SIDE, make_batch, make_volume

WEIGHTS = Path(__file__).with_name("demo3d.safetensors")
SIDES = (32, 40, 48, 56)
VOXELS_PER_STEP = 8 * 48 ** 3
HEAD_LR = 10.0
CALIBRATION_SEED = 500_000
GATE_WEIGHT = 1.0
STEPS = 2000


def train(steps: int = STEPS, batch: int = 8, seed: int = 0, lr: float = 4e-3,
          log_every: int = 100, threads: int | None = 2, width: int = 8,
          gate_weight: float = GATE_WEIGHT, device: str = "cpu", head_lr: float = HEAD_LR,
          log=print) -> Demo3dNet:
    """Train a fresh Demo3dNet; returns it in eval mode, on the CPU. ``batch``: volumes of
    48^3 per step (smaller volumes come more to a step, larger ones fewer)."""
    size_rng = np.random.default_rng(seed)
    per_step = VOXELS_PER_STEP * batch / 8

    def batches(step):
        shape = tuple(int(s) for s in size_rng.choice(SIDES, size=3))
        n = max(2, round(float(per_step / np.prod(shape))))
        return make_batch(n, shape, seed=seed * 1_000_003 + step)

    model = recipe.fit(lambda: Demo3dNet(width), batches, steps, seed, lr, head_lr, gate_weight,
                       log_every, threads, device=device, log=log)
    return model.cpu().to(memory_format=torch.contiguous_format)


def calibrate(model: Demo3dNet, volumes: int = 100, seed: int = CALIBRATION_SEED,
              sides=(MIN_SIDE, MAX_SIDE), log=print) -> np.ndarray:
    """Calibrate the class biases (``recipe.calibrate_biases``) on volumes of all sizes from 32
    to 96 voxels a side (training sees sides up to 56 only), from seeds that neither training
    nor the benchmark use. Returns the offsets."""
    rng = np.random.default_rng(seed)

    def samples():
        for i in range(volumes):
            shape = tuple(int(v) for v in rng.integers(sides[0], sides[1] + 1, size=3))
            item = make_volume(shape, seed=seed + i)
            yield item.volume, item.labels

    return recipe.calibrate_biases(model, samples(), log=log)


def sidecar() -> dict:
    """What the loader needs beside the weights (``load_model("demo3d")`` builds the default
    Demo3dNet; a model trained with another ``--width`` is loaded with its own module)."""
    return recipe.sidecar("napari_gradcam.models.demo3d.model:Demo3dNet", CLASS_NAMES)


def save(model: Demo3dNet, path: Path) -> Path:
    return recipe.save(model, path, sidecar())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--gate-weight", type=float, default=GATE_WEIGHT)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu",
                   help="cpu (default; the shipped weights were trained so), or cuda")
    p.add_argument("--head-lr", type=float, default=HEAD_LR,
                   help="the head's learning rate as a multiple of --lr")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--calibration-volumes", type=int, default=100)
    p.add_argument("--out", type=Path, default=WEIGHTS)
    args = p.parse_args(argv)
    t0, c0 = time.time(), time.process_time()
    model = train(args.steps, args.batch, args.seed, args.lr, threads=args.threads,
                  width=args.width, gate_weight=args.gate_weight, device=args.device,
                  log_every=args.log_every, head_lr=args.head_lr)
    calibrate(model, args.calibration_volumes)
    print(f"saved {save(model, args.out)}")
    print(f"training took {time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU "
          f"on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
