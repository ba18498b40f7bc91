"""Engine cost, side by side in one run: inference only vs our explain_batch vs pytorch-grad-cam.

    python benchmarks/bench_engine.py                      # CPU: resnet50, batch 8, 224 x 224
    python benchmarks/bench_engine.py --device cuda --batch 64 [--amp bf16]

Every contender runs on the same model, layer (layer4), batch and device, in interleaved rounds
(one call of each per round, in a shuffled order), and the median per contender is reported; the
machine's noise hits all of them alike, so the ratios are what to read, not the seconds. The peer
returns NumPy arrays, so on a GPU ours is also timed with the heatmaps copied to the host, and
the peer is compared with that.

Score-CAM runs N x channels masked forwards and is benchmarked separately on a smaller setting
(--scorecam-model / --scorecam-size / --scorecam-batch), each contender in a fresh process so that
its peak memory is its own: CUDA's peak allocation on a GPU, the peak resident set on the CPU,
both counted beyond one plain inference forward of the same batch.

This is a benchmark, not a test: it asserts nothing and is never run by the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Score-CAM progress bars

import torch
import torchvision

import napari_gradcam as ng
from napari_gradcam._device import describe_device, resolve_device

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, sync  # noqa: E402

try:
    import pytorch_grad_cam as pgc
except ImportError:  # the peer is optional: without it the table shows ours vs the floor
    pgc = None

PEERS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}


def autocast(device, amp):
    if not amp:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16,
                                                          "fp16": torch.float16}[amp])


def peer_call(method, model, layer, x):
    """The peer's documented usage; its hooks live only inside its own call (left registered,
    they would also fire, and copy activations to the host, during the other contenders)."""

    def run():
        with getattr(pgc, PEERS[method])(model=model, target_layers=[layer]) as cam:
            cam(input_tensor=x, targets=None)

    return run


def engine_table(args, device) -> list[str]:
    model = getattr(torchvision.models, args.model)().eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    layer = dict(model.named_modules())[args.layer]

    def floor():
        with torch.inference_mode(), autocast(device, args.amp):
            model(x)

    gpu = device.type != "cpu"
    contenders = {"inference": floor}
    for method in args.methods:
        def ours(method=method, host=False):
            maps = ng.explain_batch(model, x, method, target_layer=args.layer,
                                    amp=args.amp or None).heatmaps
            return maps.cpu() if host else maps

        contenders[f"ours:{method}"] = ours
        if gpu:  # the peer hands back host arrays: time ours with the copy too
            contenders[f"host:{method}"] = lambda ours=ours: ours(host=True)
        if pgc is not None and method in PEERS and not args.no_peer:
            contenders[f"peer:{method}"] = peer_call(method, model, layer, x)
    med = interleaved(contenders, args.repeats, device, args.budget)
    base = med["inference"]
    rows = [
        "| method | ours (s) | ours / inference | ours + copy to host / inference "
        "| pytorch-grad-cam (s) | peer / inference | peer / ours (both on host) |",
        "|---|---|---|---|---|---|---|",
        f"| inference only | {base:.4f} | 1.00 | | | | |",
    ]
    for method in args.methods:
        ours = med[f"ours:{method}"]
        host = med.get(f"host:{method}", ours)  # on the CPU the copy is a no-op
        peer = med.get(f"peer:{method}")
        peer_cols = (f"{peer:.4f} | {peer / base:.2f} | {peer / host:.2f}" if peer is not None
                     else "n/a | | ")
        rows.append(f"| {method} | {ours:.4f} | {ours / base:.2f} | {host / base:.2f} "
                    f"| {peer_cols} |")
    return rows


class PeakRSS:
    """Peak resident-set growth of this process while the block runs, sampled every 1 ms. Only
    meaningful in a fresh process: memory freed earlier would be reused without growing RSS."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)


