"""The CAM family, one small function per method.

Every method receives a :class:`CamContext` and returns the raw class activation map at the
target layer's resolution, shape (N, *spatial), float32, on the activations' device. The engine
then rectifies (ReLU), upsamples to the input size and min-max normalises each map.

Notation: A = activations (N, K, *S), G = gradient of the explained class
score with respect to A, k = channel, sums and means run over the spatial positions.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .segmentation import slot_scores


@dataclass
class CamContext:
    activations: torch.Tensor  # (N, K, *S) float32
    gradients: torch.Tensor | None  # same shape, or None for gradient-free methods
    class_ids: torch.Tensor  # (N,) int64; (N, K) for a batched method (every target slot)
    scores: torch.Tensor  # the model's logit for class_ids, same shape, float32
    num_classes: int  # the model's number of outputs
    batch: torch.Tensor  # the model input (N, C, *S_in)
    module: nn.Module
    target_name: str
    # inputs -> logits (N, classes), or a segmentation model's (N, classes, *S_out); no graph
    forward: Callable[[torch.Tensor], torch.Tensor]
    options: dict = field(default_factory=dict)
    # A segmentation model's targets: each one's region weights at the output's resolution,
    # (N, *S_out), (N, K, *S_out) with (N, K) class_ids; None for a classifier.
    region_weights: torch.Tensor | None = None

    def target_scores(self, outputs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """The explained scores (len(samples), T) in ``outputs``, the ``forward`` of inputs
        made from those samples of the batch: each target's logit, or, for a segmentation
        model, its class's logits summed over its region (the weights of *that* sample)."""
        ids = self.class_ids if self.class_ids.ndim == 2 else self.class_ids[:, None]
        if self.region_weights is None:
            return outputs.float().gather(1, ids[samples])
        w = self.region_weights
        w = w if self.class_ids.ndim == 2 else w[:, None]
        return slot_scores(outputs, ids[samples], w[samples])


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[CamContext], torch.Tensor]
    needs_gradients: bool
    summary: str
    class_free: bool = False  # the map ignores the class: computed once for all target slots
    batched: bool = False  # takes class_ids (N, K) and returns (N, K, *S) in one call
    pooled: bool = False  # channel weights pooled from the gradient over the whole map


METHODS: dict[str, Method] = {}


def _key(name: str) -> str:
    """'Grad-CAM++', 'gradcam_pp', 'GradCAMPlusPlus' -> 'gradcam++'."""
    key = name.lower().translate(str.maketrans("", "", "-_ ")).replace("plusplus", "++")
    return key[:-2] + "++" if key.endswith("pp") else key


def register_method(name: str, *, needs_gradients: bool, class_free: bool = False,
                    batched: bool = False, pooled: bool = False):
    """Decorator: make ``fn(ctx) -> (N, *S) map`` available as ``method=name``.

    The engine calls ``fn`` once per target slot with (N,) class ids, unless ``class_free``
    (the map does not depend on the class: one call serves every slot) or ``batched`` (``fn``
    takes ctx.class_ids (N, K) and returns (N, K, *S), sharing work between the slots).
    ``pooled``: the map weighs channels by the gradient pooled over the map (Grad-CAM), so
    maps left unscaled are compared by giving the pooled weights unit length, rather than the
    gradient itself (which an element-wise method such as LayerCAM uses)."""

    def deco(fn):
        METHODS[name] = Method(name, fn, needs_gradients,
                               (fn.__doc__ or "").strip().split("\n")[0], class_free, batched,
                               pooled)
        return fn

    return deco


def get_method(name: str) -> Method:
    if isinstance(name, Method):
        return name
    if not isinstance(name, str):
        raise TypeError(f"method must be a name such as 'gradcam', not {type(name).__name__}.")
    for method in METHODS.values():
        if _key(method.name) == _key(name):
            return method
    raise ValueError(
        f"unknown CAM method {name!r}; choose one of: {', '.join(METHODS)}."
    )


