"""The bundled 3D demo model: spheres, cubes and cones in grey volumes (``load_model("demo3d")``)."""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = Path(__file__).with_name("demo3d.safetensors")


def demo3d_spec(weights=None):
    """The bundled 3D model, from its safetensors and sidecar; ``weights`` (a safetensors file
    of the same architecture) replaces the bundled ones, for benchmarking a new training."""
    from safetensors.torch import load_file

    from ..spec import ModelSpec, normalise_intensity
    from .model import Demo3dNet

    meta = json.loads(WEIGHTS.with_suffix(".safetensors.json").read_text())
    state = load_file(str(weights or WEIGHTS))
    module = Demo3dNet(width=int(state["stem.0.weight"].shape[0]))  # train.py --width
    module.load_state_dict(state)
    return ModelSpec(module.eval(), list(meta["class_names"]), meta["in_channels"], None,
                     tuple(meta["mean"]), tuple(meta["std"]), meta["target_layer"],
                     normalise_intensity(meta.get("intensity", "dtype")), "demo3d",
                     output=meta.get("output"))
