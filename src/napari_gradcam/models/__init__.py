"""Models: ``load_model`` and ``ModelSpec`` (the module plus how to feed it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


@dataclass
class ModelSpec:
    """A model and what it expects.

    ``intensity`` says how raw pixels become the model's [0, 1] input before ``mean`` / ``std``:
    ``"minmax-dtype"`` = integer images divided by their dtype's maximum, float images used as
    they are.
    """

    module: nn.Module
    class_names: list[str]
    in_channels: int = 1
    input_size: tuple[int, int] | None = None  # None: any size (fully convolutional)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    target_layer: str | None = None  # None: found automatically
    intensity: str = "minmax-dtype"
    name: str = "model"
    extra: dict = field(default_factory=dict)


DEMO_DIR = Path(__file__).with_name("demo")


def _demo() -> ModelSpec:
    from safetensors.torch import load_file

    from .demo.model import DemoNet

    weights = DEMO_DIR / "demo.safetensors"
    meta = json.loads(weights.with_suffix(".safetensors.json").read_text())
    module = DemoNet()
    module.load_state_dict(load_file(str(weights)))
    return ModelSpec(module.eval(), list(meta["class_names"]), meta["in_channels"], None,
                     tuple(meta["mean"]), tuple(meta["std"]), meta["target_layer"],
                     meta.get("intensity", "minmax-dtype"), "demo")


def _num_outputs(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def load_model(
    source,
    *,
    class_names: Sequence[str] | None = None,
    in_channels: int | None = None,
    input_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    target_layer: str | None = None,
) -> ModelSpec:
    """A :class:`ModelSpec` for ``"demo"`` (the bundled model, offline) or an ``nn.Module``;
    every keyword overrides what the source says."""
    if isinstance(source, str) and source.lower() == "demo":
        spec = _demo()
    elif isinstance(source, nn.Module):
        n = _num_outputs(source)
        first = next((m for m in source.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
        spec = ModelSpec(source.eval(), [f"class {i}" for i in range(n or 0)],
                         first.in_channels if first is not None else 1,
                         name=type(source).__name__)
    else:
        raise ValueError(
            f"can't load a model from {source!r}: this version loads 'demo' and torch.nn.Module "
            "objects; build the architecture in Python, load its weights with torch.load("
            "..., weights_only=True) and pass the module."
        )
    if class_names is not None:
        spec.class_names = list(class_names)
    if in_channels is not None:
        spec.in_channels = int(in_channels)
    if input_size is not None:
        spec.input_size = tuple(int(s) for s in input_size)
    if mean is not None:
        spec.mean = tuple(float(v) for v in mean)
    if std is not None:
        spec.std = tuple(float(v) for v in std)
    if target_layer is not None:
        spec.target_layer = target_layer
    n = _num_outputs(spec.module)
    if n is not None and spec.class_names and len(spec.class_names) != n:
        raise ValueError(f"{len(spec.class_names)} class names for a model with {n} outputs; "
                         "give one name per output.")
    return spec


__all__ = ["ModelSpec", "load_model"]