def available_methods() -> list[str]:
    return list(METHODS)


def _weighted_sum(weights: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """sum_k w[n, k] * A[n, k, ...] -> (N, *S)."""
    flat = activations.flatten(2)
    return torch.einsum("nk,nkp->np", weights, flat).view(
        activations.shape[0], *activations.shape[2:]
    )


def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).sum(-1)


@register_method("cam", needs_gradients=False)
def cam(ctx: CamContext) -> torch.Tensor:
    """CAM (Zhou et al. 2016): sum_k W_fc[c, k] A_k for a global-average-pooling + Linear head."""
    head = classifier_head(ctx)
    return _weighted_sum(head.weight.detach().float()[ctx.class_ids], ctx.activations)


@register_method("gradcam", needs_gradients=True, pooled=True)
def gradcam(ctx: CamContext) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): w_k = mean_ij G."""
    return _weighted_sum(ctx.gradients.flatten(2).mean(-1), ctx.activations)


@register_method("gradcam++", needs_gradients=True, pooled=True)
def gradcam_plus_plus(ctx: CamContext) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018): a = G^2 / (2 G^2 + sum_ij(A) G^3), w_k = sum relu(G) a."""
    A, G = ctx.activations, ctx.gradients
    g2 = G * G
    sum_a = _spatial_sum(A).view(*A.shape[:2], *([1] * (A.ndim - 2)))
    alpha = g2 / (2 * g2 + sum_a * g2 * G + 1e-6)
    alpha = torch.where(G != 0, alpha, torch.zeros_like(alpha))
    return _weighted_sum(_spatial_sum(F.relu(G) * alpha), A)


@register_method("hirescam", needs_gradients=True)
def hirescam(ctx: CamContext) -> torch.Tensor:
    """HiResCAM (Draelos & Carin 2020): sum_k G * A, element-wise."""
    return (ctx.gradients * ctx.activations).sum(1)


@register_method("xgradcam", needs_gradients=True)
def xgradcam(ctx: CamContext) -> torch.Tensor:
    """XGrad-CAM (Fu et al. 2020): w_k = sum(G A) / (sum A + eps)."""
    A, G = ctx.activations, ctx.gradients
    return _weighted_sum(_spatial_sum(G * A) / (_spatial_sum(A) + 1e-7), A)


