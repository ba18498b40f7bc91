"""Target-layer discovery and resolution.

The explained layer can be named (dotted module name, as in ``model.named_modules()``), passed as
the module object, or left to :func:`find_target_layer`: the last module whose output is still a
spatial feature map, i.e. the layer right before the global pooling of a classification head
(never the model's own output: a segmentation network's head is passed over), or, in a
transformer, the norm that feeds its last attention block.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from . import tokens
from ._state import explaining
from .segmentation import is_segmentation_output, remember_output

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
        f"{'did you mean' if close else 'layers with a feature-map or token output include'}: "
        f"{', '.join(repr(h) for h in hint)}."
    )


class _Record(NamedTuple):
    name: str
    module: nn.Module
    out: torch.Tensor | None  # None: the call returned no tensor (nn.MultiheadAttention)
    inputs: tuple  # the tensors it was called with
    start: int  # ticks of one clock shared by starts and finishes
    finish: int


def _probe(module: nn.Module, sample: torch.Tensor) -> tuple[list[_Record], tuple]:
    """Run ``sample`` once; return a record per submodule call, in the order the calls finished
    (a container finishes after its children), and the tensors of the model's own output."""
    records: list[_Record] = []
    started: dict[int, list[tuple[int, tuple]]] = {}
    clock = [0]
    handles = []

    def pre_hook(mod, inp):
        clock[0] += 1
        tensors = tuple(t for t in inp if isinstance(t, torch.Tensor))
        started.setdefault(id(mod), []).append((clock[0], tensors))

    def make_hook(name):
        def hook(mod, _inp, out):
            clock[0] += 1
            begin, tensors = started[id(mod)].pop()
            out = out if isinstance(out, torch.Tensor) else None
            records.append(_Record(name, mod, out, tensors, begin, clock[0]))

        return hook

    try:
        for name, sub in module.named_modules():
            if name:
                handles.append(sub.register_forward_pre_hook(pre_hook))
                handles.append(sub.register_forward_hook(make_hook(name)))
        with explaining(module), torch.inference_mode():
            output = module(sample)
    finally:
        for h in handles:
            h.remove()
    return records, _output_tensors(output)


def _output_tensors(output) -> tuple:
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, Mapping):
        return tuple(v for v in output.values() if isinstance(v, torch.Tensor))
    if isinstance(output, (tuple, list)):
        return tuple(v for v in output if isinstance(v, torch.Tensor))
    logits = getattr(output, "logits", None)
    return (logits,) if isinstance(logits, torch.Tensor) else ()


