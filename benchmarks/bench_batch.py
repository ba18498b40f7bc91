"""The batch pipeline end to end vs the engine alone, side by side in one run.

    python benchmarks/bench_batch.py [--images 64] [--size 512] [--model demo|resnet50]
                                     [--device auto] [--batch-size 16] [--rounds 3]

A folder of synthetic grey PNGs (the demo model's generator). Contenders, in interleaved rounds
(median reported):

- engine only: ``explain_batch`` on the same batches, already decoded, preprocessed and on the
  device, heatmaps copied back to the host (the floor for "explain a folder");
- end to end: ``napari-gradcam batch``'s pipeline (``process_units`` + ``write_summary``):
  decode PNGs on a thread pool, preprocess on the device, explain, cut regions, write the float32
  heatmap TIFF, the GeoJSON and the record per image, then coco.json and summary.csv.

``--model resnet50`` uses a randomly initialised torchvision ResNet-50 (3 channels, ImageNet
normalisation, the grey PNGs repeated to 3 channels): a heavier model, as on real radiographs.
A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import napari_gradcam as ng
from napari_gradcam._device import describe_device, resolve_device
from napari_gradcam.batch import Options, collect_units, process_units, write_summary
from napari_gradcam.explain_arrays import preprocess


def make_folder(folder: Path, n: int, size: int) -> list[np.ndarray]:
    import imageio.v3 as iio

    from napari_gradcam.models.demo.synthetic import make_image

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for k in range(n):
        img = (make_image(size, seed=10_000 + k).image * 255).astype(np.uint8)
        iio.imwrite(folder / f"img{k:04d}.png", img)
        images.append(img)
    return images


def model_spec(name: str, tmp: Path):
    if name == "demo":
        return ng.load_model("demo")
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=3)
    torch.save(model.state_dict(), tmp / "weights.pt")
    return ng.load_model(name, weights=tmp / "weights.pt")


def engine_only(spec, images, batch_size, device, method) -> float:
    """Images per second of explain_batch on ready device tensors (+ the host copy)."""
    batches = [preprocess(np.stack(images[i:i + batch_size])[..., None], spec, device)
               for i in range(0, len(images), batch_size)]
    layer = spec.target_layer
    ng.explain_batch(spec.module, batches[0][:1], method, target_layer=layer)  # warm up
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        ng.explain_batch(spec.module, b, method, target_layer=layer).heatmaps.cpu()
    sync(device)
    return len(images) / (time.perf_counter() - t0)


def end_to_end(spec, folder, out, batch_size, device, method, workers) -> float:
    shutil.rmtree(out, ignore_errors=True)
    opts = Options(method=method, device=str(device), batch_size=batch_size, workers=workers)
    t0 = time.perf_counter()
    units = collect_units([folder])
    records = process_units(units, spec, out, opts)
    write_summary(records, out, spec.class_names)
    seconds = time.perf_counter() - t0
    assert all(r.status == "ok" for r in records)
    return sum(len(r.images) for r in records) / seconds


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        images = make_folder(tmp / "in", args.images, args.size)
        spec = model_spec(args.model, tmp)
        spec.module.to(device)
        # one untimed end-to-end pass: imports, thread pools, layer discovery
        end_to_end(spec, tmp / "in", tmp / "out", args.batch_size, device, args.method,
                   args.workers)
        engine, e2e = [], []
        for _ in range(args.rounds):
            engine.append(engine_only(spec, images, args.batch_size, device, args.method))
            e2e.append(end_to_end(spec, tmp / "in", tmp / "out", args.batch_size, device,
                                  args.method, args.workers))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    eng, full = statistics.median(engine), statistics.median(e2e)
    print(f"# bench_batch: {args.images} PNGs of {args.size}^2, model {args.model}, "
          f"{args.method}, batch {args.batch_size}, {args.workers} reader/writer threads")
    print(f"# {describe_device(device)}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"torch threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print("| contender | images/s (median) | rounds |")
    print("| --- | ---: | --- |")
    print(f"| engine only (explain_batch on ready device tensors) | {eng:.1f} | "
          f"{', '.join(f'{v:.1f}' for v in engine)} |")
    print(f"| end to end (decode, explain, regions, TIFF + GeoJSON + records, COCO, CSV) | "
          f"{full:.1f} | {', '.join(f'{v:.1f}' for v in e2e)} |")
    print(f"\nend-to-end / engine-only = {full / eng:.2f}")


if __name__ == "__main__":
    main()
