"""Vision-transformer Grad-CAM vs inference vs pytorch-grad-cam, side by side in one run.

    python benchmarks/bench_vit.py                       # CPU: timm vit_tiny_patch16_224, batch 8
    python benchmarks/bench_vit.py --model deit_tiny_distilled_patch16_224
    python benchmarks/bench_vit.py --model swin_tiny_patch4_window7_224
    python benchmarks/bench_vit.py --device cuda --batch 64 --rounds 10
    python benchmarks/bench_vit.py --batch 2 --rounds 1  # a quick check

The model is a timm transformer with random weights (``pretrained=False``, nothing downloaded).
The target layer is the same for every contender: the LayerNorm feeding the last block's
attention (ViT / DeiT ``blocks.11.norm1``, Swin ``layers.3.blocks.1.norm1``; ``--layer`` picks
another), whose output is tokens (N, T, C) or, in Swin, channels-last (N, H, W, C). Ours is
``explain_batch(model, x, method, target_layer=layer)``, which turns the tokens into the patch
grid itself. The peer is pytorch-grad-cam with its documented ``reshape_transform`` recipe for
ViT (drop the prefix tokens, reshape to 14 x 14, channels first): the class token for ViT, class
and distillation tokens for the distilled DeiT (``model.num_prefix_tokens``); for Swin its recipe
(reshape to 7 x 7 x C) applied to timm's tensor, which already is (N, 7, 7, C). Both explain
each image's predicted class.

The floor is the model's forward under ``torch.inference_mode``. Rounds are interleaved (one call
of each per round, shuffled) and medians reported: read the ratios, not the seconds. On a GPU
the peer hands back NumPy arrays, so ours is also timed with its heatmaps copied to the host, and
the peer is compared with that. Targets (ViT-Tiny, CPU, batch 8): ours / inference <= 1.15,
peer / ours >= 2.

This is a benchmark, not a test: it asserts nothing and is never run by the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

import napari_gradcam as ng
from napari_gradcam._device import describe_device, resolve_device

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, peer_version  # noqa: E402

try:
    import pytorch_grad_cam as pgc
except ImportError:  # the peer is optional: without it the table shows ours vs the floor
    pgc = None

MODELS = {
    "vit_tiny_patch16_224": "blocks.11.norm1",
    "deit_tiny_distilled_patch16_224": "blocks.11.norm1",
    "swin_tiny_patch4_window7_224": "layers.3.blocks.1.norm1",
}
PEERS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
         "xgradcam": "XGradCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM"}








def reshape_transform(model, size: int):
    """pytorch-grad-cam's documented recipe (its ViT and Swin examples), with the grid from the
    input size and the patch size and the prefix count from the model."""
    patch = model.patch_embed.patch_size[0]
    prefix = getattr(model, "num_prefix_tokens", 1)

    def vit(tensor, height=size // patch, width=size // patch):
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        # bring the channels to the first dimension, like in CNNs
        result = result.transpose(2, 3).transpose(1, 2)
        return result

    def swin(tensor):
        # the recipe's reshape to (N, 7, 7, C) is a no-op on timm's channels-last output
        height, width = tensor.shape[1:3]
        result = tensor.reshape(tensor.size(0), height, width, tensor.size(-1))
        result = result.transpose(2, 3).transpose(1, 2)
        return result

    return swin if "swin" in type(model).__name__.lower() else vit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--model", choices=list(MODELS), default="vit_tiny_patch16_224")
    p.add_argument("--layer", default=None, help="target layer (default: the last block's norm1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="input side (default 224)")
    p.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=10)
    p.add_argument("--methods", nargs="+", choices=list(PEERS), default=["gradcam"])
    p.add_argument("--no-peer", action="store_true", help="ours vs inference only")
    p.add_argument("--budget", type=float, default=30.0,
                   help="seconds per contender after which it stops at 3 rounds")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type != "cpu"
    try:
        import timm
    except ImportError:
        sys.exit("timm is not installed (pip install timm)")
    torch.manual_seed(0)
    extra = {} if args.size == 224 else {"img_size": args.size}
    model = timm.create_model(args.model, pretrained=False, **extra).eval().to(device)
    layer_name = args.layer or MODELS[args.model]
    layer = model.get_submodule(layer_name)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    def floor():
        with torch.inference_mode():
            model(x)

    transform = reshape_transform(model, args.size)
    contenders = {"inference": floor}
    for method in args.methods:
        def ours(method=method, host=False):
            maps = ng.explain_batch(model, x, method, target_layer=layer_name).heatmaps
            return maps.cpu() if host else maps

        contenders[f"ours:{method}"] = ours
        if gpu:  # the peer hands back host arrays: time ours with the copy too
            contenders[f"host:{method}"] = lambda ours=ours: ours(host=True)
        if pgc is not None and not args.no_peer:
            def peer(method=method):
                with getattr(pgc, PEERS[method])(model=model, target_layers=[layer],
                                                 reshape_transform=transform) as cam:
                    cam(input_tensor=x, targets=None)

            contenders[f"peer:{method}"] = peer
    med = interleaved(contenders, args.rounds, device, args.budget)

    print(f"## Transformer Grad-CAM vs inference, timm {args.model} (random weights), "
          f"{args.batch} x 3 x {args.size}^2, layer `{layer_name}`, {describe_device(device)}")
    print(f"torch {torch.__version__}, timm {timm.__version__}, pytorch-grad-cam "
          f"{peer_version()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; median of {args.rounds} interleaved rounds "
          f"(3 for a contender slower than {args.budget:g} s in all)")
    print()
    base = med["inference"]
    rows = [
        "| method | ours (s) | ours / inference "
        + ("| ours + copy to host / inference " if gpu else "")
        + "| pytorch-grad-cam (s) | peer / inference | peer / ours |",
        "|---|---|---|" + ("---|" if gpu else "") + "---|---|---|",
        f"| inference only | {base:.4f} | 1.00 |" + (" |" if gpu else "") + " | | |",
    ]
    for method in args.methods:
        ours = med[f"ours:{method}"]
        host = med.get(f"host:{method}", ours)  # on the CPU the copy is a no-op
        peer = med.get(f"peer:{method}")
        peer_cols = (f"{peer:.4f} | {peer / base:.2f} | {peer / host:.2f}"
                     if peer is not None else "n/a | | ")
        host_col = f" {host / base:.2f} |" if gpu else ""
        rows.append(f"| {method} | {ours:.4f} | {ours / base:.2f} |{host_col} {peer_cols} |")
        verdict = f"{method}: ours / inference = {ours / base:.2f} (target <= 1.15: " \
                  f"{'yes' if ours / base <= 1.15 else 'no'})"
        if peer is not None:
            verdict += (f"; peer / ours = {peer / host:.2f} (target >= 2: "
                        f"{'yes' if peer / host >= 2 else 'no'})")
        print(verdict, file=sys.stderr)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
