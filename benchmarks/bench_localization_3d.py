"""How well the 3D demo model's heatmaps localise objects in volumes, on held-out data.

    python benchmarks/bench_localization_3d.py [--volumes 200] [--weights PATH] [--methods ...]

Held-out set: synthetic volumes from seeds that training and calibration never see
(2,000,000 + i), each side drawn from 32 to 96 voxels independently. Everything goes through the
public API: ``ng.load_model("demo3d")``, ``ng.explain`` with each present class as the target
(one 3D heatmap per class present in a volume) and ``ng.find_regions(..., ndim=3)``:

- accuracy: per-label classification accuracy (sigmoid(logit) > 0.5 against the multi-hot truth);
- pointing game, per class present in a volume: the maximum of that class's heatmap lies in the
  box, grown by 2 voxels, of an object of that class (the 2D benchmark's definition); "in the
  mask" is the stricter count: the maximum is a voxel of such an object;
- 3D CorLoc@0.5, per class present in a volume: the largest 3D region of the class's heatmap
  (``find_regions`` at threshold 0.5, 6-connected) has box IoU >= 0.5 with a true box of that
  class; "per object": each object is matched by the box of some region of its class's map.

A benchmark, not a test; targets: accuracy >= 0.95, pointing >= 0.95, CorLoc >= 0.8.
"""

from __future__ import annotations

import argparse
import inspect
import time

import numpy as np
import torch

import napari_gradcam as ng
from napari_gradcam.models.demo3d import demo3d_spec
from napari_gradcam.models.demo3d.synthetic import CLASS_NAMES, MAX_SIDE, MIN_SIDE, make_volume

SEED = 2_000_000


def iou3(a, b) -> float:
    lo = [max(a[i], b[i]) for i in range(3)]
    hi = [min(a[i + 3], b[i + 3]) for i in range(3)]
    inter = float(np.prod([max(0, h - l) for l, h in zip(lo, hi)]))
    vol_a = float(np.prod([a[i + 3] - a[i] for i in range(3)]))
    vol_b = float(np.prod([b[i + 3] - b[i] for i in range(3)]))
    return inter / (vol_a + vol_b - inter) if vol_a + vol_b - inter > 0 else 0.0


def grown(box, by=2):
    return tuple(v - by for v in box[:3]) + tuple(v + by for v in box[3:])


def inside(point, box) -> bool:
    return all(box[i] <= point[i] < box[i + 3] for i in range(3))


def held_out(n: int, seed: int = SEED):
    rng = np.random.default_rng(seed)
    return [make_volume(tuple(int(s) for s in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=3)),
                        seed=seed + i) for i in range(n)]


def regions_3d(heat: np.ndarray, threshold: float = 0.5):
    """(box, voxels) of every 3D region of one heatmap, largest first: the package's
    find_regions(ndim=3) when it has it, else scipy's labelling (6-connected, as find_regions'
    default connectivity 1)."""
    if "ndim" in inspect.signature(ng.find_regions).parameters:
        found = ng.find_regions(heat, threshold, ndim=3, workers=1)
        boxes = [(tuple(int(v) for v in r.bbox), int(r.area)) for r in found]
    else:
        from scipy import ndimage

        labels, n = ndimage.label(heat >= threshold)
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))
        boxes = [(tuple(s.start for s in sl) + tuple(s.stop for s in sl), int(size))
                 for sl, size in zip(ndimage.find_objects(labels), sizes) if size >= 16]
    return sorted(boxes, key=lambda b: -b[1])


def evaluate(spec, items, methods):
    model = spec.module
    correct = total = 0
    keys = ("pairs", "point", "in_mask", "corloc", "objects", "per_object")
    stats = {m: dict.fromkeys(keys, 0) for m in methods}
    for item in items:
        with torch.inference_mode():
            logits = model(torch.from_numpy(item.volume)[None, None])[0]
        correct += int(((torch.sigmoid(logits) > 0.5).numpy() == (item.labels > 0.5)).sum())
        total += len(CLASS_NAMES)
        for m in methods:
            s = stats[m]
            for cid in sorted({o.class_id for o in item.objects}):
                heat = ng.explain(item.volume, spec, m, target=cid, device="cpu").heatmaps
                mine = [o for o in item.objects if o.class_id == cid]
                peak = np.unravel_index(int(heat.argmax()), heat.shape)
                s["pairs"] += 1
                s["point"] += any(inside(peak, grown(o.box)) for o in mine)
                s["in_mask"] += any(o.mask[peak] for o in mine)
                boxes = regions_3d(heat)
                s["corloc"] += bool(boxes) and any(iou3(boxes[0][0], o.box) >= 0.5 for o in mine)
                for o in mine:
                    s["objects"] += 1
                    s["per_object"] += any(iou3(b, o.box) >= 0.5 for b, _ in boxes)
    return correct / total, stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volumes", type=int, default=200)
    p.add_argument("--weights", default=None, help="default: the shipped demo3d weights")
    p.add_argument("--methods", nargs="+", default=["gradcam", "cam", "gradcam++", "layercam"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = demo3d_spec(args.weights) if args.weights else ng.load_model("demo3d")
    items = held_out(args.volumes)
    t0 = time.time()
    accuracy, stats = evaluate(spec, items, list(args.methods))
    n_obj = sum(len(i.objects) for i in items)
    pairs = next(iter(stats.values()))["pairs"]
    how = ("find_regions(ndim=3)" if "ndim" in inspect.signature(ng.find_regions).parameters
           else "scipy.ndimage.label")
    print(f"## {args.volumes} held-out volumes (sides 32-96, seeds {SEED:,}+), {n_obj} objects, "
          f"{pairs} (volume, present class) pairs; regions by {how}; per-label accuracy "
          f"{accuracy:.3f}; {time.time() - t0:.0f} s")
    print()
    print("| method | pointing game (box + 2 vx) | pointing (in the object) "
          "| 3D CorLoc@0.5 (largest region) | 3D CorLoc@0.5 (per object, any region) |")
    print("|---|---|---|---|---|")
    for m, s in stats.items():
        n, k = max(s["pairs"], 1), max(s["objects"], 1)
        print(f"| {m} | {s['point'] / n:.3f} | {s['in_mask'] / n:.3f} | {s['corloc'] / n:.3f} "
              f"| {s['per_object'] / k:.3f} |")


if __name__ == "__main__":
    main()
