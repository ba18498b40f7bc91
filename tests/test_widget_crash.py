"""Loading a model from the widget never kills napari.

Importing triton (which torchvision imports through ``torch._dynamo`` when PyTorch is a CUDA
build) after napari's canvas exists on Mesa's OpenGL crashed the process with a segmentation
fault: the two LLVMs clash. A crash can only be seen from outside, so the viewer runs in a
subprocess with a real canvas (Xvfb), not the offscreen platform."""

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest

from napari_gradcam.models import _optional

pytest.importorskip("napari")

HAS_TRITON = find_spec("triton") is not None

# The GUI process: viewer first, then the widget, then the model file; prints what it saw.
SCRIPT = textwrap.dedent("""
    import json, logging, sys, time
    logging.basicConfig(level=logging.WARNING)
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    for _ in range(5):
        QApplication.processEvents()
    from napari_gradcam.models import _optional

    seen = {"llvm": _optional.foreign_llvm(), "early": sorted(
        m for m in ("torchvision", "timm", "triton") if m in sys.modules)}
    viewer.add_image(__import__("numpy").random.default_rng(0).random((64, 64, 3)), rgb=True,
                     name="x")
    _dock, w = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM")
    w.model_file.value = sys.argv[1]  # what picking the file in the dialog does
    w.wait_until_ready()  # the file loads on a worker
    seen["model"] = w.model.value
    seen["targets"] = list(w.target.choices)
    w.image.value = viewer.layers["x"]
    w.run()
    deadline = time.monotonic() + 60
    while w.running and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    seen["layers"] = [layer.name for layer in viewer.layers]
    seen["triton"] = ("absent" if "triton" not in sys.modules else
                      "refused" if sys.modules["triton"] is None else "imported")
    from torch.utils._triton import has_triton_package
    seen["torch_sees_triton"] = has_triton_package()
    try:
        import triton  # noqa: F401
        seen["import_triton"] = "ok"
    except ImportError as err:
        seen["import_triton"] = str(err)
    viewer.close()
    print("RESULT " + json.dumps(seen), flush=True)
""")


def gui_env() -> dict:
    """The test's environment with a real Qt platform (the canvas must create a GL context)."""
    env = dict(os.environ)
    if not env.get("DISPLAY"):
        pytest.skip("needs a display: run under xvfb-run or with pytest-xvfb and Xvfb installed")
    env.pop("QT_QPA_PLATFORM", None)
    env["PYTHONFAULTHANDLER"] = "1"  # a crash prints its Python stack
    return env


@pytest.fixture
def resnet18_file(tmp_path):
    """resnet18 (random weights, 3 classes) as safetensors with a sidecar naming the
    torchvision architecture: a known family, so no trust is needed."""
    try:  # guarded: this pytest process may already show a canvas from another test
        torchvision = _optional.import_library("torchvision")
    except ImportError:
        pytest.skip("needs torchvision (the test extra)")
    from safetensors.torch import save_file

    weights = tmp_path / "r18.safetensors"
    save_file(torchvision.models.resnet18(num_classes=3).state_dict(), str(weights))
    (tmp_path / "r18.safetensors.json").write_text(json.dumps(
        {"architecture": "resnet18", "class_names": ["cat", "dog", "fish"]}))
    return weights


def run_gui(tmp_path, *args) -> dict:
    script = tmp_path / "gui.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=gui_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"napari's process ended with {proc.returncode} (negative: killed by that signal, "
        f"-11 = segmentation fault):\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, f"the GUI script printed no result:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return {**json.loads(line[-1][len("RESULT "):]), "stderr": proc.stderr}


