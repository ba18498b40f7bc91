"""Model files written by someone else: nothing in them runs unless the user trusts them, every
sidecar value is checked when the model loads, and unreadable files are named for what they are.
All files are crafted here, in tmp_path."""

import io
import json
import math
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import small_cnn

import napari_gradcam as ng
from napari_gradcam.models.loader import read_sidecar, read_weights

TRUST = r"trust_code=True.*--trust-code.*'trust code in model files'"


class Payload:
    """Unpickling this creates ``marker``: code execution in its smallest form."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def weights(tmp_path: Path, name="w.pt") -> Path:
    path = tmp_path / name
    torch.save(small_cnn().state_dict(), path)
    return path


# ---- a sidecar may not name code -----------------------------------------------------------

@pytest.mark.parametrize("where", ["beside", "model.json", "opened"])
def test_a_sidecar_naming_a_callable_runs_nothing(where, tmp_path):
    marker = tmp_path / "marker"
    path = weights(tmp_path)
    meta = {"architecture": "subprocess:run", "arguments": {"args": ["touch", str(marker)]}}
    sidecar = tmp_path / ("w.pt.json" if where == "beside" else "model.json")
    sidecar.write_text(json.dumps(dict(meta, weights="w.pt") if where == "opened" else meta))
    source = sidecar if where == "opened" else path
    with pytest.raises(ValueError, match=f"'subprocess:run'.*{TRUST}"):
        ng.load_model(source)
    assert not marker.exists()


def test_a_trusted_sidecar_may_name_a_factory_and_the_user_may_type_one(tmp_path):
    path = weights(tmp_path)
    (tmp_path / "w.pt.json").write_text(json.dumps({"architecture": "conftest:small_cnn"}))
    with pytest.raises(ValueError, match=TRUST):
        ng.load_model(path)
    assert ng.load_model(path, trust_code=True).in_channels == 1
    (tmp_path / "w.pt.json").unlink()
    assert len(ng.load_model("conftest:small_cnn", weights=path).class_names) == 3


def test_sidecar_arguments_may_not_load_other_files_and_must_be_an_object(tmp_path):
    marker = tmp_path / "evil.pt"
    torch.save({"x": Payload(tmp_path / "marker")}, marker)
    path = weights(tmp_path)
    side = tmp_path / "w.pt.json"
    side.write_text(json.dumps({"architecture": "timm:resnet10t",
                                "arguments": {"checkpoint_path": str(marker)}}))
    with pytest.raises(ValueError, match=f"'checkpoint_path'.*another file.*{TRUST}"):
        ng.load_model(path)
    assert not (tmp_path / "marker").exists()
    for bad in ([1, 2], "num_classes=2", {"a": float("nan")}, {"a": {"b": [[[[[[[[[1]]]]]]]]]}}):
        side.write_text(json.dumps({"architecture": "resnet18", "arguments": bad}))
        with pytest.raises(ValueError, match="w.pt.json.*: arguments must"):
            ng.load_model(path)


def test_trust_pickle_and_trust_code_conflict(tmp_path):
    with pytest.raises(TypeError, match="give only trust_code"):
        read_weights(weights(tmp_path), trust_code=True, trust_pickle=False)


# ---- .pt2 archives ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(small_cnn(), (torch.randn(2, 1, 16, 16),),
                                  dynamic_shapes={"input": {0: batch}})
    torch.export.save(program, str(path))
    return path


def rewrite(src: Path, dst: Path, change) -> Path:
    """Copy the archive, ``change(record, bytes) -> bytes | None`` per member (None drops it);
    ``change(None, None)`` may return extra {record: bytes}."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            record = info.filename.split("/", 1)[1]
            data = change(record, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
        for record, data in (change(None, None) or {}).items():
            zout.writestr(f"{root}/{record}", data)
    return dst


def test_a_normal_export_loads(exported):
    spec = ng.load_model(exported)
    assert spec.in_channels == 1 and spec.input_size == (16, 16)


def test_a_pickled_weight_payload_runs_nothing_unless_trusted(exported, tmp_path):
    marker = tmp_path / "marker"

    def change(record, data):
        if record is None:
            return None
        if record == "data/weights/model_weights_config.json":
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config)
        if record == "data/weights/weight_0":
            buffer = io.BytesIO()
            torch.save(Payload(marker), buffer)
            return buffer.getvalue()
        return data

    path = rewrite(exported, tmp_path / "evil.pt2", change)
    with pytest.raises(ValueError, match=f"use_pickle.*{TRUST}"):
        ng.load_model(path)
    assert not marker.exists()
    # the payload is real: torch.export.load runs it once the user trusts the file
    with pytest.raises(ValueError):
        ng.load_model(path, trust_code=True)
    assert marker.exists()


