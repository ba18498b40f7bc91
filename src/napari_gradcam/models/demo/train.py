"""Train the demo model from scratch, deterministically.

    python -m napari_gradcam.models.demo.train                 # the shipped weights (~12 min, 2 CPUs)
    python -m napari_gradcam.models.demo.train --steps 20 --out /tmp/w.safetensors   # smoke test

Images come from the synthetic generator, batch by batch, with seeds 0, 1, 2, ... (the
localisation benchmark uses seeds from 1,000,000 on, which training never sees). Each batch has
one image size drawn from SIZES (the model pads any other size to a multiple of 8 itself). Loss: multi-label
binary cross-entropy on the class logits, plus GATE_WEIGHT x binary cross-entropy of the
class-agnostic foreground gate (model.py) against the objects' masks at 1/2 resolution. AdamW,
one-cycle learning rate. Then the class biases are calibrated on held-apart images of all sizes
(``calibrate``). Writes safetensors plus a JSON sidecar.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import DemoNet
from .synthetic import CLASS_NAMES, make_batch, make_image

WEIGHTS = Path(__file__).with_name("demo.safetensors")
SIZES = (96, 128, 128, 160, 192, 256)
HEAD_LR = 3.0
CALIBRATION_SEED = 500_000
GATE_WEIGHT = 1.0


def train(steps: int = 2400, batch: int = 32, seed: int = 0, lr: float = 3e-3,
          log_every: int = 100, threads: int | None = None, log=print) -> DemoNet:
    """Train a fresh DemoNet; returns it in eval mode."""
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    model = DemoNet().to(memory_format=torch.channels_last)  # ~1.4x faster convs on a CPU
    with torch.no_grad():  # prior: each class is present in ~40 % of the images
        model.fc.bias.fill_(float(np.log(0.4 / 0.6)))
    # The head's weights must grow to tens for confident logits; Adam moves a weight by ~lr per
    # step, so the head gets a larger learning rate than the trunk.
    head = list(model.fc.parameters())
    trunk = [p for p in model.parameters() if all(p is not q for q in head)]
    groups = [{"params": trunk, "lr": lr}, {"params": head, "lr": lr * HEAD_LR}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * HEAD_LR], total_steps=steps,
                                                pct_start=0.15)
    size_rng = np.random.default_rng(seed)
    model.train()
    t0 = time.time()
    running = 0.0
    for step in range(steps):
        size = int(size_rng.choice(SIZES))
        n = max(4, int(batch * (128 / size) ** 2))  # about the same pixels per step
        images, labels, objects = make_batch(n, size, seed=seed * 1_000_003 + step)
        x = torch.from_numpy(images)[:, None].contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(labels)
        fg = np.zeros(images.shape, np.float32)
        for i, objs in enumerate(objects):
            for o in objs:
                fg[i][o.mask] = 1
        logits = model(x)
        gate = model.features.gate_logits
        fg_half = F.adaptive_avg_pool2d(torch.from_numpy(fg)[:, None], gate.shape[2:])
        loss = (F.binary_cross_entropy_with_logits(logits, y)
                + GATE_WEIGHT * F.binary_cross_entropy_with_logits(gate, fg_half))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}  loss {running / log_every:.4f}  "
                f"{time.time() - t0:.0f} s", flush=True)
            running = 0.0
    return model.eval()


def calibrate(model: DemoNet, images: int = 300, seed: int = CALIBRATION_SEED,
              sizes=(96, 512), log=print) -> np.ndarray:
    """Shift each class's bias so that ``sigmoid(logit) > 0.5`` is the most accurate decision on
    a calibration set: images of all sizes from 96 to 512 px, from seeds that neither training
    (0, 1, ...) nor the benchmark (1,000,000 on) use. Training sees sizes up to 256 only; larger
    images give lower logits. The bias does not enter any CAM map. Returns the offsets."""
    rng = np.random.default_rng(seed)
    logits, labels = [], []
    for i in range(images):
        h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        item = make_image((h, w), seed=seed + i)
        with torch.inference_mode():
            logits.append(model(torch.from_numpy(item.image)[None, None])[0].numpy())
        labels.append(item.labels > 0.5)
    L, Y = np.array(logits), np.array(labels)
    grid = np.round(np.linspace(-3, 3, 121), 3)
    offsets = np.array([grid[int(np.argmax([((L[:, c] + o > 0) == Y[:, c]).mean() for o in grid]))]
                        for c in range(L.shape[1])])
    with torch.no_grad():
        model.fc.bias += torch.as_tensor(offsets, dtype=model.fc.bias.dtype)
    log(f"calibrated class biases by {offsets.tolist()}")
    return offsets


def save(model: DemoNet, path: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    sidecar = {"architecture": "napari_gradcam.models.demo.model:DemoNet",
               "class_names": list(CLASS_NAMES), "in_channels": 1, "input_size": None,
               "mean": [0.0], "std": [1.0], "target_layer": "features",
               "intensity": "dtype"}
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(sidecar, indent=1))
    return path


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
