"""The main job on the bundled defaults, without a display: the demo model on a synthetic image.

Every CAM method explains every class; ``find_regions`` turns each class's heatmap into boxes,
which are printed next to the generator's true boxes.
"""

from __future__ import annotations

import numpy as np


def _iou(a, b) -> float:
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def run_example(methods=None, device="auto", seed: int = 6, size: int = 256,
                out=print) -> dict:
    """Explain every class of one synthetic image (a disc, a square, a triangle) with every
    method; returns ``{(method, class): best box IoU per true object of that class}``.

    The default seed draws an image whose three classes the demo model recognises (it does on
    95 of 100 such three-object 256 px images; benchmarks/RESULTS.md has the unbiased numbers);
    pass another seed to see other cases.
    """
    from . import available_methods, find_regions
    from ._device import describe_device, resolve_device
    from .job import ExplainJob, probabilities
    from .models import load_model
    from .models.demo.synthetic import make_image

    dev = resolve_device(device)
    spec = load_model("demo")
    item = make_image(size, seed=seed, classes=[0, 1, 2])
    methods = list(methods or available_methods())
    # "found" explains every class from one forward per method; its per-target maps hold
    # each class's heatmap whether or not the model finds the class
    res = ExplainJob(spec, methods, "found", device=dev).run(item.image)
    probs = probabilities(spec, res.scores)  # "found": slot k holds class k's logit
    out(f"napari-gradcam example: the bundled demo model on a synthetic {size} x {size} image; "
        f"device: {describe_device(dev)}")
    for o in item.objects:
        out(f"  true {o.class_name:<8} box (min_row, min_col, max_row, max_col) = {o.box}")
    out("  model says: " + ", ".join(f"{n} {p:.2f}" for n, p in zip(spec.class_names, probs)))
    results = {}
    for method in methods:
        maps = res.per_target[method]
        for cid, name in enumerate(spec.class_names):
            truth = [o.box for o in item.objects if o.class_id == cid]
            boxes = [r.bbox for r in find_regions(maps[cid], 0.5)]
            peak = tuple(int(v) for v in np.unravel_index(int(maps[cid].argmax()),
                                                          maps[cid].shape))
            on = any(t[0] <= peak[0] < t[2] and t[1] <= peak[1] < t[3] for t in truth)
            ious = [max((_iou(t, b) for b in boxes), default=0.0) for t in truth]
            results[(method, name)] = ious
            out(f"  {method:<9} {name:<8} peak at {peak}: {'on' if on else 'NOT on'} the "
                f"{name}; {len(boxes)} box(es) at heat >= 0.5 {boxes}, "
                f"IoU with the true box: {', '.join(f'{v:.2f}' for v in ious)}")
    if "eigencam" in methods:
        out("  (eigencam is class-agnostic: it maps the activations' dominant pattern, whatever "
            "the class)")
    return results
