"""A batch run never mixes up inputs, settings or runs: resume keyed by source, other settings
refused, one run per output folder, outputs never read back, clear refusals for an --out that
can't be used, and Ctrl-C that leaves a resumable folder. Every refusal leaves the output folder
as it was."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_gradcam.batch import claim_output, collect_units, held_run, run_settings
from napari_gradcam.cli import main
from napari_gradcam.job import ExplainJob
from napari_gradcam.models.demo.synthetic import make_image

iio = pytest.importorskip("imageio.v3")
tifffile = pytest.importorskip("tifffile")

LOCK = Path(".napari-gradcam") / "lock"  # rewritten by every run that gets the folder


def png(path: Path, seed: int, size: int = 96) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, (make_image(size, seed=seed).image * 255).astype(np.uint8))
    return path


def tree(root: Path, skip=(LOCK,)) -> dict:
    """Every file below ``root`` with its size and mtime: what a refusal must not change."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root) not in skip}


def summary(out: Path) -> list[dict]:
    import csv

    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def batch(*args, out: Path, extra=()) -> int:
    return main(["batch", *map(str, args), "--out", str(out), "--quiet", *extra])


# ---- resume keyed by source ------------------------------------------------------------------

def test_same_named_inputs_from_two_folders_keep_their_own_outputs(tmp_path, capsys):
    a1, a2 = png(tmp_path / "d1" / "a.png", 1), png(tmp_path / "d2" / "a.png", 2)
    out = tmp_path / "out"
    assert batch(a1, out=out) == 0
    first = tree(out)
    assert batch(a2, out=out) == 0  # processed under its own name, not skipped as "a"
    assert [r["file"] for r in summary(out)] == [str(a2)]
    assert (out / "heatmaps" / "a-2.tif").is_file()
    after = tree(out)
    for name, stat in first.items():  # d1's outputs and record untouched
        if Path(name).name not in ("summary.csv", "coco.json", "names.json"):
            assert after[name] == stat, name
    heat1 = tifffile.imread(out / "heatmaps" / "a.tif")
    heat2 = tifffile.imread(out / "heatmaps" / "a-2.tif")
    assert not np.array_equal(heat1, heat2)
    # reruns of either, and of both together, find their own records: nothing is redone
    done = tree(out, skip=(LOCK, Path("summary.csv"), Path("coco.json")))
    for inputs in ([a1], [a2], [a2, a1]):
        assert batch(*inputs, out=out) == 0
        assert tree(out, skip=(LOCK, Path("summary.csv"), Path("coco.json"))) == done
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == ["a-2.png", "a.png"]
    assert [r["file"] for r in summary(out)] == [str(a2), str(a1)]
    capsys.readouterr()


def test_names_are_decided_by_the_output_folder_whatever_the_order(tmp_path):
    a1, a2 = png(tmp_path / "d1" / "a.png", 1), png(tmp_path / "d2" / "a.png", 2)
    units = collect_units([a2, a1])  # in one run: distinct names, in the order given
    assert [u.name for u in units] == ["a", "a-2"]
    claims = {"a": str(a1.resolve())}  # but a folder where d1/a.png already is "a"
    assert [u.name for u in collect_units([a2, a1], claims=claims)] == ["a-2", "a"]
    # the same file twice (a folder and a file in it) is one unit
    assert [u.path for u in collect_units([tmp_path / "d1", a1])] == [str(a1)]
    # names differing only in case are told apart (case-insensitive file systems)
    b = png(tmp_path / "d3" / "A.png", 3)
    assert [u.name for u in collect_units([a1, b])] == ["a", "A-2"]


def test_a_changed_source_is_redone_an_unchanged_one_is_not(tmp_path):
    a, b = png(tmp_path / "in" / "a.png", 1), png(tmp_path / "in" / "b.png", 2)
    out = tmp_path / "out"
    assert batch(tmp_path / "in", out=out) == 0
    before = tree(out)
    png(a, 5)  # new contents (and size / mtime) under the same path
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert batch(tmp_path / "in", out=out) == 0
    after = tree(out)
    assert after["heatmaps/a.tif"] != before["heatmaps/a.tif"]
    assert after["heatmaps/b.tif"] == before["heatmaps/b.tif"]
    assert after[".napari-gradcam/records/b.json"] == before[".napari-gradcam/records/b.json"]
    del b


