"""Train the demo model from scratch, deterministically.

    python -m napari_gradcam.models.demo.train                 # the shipped weights (~12 min, 2 CPUs)
    python -m napari_gradcam.models.demo.train --steps 20 --out /tmp/w.safetensors   # smoke test

Images come from the synthetic generator, batch by batch, with seeds 0, 1, 2, ... (the
localisation benchmark uses seeds from 1,000,000 on, which training never sees). Each batch has
one image size drawn from SIZES (the model pads any other size to a multiple of 8 itself), with
about as many pixels per step whatever the size. Loss: multi-label binary cross-entropy on the
class logits, plus GATE_WEIGHT x binary cross-entropy of the class-agnostic foreground gate
(model.py) against the objects' masks at 1/2 resolution. AdamW, one-cycle learning rate, the head
at HEAD_LR times the trunk's (recipe.py, the same recipe as the 3D demo's). Then the class biases
are calibrated on held-apart images of all sizes (``calibrate``). Writes safetensors plus a JSON
sidecar.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from . import recipe
from .model import DemoNet
from .synthetic import CLASS_NAMES, make_batch, make_image

WEIGHTS = Path(__file__).with_name("demo.safetensors")
SIZES = (96, 128, 128, 160, 192, 256)
HEAD_LR = 3.0
CALIBRATION_SEED = 500_000
GATE_WEIGHT = 1.0


def train(steps: int = 2400, batch: int = 32, seed: int = 0, lr: float = 3e-3,
          log_every: int = 100, threads: int | None = None, log=print) -> DemoNet:
    """Train a fresh DemoNet; returns it in eval mode. ``batch``: images of 128 px per step
    (about the same pixels per step whatever the size, at least 4 images)."""
    size_rng = np.random.default_rng(seed)

    def batches(step):
        size = int(size_rng.choice(SIZES))
        n = max(4, int(batch * (128 / size) ** 2))
        return make_batch(n, size, seed=seed * 1_000_003 + step)

    return recipe.fit(DemoNet, batches, steps, seed, lr, HEAD_LR, GATE_WEIGHT, log_every,
                      threads, log=log)


def calibrate(model: DemoNet, images: int = 300, seed: int = CALIBRATION_SEED,
              sizes=(96, 512), log=print) -> np.ndarray:
    """Calibrate the class biases (``recipe.calibrate_biases``) on images of all sizes from 96
    to 512 px, from seeds that neither training (0, 1, ...) nor the benchmark (1,000,000 on)
    use. Training sees sizes up to 256 only; larger images give lower logits. Returns the
    offsets."""
    rng = np.random.default_rng(seed)

    def samples():
        for i in range(images):
            h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            item = make_image((h, w), seed=seed + i)
            yield item.image, item.labels

    return recipe.calibrate_biases(model, samples(), log=log)


def sidecar() -> dict:
    """What the loader needs beside the weights."""
    return recipe.sidecar("napari_gradcam.models.demo.model:DemoNet", CLASS_NAMES)


def save(model: DemoNet, path: Path) -> Path:
    return recipe.save(model, path, sidecar())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=WEIGHTS)
    args = p.parse_args(argv)
    model = train(args.steps, args.batch, args.seed, args.lr, threads=args.threads)
    calibrate(model)
    print(f"saved {save(model, args.out)}")


if __name__ == "__main__":
    main()