@register_method("layercam", needs_gradients=True)
def layercam(ctx: CamContext) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): sum_k relu(G) * A, element-wise."""
    return (F.relu(ctx.gradients) * ctx.activations).sum(1)


@register_method("scorecam", needs_gradients=False, batched=True)
def scorecam(ctx: CamContext) -> torch.Tensor:
    """Score-CAM (Wang et al. 2020): mask the input with each min-max scaled, upsampled channel,
    score the masked inputs, softmax over channels, w_k = that softmax.

    Every target slot is scored from the same masked forwards (they return every class's
    logit), so K targets cost what one does."""
    A, x = ctx.activations, ctx.batch
    ids = ctx.class_ids if ctx.class_ids.ndim == 2 else ctx.class_ids[:, None]  # (N, T)
    n, k = A.shape[:2]
    flat = A.flatten(2)
    # A constant channel scales to all zeros (as (up - min) / (max - min + eps) does), so every
    # such channel masks the input to zeros: one forward of a zero image scores them all.
    constant = flat.amax(-1) == flat.amin(-1)
    scores = torch.empty(n, k, ids.shape[1], device=A.device, dtype=torch.float32)
    if bool(constant.any()):
        zero = ctx.forward(torch.zeros_like(x[:1]))
        every = torch.arange(n, device=A.device)
        scores[:] = ctx.target_scores(zero.expand(n, *zero.shape[1:]), every)[:, None]
    pairs = (~constant).nonzero()
    chunk = ctx.options.get("chunk_size") or _default_chunk(x)
    mode = "bilinear" if A.ndim == 4 else "trilinear"
    # a patch grid the model padded the input for stands for a larger input: crop to x's
    full = ctx.options.get("covered") or x.shape[2:]
    crop = (slice(None), slice(None), *(slice(0, s) for s in x.shape[2:]))
    for start in range(0, pairs.shape[0], chunk):
        ni, ki = pairs[start : start + chunk].unbind(1)
        up = F.interpolate(A[ni, ki][:, None], size=tuple(full), mode=mode,
                           align_corners=False)[crop]
        up_flat = up.flatten(1)
        lo = up_flat.amin(1).view(-1, *([1] * (up.ndim - 1)))
        hi = up_flat.amax(1).view(-1, *([1] * (up.ndim - 1)))
        masked = x[ni] * ((up - lo) / (hi - lo + 1e-8)).to(x.dtype)
        scores[ni, ki] = ctx.target_scores(ctx.forward(masked), ni)
    weights = torch.softmax(scores, dim=1)  # (N, channels, T)
    maps = torch.einsum("nkt,nkp->ntp", weights, flat).view(n, ids.shape[1], *A.shape[2:])
    return maps if ctx.class_ids.ndim == 2 else maps[:, 0]


def _default_chunk(x: torch.Tensor) -> int:
    """Masked inputs per forward: large on accelerators, bounded to ~256 MB of masked input."""
    per_image = x[0].numel() * x.element_size()
    cap = 128 if x.device.type != "cpu" else 32
    return max(1, min(cap, (256 << 20) // max(per_image, 1)))


def _top_eigenpair(sym: torch.Tensor, squarings: int | None = None):
    """Largest eigenvalue and its unit eigenvector of a batch of symmetric PSD matrices (N, m, m).

    LAPACK's ``eigh`` where it is fast: on the CPU, and on CUDA up to m = 32 (a batched Jacobi
    solver). Above that, CUDA's ``eigh`` solves the batch one matrix at a time (64 matrices of
    49 x 49 took 4x a ResNet-50 forward on an H100), so there the top eigenvector comes from
    repeated squaring: after k squarings (trace-normalised) the matrix is sym^(2^k), in which
    every other eigenvalue has shrunk by (l_i / l_1)^(2^k); its largest column is the top
    eigenvector, polished by three power steps. ``squarings`` forces that path (for tests).
    """
    wide = torch.float32 if sym.device.type == "mps" else torch.float64  # MPS has no float64
    g = sym.to(wide)
    if squarings is None and (sym.device.type == "cpu" or sym.shape[-1] <= 32):
        evals, evecs = torch.linalg.eigh(g)
        return evals[..., -1].clamp(min=0), evecs[..., -1]

    def trace(h):
        return h.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=torch.finfo(wide).tiny)

    h = g / trace(g)[:, None, None]
    for _ in range(12 if squarings is None else squarings):
        h = h @ h
        h = h / trace(h)[:, None, None]
    col = h.norm(dim=-2).argmax(-1)  # (N,)
    v = h.gather(2, col[:, None, None].expand(-1, h.shape[1], 1))  # (N, m, 1)
    for _ in range(3):
        v = g @ v
        v = v / v.norm(dim=1, keepdim=True).clamp(min=torch.finfo(wide).tiny)
    lam = (v * (g @ v)).sum((1, 2))
    return lam.clamp(min=0), v[..., 0]


def eigen_projection(activations: torch.Tensor) -> torch.Tensor:
    """Projection of the centred activations on their first principal component, (N, *S).

    With X the centred (positions P x channels K) matrix, the projection X v1 equals
    sigma1 u1: it comes from the top eigenpair of the smaller of the Gram matrix X X^T (P x P)
    and the covariance X^T X (K x K), batched on the device; that is the SVD's answer at a
    fraction of its cost. The sign is arbitrary: it is fixed here so that the projection
    correlates positively with the mean over channels.
    """
    n = activations.shape[0]
    x = activations.flatten(2).transpose(1, 2)  # (N, P, K)
    x = x - x.mean(1, keepdim=True)
    p, k = x.shape[1:]
    if p <= k:
        lam, u = _top_eigenpair(x @ x.transpose(1, 2))
        proj = (u * lam[:, None].sqrt()).to(x.dtype)  # (N, P)
    else:
        _, v = _top_eigenpair(x.transpose(1, 2) @ x)
        proj = (x @ v[..., None].to(x.dtype))[..., 0]  # (N, P)
    ref = activations.mean(1).flatten(1)
    ref = ref - ref.mean(1, keepdim=True)
    sign = torch.sign((proj * ref).sum(1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (proj * sign[:, None]).view(n, *activations.shape[2:])


@register_method("eigencam", needs_gradients=False, class_free=True)
def eigencam(ctx: CamContext) -> torch.Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): first principal component of the activations."""
    return eigen_projection(torch.nan_to_num(ctx.activations))