def _scorecam_child(args, which: str) -> None:
    """Runs in a fresh process so that peak memory is this contender's alone: prints JSON with
    the median seconds and the peak bytes beyond one plain inference forward."""
    import contextlib
    import json

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.scorecam_model)().eval().to(device)
    x = torch.randn(args.scorecam_batch, 3, args.scorecam_size, args.scorecam_size,
                    device=device)
    layer = dict(model.named_modules())[args.layer]
    if which in ("ours", "ours-bf16"):
        amp = "bf16" if which == "ours-bf16" else None

        def fn():
            ng.explain_batch(model, x, "scorecam", target_layer=args.layer, amp=amp,
                             chunk_size=args.scorecam_chunk).heatmaps.cpu()
    elif which == "floor":  # the same number of plain forwards, same chunks: the floor
        acts = {}
        h = layer.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
        with torch.inference_mode():
            model(x[:1])
        h.remove()
        total = x.shape[0] * acts["a"].shape[1]
        chunk = args.scorecam_chunk or ng.cam.methods._default_chunk(x)
        images = torch.randn(chunk, *x.shape[1:], device=device)

        def fn():
            with torch.inference_mode():
                for start in range(0, total, chunk):
                    model(images[: min(chunk, total - start)])
    else:
        fn = peer_call("scorecam", model, layer, x)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        model(x)
    sync(device)
    base = torch.cuda.max_memory_allocated(device) if cuda else 0
    times = []
    with contextlib.nullcontext() if cuda else PeakRSS() as rss:
        for _ in range(args.scorecam_repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    extra = torch.cuda.max_memory_allocated(device) - base if cuda else rss.peak - rss.base
    print(json.dumps({"seconds": statistics.median(times), "bytes": extra}))


def scorecam_table(args, argv) -> list[str]:
    import json
    import subprocess
    import sys

    children = ["floor", "ours"]
    children += ["ours-bf16"] if args.scorecam_bf16 else []
    children += ["peer"] if pgc is not None and not args.no_peer else []
    res = {}
    for which in children:
        out = subprocess.run([sys.executable, __file__, *argv, "--scorecam-child", which],
                             check=True, capture_output=True, text=True).stdout
        res[which] = json.loads(out.strip().splitlines()[-1])
    labels = {"floor": "inference only, same number of masked images",
              "ours": "ours", "ours-bf16": "ours, amp bf16", "peer": "pytorch-grad-cam"}
    rows = [
        "| Score-CAM | time (s) | / floor | peer / this | peak memory beyond one inference "
        "forward (MiB) |",
        "|---|---|---|---|---|",
    ]
    for which, r in res.items():
        peer = (f"{res['peer']['seconds'] / r['seconds']:.2f}" if "peer" in res
                and which != "peer" else "")
        rows.append(f"| {labels[which]} | {r['seconds']:.2f} | "
                    f"{r['seconds'] / res['floor']['seconds']:.2f} | {peer} | "
                    f"{r['bytes'] / 2**20:.0f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--layer", default="layer4")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    p.add_argument("--no-peer", action="store_true", help="ours vs inference only")
    p.add_argument("--budget", type=float, default=15.0,
                   help="seconds per contender after which it stops at 3 rounds")
    p.add_argument("--methods", nargs="+",
                   default=["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam",
                            "eigencam", "cam"])
    p.add_argument("--scorecam-model", default="resnet18")
    p.add_argument("--scorecam-size", type=int, default=None, help="default: 112 CPU, 224 CUDA")
    p.add_argument("--scorecam-batch", type=int, default=2)
    p.add_argument("--scorecam-repeats", type=int, default=2)
    p.add_argument("--scorecam-chunk", type=int, default=None, help="default: the engine's")
    p.add_argument("--scorecam-bf16", action="store_true", help="also time ours under bf16")
    p.add_argument("--no-scorecam", action="store_true")
    p.add_argument("--scorecam-child", choices=["floor", "ours", "ours-bf16", "peer"],
                   help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type != "cpu"
    args.batch = args.batch or (64 if gpu else 8)
    args.scorecam_size = args.scorecam_size or (224 if gpu else 112)
    torch.manual_seed(0)
    if args.scorecam_child:
        return _scorecam_child(args, args.scorecam_child)

    print(f"## {describe_device(device)}, {args.model} {args.batch} x 3 x {args.size}^2, "
          f"amp={args.amp or 'off'}")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"pytorch-grad-cam {getattr(pgc, '__version__', 'installed') if pgc else 'absent'}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads; median of {args.repeats} interleaved rounds "
          f"(3 for a contender slower than {args.budget:g} s in all)")
    print()
    print("\n".join(engine_table(args, device)))
    if not args.no_scorecam:
        print()
        print(f"Score-CAM: {args.scorecam_model} {args.scorecam_batch} x 3 x "
              f"{args.scorecam_size}^2, {args.layer}, median of {args.scorecam_repeats}")
        print()
        print("\n".join(scorecam_table(args, argv)))


if __name__ == "__main__":
    main()