def test_coco_file_names_are_unique_and_keep_the_real_extension(tmp_path):
    t1 = tmp_path / "d1" / "a.tif"
    t1.parent.mkdir()
    tifffile.imwrite(t1, (make_image(96, seed=1).image * 255).astype(np.uint8))
    t2 = tmp_path / "d2" / "a.tif"
    t2.parent.mkdir()
    tifffile.imwrite(t2, (make_image(96, seed=2).image * 255).astype(np.uint8))
    stack = np.stack([make_image(96, seed=s).image for s in (3, 4)])
    (tmp_path / "d3").mkdir()
    tifffile.imwrite(tmp_path / "d3" / "s.tif", (stack * 255).astype(np.uint8),
                     photometric="minisblack")
    s0 = tmp_path / "d3" / "s_0.tif"  # named like the stack's first image
    tifffile.imwrite(s0, (make_image(96, seed=5).image * 255).astype(np.uint8))
    out = tmp_path / "out"
    assert batch(t1, t2, tmp_path / "d3", out=out) == 0
    coco = json.loads((out / "coco.json").read_text())
    names = [im["file_name"] for im in coco["images"]]
    assert len(set(names)) == len(names) == 5
    assert sorted(names) == ["a-2.tif", "a.tif", "s_0-2.tif", "s_0.tif", "s_1.tif"]
    assert {r["file"] for r in summary(out)} == {str(t1), str(t2), str(tmp_path / "d3" / "s.tif"),
                                                 str(s0)}


# ---- settings ----------------------------------------------------------------------------------

def test_other_settings_are_refused_naming_each_difference(tmp_path, capsys, monkeypatch):
    a = png(tmp_path / "in" / "a.png", 1)
    out = tmp_path / "out"
    assert batch(a, out=out) == 0
    capsys.readouterr()
    before = tree(out)

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(ExplainJob, "explain", no_model)
    for extra, said in [
        (["--method", "gradcam++"], ["--method gradcam -> gradcam++"]),
        (["--threshold", "0.3", "--min-area", "4"],
         ["--threshold 0.5 -> 0.3", "--min-area 16 -> 4"]),
        (["--target", "disc", "--overlay"], ["--target none -> disc", "--overlay false -> true"]),
        (["--mask", "{dir}/{stem}.mask.png"], ["--mask none -> {dir}/{stem}.mask.png"]),
        (["--simplify", "0", "--threshold-mode", "relative"],
         ["--simplify 1.0 -> 0.0", "--threshold-mode absolute -> relative"]),
    ]:
        assert batch(a, out=out, extra=extra) == 2, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        for text in said:
            assert text in err, (text, err)
        assert "--overwrite" in err and "new --out" in err
        assert tree(out) == before  # nothing touched, not even the lock
    monkeypatch.undo()
    # --overwrite redoes everything with the new settings, which then hold
    assert batch(a, out=out, extra=["--method", "gradcam++", "--overwrite"]) == 0
    after = tree(out)
    assert after["heatmaps/a.tif"] != before["heatmaps/a.tif"]
    run = json.loads((out / ".napari-gradcam" / "run.json").read_text())
    assert run["settings"]["method"] == "gradcam++"
    assert batch(a, out=out) == 2  # now the old settings are the other ones
    assert "--method gradcam++ -> gradcam" in capsys.readouterr().err


