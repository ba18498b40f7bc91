"""Reading transformer activations as feature maps.

CAM methods weigh channels over spatial positions, so they need (N, C, H, W) (or (N, C, D, H, W))
maps. Transformers hand their layers other layouts:

- tokens (N, T, C), as in ViT and DeiT: T is the patch grid flattened row by row, after a few
  prefix tokens (the class token, DeiT's distillation token, register tokens). The prefix count
  is the model's ``num_prefix_tokens`` when it declares one (timm's ViTs do), else the smallest
  count p in 0..8 for which T - p tokens form the input's grid. The grid is the input's spatial
  size over an integer patch size, rounded down (strided patch embedding) or up (dynamic
  padding); the model's own ``patch_size`` (timm's and Hugging Face's patch embeddings carry
  one) is tried, with every prefix count, before every other patch size.
- channels last (N, H, W, C) / (N, D, H, W, C), as in Swin's stages: permuted, not reshaped.
  An output of the batch's rank is read channels last only when its axes 1 .. -2 form the
  input's grid exactly (one integer stride for every axis) and its axes 2 .. form no
  plausible grid (a map whose shape can't be the input's, shrunk by one factor, give or take
  the few pixels a convolution without padding loses); or, when both readings are plausible,
  when the layer itself works on the last axis (a ``Linear``, or a ``LayerNorm`` over it).
  Every other output of the batch's rank is an ordinary (N, C, *spatial) map and is left as
  it is, so convolutional networks see no change.

:func:`read_layout` says which layout an activation has; :class:`Layout` converts between it
and the map, both ways, so that the engine can differentiate with respect to the map itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

MAX_PREFIX = 8  # class + distillation + registers: timm's largest register count is 8


@dataclass(frozen=True)
class Layout:
    """How a layer's output maps onto an (N, C, *grid) feature map.

    kind: ``"map"`` (already one), ``"tokens"`` ((N, prefix + prod(grid), C)) or
    ``"channels_last"`` ((N, *grid, C)).
    """

    kind: str
    grid: tuple[int, ...] = ()
    prefix: int = 0

    def to_map(self, out: torch.Tensor) -> torch.Tensor:
        """The (N, C, *grid) map as a new contiguous tensor (never a view of ``out``, so an
        in-place operation later in the network can't change it)."""
        if self.kind == "tokens":
            body = out[:, self.prefix:].movedim(2, 1)
            return body.clone(memory_format=torch.contiguous_format).view(
                out.shape[0], out.shape[2], *self.grid)
        if self.kind == "channels_last":
            return out.movedim(-1, 1).clone(memory_format=torch.contiguous_format)
        return out.clone()

    def from_map(self, fmap: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's own layout rebuilt from ``fmap`` (and ``out``'s prefix tokens) as a new
        contiguous tensor that is differentiable with respect to ``fmap``."""
        if self.kind == "tokens":
            body = fmap.flatten(2).transpose(1, 2)
            if self.prefix:
                return torch.cat([out[:, :self.prefix].to(fmap.dtype), body], 1)
            return body.clone(memory_format=torch.contiguous_format)
        if self.kind == "channels_last":
            return fmap.movedim(1, -1).clone(memory_format=torch.contiguous_format)
        return fmap.clone()


def prefix_hint(model: nn.Module | None) -> int | None:
    """The model's declared number of prefix tokens (timm's ``num_prefix_tokens``), looked up
    on the model and then on its submodules (a wrapper may hold the transformer)."""
    if model is None:
        return None
    for sub in model.modules():
        value = getattr(sub, "num_prefix_tokens", None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def patch_hint(model: nn.Module | None, dims: int) -> tuple[int, ...] | None:
    """The patch size of the model's patch embedding (an int or one int per axis), if any."""
    if model is None:
        return None
    for sub in model.modules():
        value = getattr(sub, "patch_size", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return (value,) * dims
        if (isinstance(value, (tuple, list)) and len(value) == dims
                and all(isinstance(v, int) and v > 0 for v in value)):
            return tuple(value)
    return None


def _strided(spatial, stride) -> list[tuple[int, ...]]:
    """The grids a stride gives: every axis rounded down, or every axis rounded up."""
    down = tuple(s // k for s, k in zip(spatial, stride))
    up = tuple(-(-s // k) for s, k in zip(spatial, stride))
    return [down] if down == up else [down, up]


def token_grid(count: int, spatial, patch=None, *, any_patch=True) -> tuple[int, ...] | None:
    """The grid of ``count`` patch tokens for an input of this spatial shape, or None.

    ``patch`` (the model's patch size) is tried first, then (unless ``any_patch`` is False)
    every integer patch size, the same on every axis."""
    spatial = tuple(int(s) for s in spatial)
    if count < 1:
        return None
    if patch is not None:
        for grid in _strided(spatial, patch):
            if math.prod(grid) == count and min(grid) >= 1:
                return grid
    if not any_patch:
        return None
    for k in range(1, max(spatial) + 1):
        grids = _strided(spatial, (k,) * len(spatial))
        for grid in grids:
            if math.prod(grid) == count and min(grid) >= 1:
                return grid
        if math.prod(grids[-1]) < count:  # grids only shrink as the patch grows
            break
    return None


def split_tokens(count: int, spatial, prefix=None, patch=None) -> tuple[int, tuple] | None:
    """``(prefix tokens, grid)`` for a token axis of ``count``, or None when no prefix of
    0 .. MAX_PREFIX tokens leaves a grid. The model's declared prefix is tried first (the patch
    embedding's own output has none, so 0 follows it). Every prefix is tried with the model's
    own patch size before any prefix with another patch size: 4 x 4 patches of 32 plus 5
    register tokens must not read as one class token and a 3 x 6 grid of some other stride."""
    order = list(dict.fromkeys(([prefix] if prefix is not None else [])
                               + list(range(MAX_PREFIX + 1))))
    passes = ([{"any_patch": False}] if patch is not None else []) + [{}]
    for kw in passes:
        for p in order:
            grid = token_grid(count - p, spatial, patch, **kw)
            if grid is not None:
                return p, grid
    return None


def covered_size(grid, spatial, patch) -> tuple[int, ...] | None:
    """The input size a grid of the model's ``patch`` size covers when it was rounded up
    (a patch embedding that pads the input, as timm's ``dynamic_img_pad`` does at the bottom
    and right), else None. Heatmaps are upsampled to that size and cropped to the input, so
    each cell keeps its patch's place instead of being stretched over the unpadded input."""
    if patch is None or len(patch) != len(spatial):
        return None
    grid, spatial = tuple(int(g) for g in grid), tuple(int(s) for s in spatial)
    down, up = _strided(spatial, patch)[0], _strided(spatial, patch)[-1]
    if grid != up or up == down:
        return None
    return tuple(g * int(k) for g, k in zip(grid, patch))


def is_grid(shape, spatial) -> bool:
    """Whether ``shape`` is the input's spatial shape over one integer stride (rounded down or
    up on every axis)."""
    shape, spatial = tuple(shape), tuple(int(s) for s in spatial)
    if len(shape) != len(spatial) or min(shape) < 1:
        return False
    return any(shape in _strided(spatial, (k,) * len(spatial))
               for k in range(1, max(spatial) + 1))


def near_grid(shape, spatial) -> bool:
    """Whether ``shape`` could be the input's spatial shape shrunk by one factor, give or take
    a few pixels per axis (convolutions without padding lose some at the borders)."""
    shape, spatial = tuple(shape), tuple(int(s) for s in spatial)
    if len(shape) != len(spatial):
        return False
    slack = 2 + 0.1 * max(shape)
    low = max((s - slack) / n for s, n in zip(shape, spatial))
    high = min((s + slack) / n for s, n in zip(shape, spatial))
    return low <= high


def _works_on_last_axis(layer: nn.Module | None, channels: int) -> bool:
    if isinstance(layer, nn.Linear):
        return layer.out_features == channels
    if isinstance(layer, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        name = type(layer).__name__.lower()
        shape = tuple(layer.normalized_shape)
        return shape == (channels,) and not name.endswith(("2d", "3d"))
    return False


def read_layout(shape, spatial, *, prefix=None, patch=None, layer=None) -> Layout | None:
    """The layout of an activation of ``shape`` for an input of ``spatial`` shape, or None
    when it can't be read as a feature map (wrong rank, tokens that form no grid)."""
    shape, dims = tuple(shape), len(spatial)
    if len(shape) == 3:
        found = split_tokens(shape[1], spatial, prefix, patch)
        if found is None:
            return None
        return Layout("tokens", found[1], found[0])
    if len(shape) != dims + 2:
        return None
    if (not near_grid(shape[2:], spatial) or _works_on_last_axis(layer, shape[-1])) and \
            is_grid(shape[1:-1], spatial):
        return Layout("channels_last", shape[1:-1])
    return Layout("map", shape[2:])


def no_grid_message(name: str, shape, spatial, prefix=None) -> str:
    """One sentence for a token output that forms no patch grid for this input."""
    size = " x ".join(str(int(s)) for s in spatial)
    declared = (f" (the model declares {prefix} prefix tokens)" if prefix is not None
                else f" (less 0 to {MAX_PREFIX} class, distillation or register tokens)")
    return (
        f"the target layer {name!r} outputs tokens of shape {tuple(shape)}, but "
        f"{shape[1]} tokens{declared} form no patch grid for a {size} input; give the model "
        "the input size it was built for, choose a layer inside the transformer's blocks "
        "(e.g. a block's first norm), or set the model's num_prefix_tokens."
    )
