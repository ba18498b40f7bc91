"""Models: ``load_model`` and ``ModelSpec`` (the module plus how to feed it)."""

from __future__ import annotations

import json
from pathlib import Path

from . import _optional
from .loader import SIDECAR_FIELDS, build_architecture, load_model, read_weights
from .spec import INTENSITY, ModelSpec, normalise_intensity

DEMO_DIR = Path(__file__).with_name("demo")

# Models are loaded from napari's console and from scripts that opened a viewer, not only through
# the plugin: wherever the core is imported, triton is refused rather than allowed to crash a
# process whose OpenGL driver holds another LLVM (see _optional).
_optional.install_import_guard()


def demo_spec() -> ModelSpec:
    """The bundled synthetic-shapes model, from its safetensors and sidecar."""
    from safetensors.torch import load_file

    from .demo.model import DemoNet

    weights = DEMO_DIR / "demo.safetensors"
    meta = json.loads(weights.with_suffix(".safetensors.json").read_text())
    module = DemoNet()
    module.load_state_dict(load_file(str(weights)))
    return ModelSpec(module.eval(), list(meta["class_names"]), meta["in_channels"], None,
                     tuple(meta["mean"]), tuple(meta["std"]), meta["target_layer"],
                     normalise_intensity(meta.get("intensity", "dtype")), "demo",
                     output=meta.get("output"))


__all__ = ["INTENSITY", "SIDECAR_FIELDS", "ModelSpec", "build_architecture", "demo_spec",
           "load_model", "normalise_intensity", "read_weights"]
