"""Seg-Grad-CAM on a 2D U-Net vs segmentation inference vs pytorch-grad-cam, side by side in one run.

    python benchmarks/bench_segmentation.py                   # CPU: smp Unet resnet34, 2 x 3 x 512^2
    python benchmarks/bench_segmentation.py --device cuda --batch 16 --rounds 10
    python benchmarks/bench_segmentation.py --size 128 --batch 1 --rounds 1   # a quick check
    python benchmarks/bench_segmentation.py --arch monai      # MONAI's 2D UNet instead

The model is segmentation_models_pytorch's ``Unet`` (``--encoder``, default resnet34, random
weights: ``encoder_weights=None``, nothing downloaded) or MONAI's ``UNet`` (``--arch monai``),
output (N, classes, H, W). Two target layers by default: the last decoder block (smp
``decoder.blocks.<last>``, MONAI ``model.1``; the gradient then only crosses the segmentation
head) and a deep one (smp ``encoder.layer4``, the encoder's last stage; MONAI the skip block
around the bottom, at 1/16 scale: the gradient crosses the whole decoder). ``--layers`` picks others.

The class explained is the same for every contender: the non-background class with the largest
predicted area over the batch (with random weights one class usually covers most of the image).
Two kinds of target region, each a row per layer:

* ``predicted``: the model's own predicted region of that class (argmax == class). Ours is
  ``explain_batch(model, x, "gradcam", layer, targets=c)`` (``target_masks=None``: the region
  comes from the same forward). The peer follows its semantic-segmentation tutorial: one forward
  to get the predicted mask (here under ``torch.no_grad``, cheaper than the tutorial's), then
  ``GradCAM(model, target_layers=[layer])`` with one ``SemanticSegmentationTarget(c, mask_n)``
  per image.
* ``given``: a fixed disc in the image's centre, the same for both: ours with
  ``target_masks=disc``, the peer with ``SemanticSegmentationTarget(c, disc)`` and no extra
  forward.

The floor is segmentation inference: the same model's forward under ``torch.inference_mode``.
Rounds are interleaved (one call of each contender per round, shuffled) and medians reported:
read the ratios, not the seconds. On a GPU the peer hands back NumPy arrays, so ours is also
timed with its heatmaps copied to the host, and the peer is compared with that.
Targets: ours / inference <= 1.15 at the last decoder block; peer / ours >= 2 at every layer.

This is a benchmark, not a test: it asserts nothing and is never run by the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

import napari_gradcam as ng
from napari_gradcam._device import describe_device, resolve_device

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, peer_version  # noqa: E402

try:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
except ImportError:  # the peer is optional: without it the table shows ours vs the floor
    pgc = None








def build(args):
    """(model, {layer name: label}, description); the layers default to the last decoder block
    and a deep layer (smp: the encoder's last stage; MONAI: the block around the bottom)."""
    torch.manual_seed(0)
    if args.arch == "smp":
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            sys.exit("segmentation_models_pytorch is not installed (pip install "
                     "segmentation-models-pytorch), or use --arch monai")
        model = smp.Unet(args.encoder, encoder_weights=None, classes=args.classes)
        last = f"decoder.blocks.{len(model.decoder.blocks) - 1}"
        deep = "encoder.layer4" if hasattr(model.encoder, "layer4") else None
        desc, deep_label = f"smp Unet {args.encoder}", "encoder's last stage"
    else:
        try:
            from monai.networks.nets import UNet
        except ImportError:
            sys.exit("MONAI is not installed (pip install monai), or use --arch smp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's deprecation notices
            model = UNet(spatial_dims=2, in_channels=3, out_channels=args.classes,
                         channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                         num_res_units=2)
        # model.0 (first down block), model.1 (skip connection around everything below, its
        # output feeds the top up-block model.2, which produces the classes), nested below
        last = "model.1"
        deep = "model.1.submodule.1.submodule.1.submodule.1"  # the skip around the bottom
        desc, deep_label = "MONAI UNet (16, 32, 64, 128, 256)", "bottleneck, 1/16 scale"
    layers = args.layers or [n for n in (last, deep) if n]
    names = dict(model.named_modules())
    unknown = [n for n in layers if n not in names]
    if unknown:
        sys.exit(f"{desc} has no layer {', '.join(map(repr, unknown))}; some of its layers: "
                 f"{', '.join(n for n in list(names)[-8:] if n)}")
    label = {last: "last decoder block", deep: deep_label}
    return model, {n: label.get(n, "") for n in layers}, desc


def pick_class(model, x, classes: int) -> tuple[int, list[float]]:
    """The non-background class with the largest predicted area over the batch, and every
    class's share of the predicted pixels."""
    with torch.inference_mode():
        pred = model(x).argmax(1)
    share = [float((pred == c).float().mean()) for c in range(classes)]
    order = sorted(range(1, classes), key=lambda c: -share[c]) if classes > 1 else [0]
    return (order[0] if share[order[0]] > 0 else 0), share


def disc(batch: int, size: int, device) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 4) ** 2
    return inside.expand(batch, size, size).to(device)


def contenders_for(model, x, layer_name, c, mask, modes, args, gpu):
    layer = model.get_submodule(layer_name)
    out = {}
    for mode in modes:
        kw = {"target_masks": mask} if mode == "given" else {}

        def ours(host=False, kw=kw):
            maps = ng.explain_batch(model, x, "gradcam", target_layer=layer_name, targets=c,
                                    **kw).heatmaps
            return maps.cpu() if host else maps

        out[f"ours:{mode}"] = ours
        if gpu:  # the peer hands back host arrays: time ours with the copy too
            out[f"host:{mode}"] = lambda ours=ours: ours(host=True)
        if pgc is None or args.no_peer:
            continue
        if mode == "given":
            fixed = mask[0].float().cpu().numpy()

            def peer(fixed=fixed):
                targets = [SemanticSegmentationTarget(c, fixed) for _ in range(x.shape[0])]
                with pgc.GradCAM(model=model, target_layers=[layer]) as cam:
                    cam(input_tensor=x, targets=targets)
        else:
            def peer():
                # the tutorial's recipe: the predicted mask first, then the CAM with it
                with torch.no_grad():
                    pred = model(x).argmax(1).cpu().numpy()
                targets = [SemanticSegmentationTarget(c, np.float32(p == c)) for p in pred]
                with pgc.GradCAM(model=model, target_layers=[layer]) as cam:
                    cam(input_tensor=x, targets=targets)
        out[f"peer:{mode}"] = peer
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--arch", choices=["smp", "monai"], default="smp")
    p.add_argument("--encoder", default="resnet34", help="smp encoder (default resnet34)")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--size", type=int, default=512, help="pixels per side (default 512)")
    p.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 16 on CUDA")
    p.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5)
    p.add_argument("--layers", nargs="+", default=None,
                   help="target layer names (default: the last decoder block and a deep layer)")
    p.add_argument("--modes", nargs="+", choices=["predicted", "given"],
                   default=["predicted", "given"], help="target regions to time")
    p.add_argument("--no-peer", action="store_true", help="ours vs inference only")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds per contender after which it stops at 3 rounds")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type != "cpu"
    args.batch = args.batch or (16 if gpu else 2)
    model, layers, desc = build(args)
    model = model.eval().to(device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    mask = disc(args.batch, args.size, device)
    c, share = pick_class(model, x, args.classes)

    def floor():
        with torch.inference_mode():
            model(x)

    contenders = {"inference": floor}
    for name in layers:
        for key, fn in contenders_for(model, x, name, c, mask, args.modes, args, gpu).items():
            contenders[f"{name}|{key}"] = fn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty predicted region warns once per call
        med = interleaved(contenders, args.rounds, device, args.budget)

    print(f"## Seg-Grad-CAM vs segmentation inference, {desc}, {args.batch} x 3 x "
          f"{args.size}^2, {args.classes} classes, {describe_device(device)}")
    print(f"torch {torch.__version__}, pytorch-grad-cam "
          f"{peer_version()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; median of {args.rounds} interleaved rounds "
          f"(3 for a contender slower than {args.budget:g} s in all)")
    print(f"class explained: {c} (predicted share of pixels per class: "
          f"{', '.join(f'{s:.3f}' for s in share)}); 'given' region: a centred disc, "
          f"{float(mask[0].float().mean()):.3f} of the image")
    print()
    base = med["inference"]
    rows = [
        "| target layer | region | ours (s) | ours / inference "
        + ("| ours + copy to host / inference " if gpu else "")
        + "| pytorch-grad-cam (s) | peer / inference | peer / ours |",
        "|---|---|---|---|" + ("---|" if gpu else "") + "---|---|---|",
        f"| inference only | | {base:.4f} | 1.00 |" + (" |" if gpu else "") + " | | |",
    ]
    for name, label in layers.items():
        for mode in args.modes:
            ours = med[f"{name}|ours:{mode}"]
            host = med.get(f"{name}|host:{mode}", ours)  # on the CPU the copy is a no-op
            peer = med.get(f"{name}|peer:{mode}")
            peer_cols = (f"{peer:.4f} | {peer / base:.2f} | {peer / host:.2f}"
                         if peer is not None else "n/a | | ")
            host_col = f" {host / base:.2f} |" if gpu else ""
            shown = f"`{name}`" + (f" ({label})" if label else "")
            rows.append(f"| {shown} | {mode} | {ours:.4f} | {ours / base:.2f} |{host_col} "
                        f"{peer_cols} |")
            verdicts = [f"ours / inference = {ours / base:.2f}"]
            if label == "last decoder block":
                verdicts[0] += f" (target <= 1.15: {'yes' if ours / base <= 1.15 else 'no'})"
            if peer is not None:
                verdicts.append(f"peer / ours = {peer / host:.2f} (target >= 2: "
                                f"{'yes' if peer / host >= 2 else 'no'})")
            print(f"{name}, {mode}: {'; '.join(verdicts)}", file=sys.stderr)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
