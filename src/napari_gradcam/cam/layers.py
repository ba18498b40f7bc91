"""Target-layer discovery and resolution.

The explained layer can be named (dotted module name, as in ``model.named_modules()``), passed as
the module object, or left to :func:`find_target_layer`: the last module whose output is still a
spatial feature map, i.e. the layer right before the global pooling of a classification head.
"""

from __future__ import annotations

import difflib
import weakref

import torch
from torch import nn

from ._state import explaining

# model -> {input ndim: layer name}; discovery costs one forward of a single sample, so it is done
# once per model and input rank.
_AUTO_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[int, str]] = weakref.WeakKeyDictionary()


def module_names(module: nn.Module) -> list[str]:
    """All dotted submodule names of ``module`` (the root itself excluded)."""
    return [name for name, _ in module.named_modules() if name]


def resolve_target_layer(
    module: nn.Module, target_layer: str | nn.Module | None, batch: torch.Tensor
) -> tuple[str, nn.Module]:
    """Return ``(name, layer)`` for a name, a module object or ``None`` (automatic)."""
    if target_layer is None:
        return find_target_layer(module, batch)
    if isinstance(target_layer, nn.Module):
        for name, sub in module.named_modules():
            if sub is target_layer:
                return name, sub
        raise ValueError(
            f"the target layer {type(target_layer).__name__} is not a submodule of this "
            f"{type(module).__name__}; pass one of its layers, or its dotted name."
        )
    if not isinstance(target_layer, str):
        raise TypeError(
            f"target_layer must be a dotted layer name, an nn.Module or None, not "
            f"{type(target_layer).__name__}."
        )
    if target_layer:
        try:
            return target_layer, module.get_submodule(target_layer)
        except AttributeError:
            pass
    names = module_names(module)
    close = difflib.get_close_matches(target_layer, names, n=5, cutoff=0.5)
    hint = close or spatial_layer_names(module, batch)[-5:]
    raise ValueError(
        f"{type(module).__name__} has no layer named {target_layer!r}; "
        f"{'did you mean' if close else 'layers with a spatial output include'}: "
        f"{', '.join(repr(h) for h in hint)}."
    )


def _record_outputs(module: nn.Module, sample: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Run ``sample`` once and return ``(name, output)`` for every submodule, in the order the
    submodules finished (a container finishes after its children)."""
    records: list[tuple[str, torch.Tensor]] = []
    handles = []

    def make_hook(name):
        def hook(_mod, _inp, out):
            if isinstance(out, torch.Tensor):
                records.append((name, out))

        return hook

    try:
        for name, sub in module.named_modules():
            if name:
                handles.append(sub.register_forward_hook(make_hook(name)))
        with explaining(module), torch.inference_mode():
            module(sample)
    finally:
        for h in handles:
            h.remove()
    return records


def _spatial(out: torch.Tensor, ndim: int) -> bool:
    return out.ndim == ndim and any(s > 1 for s in out.shape[2:])


def spatial_layer_names(module: nn.Module, batch: torch.Tensor) -> list[str]:
    """Names of the layers whose output is a (N, C, *spatial) map for this input, in run order."""
    records = _record_outputs(module, batch[:1])
    seen: set[str] = set()
    out = []
    for name, t in records:
        if _spatial(t, batch.ndim) and name not in seen:
            seen.add(name)
            out.append(name)
    return out


def find_target_layer(module: nn.Module, batch: torch.Tensor) -> tuple[str, nn.Module]:
    """The last layer that outputs a spatial feature map (N, C, H, W) / (N, C, D, H, W).

    Among nested modules that return the very same tensor (``layer4``, ``layer4.1``, ...) the
    outermost is chosen, so that names read as users expect (``layer4``, ``features``).
    Modules that run more than once per forward pass are passed over: their activation is
    ambiguous (MONAI's EfficientNet applies one ``_swish`` after its stem and its head, so the
    head's ``_bn1`` is chosen).
    """
    cached = _AUTO_CACHE.get(module, {}).get(batch.ndim)
    if cached is not None:
        try:
            return cached, module.get_submodule(cached)
        except AttributeError:  # the architecture changed since: discover again
            pass
    records = _record_outputs(module, batch[:1])
    runs: dict[str, int] = {}
    for name, _ in records:
        runs[name] = runs.get(name, 0) + 1
    once = [i for i, (name, _) in enumerate(records) if runs[name] == 1]
    candidates = [i for i in once if _spatial(records[i][1], batch.ndim)]
    if not candidates:  # e.g. inputs so small that the last map is 1 x 1
        candidates = [i for i in once if records[i][1].ndim == batch.ndim]
    if not candidates:
        raise ValueError(
            f"no layer of this {type(module).__name__} outputs a (N, C, "
            f"{'D, ' if batch.ndim == 5 else ''}H, W) feature map for this input; CAM methods "
            "need a convolutional layer: pass target_layer=."
        )
    last = candidates[-1]
    tensor = records[last][1]
    for j in range(last + 1, len(records)):
        if records[j][1] is tensor and runs[records[j][0]] == 1:
            last = j
    name = records[last][0]
    _AUTO_CACHE.setdefault(module, {})[batch.ndim] = name
    return name, module.get_submodule(name)
