"""The lean CAM engine: one forward pass, gradients only from the target layer up.

How it stays close to the cost of inference:

- the forward runs under ``torch.no_grad`` up to the target layer, so no graph is built below it
  and no parameter there is touched;
- a forward hook on the target layer detaches its output, makes it a leaf that requires grad,
  turns grad mode on for the rest of the forward and hands the network a clone (so an in-place
  op after the layer, such as ``ReLU(inplace=True)``, can't corrupt the activations or the graph);
- one ``torch.autograd.grad(scores.sum(), activations)`` for the whole batch: per-sample scores
  are independent (eval mode), so the summed score gives each sample its own gradient; no
  parameter gradient is computed and no ``.grad`` is ever written;
- the method's arithmetic, ReLU, ``F.interpolate`` upsampling and per-image min-max
  normalisation stay on the batch's device, in float32; nothing is copied to the host;
- hooks are removed and every submodule's train/eval flag restored in ``finally``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.spec import refuse_torchscript
from . import segmentation as seg
from . import tokens
from ._state import explaining
from .layers import resolve_target_layer
from .methods import METHODS, CamContext, get_method


class CamBatch(NamedTuple):
    """Result of :func:`explain_batch`; all tensors live on the batch's device.

    For one target per sample: heatmaps (N, *spatial), class_ids and scores (N,). For K target
    slots per sample (targets (N, K), or a callable returning that): heatmaps (N, K, *spatial),
    class_ids and scores (N, K); a slot whose class id is -1 holds no target (its map is zeros,
    its score NaN), and :attr:`valid` says which slots hold one.
    """

    heatmaps: torch.Tensor  # float32 (N[, K], H, W) or (N[, K], D, H, W), each map in [0, 1]
    class_ids: torch.Tensor  # int64 (N[, K]): the explained class of each sample (slot)
    scores: torch.Tensor  # float32 (N[, K]): the model's output (logit) for that class

    @property
    def valid(self) -> torch.Tensor:
        """Boolean, the shape of ``class_ids``: True where the slot holds a target."""
        return self.class_ids >= 0


def explain_batch(
    module: nn.Module,
    batch: torch.Tensor,
    method: str = "gradcam",
    target_layer: str | nn.Module | None = None,
    targets=None,
    *,
    target_masks=None,
    multilabel: bool | None = None,
    amp=None,
    chunk_size: int | None = None,
    normalize: bool = True,
) -> CamBatch:
    """Class activation maps for a preprocessed batch.

    Parameters
    ----------
    module : the classifier or segmentation network. Its forward may return a tensor, or a
        tuple / list (the first tensor is used), a dict (its ``"logits"`` entry, or its only
        tensor), or an object with a ``.logits`` tensor (Hugging Face outputs). A classifier
        returns (N, classes) (a 1-D output (N,) is one logit); an output of the batch's rank,
        (N, classes, *spatial) (its spatial size may differ from the batch's), is a
        segmentation network's: see "Segmentation models" below.
    batch : float tensor (N, C, H, W) or (N, C, D, H, W) on the model's device.
    method : one of :func:`napari_gradcam.cam.available_methods` (case, ``-`` and ``_`` ignored).
    target_layer : dotted module name, the module itself, or None: the last layer with a
        spatial output before the model's own output (a segmentation network's last decoder
        block), or for a transformer the norm feeding its last attention block (see
        :func:`napari_gradcam.cam.find_target_layer`). Token outputs (N, T, C) and
        channels-last maps (N, H, W, C) are read on the patch grid.
    targets : None (each sample's predicted class), one class index for all samples, N indices,
        an (N, K) array of K class indices per sample (-1: no target in that slot), or a
        callable ``targets(logits) -> (N,) or (N, K)`` that picks them from the logits of this
        same forward pass (e.g. every class with a positive logit; returning None keeps the
        default choice, for a caller that only wants to see the logits). K targets cost one
        forward:
        gradient methods take one ``autograd.grad`` per slot over the same graph, which only
        re-traverses the layers after the target layer.
    amp : None/False (full precision), True, ``"bf16"`` or ``"fp16"``: run the model under
        ``torch.autocast``; the CAM arithmetic is float32 regardless.
    chunk_size : masked inputs per forward for Score-CAM (default: bounded by memory).
    normalize : True (default) scales each map to [0, 1]; False leaves the maps ReLU'd and
        upsampled but unscaled, so that the maps of an image's tiles can be blended and then
        scaled once over the whole image (one tile's hottest pixel is not the image's), and
        scales each sample's gradient to a unit size first (:func:`_unit_gain`), so that no
        tile gets a gain of its own from the head's sensitivity to it as a whole.
    target_masks : segmentation models only: the region each target explains, (N, *S) (one
        region per sample, for every slot) or (N, K, *S) for (N, K) targets; S the batch's or
        the output's spatial shape (resized to the output's: area averaging when shrinking,
        nearest when growing); booleans or non-negative float weights. None: each target's
        own predicted region.
    multilabel : segmentation models only: whether a class's predicted region is where its
        sigmoid > 0.5 (True) or where it is the argmax (False); None: True for a one-channel
        output, else False.

    Segmentation models
    -------------------
    The score explained for class c of sample n is ``sum(logits[n, c] * W)`` over the output's
    spatial axes (Seg-Grad-CAM), W that target's region weights. ``targets=None`` explains per
    sample the class with the largest predicted region (inside the target mask when one is
    given); a softmax output's class 0 is the background and is skipped unless nothing else is
    predicted. A callable target receives the (N, classes) pooled scores: each class's logits
    summed over its own predicted region (0 where it is empty). The returned scores are the
    pooled scores explained. A target whose region is empty gets a zero map, score 0.0 and an
    :class:`~napari_gradcam.cam.EmptyTargetWarning`. Method ``"cam"`` needs a classifier head
    and is refused.

    Returns
    -------
    CamBatch(heatmaps, class_ids, scores) on the batch's device, with a K axis after N when the
    targets are (N, K). A map that is flat after the
    ReLU (nothing contributes to the class) comes out as zeros, never NaN.

    The model is left exactly as it was: train/eval flags, ``requires_grad`` flags, no ``.grad``,
    no hooks, also when it raises.
    """
    spec = get_method(method)
    _check_inputs(module, batch)
    if multilabel is not None and not isinstance(multilabel, bool):
        raise TypeError(f"multilabel must be True, False or None (decide from the output), "
                        f"not {multilabel!r}.")
    amp_dtype = _amp_dtype(amp)
    if batch.is_inference():  # made under inference_mode: such tensors can't enter a graph
        with torch.inference_mode(False):
            batch = batch.clone()
    with size_errors(module, batch):
        return _explain(module, batch, spec, target_layer, targets, amp_dtype, chunk_size,
                        target_masks, multilabel, normalize)


def _explain(module, batch, spec, target_layer, targets, amp_dtype, chunk_size,
             target_masks=None, multilabel=None, normalize=True) -> CamBatch:
    name, layer = resolve_target_layer(module, target_layer, batch)

    with torch.inference_mode(False), explaining(module):
        capture = _Capture(layer, name, requires_grad=spec.needs_gradients, batch=batch,
                           model=module)
        with capture, torch.no_grad(), _autocast(batch.device, amp_dtype):
            output = module(batch)
        logits = _logits(output, batch)
        del output
        seg.remember_output(module, logits.ndim > 2)
        activations = capture.result(batch)
        if logits.ndim > 2:  # a segmentation map: each target is a class and a region
            class_ids, slots, weights = _region_targets(spec, logits, batch, targets,
                                                        target_masks, multilabel)
        else:
            _no_masks_for_classifiers(target_masks, logits)
            class_ids, slots = _class_ids(targets, logits)  # (N, K); slots: False for 1-D
            weights = None
        valid = class_ids >= 0
        safe = class_ids.clamp(min=0)
        if weights is None:
            scores, empty, live = logits.gather(1, safe), None, valid if slots else None
        else:
            scores = seg.slot_scores(logits, safe, weights)
            empty = valid & ~(weights.flatten(2) > 0).any(-1)
            live = valid & ~empty
        gradients = (_gradients(scores, live, activations, name)
                     if spec.needs_gradients else None)
        if gradients is not None and not normalize:
            gradients = [_unit_gain(g, spec.pooled) for g in gradients]
        ctx = CamContext(
            activations=activations.detach().float(),
            gradients=None,
            class_ids=safe,
            scores=scores.detach().float(),
            num_classes=logits.shape[1],
            batch=batch,
            module=module,
            target_name=name,
            forward=partial(_forward_logits, module, amp_dtype),
            options={"chunk_size": chunk_size, "amp": amp_dtype, "covered": capture.covered,
                     # a classifier's every logit: CAM checks its head against all of them
                     "logits": logits.detach() if logits.ndim == 2 else None},
            region_weights=weights,
        )
        del logits, scores
        raw = _per_slot(spec, ctx, gradients)  # (N, K, *S)
    n, k = class_ids.shape
    heat = to_heatmaps(raw.flatten(0, 1), batch.shape[2:], covered=capture.covered,
                       normalize=normalize).view(
        n, k, *batch.shape[2:])
    shown = valid if empty is None else live  # an empty region explains nothing: zero map
    heat = heat * shown.view(n, k, *([1] * (heat.ndim - 2)))
    out_scores = torch.where(valid, ctx.scores, torch.full_like(ctx.scores, float("nan")))
    if empty is not None:
        out_scores = torch.where(empty, torch.zeros_like(out_scores), out_scores)
        if not callable(targets):  # a callable chose from the pooled scores: it saw the zeros
            seg.warn_empty(class_ids, empty, given=target_masks is not None)
    if not slots:
        return CamBatch(heat[:, 0], class_ids[:, 0], out_scores[:, 0])
    return CamBatch(heat, class_ids, out_scores)


def _gradients(scores, valid, activations, name) -> list:
    """One ``autograd.grad`` per target slot over the same graph (kept until the last slot).
    ``valid`` (None: every slot holds a target) masks empty slots: their samples add nothing,
    and a slot empty in every sample costs nothing and gets zeros."""
    cols = list(range(scores.shape[1]))
    if valid is not None:
        cols = [k for k in cols if bool(valid[:, k].any())]
    grads: list = [None] * scores.shape[1]
    for i, k in enumerate(cols):
        chosen = scores[:, k]
        if valid is not None:
            chosen = torch.where(valid[:, k], chosen, torch.zeros_like(chosen))
        grads[k] = _gradient(chosen, activations, name, retain=i < len(cols) - 1).float()
    return [torch.zeros_like(activations, dtype=torch.float32) if g is None else g
            for g in grads]


def _unit_gain(grad: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """Each sample's gradient scaled to unit root-mean-square, or (``pooled``) so that its
    mean over the map, the channel weights of Grad-CAM, has unit length. Maps left unscaled
    are compared across inputs (the tiles of one image, blended): the gradient's length is
    the head's sensitivity to that input as a whole (a head that divides by the input's mean
    foreground, or a tile's own area, gives every tile its own gain), while its direction is
    what tells which channels speak for the class. For a global-average-pooling + Linear head
    every tile then gets the whole image's weights; for a segmentation target, whose
    gradient lies on the tile's share of the region only, pooled weights of unit length
    keep a tile with a sliver of the region from getting weights that much smaller."""
    if pooled:
        size = grad.flatten(2).mean(-1).norm(dim=1)
    else:
        size = grad.flatten(1).square().mean(1).sqrt()
    return grad / torch.where(size > 0, size, torch.ones_like(size)).view(
        -1, *[1] * (grad.ndim - 1))


def _per_slot(spec, ctx: CamContext, gradients) -> torch.Tensor:
    """The method's raw maps for every slot, (N, K, *S): a class-free method (Eigen-CAM) once,
    a batched one (Score-CAM: all slots scored from the same masked forwards) in one call,
    any other slot by slot."""
    ids, scores = ctx.class_ids, ctx.scores
    k = ids.shape[1]
    if spec.class_free:
        raw = spec.fn(replace(ctx, class_ids=ids[:, 0], scores=scores[:, 0]))
        return raw[:, None].expand(-1, k, *raw.shape[1:])
    if spec.batched:
        return spec.fn(ctx)
    maps = [spec.fn(replace(ctx, class_ids=ids[:, j], scores=scores[:, j],
                            gradients=None if gradients is None else gradients[j],
                            region_weights=None if ctx.region_weights is None
                            else ctx.region_weights[:, j]))
            for j in range(k)]
    return torch.stack(maps, 1)


def to_heatmaps(raw: torch.Tensor, size: Sequence[int],
                covered: Sequence[int] | None = None, normalize: bool = True) -> torch.Tensor:
    """ReLU, upsample (bi/trilinear) to ``size`` and min-max scale each map to [0, 1];
    flat maps become zeros. ``covered``: the (larger) input size the map's grid stands for
    when the model padded the input to whole patches; the map is upsampled to it and cropped
    to ``size`` (the padding lies after the input on every axis). ``normalize=False`` skips
    the scaling: tiles of one image are blended first and scaled together afterwards."""
    cam = F.relu(raw.float())
    size = tuple(int(s) for s in size)
    full = size if covered is None else tuple(int(s) for s in covered)
    if tuple(cam.shape[1:]) != full:
        mode = {2: "bilinear", 3: "trilinear"}[len(size)]
        cam = F.interpolate(cam[:, None], size=full, mode=mode, align_corners=False)[:, 0]
    if full != size:
        cam = cam[(slice(None), *(slice(0, s) for s in size))]
    if not normalize:
        return cam.contiguous()
    flat = cam.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    ok = span > torch.maximum(hi.abs(), lo.abs()) * 1e-6
    flat = torch.where(ok, (flat - lo) / torch.where(ok, span, torch.ones_like(span)), 0.0)
    return flat.view(cam.shape)


class _Capture(contextlib.AbstractContextManager):
    """Forward hook on the target layer; removed on exit, whatever happened.

    The captured activation is always an (N, C, *spatial) map: transformer tokens (N, T, C) and
    channels-last maps (N, *spatial, C) are read as one (see :mod:`.tokens`). For those the map
    itself is the leaf that requires grad and the network continues from the layer's own layout
    rebuilt from it, so ``autograd.grad`` with respect to the map gives the gradient already in
    map layout (no second reshape, and nothing the engine must know about).
    """

    def __init__(self, layer: nn.Module, name: str, requires_grad: bool,
                 batch: torch.Tensor | None = None, model: nn.Module | None = None):
        self.layer, self.name, self.requires_grad = layer, name, requires_grad
        self.spatial = None if batch is None else tuple(batch.shape[2:])
        self.size = None if batch is None else batch.shape[0]
        self.model = model
        self.activation: torch.Tensor | None = None
        self.problem: str | None = None  # why the output can't be read as a feature map
        self.covered: tuple[int, ...] | None = None  # a padded patch grid's input size
        self.calls = 0
        self.handle = None

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False

    def _hook(self, _module, _inputs, output):
        self.calls += 1
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"the target layer {self.name!r} returns a {type(output).__name__}, not a "
                "tensor; choose a convolutional layer, a transformer block or its norm (or the "
                "block that contains it)."
            )
        act = output.detach()
        layout = self._layout(act) if self.calls == 1 else None
        if layout is not None and layout.kind != "map":
            fmap = layout.to_map(act)  # a copy: in-place ops later can't change it
            self.activation = fmap
            if not self.requires_grad:
                return None  # the network goes on with its own output
            fmap.requires_grad_(True)
            torch.set_grad_enabled(True)
            return layout.from_map(fmap, act)
        if self.requires_grad:
            act.requires_grad_(True)
            # Grad mode from here to the end of the forward only; the enclosing no_grad block
            # restores the caller's mode on exit.
            torch.set_grad_enabled(True)
        self.activation = act
        return act.clone()

    def _layout(self, act: torch.Tensor):
        """The output's layout for this batch, or None (then :attr:`problem` says why when
        the output looks like tokens; other shapes are refused by :meth:`result`)."""
        if self.spatial is None or act.ndim < 3 or act.shape[0] != self.size:
            return None
        dims = len(self.spatial)
        prefix = tokens.prefix_hint(self.model) if act.ndim == 3 else None
        patch = tokens.patch_hint(self.model, dims) if act.ndim == 3 else None
        layout = tokens.read_layout(act.shape, self.spatial, prefix=prefix, patch=patch,
                                    layer=self.layer)
        if layout is None and act.ndim == 3:
            self.problem = tokens.no_grid_message(self.name, act.shape, self.spatial, prefix)
        if layout is not None and layout.kind != "map":
            self.covered = tokens.covered_size(layout.grid, self.spatial,
                                               tokens.patch_hint(self.model, dims))
        return layout

    def result(self, batch: torch.Tensor) -> torch.Tensor:
        if self.calls == 0:
            raise ValueError(
                f"the target layer {self.name!r} did not run during the forward pass (compiled "
                "models ignore hooks added after compilation); explain the uncompiled model, "
                "or choose a layer the forward uses."
            )
        if self.calls > 1:
            raise ValueError(
                f"the target layer {self.name!r} runs {self.calls} times per forward pass, so "
                "its activation is ambiguous; choose a layer that runs once."
            )
        if self.problem is not None:
            raise ValueError(self.problem)
        act = self.activation
        if act.ndim != batch.ndim or act.shape[0] != batch.shape[0]:
            raise ValueError(
                f"the target layer {self.name!r} outputs shape {tuple(act.shape)}, neither a "
                f"(N, C, {'D, ' if batch.ndim == 5 else ''}H, W) feature map nor transformer "
                f"tokens (N, T, C) for input {tuple(batch.shape)}; choose a convolutional "
                "layer or a transformer block (or its norm)."
            )
        return act


def _gradient(scores: torch.Tensor, activations: torch.Tensor, name: str,
              retain: bool = False) -> torch.Tensor:
    if not scores.requires_grad:
        raise ValueError(
            f"the class scores are not differentiable from the target layer {name!r} (does the "
            "model detach it or run it under torch.no_grad?); choose another target_layer or a "
            "gradient-free method ('scorecam', 'eigencam')."
        )
    (grad,) = torch.autograd.grad(scores.sum(), activations, allow_unused=True,
                                  retain_graph=retain)
    if grad is None:
        raise ValueError(
            f"the class scores do not depend on the target layer {name!r}; choose a layer on "
            "the path to the classifier output."
        )
    return grad


def _forward_logits(module: nn.Module, amp_dtype, x: torch.Tensor) -> torch.Tensor:
    """The model's scores for ``x`` without a graph: (N, classes), or a segmentation network's
    (N, classes, *spatial)."""
    with torch.inference_mode(), _autocast(x.device, amp_dtype):
        return _logits(module(x), x)


def _model_output(output):
    """The documented rule for models that don't return a plain tensor: the tensor itself, a
    dict's ``"logits"`` or ``"out"`` entry (or its only tensor), an object's ``.logits``, or
    the first tensor of a tuple / list; None when there is none."""
    logits = output
    if not isinstance(logits, torch.Tensor):
        if isinstance(output, Mapping):
            named = next((output[k] for k in ("logits", "out")
                          if isinstance(output.get(k), torch.Tensor)), None)
            if named is not None:  # Hugging Face's "logits", torchvision segmentation's "out"
                logits = named
            else:
                tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
                logits = tensors[0] if len(tensors) == 1 else None
        elif isinstance(getattr(output, "logits", None), torch.Tensor):
            logits = output.logits
        elif isinstance(output, (tuple, list)):
            logits = next((v for v in output if isinstance(v, torch.Tensor)), None)
    return logits if isinstance(logits, torch.Tensor) else None


def _logits(output, batch: torch.Tensor) -> torch.Tensor:
    """The class scores of a model's output for ``batch``: (N, classes) for a classifier, or
    (N, classes, *spatial) for a segmentation network (an output of the batch's rank)."""
    n = batch.shape[0]
    logits = _model_output(output)
    if logits is None:
        raise ValueError(
            f"can't find the class scores in the model's output ({type(output).__name__}); "
            "return a tensor (N, classes), a tuple whose first tensor is that, or a dict with a "
            "'logits' entry."
        )
    if logits.ndim == 1 and logits.shape[0] == n:
        logits = logits[:, None]
    if logits.shape[0:1] == (n,) and logits.ndim == batch.ndim:
        if seg.is_segmentation_output(logits, batch):
            return logits
        logits = logits.flatten(1)  # a convolutional head's 1 x 1 map: a classifier
    if logits.ndim != 2 or logits.shape[0] != n:
        spatial = "D, H, W" if batch.ndim == 5 else "H, W"
        raise ValueError(
            f"the model's output has shape {tuple(logits.shape)}; a classifier output "
            f"(N={n}, classes) or a segmentation output (N={n}, classes, {spatial}) is needed "
            "to pick the explained class."
        )
    return logits


def _no_masks_for_classifiers(target_masks, logits: torch.Tensor) -> None:
    if target_masks is not None:
        shape = tuple(getattr(target_masks, "shape", ()) or ())
        raise ValueError(
            f"target_masks (shape {shape}) need a segmentation model, whose output is "
            f"(N, classes, *spatial); this model returns class scores of shape "
            f"{tuple(logits.shape)}; leave target_masks out (a mask= on the heatmap restricts "
            "a classifier's regions)."
        )


def _region_targets(spec, logits: torch.Tensor, batch: torch.Tensor, targets, target_masks,
                    multilabel) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """A segmentation model's targets: class ids (N, K), whether they are slots, and each
    slot's region weights (N, K, *S_out) at the output's resolution."""
    if spec.name == "cam":
        usable = ", ".join(m for m in METHODS if m != "cam")
        raise ValueError(
            f"method 'cam' needs a classifier whose logits are a Linear layer over globally "
            f"averaged features, and this model returns a segmentation map "
            f"{tuple(logits.shape)}; use one of {usable}, which explain a class's logits "
            "summed over its region."
        )
    n = logits.shape[0]
    spatial = tuple(logits.shape[2:])
    multilabel = seg.resolve_multilabel(logits, multilabel)
    out = logits.detach()
    given = None
    if target_masks is not None:
        k = None  # the slots per sample that (N, K, *S) masks must match
        if callable(targets):  # known after the call: checked below
            shape = tuple(getattr(target_masks, "shape", ()))
            k = shape[1] if len(shape) == batch.ndim else None
        elif targets is not None:
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                t = torch.as_tensor(targets)
                k = int(t.shape[1]) if t.ndim == 2 else None
        given = seg.region_weights(target_masks, n, k, batch.shape[2:], spatial, logits.device)
    one = given[:, 0] if given is not None and given.shape[1] == 1 else None  # one per sample
    class_ids, slots = _class_ids(
        targets, out,
        pooled=lambda: seg.pooled_class_scores(out, multilabel, one),
        default=lambda: seg.default_targets(out, multilabel, one),
    )
    if given is not None and given.shape[1] not in (1, class_ids.shape[1]):
        raise ValueError(
            f"target_masks has {given.shape[1]} regions per sample but the targets have "
            f"{class_ids.shape[1]} slots; give (N, *spatial) masks or one per slot, "
            f"({n}, {class_ids.shape[1]}, *spatial)."
        )
    if given is not None:
        weights = given.expand(n, class_ids.shape[1], *spatial)
    else:
        weights = seg.predicted_regions(out, class_ids.clamp(min=0), multilabel)
    return class_ids, slots, weights


def _class_ids(targets, logits: torch.Tensor, pooled=None,
               default=None) -> tuple[torch.Tensor, bool]:
    """The classes to explain as (N, K), and whether the caller asked for slots (an (N, K)
    form; otherwise K = 1 and the result drops that axis). A classifier's targets come from
    its logits (N, classes); a segmentation model passes ``pooled()``, the (N, classes) scores
    a callable picks from, and ``default()``, the (N,) classes of ``targets=None``."""
    n, num_classes = logits.shape[:2]
    if targets is None:
        return (logits.detach().argmax(1) if default is None else default())[:, None], False
    if callable(targets):
        targets = targets(logits.detach() if pooled is None else pooled())
        if targets is None:  # the callable only looked: the default choice, as for None
            return _class_ids(None, logits, pooled, default)[0], False
    t = torch.as_tensor(targets)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, not {t.dtype}.")
    t = t.to(device=logits.device, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(n)
    if t.ndim not in (1, 2) or t.shape[0] != n:
        raise ValueError(
            f"targets has shape {tuple(t.shape)}; give None, one class index, {n} indices "
            f"(one per sample), or ({n}, K) indices (K per sample)."
        )
    slots = t.ndim == 2
    lowest = -1 if slots else 0  # -1 marks an empty slot
    bad = (t < lowest) | (t >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"class index {int(t[bad][0])} is out of range: this model has {num_classes} "
            f"classes (0 to {num_classes - 1}"
            + ("; -1 marks an empty slot)." if slots else ").")
        )
    return (t if slots else t[:, None]), slots


def _check_inputs(module, batch) -> None:
    refuse_torchscript(module)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, not {type(module).__name__}.")
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"batch must be a torch.Tensor (N, C, H, W), not {type(batch).__name__}; use "
            "napari_gradcam.explain() for numpy or dask images."
        )
    if batch.ndim not in (4, 5):
        raise ValueError(
            f"batch has shape {tuple(batch.shape)}; give (N, C, H, W) for 2D or "
            "(N, C, D, H, W) for 3D models (add the batch and channel axes)."
        )
    if not batch.is_floating_point():
        raise TypeError(
            f"batch has dtype {batch.dtype}; convert it to float and normalise it as the model "
            "expects."
        )
    ref = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()), None)
    if ref is not None and ref.device != batch.device:
        raise ValueError(
            f"the model is on {ref.device} but the batch is on {batch.device}; move one of "
            f"them (model.to(device) or batch.to(device))."
        )


