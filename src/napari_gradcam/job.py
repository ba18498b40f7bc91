"""One explain job for every front end: methods x targets x images -> heatmaps, the combined
heatmap, regions and summary rows.

The widget, the ``batch`` command, its dask workers and ``example`` all describe what they want
as an :class:`ExplainJob` (model, methods, target, region options, mask) and leave the target
and method bookkeeping to it:

- ``target`` is each image's predicted class (None), one class (index or name), or ``"found"``:
  every class, counting in an image only where its logit is positive (multi-label models);
- every target of a batch is explained from one forward pass per method (the engine takes the
  gradient of each class's score over the same graph): for a model with a few classes "every
  class found" costs about what one class does. It explains every class of the model in every
  image, though, so for hundreds of classes it costs a gradient and a map per class: give those
  models one class, or the prediction;
- :meth:`ExplainJob.explain` explains one batch of raw pixels, :meth:`ExplainJob.summarise`
  turns results into the heatmap to show, regions and rows, and :meth:`ExplainJob.iter_run`
  does both over a whole (lazy) array, yielding progress and stopping when closed;
- regions have the model's dimensions: a 3D model's volumes give 3D regions (boxes over planes,
  a polygon in every plane crossed), a 2D model's images (also the planes of a volume it
  explains slice by slice) 2D ones; ``regions={"ndim": 2}`` asks a 3D model for plane-wise
  regions instead;
- a segmentation model (its output is a map of class logits per pixel) is explained for a class
  *and a region*: the class's logits summed over its predicted region ("predicted <class>"), or
  over ``target_mask`` ("why is *this* region <class>"); ``"found"`` is every class predicted
  somewhere, background excluded; :meth:`ExplainJob.segment` gives the predicted labels;
- a mask either multiplies the heatmap (``mask_mode="multiply"``, the default, as a reader masks
  an X-ray by its lungs: thresholds relative to the heat inside the mask, and the heatmap shown
  or written is the masked one) or only restricts the regions (``"restrict"``: thresholds from
  the whole map, heatmap unmasked).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch

from .annotations import class_name
from .cam import get_method, is_segmentation_output
from .cam._state import explaining
from .cam.segmentation import known_output, remember_output
from .explain_arrays import (
    Progress,
    Runner,
    check_channels,
    check_weights,
    layout,
    mask_rows,
    pad_sides,
    read_ahead,
    run_generator,
)
from .models.spec import first_conv
from .regions import find_regions
from .tiles import (
    DEFAULT_OVERLAP,
    MaskedHeat,
    SlotAxis,
    Tiling,
    check_tile_mask,
    check_tile_option,
    iter_tiled,
    open_outputs,
    resolve_tiling,
)

FOUND = "found"
REGION_DEFAULTS = {"threshold": 0.5, "min_area": 16, "simplify": 1.0, "mask_mode": "multiply"}


def is_found(target) -> bool:
    """Whether ``target`` asks for every class found (``"found"``, any case or spacing)."""
    return isinstance(target, str) and target.strip().lower() == FOUND


def _every_class(scores: torch.Tensor) -> torch.Tensor:
    """Targets for "found": every class in its own slot (slot k = class k), for every image;
    which of them count is decided from their scores afterwards. A score of exactly 0 leaves
    the slot empty (-1): for a segmentation model that is a class predicted nowhere in the
    region (its pooled score sums no pixel), which then costs no gradient."""
    n, classes = scores.shape
    every = torch.arange(classes, device=scores.device).expand(n, classes)
    return torch.where(scores != 0, every, torch.full_like(every, -1))


_PROBE_SIDE = {2: 64, 3: 32}
_PROBE_LIMIT = 2048 * 2048  # pixels (voxels) of the largest blank input probed


def is_segmentation(spec) -> bool | None:
    """Whether ``spec``'s model is a segmentation network: its output has the input's rank,
    (N, classes, *spatial), rather than (N, classes). Found by one forward of a blank input of
    the model's input size (or a small one; padded to the multiple a U-Net needs, batched as a
    static-batch program needs), once per model, unless the model was explained already (the
    engine remembers what its output looked like). None when the probe can't tell (the model
    refuses blank inputs of that size): the first explanation decides."""
    module = spec.module
    known = known_output(module)
    if known is not None:
        return known
    _name, conv = first_conv(module)
    dims = 3 if isinstance(conv, torch.nn.Conv3d) else 2
    size = tuple(spec.input_size or (_PROBE_SIDE[dims],) * dims)
    if np.prod(size) > _PROBE_LIMIT:  # a probe that big could exhaust memory: ask the first run
        return None
    ref = next(iter(module.parameters()), None)
    x = torch.zeros((int(spec.extra.get("fixed_batch") or 1), spec.in_channels, *size),
                    device=ref.device if ref is not None else "cpu")
    for multiple in (1, 2, 4, 8, 16, 32, 64):
        try:
            with torch.inference_mode(), explaining(module):
                result = is_segmentation_output(module(pad_sides(x, multiple)), x)
        except Exception:  # noqa: BLE001 - any failure: try a padded size, else don't know
            continue
        remember_output(module, result)
        return result
    return None


def is_multilabel(spec, num_classes: int) -> bool:
    """Whether the model's classes are decided each on its own (sigmoid > 0.5) rather than one
    per image or pixel (the largest logit): the spec's ``output``, else one output channel."""
    return spec.output == "multilabel" or (spec.output is None and num_classes == 1)


