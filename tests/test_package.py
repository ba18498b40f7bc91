"""Packaging, the napari manifest, the CLI and the rule that the core stays Qt-free."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import napari_gradcam
from napari_gradcam._device import describe_device, resolve_device
from napari_gradcam.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_npe2_validate_with_imports():
    res = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-gradcam", "--imports"],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout


def test_manifest_at_top_level_is_the_shipped_one():
    shipped = Path(napari_gradcam.__file__).with_name("napari.yaml")
    assert (ROOT / "napari.yaml").read_text() == shipped.read_text()


def core_modules() -> list[str]:
    """Every module of the package but the widget side (``_napari``, apart from its reader and
    sample data, which napari loads without a window) and ``__main__`` (which runs the CLI)."""
    root = Path(napari_gradcam.__file__).parent
    names = [".".join(("napari_gradcam", *p.relative_to(root).with_suffix("").parts))
             .removesuffix(".__init__") for p in sorted(root.rglob("*.py"))]
    core = [n for n in names if not n.startswith("napari_gradcam._napari")
            and n != "napari_gradcam.__main__"]
    return [*core, "napari_gradcam._napari.io", "napari_gradcam._napari.sample_data"]


def test_the_core_module_list_holds_the_core():
    core = core_modules()
    for name in ("cli", "explain_arrays", "job", "render", "files", "samples", "memory", "batch",
                 "batch.discover", "batch.read", "batch.records", "batch.settings",
                 "batch.output", "batch.write", "batch.schedule", "batch.explainer",
                 "batch.cluster", "cam.engine", "models.loader"):
        assert f"napari_gradcam.{name}" in core
    assert not [n for n in core if ".widget" in n or n.endswith("_napari.demo")]


def test_core_imports_no_napari_or_qt():
    code = (
        f"import sys, importlib\nfor m in {core_modules()!r}: importlib.import_module(m)\n"
        "import napari_gradcam.cli\n"
        "napari_gradcam.cli.build_parser()\n"
        "bad = {'napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui', 'vispy'}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & bad)\n"
        "assert not loaded, loaded\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_console_script_installed():
    exe = shutil.which("napari-gradcam")
    assert exe, "the napari-gradcam command is not on PATH: is the package installed?"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "example" in res.stdout and "demo" in res.stdout


def test_example_finds_the_objects(capsys):
    assert main(["example", "--method", "gradcam", "--method", "cam"]) == 0
    text = capsys.readouterr().out
    assert "device: CPU" in text or "device: GPU" in text
    lines = [ln for ln in text.splitlines() if ln.strip().startswith(("gradcam", "cam "))]
    assert len(lines) == 6  # 2 methods x 3 classes
    assert all(": on the" in ln for ln in lines)  # every class's peak sits on its own object


def test_example_boxes_overlap_the_truth():
    from napari_gradcam._example import run_example

    results = run_example(methods=["gradcam"], out=lambda s: None)
    assert len(results) == 3
    for (_method, _cls), ious in results.items():
        assert min(ious) >= 0.5


def test_cli_reports_user_errors_in_one_sentence(capsys):
    assert main(["example", "--device", "warp-drive"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-gradcam: error: device 'warp-drive'")


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert describe_device(torch.device("cpu")) == "CPU"
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