def test_other_ways_an_archive_could_run_code(exported, tmp_path):
    marker = tmp_path / "marker"
    protocol0 = f"cbuiltins\nopen\n(S'{marker}'\nS'w'\ntR.".encode()  # no \x80 header

    def program(edit):
        def change(record, data):
            if record and record.startswith("models/"):
                return json.dumps(edit(json.loads(data)))
            return data
        return change

    def retarget(prog):
        prog["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
        return prog

    def expression(prog):
        text = json.dumps(prog).replace("Symbol('", "__import__('os').system('touch x') or "
                                        "Symbol('", 1)
        return json.loads(text)

    def file_operator(prog):
        prog["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.aten.from_file.default"
        return prog

    def grown(prefix):  # numbers that sympify would expand without end
        return program(lambda prog: json.loads(json.dumps(prog).replace(
            "Symbol('", prefix + " + Symbol('", 1)))

    def duplicate(record, data):  # a second config, which torch may read instead of the first
        if record is None:
            return {"data/weights/model_weights_config.json": json.dumps({"config": {
                "x": {"path_name": "weight_0", "use_pickle": True}}})}
        return data

    cases = {
        "sample inputs": (lambda r, d: protocol0 if r == "data/sample_inputs/model.pt" else d,
                          "sample_inputs.*not plain tensors"),
        "opaque object": (lambda r, d: None if r is None else d.replace(b'"weight_0"',
                                                                       b'"opaque_obj_0"'),
                          "Python object"),
        "compiled code": (lambda r, d: {"data/aotinductor/model/model.so": b"\x7fELF"}
                          if r is None else d, "compiled code"),
        "graph target": (program(retarget), "'torch.os.system'.*not a PyTorch operator"),
        "shape expression": (program(expression), "shape expression"),
        "guard code": (program(lambda p: dict(p, guards_code=["__import__('os')"])),
                       "guard code"),
        "file operator": (program(file_operator), "from_file.*opens files"),
        "float power": (grown("Pow(Integer(9e9), Integer(9e9))"), "shape expression"),
        "shift": (grown("LShift(Integer(1), Integer(99999999999999999999))"), "shape expression"),
        "duplicate member": (duplicate, "appears twice"),
    }
    for name, (change, message) in cases.items():
        path = rewrite(exported, tmp_path / f"{name}.pt2", change)
        with pytest.raises(ValueError, match=f"{message}.*{TRUST}"):
            ng.load_model(path)
        assert not marker.exists() and not Path("x").exists(), name


def test_a_broken_archive_is_corrupt_not_unsafe(exported, tmp_path):
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(exported.read_bytes()[:500])
    other = tmp_path / "other.pt2"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("x/readme.txt", "hello")
    for path in (cut, other):
        with pytest.raises(ValueError, match="truncated or corrupt") as err:
            ng.load_model(path)
        assert "trust" not in str(err.value)


# ---- sidecar values -----------------------------------------------------------------------

BAD = [
    ("in_channels", 0, "from 1 to"), ("in_channels", -1, "from 1 to"),
    ("in_channels", 10 ** 9, "from 1 to"), ("in_channels", "3", "whole number"),
    ("in_channels", True, "whole number"), ("in_channels", 3.5, "whole number"),
    ("input_size", [224], "not 1 values"), ("input_size", [1, 2, 3, 4], "not 4 values"),
    ("input_size", "224", r"\[H, W\]"), ("input_size", ["224", "224"], "whole number"),
    ("input_size", [-1, 224], "from 1 to"), ("input_size", [16384, 16384], "exhaust memory"),
    ("input_size", [1024, 1024, 1024], "exhaust memory"),
    ("class_names", "cat", "list of names"), ("class_names", ["a", 1], "only strings"),
    ("class_names", ["a", "b", "a"], "'a' repeat"), ("class_names", [], "1 to"),
    ("std", 0, "above 0"), ("std", [0.2, -0.1, 0.2], "above 0"), ("std", math.inf, "finite"),
    ("std", math.nan, "finite"), ("std", "0.2", "a list, not '0.2'"), ("std", [None], "numbers"),
    ("mean", math.nan, "finite"), ("mean", [0.1, -math.inf, 0.1], "finite"),
    ("mean", [], "one number or one per channel"),
    ("target_layer", 4, "a layer name"), ("target_layer", ["layer4"], "a layer name"),
    ("intensity", "sideways", "one of dtype, minmax, none"), ("intensity", 1, "one of"),
    ("name", 7, "display name"), ("weights", 3, "a file name"),
    ("architecture", ["resnet18"], "an architecture name"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_sidecar_values_are_refused_with_the_field(field, value, message, tmp_path):
    sidecar = tmp_path / "model.json"
    sidecar.write_text(json.dumps({"architecture": "resnet18", field: value}))
    with pytest.raises(ValueError, match=f"model.json'?: {field} must .*{message}"):
        read_sidecar(sidecar)
    if field in ("weights", "architecture"):
        return
    with pytest.raises(ValueError, match=f"load_model: {field} must .*{message}"):
        ng.load_model("conftest:small_cnn", weights=tmp_path / "never-read.pt", **{field: value})


def test_wrong_length_mean_and_std_name_the_channels(tmp_path):
    path = weights(tmp_path)
    for key in ("mean", "std"):
        with pytest.raises(ValueError, match="mean has 2 and std 1 values|mean has 1 and std 2"):
            ng.load_model("conftest:small_cnn", weights=path, in_channels=1,
                          **{key: [0.5, 0.5]})


def test_the_loaded_model_gets_the_checked_values(tmp_path):
    path = weights(tmp_path)
    (tmp_path / "w.pt.json").write_text(json.dumps({
        "architecture": "conftest:small_cnn", "class_names": ["a", "b", "c"],
        "input_size": [32, 32], "mean": 0.5, "std": [0.25], "intensity": "per-image"}))
    spec = ng.load_model(path, trust_code=True)
    assert spec.class_names == ["a", "b", "c"] and spec.input_size == (32, 32)
    assert spec.mean == (0.5,) and spec.std == (0.25,) and spec.intensity == "minmax"


# ---- files that are not what they seem ------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_random_bytes_are_not_a_pytorch_file_and_trust_is_not_suggested(tmp_path):
    rng = torch.Generator().manual_seed(0)
    for suffix, head in ((".pt", b""), (".pth", b"\x80"), (".bin", b"\x80\x02")):
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(head + bytes(torch.randint(0, 256, (4096,), generator=rng).tolist()))
        with pytest.raises(ValueError, match="corrupt") as err:
            ng.load_model("conftest:small_cnn", weights=path)
        assert "trust" not in str(err.value)
    path = tmp_path / "junk.pt"
    for head in (b"", b"{", b" ["):  # random bytes that start like JSON are still junk
        path.write_bytes(head + bytes(torch.randint(0, 256, (100,), generator=rng).tolist()))
        with pytest.raises(ValueError,
                           match=r"not a PyTorch file \(corrupt or another format\)"):
            read_weights(path)


def test_a_json_file_given_as_weights_says_it_is_json(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text(json.dumps({"architecture": "resnet18"}))
    for source in (path, tmp_path / "model.safetensors", tmp_path / "w.pt2"):
        source.write_text(" \n" + json.dumps({"architecture": "resnet18"}))
        with pytest.raises(ValueError, match="is JSON text, not weights.*sidecar") as err:
            ng.load_model("conftest:small_cnn", weights=source)
        assert "trust" not in str(err.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_real_pickle_of_objects_suggests_trust(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "objects.pt"
    path.write_bytes(pickle.dumps({"x": Payload(marker)}, protocol=4))
    with pytest.raises(ValueError, match=f"pickled Python objects.*{TRUST}"):
        read_weights(path)
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_things_that_are_not_regular_files(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    json_fifo = tmp_path / "pipe.json"
    os.mkfifo(json_fifo)
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    sources = [fifo, json_fifo, folder, tmp_path]
    if Path("/dev/zero").exists():
        sources.append(Path("/dev/zero"))
    for source in sources:  # a read would block (pipe) or never end (/dev/zero)
        with pytest.raises(ValueError, match="is not a regular file") as err:
            ng.load_model(source)
        assert "does not exist" not in str(err.value)
        with pytest.raises(ValueError, match="is not a regular file"):
            ng.load_model("conftest:small_cnn", weights=source)
    with pytest.raises(ValueError, match="does not exist"):
        ng.load_model(tmp_path / "missing.pt")