def probabilities(spec, logits) -> np.ndarray:
    """The model's logits (..., classes) as probabilities, float32 of the same shape: sigmoid
    of each class for a multi-label head, softmax over the classes otherwise (``spec.output``,
    else decided from the head). Every place that shows what the model said uses this, so the
    widget, the batch summary and the example agree."""
    x = np.asarray(logits, np.float64)
    if is_multilabel(spec, x.shape[-1]):
        return (1 / (1 + np.exp(-x))).astype(np.float32)
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def background_class(spec, num_classes: int) -> int | None:
    """The class that means "nothing here" in a segmentation model's output: class 0 of a
    softmax head of more than one class (the convention of MONAI and segmentation_models_pytorch
    training recipes); a multi-label head has none."""
    return None if is_multilabel(spec, num_classes) or num_classes < 2 else 0


class BatchResult(NamedTuple):
    """One batch of n images explained for K targets each (K = 1 unless the target is
    "found", where K is the model's number of classes and slot k is class k)."""

    heatmaps: dict  # method -> float32 (n, K, *spatial) in [0, 1]
    class_ids: np.ndarray  # int64 (n, K)
    scores: np.ndarray  # float32 (n, K): the model's logit for that class
    kept: np.ndarray  # bool (n, K): the target counts ("found": its logit > 0; else always)
    # float32 (n, K): the model's probability for that class (classifiers; None or NaN where
    # the model gives none: a segmentation model's score sums a region's logits)
    probabilities: np.ndarray | None = None

    def part(self, start: int, stop: int) -> BatchResult:
        """Images ``start:stop``: a batch gathered from several inputs, split back to each."""
        return BatchResult({m: h[start:stop] for m, h in self.heatmaps.items()},
                           self.class_ids[start:stop], self.scores[start:stop],
                           self.kept[start:stop], _probs(self)[start:stop])

    @staticmethod
    def join(parts: list) -> BatchResult:
        """Consecutive batches as one (an input explained over several batches)."""
        return _concat(parts)


class Summary(NamedTuple):
    heatmaps: dict  # method -> (*lead, *spatial): the one target's map, or the hottest kept class
    regions: list  # first method's regions of kept targets, ordered by image, then class
    rows: list  # dicts: index, class, class_id, score, probability, regions (one per kept
    # target or image)


