"""How well the demo model's heatmaps localise objects, per CAM method, on held-out data.

    python benchmarks/bench_localization.py [--images 300] [--weights PATH]

Held-out set: synthetic images from seeds the training never sees (1,000,000 + i), sizes drawn
from 96 to 512 px a side. For each image, every class is explained (one heatmap per class), and:

- accuracy: per-label classification accuracy (sigmoid(logit) > 0.5 vs the multi-hot truth);
- pointing game, per class present in an image (Zhang et al.'s definition): the maximum of the
  class's heatmap lies in the box, grown by 2 px, of an object of that class (counted per
  object, an image with two discs could never score both: one maximum, two objects);
- CorLoc@0.5, per object: the best ``find_regions`` box (default threshold 0.5) of its class's
  heatmap has IoU >= 0.5 with its box;
- MaxBoxAcc: the best CorLoc over thresholds 0.05 ... 0.95 (and the threshold that gives it);
- discriminative, on images with objects of two or more classes: each present class's heatmap
  has its maximum on an object of that class.

Baseline row: the seed's recipe on the Grad-CAM heatmaps (scale to 0..155, JET colormap, grey,
threshold 127, first external contour with more than 20 points, its bounding rectangle: one box
per heatmap). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import napari_gradcam as ng
from napari_gradcam.models import load_model
from napari_gradcam.models.demo.synthetic import CLASS_NAMES, make_image

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def iou(a, b) -> float:
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def grown(box, by=2):
    return (box[0] - by, box[1] - by, box[2] + by, box[3] + by)


def inside(point, box) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def held_out(n: int, seed: int = 1_000_000, sizes=(96, 512)):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(s) for s in rng.integers(sizes[0], sizes[1] + 1, size=2))
        out.append(make_image((h, w), seed=seed + i))
    return out


def seed_box(heatmap: np.ndarray):
    """The seed's one box per heatmap, as (min_row, min_col, max_row, max_col), or None."""
    from bench_regions import seed_recipe  # the same recipe the regions benchmark times

    found = seed_recipe(heatmap)
    if found is None:
        return None
    (x, y, w, h), _contour = found
    return (y, x, y + h, x + w)


def evaluate(spec, items, methods, log=print, slow_items: int | None = None):
    """Metrics per method; Score-CAM (channels x classes masked forwards per image) only on the
    first ``slow_items`` images when given."""
    model = spec.module
    k = len(CLASS_NAMES)
    rows = {}
    correct = total = 0
    maps = {m: [] for m in methods}
    for n_item, item in enumerate(items):
        x = torch.from_numpy(item.image)[None, None].expand(k, -1, -1, -1).contiguous()
        with torch.inference_mode():
            logits = model(x[:1])[0]
        pred = (torch.sigmoid(logits) > 0.5).numpy()
        correct += int((pred == (item.labels > 0.5)).sum())
        total += k
        for m in methods:
            if m == "scorecam" and slow_items is not None and n_item >= slow_items:
                continue
            res = ng.explain_batch(model, x, m, target_layer=spec.target_layer,
                                   targets=list(range(k)))
            maps[m].append(res.heatmaps.numpy())
    accuracy = correct / total
    for m in methods + ["seed recipe (Grad-CAM)"]:
        seed_row = m.startswith("seed")
        per_item = maps["gradcam"] if seed_row else maps[m]
        point = pairs = corloc = objects = 0
        by_t = np.zeros(len(THRESHOLDS))
        disc_ok = disc_n = 0
        for item, hm in zip(items[: len(per_item)], per_item):
            classes_here = {o.class_id for o in item.objects}
            for cid in classes_here:
                heat = hm[cid]
                peak = np.unravel_index(int(heat.argmax()), heat.shape)
                mine = [o for o in item.objects if o.class_id == cid]
                hit = any(inside(peak, grown(o.box)) for o in mine)
                pairs += 1
                point += hit
                if len(classes_here) >= 2:
                    disc_n += 1
                    disc_ok += hit
                if seed_row:
                    box = seed_box(heat)
                    boxes_at = None
                else:
                    boxes = [r.bbox for r in ng.find_regions(heat, 0.5, workers=1)]
                    boxes_at = [[r.bbox for r in ng.find_regions(heat, float(t), workers=1)]
                                for t in THRESHOLDS]
                for o in mine:
                    objects += 1
                    if seed_row:
                        hit = box is not None and iou(box, o.box) >= 0.5
                        corloc += hit
                        by_t += hit
                    else:
                        corloc += any(iou(b, o.box) >= 0.5 for b in boxes)
                        by_t += [any(iou(b, o.box) >= 0.5 for b in bs) for bs in boxes_at]
        best = int(by_t.argmax())
        rows[m] = {
            "accuracy": accuracy,
            "pointing": point / max(pairs, 1),
            "corloc": corloc / max(objects, 1),
            "maxboxacc": by_t[best] / max(objects, 1),
            "best_t": "127/255 of JET grey" if seed_row else f"{THRESHOLDS[best]:.2f}",
            "discriminative": disc_ok / max(disc_n, 1),
            "objects": objects,
            "multi": disc_n,
            "images": len(per_item),
        }
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--weights", default=None, help="default: the shipped demo weights")
    p.add_argument("--methods", nargs="+", default=ng.available_methods())
    p.add_argument("--scorecam-images", type=int, default=60,
                   help="Score-CAM on the first N images only (it is ~100x slower)")
    args = p.parse_args(argv)
    spec = load_model("demo")
    if args.weights:
        from safetensors.torch import load_file

        spec.module.load_state_dict(load_file(args.weights))
    items = held_out(args.images)
    t0 = time.time()
    rows = evaluate(spec, items, list(args.methods), slow_items=args.scorecam_images)
    n_obj = next(iter(rows.values()))["objects"]
    print(f"## {args.images} held-out images (sizes 96-512, seeds 1,000,000+), {n_obj} objects, "
          f"{next(iter(rows.values()))['multi']} class heatmaps on multi-class images; "
          f"{time.time() - t0:.0f} s")
    print()
    print("| method | accuracy (per label) | pointing game | CorLoc@0.5 (threshold 0.5) "
          "| MaxBoxAcc (at threshold) | discriminative |")
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        acc = f"{r['accuracy']:.3f}" if not m.startswith("seed") else "(same model)"
        pt = f"{r['pointing']:.3f}" if not m.startswith("seed") else "(same heatmaps)"
        dc = f"{r['discriminative']:.3f}" if not m.startswith("seed") else "(same heatmaps)"
        name = m if r["images"] == len(items) else f"{m} (first {r['images']} images)"
        print(f"| {name} | {acc} | {pt} | {r['corloc']:.3f} | {r['maxboxacc']:.3f} "
              f"({r['best_t']}) | {dc} |")


if __name__ == "__main__":
    main()