# What PyTorch says when an input is smaller than a layer's kernel, padding or pooling window
_TOO_SMALL = re.compile(
    r"padding size should be less than|kernel size can't be greater|output size is too small"
    r"|sizes should be greater than 0|smaller than kernel size|output size .* too small",
    re.IGNORECASE,
)
_PROBE_LIMIT = {2: 2048, 3: 256}  # largest side tried when looking for the minimum size


@contextlib.contextmanager
def size_errors(module: nn.Module, batch: torch.Tensor):
    """Turn PyTorch's padding / kernel-size errors for an input smaller than the model can
    take into a ValueError that says the smallest size it can take. That size is found by
    running the model on blank inputs of growing side (1, 2, 4, ... then a bisection): only
    after such an error, so explaining costs nothing extra."""
    try:
        yield
    except (RuntimeError, ValueError) as err:
        if isinstance(err, torch.cuda.OutOfMemoryError) or not _TOO_SMALL.search(str(err)):
            raise
        side = minimum_side(module, batch)
        spatial = tuple(int(s) for s in batch.shape[2:])
        if side is None or min(spatial) >= side:
            raise
        raise ValueError(
            f"the image is {' x '.join(map(str, spatial))} pixels, smaller than this model can "
            f"take: it needs at least {' x '.join([str(side)] * len(spatial))} pixels (its "
            "convolutions, padding and pooling need that much); resize or pad the image to at "
            "least that size, or give the model a fixed input_size."
        ) from err


