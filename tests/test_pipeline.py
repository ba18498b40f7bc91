"""The headless batch CLI: inputs of every kind, outputs validated, resume after a kill, bad
files, and the same results on a dask.distributed cluster."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import napari_gradcam as ng
from napari_gradcam.batch import Options, collect_units, process_units, write_summary
from napari_gradcam.cli import main
from napari_gradcam.models.demo.synthetic import make_image, make_stack

tifffile = pytest.importorskip("tifffile")
iio = pytest.importorskip("imageio.v3")

DATA = Path(__file__).parent / "data" / "chest-xray"
# The CLI runs on whatever device is present and the references below are computed on the same
# one, in other batch sizes: float32 rounding on the CPU; CUDA's TF32 convolutions differ more.
HEAT_ATOL = 2e-3 if torch.cuda.is_available() else 1e-5


def summary(out: Path) -> list[dict]:
    import csv

    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def check_geojson(path: Path, planes: bool):
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    for f in doc["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["name"] in ("disc", "square", "triangle")
        assert len(props["classification"]["color"]) == 3
        for ring in [r for poly in ([f["geometry"]["coordinates"]]
                                    if f["geometry"]["type"] == "Polygon"
                                    else f["geometry"]["coordinates"]) for r in poly]:
            assert ring[0] == ring[-1]  # closed
        assert ("plane" in f["geometry"]) == planes
    return doc


def check_coco(path: Path, n_images: int):
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    assert len(coco.imgs) == n_images
    assert all(a["id"] >= 1 for a in coco.anns.values())
    return coco


def test_sixteen_bit_tiff_stack(tmp_path):
    stack, labels, _ = make_stack(5, 128, seed=4)
    u16 = (stack * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", u16)
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "stack.tif"), "--out", str(out), "--quiet",
                 "--overlay"]) == 0
    heat = tifffile.imread(out / "heatmaps" / "stack.tif")
    assert heat.dtype == np.float32 and heat.shape == (5, 128, 128)
    ref = ng.explain(u16, ng.load_model("demo"), device="auto")
    np.testing.assert_allclose(heat, ref.heatmaps, atol=HEAT_ATOL)
    rows = summary(out)
    assert [r["index"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert all(r["status"] == "ok" for r in rows)
    assert [r["class"] for r in rows] == list(np.array(["disc", "square", "triangle"])[
        ref.class_ids])
    doc = check_geojson(out / "geojson" / "stack.geojson", planes=True)
    zs = {f["geometry"]["plane"]["z"] for f in doc["features"]}
    assert zs <= set(range(5)) and sum(int(r["regions"]) for r in rows) * 2 == len(
        doc["features"])
    check_coco(out / "coco.json", 5)
    assert len(list((out / "overlays").glob("stack_*.png"))) == 5


def test_every_class_found_in_a_stack(tmp_path):
    stack, labels, _ = make_stack(4, 128, seed=12)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "s.tif"), "--out", str(out), "--quiet",
                 "--target", "found"]) == 0
    spec = ng.load_model("demo")
    per_class = [ng.explain(stack, spec, target=k, device="auto") for k in range(3)]
    rows = summary(out)
    for i in range(4):
        found = [spec.class_names[k] for k in range(3) if per_class[k].scores[i] > 0]
        assert [r["class"] for r in rows if r["index"] == str(i)] == (found or [""])
        # and on these frames the classes found are exactly the ones drawn
        assert found == [spec.class_names[k] for k in np.flatnonzero(labels[i])]
    heat = tifffile.imread(out / "heatmaps" / "s.tif")
    merged = np.max([p.heatmaps * (p.scores > 0)[:, None, None] for p in per_class], 0)
    np.testing.assert_allclose(heat, merged, atol=HEAT_ATOL)
    check_coco(out / "coco.json", 4)  # one COCO image per frame, however many classes


def test_chest_xray_palette_pngs_with_lung_masks_by_pattern(tmp_path):
    out = tmp_path / "out"
    code = main(["batch", str(DATA / "images"), "--out", str(out), "--quiet",
                 "--mask", "{dir}/../lung-masks/{name}", "--threshold", "otsu",
                 "--min-area", "4"])
    assert code == 0
    rows = summary(out)
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    assert sum(int(r["regions"]) for r in rows) >= 5
    from napari_gradcam.regions import rasterize

    for png in sorted((DATA / "images").glob("*.png")):
        lungs = iio.imread(DATA / "lung-masks" / png.name) > 0
        heat = tifffile.imread(out / "heatmaps" / f"{png.stem}.tif")
        assert heat.shape == (512, 512)
        annotations, _ = ng.read_geojson(out / "geojson" / f"{png.stem}.geojson")
        for a in annotations:
            if a.kind == "polygon":
                assert not (rasterize(a.geometry, lungs.shape) & ~lungs).any()
    check_coco(out / "coco.json", 5)
    # a mask pattern that finds nothing fails those images with a sentence, not the run
    out2 = tmp_path / "out2"
    assert main(["batch", str(DATA / "images" / "CHNCXR_0007_0.png"), "--out", str(out2),
                 "--quiet", "--mask", "{dir}/nowhere/{name}"]) == 1
    assert "mask" in summary(out2)[0]["message"] and "does not exist" in summary(out2)[0][
        "message"]


def test_zarr_array_in_parts(tmp_path):
    zarr = pytest.importorskip("zarr")
    stack, _, _ = make_stack(7, 96, seed=5)
    z = zarr.open(str(tmp_path / "movie.zarr"), mode="w", shape=stack.shape,
                  chunks=(1, 96, 96), dtype="f4")
    z[:] = stack
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "movie.zarr"), "--out", str(out), "--quiet",
                 "--part-size", "3", "--batch-size", "2"]) == 0
    heat = zarr.open(str(out / "heatmaps" / "movie.zarr"), mode="r")[:]
    ref = ng.explain(stack, ng.load_model("demo"), device="auto")
    np.testing.assert_allclose(heat, ref.heatmaps, atol=HEAT_ATOL)
    parts = sorted(p.name for p in (out / "geojson").glob("*.geojson"))
    assert parts == ["movie_000000-000003.geojson", "movie_000003-000006.geojson",
                     "movie_000006-000007.geojson"]
    rows = summary(out)
    assert [r["index"] for r in rows] == [str(i) for i in range(7)]
    coco = check_coco(out / "coco.json", 7)
    assert sorted(im["file_name"] for im in coco.imgs.values())[0] == "movie_0.png"


def test_long_tiff_stacks_and_nd_zarr_are_read_in_parts(tmp_path):
    zarr = pytest.importorskip("zarr")
    stack, _, _ = make_stack(7, 96, seed=6)
    u16 = (stack * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "long.tif", u16, photometric="minisblack")
    tz = make_stack(6, 96, seed=7)[0].reshape(3, 2, 96, 96)
    z = zarr.open(str(tmp_path / "tz.zarr"), mode="w", shape=tz.shape, chunks=(1, 1, 96, 96),
                  dtype="f4")
    z[:] = tz
    single = make_image(96, seed=3).image
    zarr.open(str(tmp_path / "one.zarr"), mode="w", shape=single.shape, dtype="f4")[:] = single
    units = collect_units([tmp_path / "long.tif", tmp_path / "tz.zarr", tmp_path / "one.zarr"],
                          part_size=2)
    assert [(u.name, u.kind, u.start, u.stop) for u in units] == [
        ("long", "parts", 0, 2), ("long", "parts", 2, 4), ("long", "parts", 4, 6),
        ("long", "parts", 6, 7), ("tz", "parts", 0, 2), ("tz", "parts", 2, 3),
        ("one", "parts", 0, 1)]
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "long.tif"), str(tmp_path / "tz.zarr"),
                 str(tmp_path / "one.zarr"), "--out", str(out), "--quiet",
                 "--part-size", "2"]) == 0
    spec = ng.load_model("demo")
    for name, data in (("long", u16), ("tz", tz), ("one", single)):
        heat = zarr.open(str(out / "heatmaps" / f"{name}.zarr"), mode="r")[:]
        np.testing.assert_allclose(heat, ng.explain(data, spec, device="auto").heatmaps,
                                   atol=HEAT_ATOL)
    rows = summary(out)
    assert [r["index"] for r in rows if "tz" in r["file"]] == [
        "0 0", "0 1", "1 0", "1 1", "2 0", "2 1"]
    check_coco(out / "coco.json", 7 + 6 + 1)
    # a short TIFF stack stays one unit with a TIFF heatmap
    assert [u.kind for u in collect_units([tmp_path / "long.tif"])] == ["file"]


def test_a_bad_file_is_reported_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        iio.imwrite(folder / f"img{k}.png",
                    (make_image(128, seed=k).image * 255).astype(np.uint8))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "empty.tif").write_bytes(b"")
    tifffile.imwrite(folder / "colour.tif", np.random.default_rng(0).integers(
        0, 255, (96, 96, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), "--quiet"]) == 1
    rows = {Path(r["file"]).name: r for r in summary(out)}
    assert {n for n, r in rows.items() if r["status"] == "ok"} == {"img0.png", "img1.png",
                                                                   "img2.png"}
    assert "can't read it as an image" in rows["corrupt.png"]["message"]
    assert "can't read it" in rows["empty.tif"]["message"]
    assert "colour RGB" in rows["colour.tif"]["message"]
    check_coco(out / "coco.json", 3)


def _copy_tree_text(out: Path) -> dict:
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and rel.parts[0] != ".napari-gradcam":
            files[str(rel)] = p.read_bytes()
    return files


def _holder(out: Path) -> int | None:
    """The pid written in the output folder's lock file (while a run holds it)."""
    try:
        return json.loads((out / ".napari-gradcam" / "lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def _files(root: Path, skip=()) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def test_resume_after_a_killed_run_gives_the_same_outputs(tmp_path, capsys):
    """Killed, resumed, run alongside another run, rerun with other settings and with a
    same-named input from another folder: the folder ends as a clean run leaves it."""
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(20):
        iio.imwrite(folder / f"img{k:02d}.png",
                    (make_image(96, seed=100 + k).image * 255).astype(np.uint8))
    from conftest import sleepy_cnn
    from safetensors.torch import save_file

    save_file(sleepy_cnn(in_ch=1, classes=3).state_dict(), str(tmp_path / "slow.safetensors"))
    (tmp_path / "slow.safetensors.json").write_text(json.dumps({
        "architecture": "conftest:sleepy_cnn", "arguments": {"delay": 0.15},
        "class_names": ["disc", "square", "triangle"]}))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    args = ["batch", str(folder), "--model", str(tmp_path / "slow.safetensors"), "--trust-code",
            "--batch-size", "1", "--quiet"]
    cmd = [sys.executable, "-m", "napari_gradcam", *args]
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    records = out / ".napari-gradcam" / "records"
    deadline = time.time() + 120
    while time.time() < deadline and (not records.is_dir() or len(list(records.glob(
            "*.json"))) < 4):
        time.sleep(0.05)
    # a second run into the folder while the first writes: stopped at once, naming the first
    assert main(args + ["--out", str(out)]) == 2
    assert f"in use by another napari-gradcam run (process {proc.pid} on " in \
        capsys.readouterr().err
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(records.glob("*.json")))
    assert 4 <= done_before < 20, "the run was not interrupted in the middle"
    assert not (out / "summary.csv").exists()
    # the rerun does only what is missing; a run started meanwhile is refused, the rerun
    # completes undisturbed
    rerun = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    while rerun.poll() is None and _holder(out) != rerun.pid:
        time.sleep(0.01)
    assert _holder(out) == rerun.pid, "the rerun finished before the second run could start"
    assert main(args + ["--out", str(out)]) == 2
    assert f"(process {rerun.pid} on " in capsys.readouterr().err
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert not [p for p in out.rglob(".*.tmp*")]
    clean = tmp_path / "clean"
    assert main(args + ["--out", str(clean)]) == 0
    assert _copy_tree_text(out) == _copy_tree_text(clean)
    # a third run has nothing to do: no unit's files or record is written again
    written = _files(out, skip=("summary.csv", "coco.json", "lock"))
    assert main(args + ["--out", str(out)]) == 0
    assert _files(out, skip=("summary.csv", "coco.json", "lock")) == written
    # other settings: refused before anything runs or changes
    before = _files(out, skip=("lock",))
    assert main(args + ["--out", str(out), "--threshold", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--threshold 0.5 -> 0.3" in err and "--overwrite" in err
    assert _files(out, skip=("lock",)) == before
    # a same-named input from another folder is an input of its own, not one already done
    kept = {k: v for k, v in written.items() if not k.endswith("names.json")}
    other = tmp_path / "other" / "img00.png"
    other.parent.mkdir()
    iio.imwrite(other, (make_image(96, seed=7).image * 255).astype(np.uint8))
    assert main([*args[:1], str(other), *args[2:], "--out", str(out)]) == 0
    assert [r["file"] for r in summary(out)] == [str(other)]
    assert (out / "heatmaps" / "img00-2.tif").is_file()
    assert _files(out, skip=("summary.csv", "coco.json", "lock", "names.json")) == {
        **kept, **{k: v for k, v in _files(out).items() if "img00-2" in k}}
    # and the folder's own inputs still find their records
    assert main(args + ["--out", str(out)]) == 0
    assert _files(out, skip=("summary.csv", "coco.json", "lock", "names.json")) == {
        **kept, **{k: v for k, v in _files(out).items() if "img00-2" in k}}
    assert len(summary(out)) == 20


def test_dask_cluster_gives_the_single_process_results_with_one_model_per_worker(tmp_path):
    distributed = pytest.importorskip("distributed")
    from napari_gradcam.batch import cluster

    def model_loads():  # runs on each worker: how often that process loaded a model
        import importlib

        return importlib.import_module("napari_gradcam.batch.cluster").MODEL_LOADS

    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(6):
        iio.imwrite(folder / f"img{k}.png",
                    (make_image(128, seed=200 + k).image * 255).astype(np.uint8))
    stack, _, _ = make_stack(4, 96, seed=9)
    tifffile.imwrite(folder / "stack.tif", stack, photometric="minisblack")
    units = collect_units([folder])
    spec = ng.load_model("demo")
    opts = Options(device="cpu")
    single = tmp_path / "single"
    write_summary(process_units(units, spec, single, opts), single, spec.class_names)

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as lc, \
            distributed.Client(lc) as client:
        out = tmp_path / "dask"
        records = cluster.process_on_cluster(client, units, {"source": "demo"}, out, opts)
        write_summary(records, out, spec.class_names)
        loads = client.run(model_loads)
        assert all(v <= 1 for v in loads.values()) and sum(loads.values()) >= 1
        # the CLI on the same cluster
        cli_out = tmp_path / "cli"
        assert main(["batch", str(folder), "--out", str(cli_out), "--quiet",
                     "--device", "cpu", "--dask-scheduler", lc.scheduler_address]) == 0
        loads = client.run(model_loads)
        assert all(v <= 1 for v in loads.values())  # reused by the second job
    def rows(folder, approx=False):  # workers gather other batches: float32 rounding
        return [{**r, "score": pytest.approx(float(r["score"]), rel=1e-4) if approx
                 else float(r["score"])} for r in summary(folder)]

    for other in (out, cli_out):
        assert rows(other) == rows(single, approx=True)
        for tif in (single / "heatmaps").glob("*.tif"):
            np.testing.assert_allclose(tifffile.imread(other / "heatmaps" / tif.name),
                                       tifffile.imread(tif), atol=1e-5)
        for geo in (single / "geojson").glob("*.geojson"):
            a, _ = ng.read_geojson(geo)
            b, _ = ng.read_geojson(other / "geojson" / geo.name)
            assert [x.properties["class"] for x in a] == [x.properties["class"] for x in b]


def test_demo_headless_writes_the_main_job(tmp_path, capsys):
    assert main(["demo", "--headless", str(tmp_path / "demo")]) == 0
    out = tmp_path / "demo"
    assert (out / "heatmaps" / "synthetic-shapes.tif").is_file()
    assert (out / "overlays" / "synthetic-shapes.png").is_file()
    check_geojson(out / "geojson" / "synthetic-shapes.geojson", planes=False)
    check_coco(out / "coco.json", 1)
    rows = summary(out)  # like the window: every class the model finds, a row each
    assert [r["class"] for r in rows] == ["disc", "square", "triangle"]
    assert all(r["status"] == "ok" and int(r["regions"]) == 1 for r in rows)
    item = make_image(256, seed=6, classes=[0, 1, 2])
    annotations, _ = ng.read_geojson(out / "geojson" / "synthetic-shapes.geojson")
    for o in item.objects:  # each object boxed in its own class
        boxes = [a.geometry.bounds for a in annotations
                 if a.kind == "rectangle" and a.properties["class"] == o.class_name]
        r0, c0, r1, c1 = o.box
        assert any(abs(b[0] - c0) <= 3 and abs(b[1] - r0) <= 3 and abs(b[2] - c1) <= 3
                   and abs(b[3] - r1) <= 3 for b in boxes)
    assert "1 image from 1 input written" in capsys.readouterr().out


def test_inputs_and_options_that_make_no_sense(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["batch", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["batch", str(DATA / "images"), "--out", str(tmp_path / "o"),
                 "--target", "zebra"]) == 2
    assert "no class 'zebra'" in capsys.readouterr().err
    assert main(["batch", str(DATA / "images"), "--out", str(tmp_path / "o"),
                 "--threshold", "high"]) == 2
    assert "--threshold 'high'" in capsys.readouterr().err


def test_an_output_folder_inside_the_input_folder_is_not_read_back(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(2):
        iio.imwrite(folder / f"img{k}.png", (make_image(96, seed=k).image * 255).astype(np.uint8))
    out = folder / "results"
    for _ in range(2):  # the second run would find the overlays if it looked inside
        assert main(["batch", str(folder), "--out", str(out), "--quiet", "--overlay"]) == 0
        assert [r["file"] for r in summary(out)] == [str(folder / "img0.png"),
                                                     str(folder / "img1.png")]


def test_a_folder_of_single_images_is_batched_with_the_automatic_batch_size(tmp_path,
                                                                          monkeypatch):
    """The automatic batch size is chosen from the first input; sized for that one image it
    would run a folder one image per forward pass."""
    import napari_gradcam.models as models

    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(6):
        iio.imwrite(folder / f"img{k}.png", (make_image(96, seed=k).image * 255).astype(np.uint8))
    forwards, load = [], models.load_model

    def counted(*args, **kwargs):
        spec = load(*args, **kwargs)
        spec.module.register_forward_pre_hook(lambda _m, args: forwards.append(len(args[0])))
        return spec

    monkeypatch.setattr(models, "load_model", counted)
    assert main(["batch", str(folder), "--out", str(tmp_path / "out"), "--quiet",
                 "--device", "cpu"]) == 0
    assert sum(forwards) == 6 and len(forwards) < 6, forwards


def test_every_class_found_costs_one_forward_per_batch(tmp_path, monkeypatch):
    """``--target found`` explains all three classes of a batch from one forward pass, and
    writes what explaining each class on its own gives."""
    import napari_gradcam.models as models
    from napari_gradcam.job import ExplainJob

    stack, _, _ = make_stack(4, 96, seed=12)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    singles = [make_image(96, seed=s, classes=[0, 1, 2]).image for s in (6, 7)]
    for name, image in zip("ab", singles):
        tifffile.imwrite(tmp_path / f"{name}.tif", image)
    forwards, load = [], models.load_model

    def counted(*args, **kwargs):
        spec = load(*args, **kwargs)
        spec.module.register_forward_pre_hook(lambda *_: forwards.append(1))
        return spec

    monkeypatch.setattr(models, "load_model", counted)
    out = tmp_path / "out"
    assert main(["batch", *(str(tmp_path / f) for f in ("a.tif", "b.tif", "s.tif")), "--out",
                 str(out), "--quiet", "--device", "cpu", "--batch-size", "4",
                 "--target", "found"]) == 0
    # a.tif and b.tif gathered into one batch, the 4-frame stack its own: two forwards, where
    # one per class would be six (the demo model names its target layer: no probe forward)
    assert len(forwards) == 2
    monkeypatch.undo()

    spec = ng.load_model("demo")
    rows = summary(out)
    for name, images in [("a", singles[0]), ("b", singles[1]), ("s", stack)]:
        per_class = [ExplainJob(spec, "gradcam", k, device="cpu").run(images)
                     for k in range(3)]
        kept = np.stack([r.scores[..., 0] > 0 for r in per_class], -1)
        maps = np.stack([r.heatmaps["gradcam"] for r in per_class], -1)
        shown = (maps * kept[..., None, None, :]).max(-1)
        np.testing.assert_allclose(tifffile.imread(out / "heatmaps" / f"{name}.tif"), shown,
                                   atol=1e-5)
        source = str(tmp_path / f"{name}.tif")
        for idx in np.ndindex(*kept.shape[:-1]):
            index = " ".join(map(str, idx))
            got = [(r["class"], float(r["score"]), int(r["regions"])) for r in rows
                   if r["file"] == source and r["index"] == index]
            want = [(spec.class_names[k], float(per_class[k].scores[idx][0]),
                     sum(1 for g in per_class[k].regions if g.index == idx))
                    for k in range(3) if kept[idx][k]]
            assert [g[0] for g in got] == [w[0] for w in want] and want, (name, idx)
            assert [g[2] for g in got] == [w[2] for w in want], (name, idx)
            np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-5)


def test_every_class_found_with_a_model_without_class_names(tmp_path):
    """A model that names no classes still explains every class found; rows carry the ids."""
    import torch
    from conftest import small_cnn

    net = small_cnn(in_ch=1, classes=3)
    with torch.no_grad():  # logits (1, 1, -1) whatever the image: classes 0 and 1 are found
        net[-1].weight.zero_()
        net[-1].bias.copy_(torch.tensor([1.0, 1.0, -1.0]))
    spec = ng.ModelSpec(net, [], in_channels=1)
    tifffile.imwrite(tmp_path / "a.tif", make_image(96, seed=3).image)
    out = tmp_path / "out"
    records = process_units(collect_units([tmp_path / "a.tif"]), spec, out,
                            Options(device="cpu", target="found"))
    write_summary(records, out, spec.class_names)
    assert [r.status for r in records] == ["ok"]
    assert [(img["class"], img["class_id"]) for img in records[0].images] == [("0", 0),
                                                                              ("1", 1)]
    assert [(r["class"], r["score"]) for r in summary(out)] == [("0", "1"), ("1", "1")]