def _record_outputs(module: nn.Module, sample: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Run ``sample`` once and return ``(name, output)`` for every submodule, in the order the
    submodules finished (a container finishes after its children)."""
    return [(r.name, r.out) for r in _probe(module, sample)[0] if r.out is not None]


def _layouts(module: nn.Module, records: list[_Record], batch: torch.Tensor) -> list:
    """Each record's :class:`~.tokens.Layout` for this input (None: no feature map)."""
    spatial = tuple(batch.shape[2:])
    prefix = tokens.prefix_hint(module)
    patch = tokens.patch_hint(module, len(spatial))
    out = []
    for r in records:
        t = r.out
        ok = t is not None and t.ndim in (3, batch.ndim) and t.shape[0] == 1
        out.append(tokens.read_layout(t.shape, spatial, prefix=prefix, patch=patch,
                                      layer=r.module) if ok else None)
    return out


def _spatial(out: torch.Tensor | None, ndim: int) -> bool:
    return out is not None and out.ndim == ndim and any(s > 1 for s in out.shape[2:])


def spatial_layer_names(module: nn.Module, batch: torch.Tensor) -> list[str]:
    """Names of the layers whose output reads as a feature map for this input, in run order:
    (N, C, *spatial) maps, transformer tokens that form the patch grid, channels-last maps."""
    sample = batch[:1]
    records, _ = _probe(module, sample)
    layouts = _layouts(module, records, sample)
    seen: set[str] = set()
    out = []
    for r, layout in zip(records, layouts):
        usable = _spatial(r.out, batch.ndim) or (layout is not None and layout.kind != "map")
        if usable and r.name not in seen:
            seen.add(r.name)
            out.append(r.name)
    return out


def _has_weights(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _output_like(records: list[_Record], final: tuple) -> set[int]:
    """Records whose output is the model's own output, or is passed on to it by weightless
    modules only (Identity, an activation, an upsampling): explaining those would explain the
    logits themselves, so a segmentation network's head is never the automatic layer."""
    like = {id(t) for t in final}
    found: set[int] = set()
    for i in range(len(records) - 1, -1, -1):
        r = records[i]
        if r.out is not None and id(r.out) in like:
            found.add(i)
            if not _has_weights(r.module):
                like.update(id(t) for t in r.inputs)
    return found


def _inside_output(records: list[_Record], final: tuple, like: set[int]) -> set[int]:
    """Records that run inside a module producing the model's output (``like``) and output a
    tensor of the output's exact shape: the pieces of a head that computes the logits in more
    than one step (MONAI's UNet with residual units ends in a ResidualUnit whose inner
    convolution already makes the class maps), which explain the logits just the same."""
    shapes = {tuple(t.shape) for t in final}
    return {i for i, r in enumerate(records)
            if i not in like and r.out is not None and tuple(r.out.shape) in shapes
            and any(records[k].start < r.start and r.finish < records[k].finish
                    for k in like)}


def _coarse_logits(records: list[_Record], final: tuple, ndim: int) -> set[int]:
    """The last records when they output class maps at another resolution than the model's
    segmentation output (torchvision's FCN / DeepLabV3 / LR-ASPP heads, whose forward upsamples
    the logits itself, outside any module): explaining them would explain the logits too."""
    classes = {t.shape[1] for t in final if t.ndim == ndim and any(s > 1 for s in t.shape[2:])}
    found: set[int] = set()
    for i in range(len(records) - 1, -1, -1):
        out = records[i].out
        if out is None or out.ndim != ndim:
            continue
        if out.shape[1] not in classes:
            break
        found.add(i)
    return found


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_attention(mod: nn.Module) -> bool:
    """Self-attention modules, by type (torch) or by the names libraries give them (timm's
    Attention / WindowAttention / ClassAttn / MHSA, Hugging Face's ViTAttention, MONAI's
    SABlock)."""
    if isinstance(mod, nn.MultiheadAttention):
        return True
    name = type(mod).__name__
    lower = name.lower()
    return "attention" in lower or "attn" in lower or name.endswith(("SABlock", "MHSA", "GPSA"))


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, _NORMS) or "norm" in type(mod).__name__.lower()


def _transformer_layer(records, layouts, runs, excluded, plain) -> int | None:
    """The normalisation layer that feeds the last attention module (what Grad-CAM's
    transformer recipes explain: timm's ``blocks[-1].norm1``; its tokens still see every patch,
    unlike the last block's output, which only the class token leaves), or None when the model
    has no such layer, when its output is an ordinary map, or when a layer with weights outputs
    an ordinary map after the attention (a CNN with an attention block inside, a hybrid whose
    last stage ends in a map: the old rule's last map then stands)."""
    attention = [r for r in records if runs[r.name] == 1 and _is_attention(r.module)]
    if not attention:
        return None
    last_attn = max(attention, key=lambda r: r.start)
    norms = [i for i, r in enumerate(records)
             if r.finish < last_attn.start and _is_norm(r.module)]
    if not norms:
        return None
    i = max(norms, key=lambda j: records[j].finish)
    layout = layouts[i]
    if runs[records[i].name] != 1 or i in excluded or layout is None or layout.kind == "map":
        return None
    if any(records[j].finish > last_attn.finish and _has_weights(records[j].module)
           for j in plain):
        return None
    return i


def find_target_layer(module: nn.Module, batch: torch.Tensor) -> tuple[str, nn.Module]:
    """The layer CAM methods explain when none is named.

    - Transformers (ViT, DeiT, Swin, ...): the normalisation layer that feeds the last
      attention module (timm: ``blocks.11.norm1``, ``layers.3.blocks.1.norm1``); its tokens or
      channels-last maps are read as a feature map.
    - Otherwise the last layer that outputs a spatial feature map (N, C, H, W) /
      (N, C, D, H, W), except the model's own output (and what weightless modules such as
      Identity or an activation pass on to it, and class maps the forward upsamples into it):
      a segmentation network is explained at its last layer before the head, not at its
      logits.

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
    sample = batch[:1]
    records, final = _probe(module, sample)
    # the probe saw the model's output: whoever asks whether it segments needs no forward
    remember_output(module, any(is_segmentation_output(t, sample) for t in final))
    layouts = _layouts(module, records, sample)
    like = _output_like(records, final)
    runs: dict[str, int] = {}
    for r in records:
        runs[r.name] = runs.get(r.name, 0) + 1
    # first without the head's inner steps as well; if that leaves nothing, the old rule
    head = _inside_output(records, final, like) | _coarse_logits(records, final, batch.ndim)
    for excluded in (like | head, like):
        once = [i for i, r in enumerate(records) if runs[r.name] == 1 and i not in excluded]
        maps = [i for i in once if layouts[i] is not None and layouts[i].kind == "map"]
        candidates = [i for i in maps if _spatial(records[i].out, batch.ndim)]
        if not candidates:  # e.g. inputs so small that the last map is 1 x 1
            candidates = maps
        chosen = _transformer_layer(records, layouts, runs, excluded, candidates)
        if chosen is None and not candidates:  # tokens without attention (MLP-Mixer, ...)
            shaped = [i for i in once if layouts[i] is not None]
            chosen = shaped[-1] if shaped else None
        if chosen is not None or candidates:
            break
    if chosen is None and not candidates:
        raise ValueError(
            f"no layer of this {type(module).__name__} outputs a (N, C, "
            f"{'D, ' if batch.ndim == 5 else ''}H, W) feature map or transformer tokens for "
            "this input (apart from the model's output itself); CAM methods need a "
            "convolutional or transformer layer: pass target_layer=."
        )
    last = candidates[-1] if chosen is None else chosen
    tensor, inner = records[last].out, records[last].name
    for j in range(last + 1, len(records)):
        # a transformer's norm keeps its own name: only a block that returns it as its own
        # output may rename it, not the Identity (drop path) that passes it on
        if (records[j].out is tensor and runs[records[j].name] == 1 and j not in excluded
                and (chosen is None or inner.startswith(records[j].name + "."))):
            last = j
    name = records[last].name
    _AUTO_CACHE.setdefault(module, {})[batch.ndim] = name
    return name, module.get_submodule(name)