@dataclass
class JobResult:
    """A whole array explained: what :meth:`ExplainJob.iter_run` returns."""

    heatmaps: dict  # method -> (*lead, *spatial), the combined heatmap
    per_target: dict  # method -> (*lead, K, *spatial)
    class_ids: np.ndarray  # (*lead, K)
    scores: np.ndarray  # (*lead, K)
    kept: np.ndarray  # (*lead, K)
    regions: list
    rows: list
    class_names: list
    methods: list
    target_layer: str | None
    device: str
    batch_size: int
    region_options: dict = field(default_factory=dict)
    mask: np.ndarray | None = None
    offset: tuple = ()
    notes: list = field(default_factory=list)  # sentences for the user (empty target regions)
    probabilities: np.ndarray | None = None  # (*lead, K); NaN where the model gives none
    tiling: Tiling | None = None  # the tiles the images were explained in (None: whole)
    storage: object = None  # keeps a temporary folder of zarr heat alive with the result

    def rederive(self, mask=..., **region_options) -> JobResult:
        """Regions, rows and the combined heatmap again from the stored maps, without the
        model: new region options (merged into the old ones) and optionally a new mask (None:
        no mask)."""
        lead = self.class_ids.shape[:-1]
        first = self.per_target[self.methods[0]]
        dims = first.ndim - len(lead) - 1
        options = _check_regions({**self.region_options, **region_options}, dims)
        mask = self.mask if mask is ... else mask
        regions, rows = find_targets(first, self.class_ids, self.scores, self.kept, lead,
                                     self.class_names, options, mask, self.offset,
                                     self.probabilities)
        shown = {m: masked(combine(h, self.kept), mask, options)
                 for m, h in self.per_target.items()}
        return replace(self, heatmaps=shown, regions=regions, rows=rows,
                       region_options=options, mask=mask)

    def regions_of(self, method: str) -> list:
        """``method``'s regions, found as the first method's are (same targets, options and
        mask): for showing each method's regions beside its own heatmap. The first method's
        are :attr:`regions` itself."""
        if method not in self.per_target:
            raise ValueError(f"{method!r} was not run; this result has {self.methods}.")
        if method == self.methods[0]:
            return self.regions
        lead = self.class_ids.shape[:-1]
        regions, _rows = find_targets(self.per_target[method], self.class_ids, self.scores,
                                      self.kept, lead, self.class_names, self.region_options,
                                      self.mask, self.offset, self.probabilities)
        return regions


