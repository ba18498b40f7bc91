"""The metrics of ``napari_gradcam.metrics``: their cost, and evidence that they mean something.

    python benchmarks/bench_metrics.py [--device cuda] [--images 4] [--size 128]
        [--evidence-images 16] [--evidence-steps 20] [--out FILE]

Speed (interleaved rounds, medians; read the ratios, not the seconds):

- deletion + insertion with 50 steps each (2 x 51 perturbed inputs per image, built on the
  device) vs the same number of plain forward passes of ready-made inputs in the same batch
  size: the price of building the perturbations (target <= 1.2x);
- ROAD, most relevant first, ours vs pytorch-grad-cam's ``ROADMostRelevantFirst`` on the same
  maps, inputs and targets: one percentile (80) and the nine of ``ROADMostRelevantFirstAverage``
  (target: no slower on a CPU). The maps are the images' Grad-CAM maps with a 30 % share of
  uniform noise: Grad-CAM alone is 0 on most pixels of these images, and every percentile
  below that share would remove every pixel (nothing to impute from: a singular system for
  the peer, a constant for ours).

Evidence, on held-out synthetic images (seeds 1,000,000 + i, as bench_localization.py; 1-3
objects each) with the demo model, each image's predicted class:

- deletion / insertion AUC and ROAD of Grad-CAM vs random maps (uniform noise) vs a centre
  Gaussian (sigma a quarter of the side): Grad-CAM should delete lower and insert higher;
  deletion both to black (the default) and to the blurred image;
- the sanity check: Spearman and SSIM after the full cascade (bar: Spearman < 0.3);
- agreement with the generator's objects: the pointing game of every class present (its
  Grad-CAM map vs its objects), as ``agreement`` computes it with the objects' boxes and a
  2 px tolerance, next to the localisation benchmark's own rule (the maximum in an object's
  box grown by 2 px) on the same maps; and with the object masks at Zhang et al.'s 15 px.

A benchmark, not a test: it asserts nothing and is never run by the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

import napari_gradcam as ng
import napari_gradcam.metrics as M
from napari_gradcam._device import describe_device, resolve_device
from napari_gradcam.metrics._perturbation import _nhwc
from napari_gradcam.models.demo.synthetic import make_image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, peer_version, sync

try:
    from pytorch_grad_cam.metrics.road import (
        ROADMostRelevantFirst,
        ROADMostRelevantFirstAverage,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except ImportError:  # the peer is optional
    ROADMostRelevantFirst = None


def held_out(n: int, size: int, seed: int = 1_000_000):
    rng = np.random.default_rng(seed)
    return [make_image(size, seed=seed + i, n_objects=int(rng.integers(1, 4)))
            for i in range(n)]


def centre_gaussian(shape) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    s = min(h, w) / 4
    return np.exp(-(((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * s * s))
                  ).astype(np.float32)


def speed_tables(args, spec, device) -> list[str]:
    items = held_out(args.images, args.size, seed=1_500_000)
    images = np.stack([it.image for it in items]).astype(np.float32)
    ex = ng.explain(images, spec, device=device)
    # Grad-CAM is 0 on most of these images' pixels: every percentile below that share would
    # remove every pixel (a singular system for the peer's solver), so the maps get a 30 %
    # share of uniform noise and each percentile removes its own share
    noise = np.random.default_rng(3).random(ex.heatmaps.shape)
    maps = (0.7 * ex.heatmaps + 0.3 * noise).astype(np.float32)
    steps = 50
    batch = args.batch or max(1, min(64, (1 << 19) // (args.size * args.size)))
    module = spec.module.to(device).eval()
    x = torch.from_numpy(images[:, None]).to(device)
    total = len(images) * 2 * (steps + 1)
    # channels-last like every input the library builds (preprocess, the metrics)
    plain_inputs = _nhwc(x.repeat_interleave(2 * (steps + 1), 0))

    def ours():
        M.deletion_insertion(images, spec, maps, steps=steps, device=device, batch_size=batch)

    def plain():
        with torch.inference_mode():
            for a in range(0, total, batch):
                module(plain_inputs[a:a + batch])

    t = interleaved({"deletion+insertion": ours, "plain forwards": plain}, args.repeats,
                    device, args.budget)
    lines = [f"Deletion + insertion, {steps} steps each: {len(images)} images of "
             f"{args.size}^2, {total} inputs in batches of {batch}", "",
             "| contender | s | ratio to plain forwards |", "|---|---|---|"]
    for k in ("deletion+insertion", "plain forwards"):
        lines.append(f"| {k} | {t[k]:.3f} | {t[k] / t['plain forwards']:.2f}x |")

    lines += ["", f"ROAD, most relevant first, {len(images)} images of {args.size}^2 "
              f"(pytorch-grad-cam {peer_version()})", "",
              "| percentiles | ours s | pytorch-grad-cam s | ours / peer |", "|---|---|---|---|"]
    if ROADMostRelevantFirst is None:
        return lines + ["| (pytorch-grad-cam not installed) | | | |"]
    targets = [ClassifierOutputTarget(int(c)) for c in ex.class_ids]
    for label, pct, peer_metric in (("80", (80,), ROADMostRelevantFirst(80)),
                                    ("10..90 (9)", tuple(range(10, 100, 10)),
                                     ROADMostRelevantFirstAverage())):
        def road_ours(pct=pct):
            M.road(images, spec, maps, percentiles=pct, device=device, batch_size=batch)

        def road_peer(metric=peer_metric):
            metric(x, maps, targets, module)

        r = interleaved({"ours": road_ours, "peer": road_peer}, max(1, args.repeats // 2),
                        device, args.budget)
        lines.append(f"| {label} | {r['ours']:.3f} | {r['peer']:.3f} | "
                     f"{r['ours'] / r['peer']:.2f}x |")
    return lines


def evidence_tables(args, spec, device) -> list[str]:
    items = held_out(args.evidence_images, args.size)
    images = np.stack([it.image for it in items]).astype(np.float32)
    ex = ng.explain(images, spec, device=device)
    rng = np.random.default_rng(7)
    baselines = {
        "Grad-CAM": ex.heatmaps,
        "random": rng.random(ex.heatmaps.shape).astype(np.float32),
        "centre Gaussian": np.broadcast_to(centre_gaussian(images.shape[1:]),
                                           images.shape).copy(),
    }
    steps = args.evidence_steps
    lines = [f"Evidence: {len(items)} held-out images of {args.size}^2 (1-3 objects), the "
             f"predicted class, {steps} steps; insertion on the blurred canvas (sigma 5); "
             "deletion to black (the default) and to the blurred image; ROAD with both orders "
             "at 10..90 (combined: higher is better)", "",
             "| map | deletion AUC, black | deletion AUC, blur | insertion AUC | "
             "ROAD combined | Grad-CAM better on images (del black / del blur / ins) |",
             "|---|---|---|---|---|---|"]
    results = {}
    for name, maps in baselines.items():
        black = M.deletion_insertion(images, spec, maps, targets=ex.class_ids, steps=steps,
                                     device=device)
        blur = M.deletion_insertion(images, spec, maps, targets=ex.class_ids, steps=steps,
                                    baseline="blur", device=device)
        road = M.road(images, spec, maps, targets=ex.class_ids, most_relevant_first="both",
                      device=device)
        results[name] = (black, blur, road)
    g = results["Grad-CAM"]
    for name, (black, blur, road) in results.items():
        share = "" if name == "Grad-CAM" else (
            f"{np.mean(g[0].deletion_auc < black.deletion_auc):.0%} / "
            f"{np.mean(g[1].deletion_auc < blur.deletion_auc):.0%} / "
            f"{np.mean(g[0].insertion_auc > black.insertion_auc):.0%}")
        lines.append(f"| {name} | {black.deletion_auc.mean():.3f} | "
                     f"{blur.deletion_auc.mean():.3f} | {black.insertion_auc.mean():.3f} | "
                     f"{road.combined.mean():.3f} | {share} |")

    n_sanity = min(args.sanity_images, len(items))
    t0 = time.perf_counter()
    sc = M.sanity_check(images[:n_sanity], spec, "gradcam", device=device)
    spent = time.perf_counter() - t0
    final = sc.spearman[:, -1]
    lines += ["", f"Sanity check (Grad-CAM, {len(sc.stages)} cascading stages, "
              f"{n_sanity} images, {spent:.1f} s)", "",
              "| after stage | mean Spearman | mean SSIM |", "|---|---|---|"]
    for s in sorted({0, 1, 2, len(sc.stages) // 2, len(sc.stages) - 1}):
        lines.append(f"| {s + 1}: {sc.stages[s]} | {sc.spearman[:, s].mean():.3f} | "
                     f"{sc.ssim[:, s].mean():.3f} |")
    lines.append(f"| full cascade, per image | {', '.join(f'{v:.2f}' for v in final)} | |")

    # agreement: every class present, its Grad-CAM map vs its objects
    heat, boxes, masks, own = [], [], [], 0
    for cid in range(len(spec.class_names)):
        having = [i for i, it in enumerate(items) if any(o.class_id == cid for o in it.objects)]
        if not having:
            continue
        maps_c = ng.explain(images[having], spec, target=cid, device=device).heatmaps
        for i, hm in zip(having, maps_c):
            mine = [o for o in items[i].objects if o.class_id == cid]
            box = np.zeros(hm.shape, bool)
            for o in mine:
                box[o.box[0]:o.box[2], o.box[1]:o.box[3]] = True
            peak = np.unravel_index(int(hm.argmax()), hm.shape)
            own += any(o.box[0] - 2 <= peak[0] < o.box[2] + 2 and
                       o.box[1] - 2 <= peak[1] < o.box[3] + 2 for o in mine)
            heat.append(hm)
            boxes.append(box)
            masks.append(np.any([o.mask for o in mine], 0))
    heat = np.stack(heat)
    by_box = M.agreement(heat, np.stack(boxes), tolerance=2).summary()
    by_mask = M.agreement(heat, np.stack(masks), tolerance=15).summary()
    strict = M.agreement(heat, np.stack(masks), tolerance=0).summary()
    lines += ["", f"Agreement with the generator's objects ({len(heat)} class-image pairs)", "",
              "| rule | pointing game | energy (boxes) | IoU @0.5 | Dice @0.5 |",
              "|---|---|---|---|---|",
              f"| localisation benchmark's rule (box + 2 px) | {own / len(heat):.3f} | | | |",
              f"| agreement, boxes, tolerance 2 px | {by_box['pointing_game']:.3f} | "
              f"{by_box['energy']:.3f} | {by_box['iou']:.3f} | {by_box['dice']:.3f} |",
              f"| agreement, masks, tolerance 15 px | {by_mask['pointing_game']:.3f} | "
              f"{by_mask['energy']:.3f} | {by_mask['iou']:.3f} | {by_mask['dice']:.3f} |",
              f"| agreement, masks, tolerance 0 | {strict['pointing_game']:.3f} | | | |"]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=4, help="images for the speed tables")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=None, help="default: 0.5 MPix per batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds per contender after which it stops at 3 rounds")
    p.add_argument("--evidence-images", type=int, default=12)
    p.add_argument("--evidence-steps", type=int, default=20)
    p.add_argument("--sanity-images", type=int, default=4)
    p.add_argument("--only", choices=["speed", "evidence"], default=None)
    p.add_argument("--out", help="also write the tables (markdown) to this file")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    spec = ng.load_model("demo")
    head = [f"## bench_metrics: {describe_device(device)}, {platform.processor() or 'cpu'}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} "
            "threads", ""]
    print("\n".join(head), flush=True)
    out = list(head)
    parts = [] if args.only == "evidence" else [speed_tables]
    parts += [] if args.only == "speed" else [evidence_tables]
    for part in parts:
        lines = part(args, spec, device)
        sync(device)
        print("\n".join(lines) + "\n", flush=True)
        out += lines + [""]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(out))


if __name__ == "__main__":
    main()
