"""3D Grad-CAM vs 3D inference, side by side in one run, on 1 x 1 x 96^3 volumes.

    python benchmarks/bench_volumes.py                       # CPU
    python benchmarks/bench_volumes.py --device cuda [--repeats 20]

Models: the bundled 3D demo model (``load_model("demo3d")``; skipped with a message where this
checkout has none yet) and MONAI's DenseNet121 in 3D with random weights (``monai`` installed).
For each, three contenders run on the same volume, device and layer (the automatic one): the
model's forward under ``torch.inference_mode`` (the floor), ``explain_batch`` Grad-CAM (on a GPU
with the heatmap copied to the host, since the peer returns NumPy), and pytorch-grad-cam's
GradCAM, which takes 5-D activations, as the peer. Rounds are interleaved (one call of each per
round, shuffled) and medians reported: read the ratios, not the seconds. Target: ours /
inference <= 1.1.

This is a benchmark, not a test: it asserts nothing and is never run by the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

import napari_gradcam as ng
from napari_gradcam._device import describe_device, resolve_device

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved  # noqa: E402
from napari_gradcam.cam import resolve_target_layer

try:
    import pytorch_grad_cam as pgc
except ImportError:  # the peer is optional: without it the table shows ours vs the floor
    pgc = None






def demo3d():
    """The bundled 3D demo model, or None (with the reason) where it isn't available yet."""
    try:
        spec = ng.load_model("demo3d")
    except (ValueError, OSError, ImportError) as err:
        first = (str(err).split(";")[0] or type(err).__name__)[:100]
        return None, f"load_model('demo3d') is not available in this checkout ({first})"
    return spec.module, spec.target_layer


def densenet121():
    try:
        from monai.networks.nets import DenseNet121
    except ImportError:
        return None, "MONAI is not installed (pip install monai)"
    torch.manual_seed(0)
    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=2), None


MODELS = {"demo3d": demo3d, "monai-densenet121": densenet121}


def model_rows(name: str, args, device) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notices
        model, layer_or_reason = MODELS[name]()
    if model is None:
        print(f"skipping {name}: {layer_or_reason}", file=sys.stderr)
        return [f"| {name} | skipped: {layer_or_reason} | | | | | | |"]
    model = model.eval().to(device)
    x = torch.randn(1, 1, *[args.size] * 3, device=device)
    layer_name, layer = resolve_target_layer(model, layer_or_reason, x)

    def floor():
        with torch.inference_mode():
            model(x)

    def ours():
        return ng.explain_batch(model, x, "gradcam", target_layer=layer_name).heatmaps.cpu()

    contenders = {"inference": floor, "ours": ours}
    if pgc is not None and not args.no_peer:
        def peer():
            with pgc.GradCAM(model=model, target_layers=[layer]) as cam:
                cam(input_tensor=x, targets=None)

        contenders["peer"] = peer
    med = interleaved(contenders, args.repeats, device, args.budget)
    base, mine, peer_s = med["inference"], med["ours"], med.get("peer")
    peer_cols = (f"{peer_s:.3f} | {peer_s / base:.2f} | {peer_s / mine:.2f}"
                 if peer_s is not None else "n/a | | ")
    verdict = "yes" if mine / base <= 1.1 else "no"
    print(f"{name}: Grad-CAM / inference = {mine / base:.2f} (target <= 1.1: {verdict})",
          file=sys.stderr)
    return [(f"| {name} | `{layer_name}` | {base:.3f} | {mine:.3f} | {mine / base:.2f} "
             f"| {peer_cols} |")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--size", type=int, default=96, help="voxels per side (default 96)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds per contender after which it stops at 3 rounds")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-peer", action="store_true", help="ours vs inference only")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.set_grad_enabled(True)
    print(f"## 3D Grad-CAM vs inference, 1 x 1 x {args.size}^3, {describe_device(device)}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds, medians\n")
    rows = [("| model | layer (automatic) | inference (s) | Grad-CAM, ours (s) "
             "| ours / inference | pytorch-grad-cam (s) | peer / inference | peer / ours |"),
            "|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        rows += model_rows(name, args, device)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