def minimum_side(module: nn.Module, batch: torch.Tensor) -> int | None:
    """The smallest side s for which the model runs on a blank (1, C, s, s[, s]) input, or None
    when no side up to a limit does (the failure is then not about size)."""
    dims = batch.ndim - 2

    def runs(side: int) -> bool:
        x = torch.zeros((1, batch.shape[1]) + (side,) * dims, dtype=batch.dtype,
                        device=batch.device)
        try:
            with torch.inference_mode(), explaining(module):
                module(x)
        except Exception:  # noqa: BLE001 - any failure means "not at this size"
            return False
        return True

    fail, side = 0, 1
    while not runs(side):
        fail, side = side, side * 2
        if side > _PROBE_LIMIT[dims]:
            return None
    while side - fail > 1:  # the smallest working side lies in (fail, side]
        mid = (fail + side) // 2
        fail, side = (fail, mid) if runs(mid) else (mid, side)
    return side


_AMP = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def _amp_dtype(amp):
    if amp is None or amp is False:
        return None
    if amp is True:
        return torch.bfloat16
    if isinstance(amp, torch.dtype) and amp in (torch.bfloat16, torch.float16):
        return amp
    if isinstance(amp, str) and amp.lower() in _AMP:
        return _AMP[amp.lower()]
    raise ValueError(f"amp={amp!r}: use None, True, 'bf16' or 'fp16'.")


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
