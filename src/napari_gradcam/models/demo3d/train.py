"""Train the 3D demo model from scratch, deterministically by seed.

    python -m napari_gradcam.models.demo3d.train --device cuda   # how the shipped weights were made
    python -m napari_gradcam.models.demo3d.train                 # the same recipe on 2 CPU threads
    python -m napari_gradcam.models.demo3d.train --steps 5 --out /tmp/w.safetensors  # smoke test

On two threads of an otherwise idle server CPU the recipe takes about 0.27 s a step, 9 to 10
minutes in all; on a GPU under 3 minutes (the synthetic volumes are made on the CPU either way).
A GPU's convolution sums differ from a CPU's in the last bits, and so do a CPU's with another
thread count, so each gives slightly different weights of the same quality.

Volumes come from the synthetic generator, batch by batch, with seeds 0, 1, 2, ... (the 3D
localisation benchmark uses seeds from 2,000,000 on, calibration 500,000 on: training never sees
either). Each batch has one shape, its three sides drawn independently from SIDES (the model
pads any other size to a multiple of 8 itself), with about as many voxels per step whatever the
shape. Loss: multi-label binary cross-entropy on the class logits, plus GATE_WEIGHT x binary
cross-entropy of the class-agnostic foreground gate (model.py) against the objects' masks at 1/2
resolution. AdamW, one-cycle learning rate, the head at HEAD_LR times the trunk's. Then the class
biases are calibrated on held-apart volumes of all sizes (``calibrate``). Writes safetensors
plus a JSON sidecar.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    # channels-last convolutions are several times faster on a CPU
    model = Demo3dNet(width).to(device=device, memory_format=torch.channels_last_3d)
    with torch.no_grad():  # prior: each class is present in ~40 % of the volumes
        model.fc.bias.fill_(float(np.log(0.4 / 0.6)))
    # The head's weights must grow to tens for confident logits; Adam moves a weight by ~lr per
    # step, so the head gets a larger learning rate than the trunk.
    head = list(model.fc.parameters())
    trunk = [p for p in model.parameters() if all(p is not q for q in head)]
    groups = [{"params": trunk, "lr": lr}, {"params": head, "lr": lr * head_lr}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * head_lr],
                                                total_steps=steps, pct_start=0.15)
    size_rng = np.random.default_rng(seed)
    model.train()
    t0 = time.time()
    running = 0.0
    per_step = VOXELS_PER_STEP * batch / 8
    for step in range(steps):
        shape = tuple(int(s) for s in size_rng.choice(SIDES, size=3))
        n = max(2, round(float(per_step / np.prod(shape))))
        volumes, labels, objects = make_batch(n, shape, seed=seed * 1_000_003 + step)
        x = torch.from_numpy(volumes)[:, None].to(device).contiguous(
            memory_format=torch.channels_last_3d)
        y = torch.from_numpy(labels).to(device)
        fg = np.zeros(volumes.shape, np.float32)
        for i, objs in enumerate(objects):
            for o in objs:
                fg[i][o.mask] = 1
        logits = model(x)
        gate = model.features.gate_logits
        fg_half = F.adaptive_avg_pool3d(torch.from_numpy(fg)[:, None].to(device), gate.shape[2:])
        loss = (F.binary_cross_entropy_with_logits(logits, y)
                + gate_weight * F.binary_cross_entropy_with_logits(gate, fg_half))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}  loss {running / log_every:.4f}  "
                f"{time.time() - t0:.0f} s", flush=True)
            running = 0.0
    return model.cpu().to(memory_format=torch.contiguous_format).eval()


def calibrate(model: Demo3dNet, volumes: int = 100, seed: int = CALIBRATION_SEED,
              sides=(MIN_SIDE, MAX_SIDE), log=print) -> np.ndarray:
    """Shift each class's bias so that ``sigmoid(logit) > 0.5`` is the most accurate decision on
    a calibration set of volumes of all sizes from 32 to 96 voxels a side (training sees sides
    up to 56 only), from seeds that neither training nor the benchmark use. The bias enters no
    CAM map. Returns the offsets."""
    rng = np.random.default_rng(seed)
    logits, labels = [], []
    for i in range(volumes):
        shape = tuple(int(v) for v in rng.integers(sides[0], sides[1] + 1, size=3))
        item = make_volume(shape, seed=seed + i)
        with torch.inference_mode():
            logits.append(model(torch.from_numpy(item.volume)[None, None])[0].numpy())
        labels.append(item.labels > 0.5)
    L, Y = np.array(logits), np.array(labels)
    grid = np.round(np.linspace(-3, 3, 121), 3)
    offsets = np.array([grid[int(np.argmax([((L[:, c] + o > 0) == Y[:, c]).mean() for o in grid]))]
                        for c in range(L.shape[1])])
    with torch.no_grad():
        model.fc.bias += torch.as_tensor(offsets, dtype=model.fc.bias.dtype)
    log(f"calibrated class biases by {offsets.tolist()}")
    return offsets


def sidecar() -> dict:
    """What the loader needs beside the weights (``load_model("demo3d")`` builds the default
    Demo3dNet; a model trained with another ``--width`` is loaded with its own module)."""
    return {"architecture": "napari_gradcam.models.demo3d.model:Demo3dNet",
            "class_names": list(CLASS_NAMES), "in_channels": 1,
            "input_size": None, "mean": [0.0], "std": [1.0], "target_layer": "features",
            "intensity": "dtype"}


def save(model: Demo3dNet, path: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(sidecar(), indent=1))
    return path


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
                   help="cpu, or cuda (the shipped weights were trained with cuda)")
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