class ExplainJob:
    """What to explain and how; the model runs only in :meth:`explain`.

    Parameters
    ----------
    spec : a ModelSpec (``load_model(...)``).
    methods : one CAM method name or several (``available_methods()``); regions come from the
        first.
    target : None (each image's predicted class), a class index or name, or ``"found"`` (every
        class with a positive logit in the image).
    regions : keyword arguments for :func:`find_regions` (defaults: threshold 0.5, min_area
        16, simplify 1.0, mask_mode "multiply", ndim the model's: 3 for a 3D model, whose
        volumes then give 3D regions; 2 asks for plane-wise ones).
    mask : regions only where mask > 0: the spatial shape ((H, W), or (D, H, W) for a 3D
        model) for every image, or the leading shape plus the spatial shape. With mask_mode
        "multiply" the combined heatmap is masked too.
    target_mask : segmentation models only: the region whose class logits are explained
        (Seg-Grad-CAM), in the same shapes as ``mask``; bool / integers count where > 0, floats
        are weights. None explains each class over the model's own predicted region of it.
    device, batch_size, target_layer, amp : as for :func:`napari_gradcam.explain`.
    tile : "auto" (default: tile an image that would not fit in memory whole, or, in
        :meth:`iter_run` with ``whole_slide=True``, one larger than the model's input size;
        see :func:`napari_gradcam.tiles.auto_tiling`), None (never tile), or a tile size in
        pixels (int or (rows, cols)): images larger than one tile are explained tile by tile,
        the maps blended and scaled to [0, 1] once per image (:mod:`napari_gradcam.tiles`).
        A model with a fixed input size sees every tile resized to it. Tiles are 2-D (refused
        for a 3D model) and need one class per image (refused with target "found").
    overlap : pixels shared by neighbouring tiles (int or (rows, cols)), below the tile.

    Bad methods, targets, devices or region options raise ValueError / TypeError here, before
    any image is read.
    """

    def __init__(self, spec, methods=("gradcam",), target=None, *, regions=None, mask=None,
                 target_mask=None, device="auto", batch_size=None, target_layer=None,
                 amp=None, tile="auto", overlap=DEFAULT_OVERLAP):
        self.methods = [methods] if isinstance(methods, str) else list(methods)
        if not self.methods:
            raise ValueError("no method given; name at least one, e.g. methods=('gradcam',).")
        for m in self.methods:
            get_method(m)
        self.found = is_found(target)
        self.runner = Runner(spec, self.methods[0], None if self.found else target, device,
                             batch_size, target_layer=target_layer, amp=amp)
        self.spec = spec
        check_tile_option(tile, overlap, self.runner.dims, self.found)
        self.tile, self.overlap = tile, overlap
        self.region_options = _check_regions({**REGION_DEFAULTS, "ndim": self.runner.dims,
                                              **(regions or {})}, self.runner.dims)
        self.mask = mask
        self.target_mask = None if target_mask is None else check_weights(target_mask)
        if self.target_mask is not None and self.segmentation is False:
            raise ValueError("a target mask selects the pixels whose class scores a "
                             "segmentation model explains, but this model is a classifier (one "
                             "score per image); leave the target mask out, or use mask= to "
                             "keep regions inside it.")

    @property
    def segmentation(self) -> bool | None:
        """Whether the model is a segmentation network (a class map per pixel); None until
        the first explanation when a blank probe can't tell."""
        return is_segmentation(self.spec)

    @property
    def target(self):
        """"found", or the class index explained (None: each image's prediction)."""
        return FOUND if self.found else self.runner.class_id

    def explain(self, raw: np.ndarray, target_masks=None, normalize: bool = True,
                targets=...) -> BatchResult:
        """Raw pixels (n, *spatial, channels) -> every method's maps for every target, one
        forward pass per method. ``target_masks`` (n, *spatial): a segmentation model's
        regions to explain, one per image (default: the job's target mask, when it has the
        images' spatial shape). ``normalize=False``: maps not scaled to [0, 1] (tiles of one
        image, blended before one scaling). ``targets``: a class index overriding the job's
        target for this batch (the class decided over a whole tiled image)."""
        runner, spatial = self.runner, tuple(raw.shape[1:-1])
        if target_masks is None and self.target_mask is not None:
            target_masks = mask_rows(self.target_mask, (), spatial, 0, raw.shape[0],
                                     "target mask")
        batch = runner.prepare(raw)
        found = self.found and targets is ...  # a class given overrides "found" too
        if targets is ...:
            targets = _every_class if found else runner.class_id
        # a softmax probability needs every class's logits, which one target's result lacks:
        # the first method's target choice sees them (no extra forward)
        logits = None if found else []
        maps, ids, scores = {}, None, None
        for method in self.methods:
            chosen = targets
            if logits is not None and ids is None:
                chosen = functools.partial(_keep_logits, logits, targets)
            heat, method_ids, method_scores = runner.explain(batch, spatial, method, chosen,
                                                             target_masks, normalize=normalize)
            if not found:  # one target: give it its slot axis
                heat, method_ids, method_scores = heat[:, None], method_ids[:, None], \
                    method_scores[:, None]
            maps[method] = heat
            if ids is None:
                ids, scores = method_ids, method_scores
        if not found:
            probs = np.full(ids.shape, np.nan, np.float32)
            every = _captured(logits or [], ids.shape[0])
            if every is not None and self.segmentation is False:  # known once explained
                probs = np.take_along_axis(probabilities(self.spec, every), ids, 1)
            return BatchResult(maps, ids, scores, np.ones(ids.shape, bool), probs)
        # slot k stays class k; an empty slot (-1) holds no score: 0, so no table shows NaN
        present = ids >= 0
        scores = np.where(present, scores, np.float32(0))
        ids = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        if self.segmentation:  # predicted somewhere in the region (else the slot is empty)
            kept = present
            background = background_class(self.spec, ids.shape[1])
            if background is not None:
                kept &= ids != background
        else:
            kept = scores > 0
        # "found" on a classifier holds every class's logit (slot k = class k)
        probs = (np.full(ids.shape, np.nan, np.float32) if self.segmentation is not False
                 else probabilities(self.spec, scores))
        return BatchResult(maps, ids, scores, kept, probs)

    def segment(self, images, channel_axis=None) -> np.ndarray:
        """The segmentation model's predicted labels for every image of an array: int32 of
        the images' leading + spatial shape; 0 = background (softmax heads) or no class
        (multi-label heads, where class c is c + 1: the most confident class above 0.5)."""
        if self.segmentation is False:
            raise ValueError("this model is a classifier (one score per image), so it has no "
                             "segmentation to show; load a segmentation model.")
        return run_generator(self.iter_segment(images, channel_axis))

    def _layout(self, images, channel_axis):
        """The array (anything array-like made one), its :class:`Layout` for this model, and
        its number of images; channels checked against the model's."""
        if not hasattr(images, "shape") or not hasattr(images, "__getitem__"):
            images = np.asarray(images)
        lay = layout(images.shape, channel_axis, self.runner.dims,
                     in_channels=self.spec.in_channels)
        check_channels(lay.channels, self.spec.in_channels)
        return images, lay, lay.count if lay.lead else 1

    def iter_segment(self, images, channel_axis=None):
        """:meth:`segment` as a generator yielding a Progress per batch (closing it stops)."""
        images, lay, n = self._layout(images, channel_axis)
        runner = self.runner
        labels = np.zeros((n, *lay.spatial), np.int32)
        with contextlib.closing(read_ahead(images, lay, runner)) as batches:
            for start, stop, raw in batches:
                labels[start:stop] = runner.segment(runner.prepare(raw), lay.spatial)
                yield Progress(stop, n, "segmentation", runner.batch_size)
        return labels.reshape(*lay.lead, *lay.spatial)

    def summarise(self, result: BatchResult, lead=(), mask=..., offset=()) -> Summary:
        """Per image the combined heatmap per method, the first method's regions and the
        summary rows. ``lead`` is the images' leading shape (() for one image); ``mask``
        defaults to the job's; ``offset`` is added to each image's index (see
        :func:`shift_index`)."""
        lead = tuple(lead)
        mask = self.mask if mask is ... else mask
        ids = result.class_ids.reshape(*lead, -1)
        scores = result.scores.reshape(*lead, -1)
        kept = result.kept.reshape(*lead, -1)
        probs = _probs(result).reshape(*lead, -1)
        per_target = {m: h.reshape(*lead, *h.shape[1:]) for m, h in result.heatmaps.items()}
        shown = {m: masked(combine(h, kept), mask, self.region_options)
                 for m, h in per_target.items()}
        regions, rows = find_targets(per_target[self.methods[0]], ids, scores, kept, lead,
                                     list(self.spec.class_names), self.region_options, mask,
                                     offset, probs)
        return Summary(shown, regions, rows)

    def iter_run(self, images, channel_axis=None, offset=(), *, out=None, whole_slide=False,
                 resume_key=None):
        """Explain every image of a NumPy / dask / zarr array, reading the next batch while
        this one runs; yields a Progress per batch and returns a :class:`JobResult`. Closing
        the generator stops after the current batch.

        Images that the job's ``tile`` setting tiles (``whole_slide``: the array is a pyramid
        level or a multiscale layer, tiled when larger than the model's input size) are
        explained tile by tile, one image after the other: Progress counts tiles, and the
        result's ``heatmaps[method]`` is the blended heat scaled to [0, 1] per image, written
        into ``out`` as it goes: None (NumPy when it fits in memory, else zarr in a temporary
        folder that lives as long as the result), the path of a zarr group or the group (one
        float32 array per method, named by it), or a dict method -> writable array
        (*lead, H, W). ``resume_key`` (a string describing the settings): with a zarr ``out``,
        a rerun with the same key continues where an interrupted one stopped; another key
        starts over. Untiled images ignore ``resume_key``; their heat is copied into ``out``
        when one is given."""
        images, lay, n = self._layout(images, channel_axis)
        tiling = self._tiling(images, lay, whole_slide)
        if tiling is not None:
            return (yield from self._iter_tiled(images, lay, tiling, offset, out, resume_key))
        runner = self.runner
        parts = []
        with contextlib.closing(read_ahead(images, lay, runner)) as batches:
            for start, stop, raw in batches:
                rows = None if self.target_mask is None else mask_rows(
                    self.target_mask, lay.lead, lay.spatial, start, stop, "target mask")
                parts.append(self.explain(raw, rows))
                yield Progress(stop, n, "+".join(self.methods), runner.batch_size)
        result = self._result(_concat(parts), lay.lead, offset)
        if out is not None:
            outs, _group, _keep = open_outputs(out, self.methods, (*lay.lead, *lay.spatial))
            for m, a in outs.items():
                a[...] = result.heatmaps[m]
        return result

    def run(self, images, channel_axis=None, offset=(), progress=None, *, out=None,
            whole_slide=False, resume_key=None) -> JobResult:
        """:meth:`iter_run` to its end; ``progress`` is called with each Progress."""
        return run_generator(self.iter_run(images, channel_axis, offset, out=out,
                                           whole_slide=whole_slide, resume_key=resume_key),
                             progress)

    def _tiling(self, images, lay, whole_slide: bool) -> Tiling | None:
        """The tiles each image of the array gets (None: explained whole)."""
        if self.runner.dims != 2 or len(lay.spatial) != 2:
            return None
        dtype = np.dtype(getattr(images, "dtype", np.float32))
        tiling = resolve_tiling(self.tile, self.overlap, lay.spatial, lay.channels, dtype,
                                self.spec, self.runner.device, whole_slide)
        if tiling is not None and self.found:
            raise ValueError(
                f"the image ({lay.spatial[0]} x {lay.spatial[1]} pixels) is explained in tiles, "
                "which need one class for the whole image, and the target is 'found'; give one "
                "class (or None for the class predicted over the whole image).")
        return tiling

    def _iter_tiled(self, images, lay, tiling, offset, out, resume_key):
        """The tiled path of :meth:`iter_run`."""
        lead, spatial = tuple(lay.lead), tuple(lay.spatial)
        check_tile_mask(self.target_mask, lead, spatial)
        outs, group, keep = open_outputs(out, self.methods, lead + spatial, tiling.tile[0])
        segmentation = bool(self.segmentation)
        done = yield from iter_tiled(self.runner, self.methods, images, lay, tiling, outs,
                                     target=self.runner.class_id, segmentation=segmentation,
                                     target_mask=self.target_mask, resume_key=resume_key,
                                     store=group)
        n = len(done)
        ids = np.array([d.class_id for d in done], np.int64).reshape(n, 1)
        scores = np.array([d.score for d in done], np.float32).reshape(n, 1)
        probs = np.full((n, 1), np.nan, np.float32)
        if self.segmentation is False:
            for i, d in enumerate(done):
                if d.logits is not None:
                    probs[i, 0] = probabilities(self.spec, d.logits)[d.class_id]
        kept = np.ones((n, 1), bool)
        per_target = {m: (np.expand_dims(h, len(lead)) if isinstance(h, np.ndarray)
                          else SlotAxis(h, len(lead))) for m, h in outs.items()}
        ids, scores, kept, probs = (a.reshape(*lead, 1) for a in (ids, scores, kept, probs))
        shown = {m: masked(combine(h, kept), self.mask, self.region_options)
                 for m, h in per_target.items()}
        regions, rows = find_targets(per_target[self.methods[0]], ids, scores, kept, lead,
                                     list(self.spec.class_names), self.region_options,
                                     self.mask, offset, probs)
        batch = BatchResult({}, ids.reshape(n, 1), scores.reshape(n, 1), kept.reshape(n, 1),
                            probs.reshape(n, 1))
        return JobResult(
            heatmaps=shown, per_target=per_target, class_ids=ids, scores=scores, kept=kept,
            regions=regions, rows=rows, class_names=list(self.spec.class_names),
            methods=list(self.methods), target_layer=self.runner.layer_name,
            device=str(self.runner.device), batch_size=int(self.runner.batch_size or 1),
            region_options=dict(self.region_options), mask=self.mask, offset=tuple(offset),
            notes=self.notes(batch, lead, offset), probabilities=probs, tiling=tiling,
            storage=keep)

    def _result(self, result: BatchResult, lead, offset) -> JobResult:
        summary = self.summarise(result, lead, offset=offset)
        per_target = {m: h.reshape(*lead, *h.shape[1:]) for m, h in result.heatmaps.items()}
        return JobResult(
            heatmaps=summary.heatmaps, per_target=per_target,
            class_ids=result.class_ids.reshape(*lead, -1),
            scores=result.scores.reshape(*lead, -1), kept=result.kept.reshape(*lead, -1),
            regions=summary.regions, rows=summary.rows, class_names=list(self.spec.class_names),
            methods=list(self.methods), target_layer=self.runner.layer_name,
            device=str(self.runner.device), batch_size=int(self.runner.batch_size),
            region_options=dict(self.region_options), mask=self.mask, offset=tuple(offset),
            notes=self.notes(result, lead, offset),
            probabilities=_probs(result).reshape(*lead, -1))

    def notes(self, result: BatchResult, lead=(), offset=()) -> list:
        """Sentences for the user about targets that explain nothing: a segmentation class
        asked for that has no pixels in an image's region (its map is zeros)."""
        if self.found or not self.segmentation:
            return []
        ids = result.class_ids.reshape(*lead, -1)
        empty = (result.scores.reshape(*lead, -1) == 0) & result.kept.reshape(*lead, -1)
        notes = []
        for cid in np.unique(ids[empty]):
            images = ((ids == cid) & empty).any(-1)  # images, not slots
            where = [shift_index(i, offset) for i in np.ndindex(*lead) if images[i]]
            name = class_name(list(self.spec.class_names), int(cid), str(cid))
            shown = ", ".join(str(list(w)) for w in where[:5]) + (" ..." if len(where) > 5
                                                                  else "")
            notes.append(
                f"class {name!r} has no pixels in the region explained for "
                + (f"image(s) {shown}" if lead else "the image")
                + ", so its heatmap is zero; give a target region that covers the class, or "
                "choose a class the model predicts there.")
        return notes