def test_picking_a_torchvision_model_file_after_the_viewer_is_up_loads_it(tmp_path,
                                                                          resnet18_file):
    seen = run_gui(tmp_path, resnet18_file)
    assert seen["early"] == []  # nothing imported the libraries before the canvas existed
    assert seen["model"] == "r18 (r18.safetensors)"
    assert seen["targets"][-3:] == ["cat", "dog", "fish"]
    assert "gradcam · x" in seen["layers"] and "regions · x" in seen["layers"]
    if not HAS_TRITON:
        pytest.skip("triton is not installed (CPU-only PyTorch): nothing that could crash; "
                    "the widget's load and run path above passed")
    if seen["llvm"] is None:
        # no shared LLVM in the process (a vendor OpenGL driver): triton is safe and allowed
        assert seen["triton"] == "imported" and seen["torch_sees_triton"]
        return
    # Mesa's LLVM is loaded: triton is refused, PyTorch sees it as absent, and a log line says
    # why and how to get it back
    assert seen["triton"] == "refused" and not seen["torch_sees_triton"]
    assert seen["import_triton"] != "ok"  # every later import is refused too
    assert "import it before creating the napari viewer" in seen["stderr"]


# ---- the guard itself, without a GUI ----------------------------------------------------------

def test_foreign_llvm_reads_the_process_mappings(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f02-7f03 r-xp 00000000 08:01 2 /opt/venv/triton/_C/libtriton.so\n"
        "7f04-7f05 r--p 00000000 00:00 0 [heap]\n")
    assert _optional.foreign_llvm(str(maps)) is None
    with maps.open("a") as f:
        f.write("7f06-7f07 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    assert _optional.foreign_llvm(str(maps)) == "/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1"
    assert _optional.foreign_llvm(str(tmp_path / "missing")) is None  # not Linux: no guess


GUARD = textwrap.dedent("""
    import json, sys
    from napari_gradcam.models import _optional
    # as if Mesa's OpenGL driver had loaded its LLVM into this process
    _optional.foreign_llvm = lambda maps="": "/usr/lib/libLLVM-15.so.1"
    _optional.install_import_guard()
    out = {}
    for name in ("triton", "triton.language", "triton"):
        try:
            __import__(name)
            out[name] = "ok"
        except ImportError as err:
            out[name] = out.get(name) or type(err).__name__ + ": " + str(err)
    import importlib.util
    out["find_spec"] = importlib.util.find_spec("triton") is not None
    from torch.utils._triton import has_triton_package
    out["torch"] = has_triton_package()
    out["blocked"] = sorted(_optional.blocked())
    print(json.dumps(out))
""")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: nothing to guard")
def test_beside_another_llvm_triton_is_refused_with_the_reason(tmp_path):
    script = tmp_path / "guard.py"
    script.write_text(GUARD)
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["triton"].startswith("ModuleNotFoundError") and "would crash" in out["triton"]
    assert out["triton.language"].startswith("ModuleNotFoundError")
    assert not out["find_spec"] and not out["torch"]  # PyTorch sees no triton, and copes
    assert out["blocked"] == ["triton"]
    assert "libLLVM-15.so.1" in proc.stderr and "before creating the napari viewer" in proc.stderr


def test_without_another_llvm_the_guard_lets_triton_import(monkeypatch):
    """The command line, a batch worker, a vendor OpenGL driver: nothing is refused."""
    # a GUI test earlier in this process may have blocked triton already: start from a clean state
    monkeypatch.setattr(_optional, "_blocked", {})
    monkeypatch.setattr(_optional, "foreign_llvm", lambda maps="": None)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    assert _optional._guard.find_spec("triton") is None  # the normal finders take over
    assert _optional._guard.find_spec("numpy") is None
    assert "triton" not in _optional.blocked()


def test_triton_imported_before_the_canvas_stays_usable(monkeypatch):
    """Imported before any OpenGL context (safe), its submodules still import afterwards."""
    monkeypatch.setattr(_optional, "_blocked", {})
    monkeypatch.setattr(_optional, "foreign_llvm", lambda maps="": "/usr/lib/libLLVM-15.so.1")
    monkeypatch.setitem(sys.modules, "triton", sys.modules["os"])  # stands in for triton
    assert _optional._guard.find_spec("triton.language") is None
    assert "triton" not in _optional.blocked()
