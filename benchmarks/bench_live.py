"""Live mode's latency: from a slice change to that slice's heatmap on screen, next to the
inference-only floor, side by side in one run.

    xvfb-run -a python benchmarks/bench_live.py                    # CPU: demo model, 256^2
    python benchmarks/bench_live.py --model resnet50 --size 512 --device cuda   # a GPU

A viewer (shown: under Xvfb without a display) holds a stack of --frames frames; the widget's
`live` box is ticked, and the slider is set (viewer.dims.current_step) to each frame in turn:
the cold pass explains every frame (one model run each), the way back shows each frame from
the cache (no model run). A frame's latency ends at the first canvas draw after the heatmap
layer holds that frame (the heatmap is then on screen); the table also gives the time to the
heatmap layer written and to the regions written (the widget writes a result one layer per
event-loop turn, the regions after the heatmaps). Beside it, in the same process and on the same
device: one inference forward of the model on one image (the physical floor of a cold
slice) and our explain_batch on that image (the engine's share of a cold slice).

resnet50 has random weights (nothing is downloaded): its timings are real, its heatmaps are
not meaningful. This is a benchmark, not a test: it asserts nothing and is never run by the
test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

# torchvision before napari: importing it after the viewer's GL context exists crashed the
# process under Mesa / Xvfb
import torchvision

import napari_gradcam as ng
from napari_gradcam._device import describe_device, resolve_device

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, sync


def make_spec(name: str):
    if name == "resnet50":  # random weights: no download; the timing is what is measured
        module = torchvision.models.resnet50().eval()
        return ng.load_model(module, class_names=[f"class {i}" for i in range(1000)])
    return ng.load_model(name)


def make_stack(frames: int, size: int, channels: int) -> np.ndarray:
    """The demo's synthetic images (each frame its own objects) at ``size``; three channels
    for an RGB model."""
    from napari_gradcam.models.demo.synthetic import make_image

    planes = [make_image(min(max(size, 96), 512), seed=i).image for i in range(frames)]
    stack = np.stack(planes).astype(np.float32)
    if stack.shape[-1] != size:  # outside the generator's 96-512: resized
        from skimage.transform import resize

        stack = resize(stack, (frames, size, size), preserve_range=True).astype(np.float32)
    if channels == 3:
        stack = np.repeat(stack[..., None], 3, axis=-1)
    return stack


def floor_times(spec, size: int, device, repeats: int) -> dict:
    """One inference forward of one image, and explain_batch (Grad-CAM) on it, interleaved."""
    module = spec.module.to(device).eval()
    x = torch.rand(1, spec.in_channels, size, size, device=device)

    def forward():
        with torch.inference_mode():
            module(x)

    def explain():
        ng.explain_batch(module, x, method="gradcam", target_layer=spec.target_layer)

    return interleaved({"forward": forward, "explain": explain}, repeats, device, budget=60.0)


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def live_times(spec, name: str, stack: np.ndarray, device: str, timeout: float) -> dict:
    """Cold and cached latencies (seconds) from setting the slider to a draw of the canvas
    after the frame's result was written, and to the layers being written."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_gradcam._napari import widget as widget_mod
    from napari_gradcam._napari.widget import GradCamWidget

    viewer = napari.Viewer(show=True)
    rgb = stack.ndim == 4
    viewer.add_image(stack, name="stack", rgb=rgb)
    w = GradCamWidget(viewer)
    viewer.window.add_dock_widget(w, name="Grad-CAM")
    if not w.wait_until_ready(timeout):
        raise SystemExit("the demo model did not load")
    if name != "demo":
        w.set_model(spec, name=name)
        if not w.wait_until_ready(timeout):
            raise SystemExit(f"the model {name!r} did not load")
    w.device.value = device
    app = QApplication.instance()

    runs = []
    real_compute = widget_mod.compute

    def counting(job):
        runs.append(tuple(job.offset))
        return (yield from real_compute(job))

    widget_mod.compute = counting
    state = {"frame": None, "written": None, "drawn": None, "regions": None}
    real_heatmap, real_regions = GradCamWidget._show_heatmap, GradCamWidget._show_regions

    def show_heatmap(self, job, *args, **kwargs):
        layer = real_heatmap(self, job, *args, **kwargs)
        if tuple(job.offset) == (state["frame"],) and state["written"] is None:
            state["written"] = time.perf_counter()
        return layer

    def show_regions(self, job, *args, **kwargs):
        layer = real_regions(self, job, *args, **kwargs)
        if tuple(job.offset) == (state["frame"],) and state["regions"] is None:
            state["regions"] = time.perf_counter()
        return layer

    # the class's: the widget writes a result one layer per event-loop turn, so the moment
    # the heatmap layer holds the frame is when _show_heatmap returns
    GradCamWidget._show_heatmap, GradCamWidget._show_regions = show_heatmap, show_regions
    canvas = viewer.window._qt_viewer.canvas._scene_canvas

    def on_draw(_event=None):
        if state["written"] is not None and state["drawn"] is None:
            state["drawn"] = time.perf_counter()

    canvas.events.draw.connect(on_draw)

    def step(frame: int):
        state.update(frame=frame, written=None, drawn=None, regions=None)
        t0 = time.perf_counter()
        viewer.dims.current_step = (frame, *viewer.dims.current_step[1:])
        deadline = t0 + timeout
        while (state["drawn"] is None or state["regions"] is None) and \
                time.perf_counter() < deadline:
            app.processEvents()
            time.sleep(0.0005)
        if state["drawn"] is None or state["regions"] is None:
            raise SystemExit(f"frame {frame}: no heatmap on screen within {timeout} s")
        # the next frame's timing starts with the widget idle (its run and writes over)
        while (w.running or w._live.flight is not None) and time.perf_counter() < deadline:
            app.processEvents()
            time.sleep(0.0005)
        return state["written"] - t0, state["drawn"] - t0, state["regions"] - t0

    # the first frame outside the timing: the widget's own warm-up (napari's shapes compile,
    # the first forward on the device) is bench_ui's business
    state.update(frame=0, written=None, drawn=None, regions=None)
    viewer.dims.current_step = (0, *viewer.dims.current_step[1:])
    w.live.value = True
    deadline = time.perf_counter() + timeout
    while (state["drawn"] is None or w.running) and time.perf_counter() < deadline:
        app.processEvents()
        time.sleep(0.001)
    if state["drawn"] is None:
        raise SystemExit(f"live did not show the first frame within {timeout} s")

    frames = len(stack)
    before = len(runs)
    cold = [step(f) for f in range(1, frames)]
    cold_runs = len(runs) - before
    before = len(runs)
    cached = [step(f) for f in range(frames - 2, -1, -1)]
    cached_runs = len(runs) - before
    widget_mod.compute = real_compute
    GradCamWidget._show_heatmap, GradCamWidget._show_regions = real_heatmap, real_regions
    viewer.close()
    return {"cold": cold, "cached": cached, "cold_runs": cold_runs,
            "cached_runs": cached_runs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="demo, or resnet50 (random weights)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=20, help="rounds of the floor timing")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per frame, most")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    spec = make_spec(args.model)
    stack = make_stack(args.frames, args.size, spec.in_channels)
    floors = floor_times(spec, args.size, device, args.repeats)
    sync(device)
    live = live_times(spec, args.model, stack, args.device, args.timeout)

    def row(what, seconds, runs=""):
        ms = [s * 1000 for s in seconds]
        return (f"| {what} | {statistics.median(ms):.1f} | {percentile(ms, 95):.1f} | "
                f"{len(ms)} | {runs} |")

    def floor_row(what, seconds):
        return f"| {what} | {seconds * 1000:.1f} | - | {args.repeats} | |"

    cold_w, cold_d, cold_r = zip(*live["cold"])
    cached_w, cached_d, cached_r = zip(*live["cached"])
    machine = platform.processor() or platform.machine()
    header = (f"Live mode, {args.model} at {args.size}^2, {args.frames} frames, on "
              f"{describe_device(device)} ({machine}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads)")
    ratios = (f"cold slice drawn / inference only: "
              f"{statistics.median(cold_d) / floors['forward']:.1f}x; cached slice drawn / "
              f"inference only: {statistics.median(cached_d) / floors['forward']:.2f}x")
    lines = [
        header,
        "",
        "| what | median ms | p95 ms | n | model runs |",
        "|---|---|---|---|---|",
        floor_row("inference only: one forward, one image", floors["forward"]),
        floor_row("explain_batch (gradcam), one image", floors["explain"]),
        row("cold slice: slider -> heatmap layer written", cold_w, live["cold_runs"]),
        row("cold slice: slider -> heatmap drawn", cold_d, live["cold_runs"]),
        row("cold slice: slider -> regions written", cold_r, live["cold_runs"]),
        row("cached slice: slider -> heatmap layer written", cached_w, live["cached_runs"]),
        row("cached slice: slider -> heatmap drawn", cached_d, live["cached_runs"]),
        row("cached slice: slider -> regions written", cached_r, live["cached_runs"]),
        "",
        ratios,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