def combine(per_target: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """(*lead, K, *spatial) maps -> (*lead, *spatial): the one target's map, or per pixel the
    hottest target that counts (zeros where none does)."""
    k_axis = kept.ndim - 1
    if isinstance(per_target, SlotAxis) and kept.all():  # a tiled result's heat, unread
        return per_target.base
    if per_target.shape[k_axis] == 1 and kept.all():
        return np.take(per_target, 0, axis=k_axis)
    spatial = per_target.ndim - kept.ndim
    weights = kept.reshape(kept.shape + (1,) * spatial).astype(per_target.dtype)
    return (per_target * weights).max(axis=k_axis)


def masked(heat: np.ndarray, mask, options: dict) -> np.ndarray:
    """The heatmap to show and write: multiplied by the mask (> 0) when the regions are cut
    from the masked heat (mask_mode "multiply"), else as explained."""
    if mask is None or options.get("mask_mode", "multiply") != "multiply":
        return heat
    if not isinstance(heat, np.ndarray):  # tiled heat on disk: masked as it is read
        return MaskedHeat(heat, mask)
    return heat * (np.asarray(mask) > 0)


def find_targets(per_target, class_ids, scores, kept, lead, class_names, options, mask=None,
                 offset=(), probabilities=None):
    """Regions of the targets that count, ordered by image then class, and one summary row per
    counted target (an image where none counts gets a row with class '' and id -1);
    ``probabilities`` (the shape of ``scores``) go into the rows. Regions
    with fewer dimensions than the images (plane-wise regions of a volume) carry the plane in
    their index after the image's."""
    lead = tuple(lead)
    regions = []
    for k in range(class_ids.shape[-1]):
        if not kept[..., k].any():  # a class no image found: no regions to cut
            continue
        heat = (per_target.base if isinstance(per_target, SlotAxis)
                else np.take(per_target, k, axis=len(lead)))
        maps = heat.shape[:heat.ndim - options.get("ndim", 2)]  # one class per map
        planes = (1,) * (len(maps) - len(lead))
        ids, values = (np.broadcast_to(a[..., k].reshape(lead + planes), maps)
                       for a in (class_ids, scores))
        found = find_regions(heat, mask=_mask_for(mask, heat.shape), class_ids=ids,
                             scores=values, **options)
        regions += [r for r in found if kept[tuple(r.index[:len(lead)])][k]]
    regions.sort(key=lambda r: (tuple(r.index), -1 if r.class_id is None else r.class_id))
    n = len(lead)
    regions = _one_label_per_region(regions, n)
    regions = [replace(r, index=shift_index(r.index[:n], offset) + tuple(r.index[n:]))
               for r in regions] if offset else regions
    return regions, summary_rows(class_ids, scores, kept, lead, class_names, regions, offset,
                                 probabilities)


def _mask_for(mask, shape):
    """The job's mask (the images' spatial shape, or the leading shape plus it) for maps of
    ``shape``: a volume's mask given for plane-wise regions of several volumes is repeated
    for each (find_regions takes one plane's shape or the maps' whole shape)."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim == 2 or mask.shape == tuple(shape):
        return mask
    try:
        return np.broadcast_to(mask, shape)
    except ValueError:
        return mask  # find_regions says which shapes it takes


def _one_label_per_region(regions: list, image_axes: int) -> list:
    """3D regions numbered 1..n per volume across all its classes, in order: each class's map
    numbers its own regions from 1, and one volume's label map, boxes table and exports need
    one id per region."""
    count: dict = {}
    out = []
    for r in regions:
        if r.label is None:
            out.append(r)
            continue
        key = tuple(r.index[:image_axes])
        count[key] = count.get(key, 0) + 1
        out.append(r if r.label == count[key] else replace(r, label=count[key]))
    return out


def summary_rows(class_ids, scores, kept, lead, class_names, regions, offset=(),
                 probabilities=None) -> list:
    """One row per counted target per image: index, class, class_id, score (the logit),
    probability (only where the model gives one: a segmentation model's score sums a region's
    logits, and rows are written as strict JSON, which has no NaN), regions."""
    if probabilities is None:
        probabilities = np.full(np.shape(scores), np.nan, np.float32)

    def row(index, name, cid, score, prob, regions):
        out = {"index": index, "class": name, "class_id": cid, "score": float(score)}
        if np.isfinite(prob):
            out["probability"] = float(prob)
        out["regions"] = regions
        return out

    counts: dict = {}
    image_axes = max(len(lead), len(offset))
    for r in regions:  # a plane-wise region of a volume counts for its volume
        key = (tuple(r.index[:image_axes]), r.class_id)
        counts[key] = counts.get(key, 0) + 1
    rows = []
    for idx in np.ndindex(*lead):
        full = shift_index(idx, offset)
        slots = [k for k in range(class_ids.shape[-1]) if kept[idx][k]]
        for k in slots:
            cid = int(class_ids[idx][k])
            rows.append(row(list(full), class_name(class_names, cid, str(cid)), cid,
                            scores[idx][k], probabilities[idx][k], counts.get((full, cid), 0)))
        if not slots:  # nothing found: the image still gets its row, with its best logit
            best = int(np.argmax(scores[idx]))
            rows.append(row(list(full), "", -1, scores[idx][best], probabilities[idx][best], 0))
    return rows


def shift_index(index, offset) -> tuple:
    """An image's index in the whole array: ``offset`` added on the leading axes (a part
    ``data[start:stop]`` has offset (start,)); an index with fewer axes than ``offset`` (one
    slice ``data[t, z]``, offset (t, z)) is first padded on the left with zeros."""
    index, offset = tuple(int(i) for i in index), tuple(int(o) for o in offset)
    if len(index) < len(offset):
        index = (0,) * (len(offset) - len(index)) + index
    return tuple(i + o for i, o in zip(index, offset)) + index[len(offset):]


def _check_regions(options: dict, dims: int = 2) -> dict:
    """Fail on bad region options now, not after the model ran (find_regions says what is
    wrong with which argument). ``dims``: the model's spatial dimensions, the most a region
    can have."""
    if "mask" in options or "class_ids" in options or "scores" in options:
        raise ValueError("region options take find_regions settings (threshold, min_area, "
                         "simplify, threshold_mode, mask_mode, connectivity, ndim, workers); "
                         "pass the mask as mask=.")
    ndim = options.get("ndim", 2)
    if isinstance(ndim, bool) or ndim not in (2, 3) or ndim > dims:
        raise ValueError(f"regions ndim={ndim!r}: this model explains {dims}D images, so its "
                         f"regions can be 2D" + (" (plane-wise) or 3D." if dims == 3 else
                                                 "; give ndim=2 or leave it out."))
    find_regions(np.zeros((2,) * ndim, np.float32), **options)
    return options


def _concat(parts: list) -> BatchResult:
    if len(parts) == 1:
        return parts[0]
    return BatchResult({m: np.concatenate([p.heatmaps[m] for p in parts])
                        for m in parts[0].heatmaps},
                       *(np.concatenate([p[i] for p in parts]) for i in (1, 2, 3)),
                       np.concatenate([_probs(p) for p in parts]))


def _probs(result: BatchResult) -> np.ndarray:
    """A result's probabilities, NaN where it has none (a result built without them)."""
    if result.probabilities is None:
        return np.full(result.scores.shape, np.nan, np.float32)
    return result.probabilities


def _keep_logits(store: list, targets, logits: torch.Tensor):
    """The engine's target choice for one target (None: the predicted class, or a class
    index), keeping the part's logits of every class on the way."""
    store.append(logits.detach().float().cpu().numpy())
    return targets  # None: the engine's own default (also a segmentation model's)


def _captured(store: list, n: int) -> np.ndarray | None:
    """The (n, classes) logits kept by :func:`_keep_logits`, part after part; a static-batch
    model's last part holds padding copies past n. None when the parts don't add up to n (a
    part that ran out of memory was kept before it was retried smaller): no probability then
    rather than one of the wrong image."""
    taken, pos = [], 0
    for part in store:
        if pos >= n:
            return None
        taken.append(part[:n - pos])
        pos += len(taken[-1])
    return np.concatenate(taken) if taken and pos == n else None


__all__ = ["FOUND", "BatchResult", "ExplainJob", "JobResult", "Summary", "combine",
           "find_targets", "is_found", "is_multilabel", "masked", "probabilities", "shift_index",
           "summary_rows"]