def test_another_model_file_is_refused_even_under_the_same_path(tmp_path, capsys):
    from conftest import small_cnn
    from safetensors.torch import save_file

    a = png(tmp_path / "in" / "a.png", 1)
    model = tmp_path / "m.safetensors"
    save_file(small_cnn(in_ch=1, classes=3).state_dict(), str(model))
    sidecar = {"architecture": "conftest:small_cnn", "class_names": ["x", "y", "z"]}
    (tmp_path / "m.safetensors.json").write_text(json.dumps(sidecar))
    out = tmp_path / "out"
    flags = ["--model", str(model), "--trust-code"]
    assert batch(a, out=out, extra=flags) == 0
    # the same files under another path are the same model
    other = tmp_path / "copy"
    other.mkdir()
    (other / "m.safetensors").write_bytes(model.read_bytes())
    (other / "m.safetensors.json").write_text(json.dumps(sidecar))
    before = tree(out)
    assert batch(a, out=out, extra=["--model", str(other / "m.safetensors"), "--trust-code"]) == 0
    assert tree(out, skip=(LOCK, Path("summary.csv"), Path("coco.json"))) == {
        k: v for k, v in before.items() if k not in ("summary.csv", "coco.json")}
    capsys.readouterr()
    # new weights, or a new sidecar, under the same path: refused, naming the model
    import torch

    torch.manual_seed(1)
    save_file(small_cnn(in_ch=1, classes=3).state_dict(), str(model))
    before = tree(out)
    assert batch(a, out=out, extra=flags) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "sha256" in err and "--overwrite" in err
    assert tree(out) == before
    (other / "m.safetensors.json").write_text(json.dumps({**sidecar, "class_names": ["p", "q",
                                                                                     "r"]}))
    assert batch(a, out=out, extra=["--model", str(other / "m.safetensors"), "--trust-code"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "class_names" in err
    # the sidecar itself as --model, naming its weights: fingerprinted through them
    described = tmp_path / "described"
    described.mkdir()
    (described / "w.safetensors").write_bytes(model.read_bytes())
    (described / "model.json").write_text(json.dumps({**sidecar, "weights": "w.safetensors"}))
    json_flags = ["--model", str(described / "model.json"), "--trust-code"]
    assert batch(a, out=tmp_path / "out2", extra=json_flags) == 0
    torch.manual_seed(2)
    save_file(small_cnn(in_ch=1, classes=3).state_dict(), str(described / "w.safetensors"))
    assert batch(a, out=tmp_path / "out2", extra=json_flags) == 2
    assert "sha256" in capsys.readouterr().err


def test_settings_fingerprint_leaves_out_what_does_not_change_results():
    import napari_gradcam as ng
    from napari_gradcam.batch import Options

    spec = ng.load_model("demo")
    base = run_settings(Options(), {"source": "demo"}, spec)
    same = run_settings(Options(device="cpu", batch_size=3, workers=5, prefetch=1),
                        {"source": "demo", "trust_code": True}, spec)
    assert base == same
    assert run_settings(Options(), spec, spec)["model"]["sha256"] != base["model"]["sha256"]
    json.dumps(base, allow_nan=False)  # plain JSON


# ---- one run per output folder -----------------------------------------------------------------

HOLD = """
import json, sys, time
from napari_gradcam.batch import claim_output
with claim_output(sys.argv[1], json.loads(sys.argv[2])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_a_held_folder_stops_at_once_naming_the_holder(tmp_path, capsys):
    a = png(tmp_path / "in" / "a.png", 1)
    out = tmp_path / "out"
    assert batch(a, out=out) == 0
    capsys.readouterr()
    settings = json.loads((out / ".napari-gradcam" / "run.json").read_text())["settings"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), json.dumps(settings)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # the holder's temporary files, and a user's own files in the folder
        (out / "heatmaps" / ".a.k3j_x9q2.tmp.tif").write_bytes(b"half")
        (out / "mine.tmp").write_text("keep")
        (out / ".notes.k3j_x9q2.tmp").write_text("keep: not named as one of our outputs")
        before = tree(out)
        t0 = time.perf_counter()
        assert batch(a, out=out, extra=["--overwrite"]) == 2
        assert time.perf_counter() - t0 < 30
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert "in use by another napari-gradcam run" in err
        assert f"process {holder.pid} on " in err and "started 20" in err
        assert tree(out) == before  # its temp files are not deleted, nothing is written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed: the system released its lock): the folder is usable again,
    # and the next run deletes the stale temp file named as ours, and only that one
    assert batch(a, out=out) == 0
    assert not (out / "heatmaps" / ".a.k3j_x9q2.tmp.tif").exists()
    assert (out / "mine.tmp").read_text() == "keep"
    assert (out / ".notes.k3j_x9q2.tmp").exists()


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with claim_output(out, {"method": "x"}):
            with pytest.raises(ValueError, match="already being written by this process"):
                with claim_output(out, {"method": "x"}):
                    pass
            raise RuntimeError("boom")
    with claim_output(out, {"method": "x"}) as run:  # free again
        assert run.out == out
    assert held_run(out) is None


# ---- the output folder itself ----------------------------------------------------------------

def test_an_output_folder_that_is_a_file_or_unwritable_is_refused_untouched(tmp_path, capsys):
    a = png(tmp_path / "in" / "a.png", 1)
    afile = tmp_path / "results"
    afile.write_text("not a folder")
    before = tree(tmp_path)
    for out, said in [(afile, "is a file, not a folder"),
                      (afile / "sub", "can't be created"),
                      (tmp_path / "in" / "a.png", "is a file")]:
        assert batch(a, out=out) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and said in err and "--out" in err, err
        assert tree(tmp_path) == before
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) can write into a 0500 folder")
        assert batch(a, out=locked / "out") == 2
        err = capsys.readouterr().err
        assert "not writable" in err and len(err.strip().splitlines()) == 1
        assert not (locked / "out").exists()
    finally:
        locked.chmod(0o700)


def test_inputs_inside_the_output_folder_are_refused(tmp_path, capsys):
    folder = tmp_path / "data"
    png(folder / "a.png", 1)
    before = tree(tmp_path)
    assert batch(folder, out=folder) == 2  # its heatmaps/ and overlays/ would be inputs next
    assert "read back as inputs" in capsys.readouterr().err
    assert batch(folder, out=tmp_path) == 2
    assert "lies inside --out" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_an_output_folder_inside_the_input_folder_is_never_read_back(tmp_path):
    folder = tmp_path / "data"
    for k in range(2):
        png(folder / f"img{k}.png", k)
    tifffile.imwrite(folder / "stack.tif", np.stack([make_image(96, seed=s).image
                                                     for s in (7, 8)]).astype(np.float32))
    inputs = tree(folder)
    out = folder / "results"
    for _ in range(2):  # the second run would find heatmaps (TIFF) and overlays if it looked
        assert batch(folder, out=out, extra=["--overlay"]) == 0
        assert sorted({r["file"] for r in summary(out)}) == [
            str(folder / "img0.png"), str(folder / "img1.png"), str(folder / "stack.tif")]
        assert [u.path for u in collect_units([folder], exclude=out)] == [
            str(folder / "img0.png"), str(folder / "img1.png"), str(folder / "stack.tif")]
    assert {k: v for k, v in tree(folder).items() if not k.startswith("results")} == inputs


# ---- Ctrl-C ------------------------------------------------------------------------------------

def slow_model(tmp_path: Path, delay: float = 0.15) -> Path:
    from conftest import sleepy_cnn
    from safetensors.torch import save_file

    path = tmp_path / "slow.safetensors"
    save_file(sleepy_cnn(in_ch=1, classes=3).state_dict(), str(path))
    (tmp_path / "slow.safetensors.json").write_text(json.dumps({
        "architecture": "conftest:sleepy_cnn", "arguments": {"delay": delay},
        "class_names": ["disc", "square", "triangle"]}))
    return path


def test_ctrl_c_says_what_finished_in_one_line_and_the_same_command_resumes(tmp_path):
    folder = tmp_path / "in"
    for k in range(16):
        png(folder / f"img{k:02d}.png", 300 + k)
    cmd = [sys.executable, "-m", "napari_gradcam", "batch", str(folder), "--model",
           str(slow_model(tmp_path)), "--trust-code", "--batch-size", "1", "--quiet",
           "--out", str(tmp_path / "out")]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    records = tmp_path / "out" / ".napari-gradcam" / "records"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(records.glob("*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and lines[0].endswith("rerun the same command to resume."), err
    n = int(lines[0].split("interrupted: ")[1].split(" of ")[0])
    assert " of 16 inputs finished" in lines[0]
    done = [json.loads(p.read_text()) for p in records.glob("*.json")]
    assert n == sum(r["status"] == "ok" for r in done) and 3 <= n < 16
    out = tmp_path / "out"
    assert not list(out.rglob(".*.tmp*"))  # nothing half-written
    assert not (out / "summary.csv").exists()
    with claim_output(out, json.loads((out / ".napari-gradcam" / "run.json").read_text())[
            "settings"]):
        pass  # the lock was released
    finished = tree(records)
    assert main(cmd[3:]) == 0  # the same command, resumed
    assert len(summary(out)) == 16
    assert {k: v for k, v in tree(records).items() if k in finished} == finished
