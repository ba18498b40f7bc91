"""The training recipe both demo models share: demo/train.py (images) and demo3d/train.py
(volumes) keep only their data, sizes and defaults.

Loss: multi-label binary cross-entropy on the class logits, plus ``gate_weight`` x binary
cross-entropy of the class-agnostic foreground gate (model.py) against the objects' masks at 1/2
resolution. AdamW, one-cycle learning rate, the head at ``head_lr`` times the trunk's. Then the
class biases are calibrated on held-apart inputs of all sizes (``calibrate_biases``). Writes
safetensors plus a JSON sidecar.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import DemoNet


def fit(make_model: Callable[[], DemoNet], batches: Callable[[int], tuple], steps: int,
        seed: int, lr: float, head_lr: float, gate_weight: float, log_every: int,
        threads: int | None, device: str = "cpu", log=print) -> DemoNet:
    """Train a fresh ``make_model()`` on ``batches(step)`` -> (inputs (n, *spatial) float32,
    multi-hot labels (n, classes), objects with a ``mask`` per input); returns it in eval mode,
    on ``device``, channels-last."""
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    model = make_model()
    dims = model.dims
    # channels-last convolutions are faster on a CPU (~1.4x in 2D, several times in 3D)
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    model = model.to(device=device, memory_format=memory_format)
    with torch.no_grad():  # prior: each class is present in ~40 % of the inputs
        model.fc.bias.fill_(float(np.log(0.4 / 0.6)))
    # The head's weights must grow to tens for confident logits; Adam moves a weight by ~lr per
    # step, so the head gets a larger learning rate than the trunk.
    head = list(model.fc.parameters())
    trunk = [p for p in model.parameters() if all(p is not q for q in head)]
    groups = [{"params": trunk, "lr": lr}, {"params": head, "lr": lr * head_lr}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * head_lr],
                                                total_steps=steps, pct_start=0.15)
    pool = F.adaptive_avg_pool2d if dims == 2 else F.adaptive_avg_pool3d
    model.train()
    t0 = time.time()
    running = 0.0
    for step in range(steps):
        inputs, labels, objects = batches(step)
        x = torch.from_numpy(inputs)[:, None].to(device).contiguous(memory_format=memory_format)
        y = torch.from_numpy(labels).to(device)
        fg = np.zeros(inputs.shape, np.float32)
        for i, objs in enumerate(objects):
            for o in objs:
                fg[i][o.mask] = 1
        logits = model(x)
        gate = model.features.gate_logits
        fg_half = pool(torch.from_numpy(fg)[:, None].to(device), gate.shape[2:])
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
    return model.eval()


def calibrate_biases(model: DemoNet, samples: Iterable[tuple[np.ndarray, np.ndarray]],
                     log=print) -> np.ndarray:
    """Shift each class's bias so that ``sigmoid(logit) > 0.5`` is the most accurate decision on
    ``samples``, (input (*spatial), multi-hot labels) pairs, in steps of 0.05 within +-3.
    Training sees small sizes only and larger inputs give lower logits, so the samples should
    span all sizes, from seeds that neither training nor the benchmark use. The bias enters no
    CAM map. Returns the offsets."""
    logits, labels = [], []
    for array, y in samples:
        with torch.inference_mode():
            logits.append(model(torch.from_numpy(array)[None, None])[0].numpy())
        labels.append(y > 0.5)
    L, Y = np.array(logits), np.array(labels)
    grid = np.round(np.linspace(-3, 3, 121), 3)
    offsets = np.array([grid[int(np.argmax([((L[:, c] + o > 0) == Y[:, c]).mean() for o in grid]))]
                        for c in range(L.shape[1])])
    with torch.no_grad():
        model.fc.bias += torch.as_tensor(offsets, dtype=model.fc.bias.dtype)
    log(f"calibrated class biases by {offsets.tolist()}")
    return offsets


def sidecar(architecture: str, class_names) -> dict:
    """What the loader needs beside the weights: one grey channel taken as it comes, any size,
    explained at ``features``; each class decided on its own (trained with a sigmoid per
    class), so its probabilities are sigmoids, not a softmax over the classes."""
    return {"architecture": architecture, "class_names": list(class_names), "in_channels": 1,
            "input_size": None, "mean": [0.0], "std": [1.0], "target_layer": "features",
            "intensity": "dtype", "output": "multilabel"}


def save(model: DemoNet, path: Path, meta: dict) -> Path:
    """The weights as safetensors at ``path``, ``meta`` as its JSON sidecar (path + ".json")."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(meta, indent=1))
    return path