# model -> {target layer name: head name}, verified once: the check needs host synchronisation,
# and whether the logits are Linear(mean(A)) is a property of the architecture, not of the input.
_HEADS: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


def classifier_head(ctx: CamContext) -> nn.Linear:
    """The Linear layer that maps the globally averaged target activations to the logits.

    It must be exactly that: the model's logits must equal ``Linear(mean_ij A)``, or
    ``Linear(s * mean_ij A)`` with one positive ``s`` per input for every class (a head that
    divides the pooled vector by something of the whole input, such as its foreground's
    share: a map is only defined up to a positive scale, so the weights still apply);
    otherwise CAM's weights would not explain this model.
    """
    known = _HEADS.get(ctx.module, {}).get(ctx.target_name)
    if known is not None:
        return ctx.module.get_submodule(known)
    k = ctx.activations.shape[1]
    linears = [
        (name, m) for name, m in ctx.module.named_modules()
        if isinstance(m, nn.Linear) and m.in_features == k
    ]
    advice = (
        "use method='gradcam' (identical to CAM on such heads), or choose the layer right "
        "before the global pooling as target_layer"
    )
    if not linears:
        raise ValueError(
            f"method 'cam' needs a global-average-pooling + Linear head on the target layer "
            f"{ctx.target_name!r} ({k} channels), and this model has no Linear layer with "
            f"{k} inputs; {advice}."
        )
    name, head = linears[-1]
    pooled = ctx.activations.flatten(2).mean(-1)
    if head.out_features != ctx.num_classes:
        raise ValueError(f"method 'cam': the Linear layer {name!r} has {head.out_features} "
                         f"outputs but the model has {ctx.num_classes} classes; {advice}.")
    bias = 0.0 if head.bias is None else head.bias.detach().float()
    linear = F.linear(pooled, head.weight.detach().float())  # (N, classes), without bias
    every = ctx.options.get("logits")
    tol = 5e-2 if ctx.options.get("amp") else 1e-3
    if every is not None and tuple(every.shape) == tuple(linear.shape) and linear.shape[1] > 1:
        # every class's logit pins the per-input scale s (least squares); s = 1 is plain GAP
        target = every.float() - bias
        norm = (linear * linear).sum(1)
        s = (target * linear).sum(1) / norm.clamp(min=1e-12)
        s = torch.where(norm > 1e-12, s, torch.ones_like(s))  # nothing pooled: any s fits
        predicted, actual = s[:, None] * linear + bias, every.float()
        fits = bool((s > 0).all())
    else:
        predicted = (linear + bias).gather(1, ctx.class_ids[:, None])[:, 0]
        actual, fits = ctx.scores, True
    scale = float(actual.abs().max()) + 1e-6
    if not fits or not torch.allclose(predicted, actual, rtol=tol, atol=tol * scale):
        raise ValueError(
            f"method 'cam': the model's output is not Linear({name!r}) applied to the global "
            f"average of {ctx.target_name!r}, so CAM's weights don't apply; {advice}."
        )
    _HEADS.setdefault(ctx.module, {})[ctx.target_name] = name
    return head
