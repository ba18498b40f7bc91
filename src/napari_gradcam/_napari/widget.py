"""The dock widget: explain the active image layer, show the heatmap and editable regions.

Thin by design: the work is the core's :class:`napari_gradcam.job.ExplainJob` (its ``iter_run``
driven from a napari ``thread_worker``, one yield per batch, so the event loop never blocks and
Cancel stops at the next batch; new region settings are its result's ``rederive``); this module
only reads the controls, checks the inputs (a napari notification that says what to change,
every layer left untouched), loads models and probes their layers on a worker too, and writes
layers on the main thread.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import time
import warnings
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    PushButton,
    RadioButtons,
    Select,
    SpinBox,
)
from napari.layers import Image, Labels, Shapes
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from napari.utils.progress import cancelable_progress

from .._device import describe_device, resolve_device
from ..cam import EmptyTargetWarning, available_methods
from ..explain_arrays import Progress, check_channels, layout, model_spatial_dims
from ..job import FOUND, ExplainJob, JobResult, is_segmentation
from ..models import ModelSpec, load_model
from ..render import shown_score
from . import warmup
from .geometry import (
    Outlines,
    image_shape,
    index_map,
    labels_region,
    layer_onto_image,
    shape_outlines,
    shapes_region,
)
from .io import META_KEY
from .live import (
    SHOW,
    START,
    Debounce,
    LiveKey,
    LiveScheduler,
    pixels_token,
    region_token,
)
from .results import (
    NAME_WIDTH,
    ResultLayers,
    heat_colormap,
    heat_pyramid,
    result_name,
    short_name,
)

if TYPE_CHECKING:
    import napari

PREDICTED = "predicted class"
PRESENT = "every class found"
# a segmentation model's own words for the same two targets: it predicts a class per pixel,
# so "predicted" is the class with the largest predicted region
SEG_PREDICTED = "predicted"
AUTO = "auto"
NO_MASK = "none"
SCOPES = ("current slice", "whole stack")
MODEL_FILES = "*.safetensors *.pt *.pth *.pt2 *.ckpt *.bin *.json"
THRESHOLD_MODES = ("absolute", "relative", "otsu")
MASK_MODES = ("multiply", "restrict")
# a multiscale (pyramid) layer's level choice: the level napari draws now, or a level by number
ON_SCREEN = "on screen"
LEVEL_TIP = (
    "The pyramid level explained: 'on screen' is the level napari draws at the current zoom "
    "(zoom in for more detail), or a level by number (0 = full resolution). Only that level is "
    "read, tile by tile; the heatmap comes back as a pyramid of its own, on the image.")
TILE_TIP = (
    "Large images are explained tile by tile (tiles batched on the device, blended across the "
    "overlap with a smooth window, normalised over the whole image). auto: tiles of a pyramid "
    "level larger than the model's input, or of any image too large for memory; else the tile "
    "side in pixels. overlap: pixels shared by neighbouring tiles.")
LIVE_MULTISCALE = (
    "live mode follows the slider of a stack, but {name!r} is a multiscale (pyramid) layer, "
    "explained level by level in tiles, which can take minutes; untick live and press Run.")


TARGET_TIP = (
    "predicted class: each image's top class. every class found: each class with a positive "
    "logit (p > 0.5 for multi-label models), regions per class, one merged heatmap. Or one "
    "class by name.")
# slider steps closer together than this after live's last look are folded into one look
# (a drag, a script stepping through frames); the first step of a move is looked at at once
LIVE_LEAD_MS = 50
LIVE_TIP = (
    "Explain the shown slice again whenever it changes (the slider), or the image, model, "
    "methods, target, target layer or device change; a slice explained before is shown from "
    "a cache at once. Live explains the current slice only: the scope is held at 'current "
    "slice' while it is on. Region settings only re-derive the regions, as without live.")
SEG_TARGET_TIP = (
    "A segmentation model explains a class over a region of pixels (the sum of its scores "
    "there). predicted: the class with the largest predicted region. every class found: each "
    "class predicted somewhere (background skipped), one merged heatmap. predicted <class>: "
    "the pixels the model gives that class. <class> inside layer <L>: why the model gives "
    "these pixels that class: a Labels layer's labels (> 0; only its selected label while it "
    "shows only that one, 'show selected'), or a Shapes layer's selected shapes (all of them "
    "when none is selected). Layers are matched to the image where they lie in the viewer "
    "(their scale and translate). On a volume or stack, a 3D Shapes layer's outline covers "
    "its own plane; a 2D Shapes layer's covers every plane.")


def explains(dims: int, layer_ndim: int | None) -> str:
    """What a run does with the chosen image, for the label next to the model: a 3D model
    explains each volume in one run, a 2D model a volume slice by slice (its regions are then
    plane-wise, not 3D)."""
    if dims == 3:
        return "each volume in one run (3D model)"
    if layer_ndim is not None and layer_ndim > 2:
        return "slice by slice (2D model: each plane on its own)"
    return "each image (2D model)"


def available_devices() -> list[str]:
    """'auto', 'cpu' and the accelerators this PyTorch actually sees."""
    import torch

    out = [AUTO, "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


@dataclass
class Job:
    """Everything a run needs, read from the controls on the main thread: which pixels of
    which layer, and the core's explain job (model, methods, target, region options, mask)."""

    layer: Image
    images: Any  # the array explained (the whole layer, or the current slice)
    offset: tuple[int, ...]  # leading indices of ``images`` inside the layer
    channel_axis: int | bool
    explain: ExplainJob
    total: int  # images to explain (the progress bar's length)
    # a Shapes layer's target region, read on the UI thread, rasterised by the worker
    outlines: Outlines | None = None
    # a multiscale layer: the level explained (None: not multiscale) and its downsample
    # (rows, cols) against level 0, which places the heat and the regions on the image
    level: int | None = None
    downsample: tuple[float, float] = (1.0, 1.0)

    @property
    def whole_slide(self) -> bool:
        """A pyramid level: tiled by the job's "auto" rule as soon as it is larger than the
        model's input (a plain image only when it would not fit in memory)."""
        return self.level is not None

    @property
    def methods(self) -> list[str]:
        return self.explain.methods

    @property
    def found(self) -> bool:
        """"every class found": regions per class, one merged heatmap."""
        return self.explain.found

    @property
    def target(self) -> int | None:
        """The one class explained (None: each image's prediction, or every class found)."""
        return None if self.found else self.explain.target


@dataclass
class Result:
    job: Job
    explained: JobResult  # heatmaps per method, the first method's regions, summary rows
    seconds: float = 0.0
    # a multiscale layer's run: each method's heat as a pyramid (the explained level first),
    # built on the worker so that adding the layer costs the UI thread nothing
    pyramids: dict = field(default_factory=dict)


@dataclass
class Cached:
    """A live result as the cache keeps it: only what shows it again (the slice, model and
    settings it belongs to are its key, and the job is the one read when it is shown), so a
    cached slice holds no view of the layer's pixels: a replaced array is freed."""

    explained: JobResult
    seconds: float = 0.0


# slice digests kept for the chosen image (a slice's is 16 bytes; the count only bounds a
# very long scroll through a very long stack)
DIGESTS_KEPT = 4096


class RunFailed(Exception):
    """An error raised in the worker thread, re-raised under a type Qt's worker reports
    (superqt drops RuntimeErrors, which torch raises for most model problems)."""


def _failed(err: Exception) -> RunFailed:
    return RunFailed(str(err) or type(err).__name__)


def _guarded(fn):
    """``fn`` (a function or a generator function) for a worker thread: its errors leave
    as :class:`RunFailed`."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                return (yield from fn(*args, **kwargs))
            except Exception as err:
                raise _failed(err) from err

        return generator

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise _failed(err) from err

    return call


@_guarded
def compute(job: Job):
    """Worker-thread body: the explain job over the images, yielding its Progress per batch
    (every method and target of a batch in one go); closing it stops after that batch."""
    t0 = time.perf_counter()
    if job.outlines is not None:
        job.explain.target_mask = GradCamWidget._shaped(
            job.outlines, job.layer, job.offset, job.explain.spec)
    # a pyramid level is tiled by the job's rule for slides (see Job.whole_slide)
    slide = {"whole_slide": True} if job.whole_slide else {}
    with _empty_targets_as_notes():
        explained = yield from job.explain.iter_run(job.images, job.channel_axis, job.offset,
                                                    **slide)
    pyramids = {m: heat_pyramid(explained.heatmaps[m]) for m in explained.methods} \
        if job.whole_slide else {}
    return Result(job, explained, time.perf_counter() - t0, pyramids)


@contextlib.contextmanager
def _empty_targets_as_notes():
    """The engine warns once per batch about a class with no pixels in its region; the job's
    result says the same once per run in its notes, which the widget shows (napari's worker
    would otherwise turn every batch's warning into a notification of its own)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=EmptyTargetWarning)
        yield


@dataclass
class Segmented:
    """A segmentation model's predicted labels for a job's images."""

    job: Job
    labels: np.ndarray  # int32, the images' leading + spatial shape
    seconds: float = 0.0


@_guarded
def segment(job: Job):
    """Worker-thread body for "Add segmentation": the model's labels for the job's images,
    a Progress per batch."""
    t0 = time.perf_counter()
    labels = yield from job.explain.iter_segment(job.images, job.channel_axis)
    return Segmented(job, labels, time.perf_counter() - t0)


def _pairs(choices) -> list[tuple[str, Any]]:
    """ComboBox choices as (text, value) pairs."""
    return [c if isinstance(c, tuple) else (str(c), c) for c in choices]


@dataclass(frozen=True)
class InsideLayer:
    """The target "<class> inside layer <L>": a segmentation model's class explained over the
    pixels of a Labels layer or the selected shapes of a Shapes layer."""

    class_name: str
    layer: Any  # a Labels or Shapes layer of the viewer

    def label(self) -> str:
        return f"{self.class_name} inside layer {self.layer.name}"


def _shown_mask_changed(old: JobResult, new: JobResult) -> bool:
    """Whether the heatmap shown differs: it is masked only when the mask multiplies."""
    def used(result):
        multiply = result.region_options.get("mask_mode", "multiply") == "multiply"
        return result.mask if multiply else None

    a, b = used(old), used(new)
    if a is None or b is None:
        return (a is None) != (b is None)
    return a.shape != b.shape or not np.array_equal(a, b)


@dataclass
class LoadedModel:
    """A model the widget offers: the core's spec plus what the widget learnt about it (the
    spec itself stays the core's: loader details only)."""

    spec: ModelSpec
    layers: list[str] | None = None  # target-layer choices; None until the probe has run
    segmentation: bool = False  # a map of classes per pixel (known once the probe has run)


def probe_layers(spec: ModelSpec) -> list[str]:
    """Layers with a spatial output (found by one small forward), else every module."""
    import torch

    from ..cam.layers import module_names, spatial_layer_names

    size = spec.input_size or (64,) * model_spatial_dims(spec.module)
    try:
        ref = next(spec.module.parameters())
        probe = torch.zeros((1, spec.in_channels, *size), device=ref.device)
        return spatial_layer_names(spec.module, probe)
    except Exception:  # noqa: BLE001 - a model that can't take the probe: list everything
        return module_names(spec.module)


@_guarded
def prepare_model(source, trust_code: bool = False) -> LoadedModel:
    """Worker-thread body: load ``source`` (a :class:`ModelSpec` is used as it is) and probe
    its layers, so neither a slow file nor the probe's forward freezes the viewer."""
    spec = source if isinstance(source, ModelSpec) else load_model(source, trust_code=trust_code)
    loaded = LoadedModel(spec, probe_layers(spec), probe_segmentation(spec))
    # the one-time warm-up for the first result's layers, once a model is there to run: had
    # it started with the widget, it would compete with this load while the widget opens
    warmup.start()
    return loaded


def probe_segmentation(spec: ModelSpec) -> bool:
    """Whether the model answers with a class map per pixel (the job's probe: one forward);
    a model that can't take the probe is treated as a classifier, and its run says why."""
    try:
        return bool(is_segmentation(spec))
    except Exception:  # noqa: BLE001 - the run reports the model's error where it matters
        return False


def model_file_problem(path: Path) -> str:
    """Why ``path`` (not a readable file) can't be loaded as a model, and what to pick."""
    exts = ", ".join(MODEL_FILES.replace("*", "").split())
    if not path.exists():
        return (f"the model file {str(path)!r} does not exist; check the path or pick the "
                "file with the model file's Select file button")
    if path.is_dir():
        return (f"{str(path)!r} is a folder with no model.json sidecar in it; pick the "
                f"model file itself ({exts})")
    if not path.is_file():
        return (f"{str(path)!r} is not a regular file (a device or pipe); pick a model "
                f"file ({exts})")
    return (f"the model file {str(path)!r} can't be read (permission denied); make it "
            "readable or pick a copy you can read")


class GradCamWidget(ResultLayers, Container):
    """CAM / Grad-CAM on the chosen image layer; heatmaps as Image layers, boxes and polygons
    as one editable Shapes layer (saved with File > Save Selected Layers: QuPath GeoJSON,
    COCO JSON or CSV). A segmentation model's targets are a class over a region (its
    predicted pixels, or a Labels / Shapes layer's: see :data:`SEG_TARGET_TIP`), and "Add
    segmentation" shows its predicted classes as a Labels layer."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._viewer = viewer
        self._models: dict[str, LoadedModel] = {}
        self._model_names = ["demo"]
        self._loaders: set = set()  # model load / probe workers in flight
        self._run_pending = False  # Run asked for while a model was loading
        # each model the user asks for (set_model, a file pick, the trust re-load, a pick in
        # the model list) bumps this; a load that finishes selects its model only if its
        # request is still the latest (the start-up demo load is request 0), so a slow load
        # finishing last can't override a later choice
        self._request = 0
        self._model_file_said = ""  # the model-file text last reported as unusable
        self._owners: dict[str, int] = {}  # model name -> the request that registered it
        self._selecting = False  # the widget itself is setting the model list's value
        self._worker = None
        self._running_job: Job | None = None  # the job of the run in flight (its progress)
        # a run's result is written one layer per event-loop turn (see _on_result): the steps
        # left, and whether the run's worker finished meanwhile (it ends with the last step)
        self._applying: list = []
        self._finish_pending = False
        from qtpy.QtCore import QTimer

        self._apply_timer = QTimer(self.native)
        self._apply_timer.setSingleShot(True)
        self._apply_timer.timeout.connect(self._apply_next)
        self._region_worker = None
        self._region_generation = 0
        self._pbar = None
        self._last: Result | None = None
        # the status line of the last run, as (result, text before the summary, after it, the
        # whole line shown): re-said for the frame shown while that line is still up
        self._said: tuple | None = None
        # the viewer closed: Qt deleted the controls, so what the workers still report is
        # dropped (see _alive)
        self._closed = False
        # the chosen image's data events (an edit must not leave a stale live heatmap): the
        # layer watched, a count of its edits, the slice digests per (layer, edits, slice), and
        # the slider step of its last redraw (a redraw at an unchanged step is a refresh())
        self._watched = None
        self._edits: dict = {}
        self._digests: dict = {}
        self._redrawn_at: dict = {}
        self._step_seen = None  # (layer, slice) of the last slider step live looked at
        self._build_model_controls()
        self._build_explain_controls()
        self._build_region_controls()
        self._build_layout()
        self._connect_signals()
        self._refresh_layers()
        self._follow_selection()
        self._on_device()
        self._on_model()
        self._start_loading("demo", name="demo")  # then napari's first shapes compile

    # ---- building -----------------------------------------------------------------------------

    def _build_model_controls(self):
        self.image = ComboBox(label="image", choices=self._image_choices, nullable=True,
                              tooltip="The image layer to explain (follows the selection).")
        # shown only while the image is a multiscale (pyramid) layer
        self.level = ComboBox(label="level", choices=self._level_choices, value=ON_SCREEN,
                              tooltip=LEVEL_TIP, visible=False)
        self.model = ComboBox(label="model", choices=self._model_choices,
                              tooltip="demo = the bundled synthetic-shapes model; models "
                                      "loaded from a file or set from Python "
                                      "(widget.set_model) are added here.")
        self.model_file = FileEdit(
            label="model file", mode="r", filter=MODEL_FILES,
            tooltip="Weights with a sidecar JSON naming the architecture (.safetensors, "
                    ".pt/.pth state dicts), the sidecar itself, or a torch.export .pt2 "
                    "program. See the README for the sidecar's fields.")
        self.trust_code = CheckBox(
            text="trust code in model files", value=False,
            tooltip="Allow model files that run code when loaded: whole pickled models "
                    "(.pt / .pth), sidecars naming a Python factory ('package.module:factory') "
                    "and pickled payloads in .pt2 programs. Tick only for files from a source "
                    "you trust.")
        self.explains = Label(label="explains", tooltip=(
            "A 3D model (Conv3d) explains each volume (the last three axes) in one run and "
            "finds 3D regions; a 2D model explains a volume slice by slice, with regions per "
            "plane."))

    def _build_explain_controls(self):
        self.methods = Select(label="methods", choices=available_methods(), value=["gradcam"],
                              tooltip="One or several (ctrl-click) to compare: one heatmap "
                                      "layer each; the regions come from the first.")
        self.methods.native.setMaximumHeight(110)
        self.target = ComboBox(label="target", choices=self._target_choices,
                               tooltip=TARGET_TIP)
        self.target_layer = ComboBox(label="target layer", choices=self._layer_choices,
                                     tooltip="The layer whose activations are explained.")
        self.device = ComboBox(label="device", choices=available_devices(), value=AUTO)
        self.device_label = Label(label="running on")
        self.batch_size = SpinBox(label="batch size (0 = auto)", min=0, max=4096, value=0,
                                  tooltip="Images per forward pass; 0 = auto (halved on "
                                          "out-of-memory).")
        # tile side (0 shown as "auto": the job's rule) and overlap, one compact row
        self.tile = SpinBox(label="tile", min=0, max=2**16, step=32, value=0,
                            tooltip=TILE_TIP)
        self.tile.native.setSpecialValueText("auto")
        self.overlap = SpinBox(label="overlap", min=0, max=2**16, step=16, value=64,
                               tooltip=TILE_TIP)
        self.tiles = Container(widgets=[self.tile, self.overlap], layout="horizontal",
                               labels=True, label="tiles (px)", tooltip=TILE_TIP)
        self.tiles.margins = (0, 0, 0, 0)
        self.scope = RadioButtons(label="scope", choices=list(SCOPES), value=SCOPES[0],
                                  orientation="horizontal")
        self.live = CheckBox(text="live", value=False, tooltip=LIVE_TIP)
        # live mode's cache and its one-run-in-flight rule; a zero-delay timer folds a burst
        # of slider steps or control resets into one look at what is wanted
        self._live = LiveScheduler()
        self._live_soon = Debounce(self._live_update, parent=self.native)
        self._live_models: dict[str, Any] = {}  # model name -> the LoadedModel last seen

    def _build_region_controls(self):
        self.threshold = FloatSlider(label="threshold", min=0.0, max=1.0, step=0.01, value=0.5,
                                     tooltip="Heat >= threshold belongs to a region.")
        self.threshold_mode = ComboBox(
            label="threshold mode", choices=list(THRESHOLD_MODES), value="absolute",
            tooltip="absolute: a heat value; relative: a fraction of each map's maximum; "
                    "otsu: each map's Otsu threshold.")
        self.min_area = SpinBox(label="min area (px)", min=0, max=10**8, value=16)
        self.simplify = FloatSpinBox(label="simplify (px)", min=0.0, max=50.0, step=0.25,
                                     value=1.0, tooltip="Polygon simplification tolerance; "
                                                        "0 = exact pixel outline.")
        self.mask = ComboBox(label="mask", choices=self._mask_choices,
                             tooltip="Regions only where this Labels / Image layer is > 0 "
                                     "(e.g. lung masks on chest X-rays, a brain mask on an "
                                     "MRI volume): the image's spatial shape, or its whole "
                                     "shape.")
        self.mask_mode = ComboBox(
            label="mask mode", choices=list(MASK_MODES), value=MASK_MODES[0],
            tooltip="multiply: the heatmap is multiplied by the mask before thresholding "
                    "(relative / otsu thresholds come from the heat inside the mask; the "
                    "heatmap shown is the masked one). restrict: thresholds from the whole "
                    "heatmap, regions kept only inside the mask; the heatmap shown unmasked.")

    def _build_layout(self):
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.grid_button = PushButton(text="Side by side",
                                      tooltip="Show the heatmap layers next to each other.")
        self.segment_button = PushButton(
            text="Add segmentation", enabled=False,
            tooltip="Segmentation models: add the model's predicted classes for the image (the "
                    "scope's slice or stack) as a Labels layer; background stays transparent.")
        self.status = Label(label="")
        self.status.native.setWordWrap(True)
        self.extend([
            self.image, self.level, self.model, self.explains, self.model_file,
            self.trust_code, self.methods, self.target,
            self.target_layer, self.device,
            self.device_label, self.batch_size, self.tiles, self.scope, self.threshold,
            self.threshold_mode, self.min_area, self.simplify, self.mask, self.mask_mode,
            Container(widgets=[self.run_button, self.live, self.cancel_button,
                               self.grid_button], layout="horizontal", labels=False),
            Container(widgets=[self.segment_button], layout="horizontal", labels=False),
            self.status,
        ])
        from .check import CheckSection  # faithfulness, sanity check, agreement of the last run

        self.check = CheckSection(self)
        self.append(self.check)

    def _connect_signals(self):
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.grid_button.changed.connect(self.toggle_grid)
        self.segment_button.changed.connect(self.add_segmentation)
        self.model.changed.connect(self._on_model)
        self.model_file.changed.connect(self._on_model_file)
        self.model_file.line_edit.native.editingFinished.connect(self._on_model_file_typed)
        self.trust_code.changed.connect(self._on_trust)
        self.device.changed.connect(self._on_device)
        self.image.changed.connect(self._on_image)
        self.live.changed.connect(self._on_live)
        for w in (self.methods, self.target, self.target_layer, self.device):
            w.changed.connect(self._live_request)
        for w in (self.threshold, self.threshold_mode, self.min_area, self.simplify, self.mask,
                  self.mask_mode):
            w.changed.connect(self._on_region_settings)
        self._viewer.dims.events.ndisplay.connect(self._on_ndisplay)
        self._viewer.dims.events.current_step.connect(self._on_step)
        layers = self._viewer.layers
        layers.events.inserted.connect(self._refresh_layers)
        layers.events.removed.connect(self._refresh_layers)
        layers.events.removed.connect(self._live_forget)
        layers.events.reordered.connect(self._refresh_layers)
        layers.events.renamed.connect(self._refresh_layers)
        layers.selection.events.active.connect(self._follow_selection)
        self.native.destroyed.connect(self._on_closed)

    def _on_closed(self, _obj=None):
        """The viewer closed (the dock widget's Qt object is gone): the runs and loads in
        flight are asked to stop, and whatever they still report is dropped (_alive)."""
        self._closed = True
        for worker in (self._worker, self._region_worker, *self._loaders):
            if worker is not None:
                with contextlib.suppress(RuntimeError):
                    worker.quit()
        self._unwatch()

    def _alive(self, fn):
        """``fn`` as a worker's handler: it does nothing once the viewer has closed (its
        controls are deleted then, and a run, a check or a model load may still be ending)."""

        @functools.wraps(fn)
        def handler(*args):
            if not self._closed:
                return fn(*args)
            return None

        return handler

    # ---- choices ----------------------------------------------------------------------------

    def _image_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and not self._is_ours(layer)]

    def _level_choices(self, _widget=None):
        """'on screen' and each level of the chosen multiscale image as "k: H x W"."""
        layer = getattr(self.image, "value", None) if hasattr(self, "image") else None
        choices = [(ON_SCREEN, ON_SCREEN)]
        if layer is not None and layer.multiscale:
            for k in range(len(layer.data)):
                shape = tuple(layer.data[k].shape)
                h, w = (shape[:-1] if layer.rgb else shape)[-2:]
                choices.append((f"{k}: {h} x {w}", k))
        return choices

    def _mask_choices(self, _widget=None):
        return [(NO_MASK, None)] + [
            (layer.name, layer) for layer in self._viewer.layers
            if isinstance(layer, (Labels, Image)) and not self._is_ours(layer)
            and not getattr(layer, "rgb", False)]

    @staticmethod
    def _is_ours(layer) -> bool:
        return META_KEY in layer.metadata and "role" in layer.metadata[META_KEY]

    def _refresh_layers(self, _event=None):
        self.image.reset_choices()
        self.mask.reset_choices()
        if self._is_segmentation():  # its targets name the Labels and Shapes layers
            self._reset_targets()

    def reset_choices(self, *args):
        """What napari calls when layers change (before the widget's own handlers): the
        target a segmentation model had stays chosen when its layer is renamed."""
        value = self.target.value
        super().reset_choices(*args)
        self._order_targets(value)

    def _reset_targets(self):
        value = self.target.value
        self.target.reset_choices()
        self._order_targets(value)

    def _order_targets(self, value):
        """Target choices in their order, ``value`` kept chosen while it is still offered
        (magicgui keeps the items it knows where they were and appends new ones, so a renamed
        layer or another model's targets would end up out of order, and the renamed layer's
        target unchosen)."""
        texts = [label for label, _value in _pairs(self._target_choices())]
        if [self.target.native.itemText(i) for i in range(self.target.native.count())] \
                != texts:
            with self.target.changed.blocked():
                self.target.native.clear()
                self.target.reset_choices()
        same = [choice for choice in self.target.choices if choice == value]
        if same and self.target.value != value:  # the new choice object: the combobox
            self.target.value = same[0]  # matches objects, not equal ones

    def _follow_selection(self, _event=None):
        active = self._viewer.layers.selection.active
        if isinstance(active, Image) and not self._is_ours(active):
            self.image.value = active

    def _on_image(self, _event=None):
        layer, loaded = self.image.value, self._loaded()
        lead = 0
        dims = model_spatial_dims(loaded.spec.module) if loaded is not None else 2
        shape = image_shape(layer) if layer is not None else None
        if shape is not None:
            lead = len(shape) - dims
        self.explains.value = "" if loaded is None else \
            explains(dims, None if shape is None else len(shape))
        self.scope.enabled = lead > 0 and not self.live.value  # live: the shown slice
        if lead <= 0 or self.live.value:
            self.scope.value = SCOPES[0]
        self._show_levels(layer)
        self._watch(layer)
        self._live_request()

    def _show_levels(self, layer):
        """The level choice: offered (with this image's levels) only for a multiscale layer;
        the level chosen stays chosen while the new image has it."""
        multiscale = layer is not None and bool(layer.multiscale)
        value = self.level.value
        self.level.reset_choices()
        if value not in [v for _t, v in _pairs(self.level.choices)]:
            self.level.value = ON_SCREEN
        if self.level.native.isHidden() == multiscale:
            self.level.visible = multiscale

    def _level_data(self, layer):
        """The array a run reads from ``layer``: a multiscale layer's chosen level (lazy, as
        the layer holds it), else the layer's data; with the level (None: not multiscale)
        and its downsample (rows, cols) against level 0."""
        if not layer.multiscale:
            return layer.data, None, (1.0, 1.0)
        choice = self.level.value
        level = int(layer.data_level) if choice == ON_SCREEN or choice is None else int(choice)
        if not 0 <= level < len(layer.data):
            raise ValueError(f"the image {layer.name!r} has levels 0 to {len(layer.data) - 1}, "
                             f"not {level}; choose one of its levels or 'on screen'.")
        full, here = image_shape(layer), tuple(layer.data[level].shape)
        here = here[:-1] if layer.rgb else here
        downsample = (full[-2] / here[-2], full[-1] / here[-1])
        return layer.data[level], level, downsample

    def _tile_settings(self) -> dict:
        """The tile side (0: the job's "auto" rule) and overlap for the ExplainJob (which
        says what is wrong with them)."""
        tile = int(self.tile.value)
        return {"tile": "auto" if tile == 0 else tile, "overlap": int(self.overlap.value)}

    # ---- the chosen image's edits -------------------------------------------------------------

    def _watch(self, layer):
        """Follow ``layer``'s data events (only the chosen image's: the one live explains);
        the previous layer's slice digests go, as its edits are no longer counted."""
        if layer is self._watched:
            return
        self._unwatch()
        if layer is None:
            return
        layer.events.data.connect(self._on_image_data)
        layer.events.set_data.connect(self._on_image_redrawn)
        self._watched = layer

    def _unwatch(self):
        layer, self._watched = self._watched, None
        if layer is None:
            return
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            layer.events.data.disconnect(self._on_image_data)
            layer.events.set_data.disconnect(self._on_image_redrawn)
        self._forget_digests(layer.unique_id)
        self._redrawn_at.pop(layer.unique_id, None)

    def _forget_digests(self, uid):
        self._digests = {k: v for k, v in self._digests.items() if k[0] != uid}

    def _edited(self, layer, replaced: bool):
        """The chosen image's pixels changed: its slices are hashed again at the next look,
        which live takes now (the heatmap shown is of the old pixels). ``replaced`` (a new
        array): its cached results are of pixels that are gone, so they go too."""
        uid = layer.unique_id
        self._edits[uid] = self._edits.get(uid, 0) + 1
        self._forget_digests(uid)
        if replaced:
            self._live.cache.drop_layer(uid)
        self._step_seen = None
        self._live_request()

    def _on_image_data(self, event=None):
        layer = getattr(event, "source", None) or self._watched
        if layer is not None and not self._closed:
            self._edited(layer, replaced=True)

    def _on_image_redrawn(self, event=None):
        """napari redraws a layer's slice when the slider moves and when ``refresh()`` is
        called after an edit in place; only the second leaves the slider where it was."""
        layer = getattr(event, "source", None) or self._watched
        if layer is None or self._closed:
            return
        step = tuple(self._viewer.dims.current_step)
        if self._redrawn_at.get(layer.unique_id) == step:
            self._edited(layer, replaced=False)
        self._redrawn_at[layer.unique_id] = step

    def _pixels(self, job: Job) -> Hashable:
        """The pixels token of the job's slice, hashed once per slice and edit of the chosen
        image (a volume's digest takes tens of milliseconds: not on every look)."""
        layer = job.layer
        if layer is not self._watched:
            return pixels_token(job.images, layer.data)
        uid = layer.unique_id
        memo = (uid, self._edits.get(uid, 0), tuple(job.offset))
        token = self._digests.get(memo)
        if token is None:
            token = pixels_token(job.images, layer.data)
            if len(self._digests) >= DIGESTS_KEPT:
                self._digests.clear()
            self._digests[memo] = token
        return token

    def _on_device(self, _event=None):
        try:
            self.device_label.value = describe_device(resolve_device(self.device.value))
        except ValueError as err:
            self.device_label.value = "unavailable"
            show_error(str(err))

    def _target_choices(self, _widget=None):
        loaded = self._loaded()
        names = list(loaded.spec.class_names or ()) if loaded is not None else []
        if not self._is_segmentation():
            return [PREDICTED, PRESENT, *names]
        regions = [layer for layer in self._viewer.layers if isinstance(layer, (Labels, Shapes))]
        inside = [InsideLayer(c, layer) for layer in regions for c in names]
        return [(SEG_PREDICTED, PREDICTED), (PRESENT, PRESENT),
                *((f"predicted {c}", c) for c in names),
                *((choice.label(), choice) for choice in inside)]

    def _is_segmentation(self) -> bool:
        loaded = self._loaded()
        return loaded is not None and loaded.segmentation

    def _layer_choices(self, _widget=None):
        loaded = self._loaded()
        layers = loaded.layers if loaded is not None else None
        return [AUTO, *(layers or ())]

    def _on_model(self, _event=None):
        if _event is not None and not self._selecting:  # the user picked in the list
            self._new_request()
        self._reset_targets()
        self.target.value = PREDICTED
        self.target.tooltip = SEG_TARGET_TIP if self._is_segmentation() else TARGET_TIP
        self._show_target_layers()
        self._update_buttons()
        self._live_forget_models()
        self._on_image()

    def _show_target_layers(self):
        """Offer the chosen model's probed layers, its own target layer chosen."""
        loaded = self._loaded()
        self.target_layer.reset_choices()
        wanted = loaded.spec.target_layer if loaded is not None else None
        self.target_layer.value = wanted if wanted in self.target_layer.choices else AUTO

    # ---- models -----------------------------------------------------------------------------

    def _loaded(self) -> LoadedModel | None:
        """The chosen model, or None while it is still loading."""
        return self._models.get(self.model.value)

    def _spec(self) -> ModelSpec:
        loaded = self._loaded()
        if loaded is None:
            raise ValueError(f"the model {self.model.value!r} is still loading; run again once "
                             "it is ready.")
        return loaded.spec

    @property
    def loading(self) -> bool:
        """True while a model is being loaded or probed (Run waits for it)."""
        return bool(self._loaders)

    def wait_until_ready(self, timeout: float = 60.0) -> bool:
        """Process Qt events until no model is loading, for scripts (and the demo) that run
        right after docking the widget; returns False on timeout."""
        from qtpy.QtWidgets import QApplication

        deadline = time.monotonic() + timeout
        while self.loading and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.005)
        return not self.loading

    def _model_choices(self, _widget=None):
        return list(self._model_names)

    def set_model(self, model, name: str | None = None) -> ModelSpec | None:
        """Use a model from Python: a :class:`ModelSpec`, an ``nn.Module`` or anything
        :func:`napari_gradcam.load_model` takes. It is added to the model list and chosen
        (unless another model is asked for before it is ready); its layers are probed on a
        worker (Run waits for that).

        A ModelSpec or ``nn.Module`` is chosen at once and its spec returned. Anything else
        (a path, an architecture or model name) is loaded on a worker, so the viewer doesn't
        freeze: it joins the list when ready and None is returned (``wait_until_ready()``
        waits for it; a failure is a notification)."""
        from torch import nn

        request = self._new_request()
        if not isinstance(model, (ModelSpec, nn.Module)):
            self._start_loading(model, name=name, request=request)
            return None
        spec = model if isinstance(model, ModelSpec) else load_model(model)
        name = name or spec.name or "model"
        self._register(name, LoadedModel(spec), request)
        self._start_loading(spec, name=name, request=request)
        return spec

    def _new_request(self) -> int:
        """The user asked for a model: loads asked for before it no longer choose theirs."""
        self._request += 1
        return self._request

    def _register(self, name: str, loaded: LoadedModel, request: int):
        """Add ``loaded`` to the model list under ``name``; choose it if ``request`` is still
        the latest. A name a later request registered meanwhile is left as it is."""
        if self._owners.get(name, -1) > request:
            return
        self._owners[name] = request
        self._models[name] = loaded
        if name not in self._model_names:
            self._model_names.append(name)
            self._selecting = True
            try:
                self.model.reset_choices()
            finally:
                self._selecting = False
        if self.model.value == name:  # chosen already (it may have been waiting for this)
            self._on_model()
        elif request == self._request:
            self._selecting = True
            try:
                self.model.value = name
            finally:
                self._selecting = False

    def _start_loading(self, source, *, name: str | None = None, label: str = "",
                       trust_code: bool = False, request: int = 0):
        """Load and probe ``source`` on a worker; the model joins the list when ready (named
        ``name``, or '<its name> (<label>)') and is chosen if ``request`` is still the latest.
        A failure is a notification and leaves the chosen model as it was."""
        worker = create_worker(prepare_model, source, trust_code, _start_thread=False,
                               _ignore_errors=True)

        def named(loaded: LoadedModel) -> str:
            if name:
                return name
            if label:
                return f"{loaded.spec.name} ({label})"
            return loaded.spec.name or "model"

        worker.returned.connect(self._alive(
            lambda loaded: self._on_loaded(loaded, named(loaded), request)))
        worker.errored.connect(self._alive(lambda err: self._on_load_error(err, request)))
        worker.finished.connect(self._alive(lambda: self._on_load_finished(worker)))
        self._loaders.add(worker)
        self._show_busy(f"loading {label or name or 'the model'} …")
        worker.start()
        return worker

    def _on_loaded(self, loaded: LoadedModel, name: str, request: int = 0):
        current = self._models.get(name)
        if current is not None and current.spec is loaded.spec:  # set_model's, now probed
            current.layers = loaded.layers
            known = current.segmentation
            current.segmentation = loaded.segmentation
            if self.model.value == name:
                if known != loaded.segmentation:  # its targets are a segmentation model's
                    self._on_model()
                self._show_target_layers()
        else:
            self._register(name, loaded, request)

    def _on_load_error(self, err: Exception, request: int = 0):
        if request == self._request:  # the run was asked for with the model that failed
            self._run_pending = False
        show_error(f"napari-gradcam: {err}")

    def _on_load_finished(self, worker):
        self._loaders.discard(worker)
        if self.loading:
            return
        self._show_busy("")
        if self._run_pending:
            self._run_pending = False
            if self._loaded() is not None:
                self.run()

    def _update_buttons(self):
        """Run is enabled only when no run is going and no model is loading; Add
        segmentation too, and only for a segmentation model."""
        self.run_button.enabled = not self.running and not self.loading
        self.segment_button.enabled = self.run_button.enabled and self._is_segmentation()
        if getattr(self, "check", None) is not None:  # the Check section: one job at a time
            self.check.set_enabled(self.run_button.enabled)

    def _show_busy(self, text: str):
        self._update_buttons()
        if text or self.status.value.startswith("loading"):
            self.status.value = text

    def _on_model_file(self, _event=None, *, typed: bool = False):
        """Load the picked file (weights + sidecar, sidecar, .pt2; a folder holding a
        ``model.json`` sidecar) on a worker; errors leave the current model chosen.

        A path that can't be a model is a notification that says why, and nothing else
        changes. The field reports every keystroke, so while the user is typing in it a
        half-typed path is not an error: it is judged when the typing ends (``typed``)."""
        text = str(self.model_file.line_edit.value).strip()
        if not text:
            self._model_file_said = ""
            return
        path = Path(text).expanduser()
        if path.is_dir() and (path / "model.json").is_file():
            path = path / "model.json"
        if path.is_file() and os.access(path, os.R_OK):
            self._model_file_said = ""
            if not typed:  # a valid path was loaded when it was set
                self._start_loading(path, label=path.name,
                                    trust_code=bool(self.trust_code.value),
                                    request=self._new_request())
            return
        if not typed and self.model_file.line_edit.native.hasFocus():
            return  # still typing: editingFinished judges the path
        if text == self._model_file_said:  # said already (focus left again, trust ticked)
            return
        self._model_file_said = text
        show_error(f"napari-gradcam: {model_file_problem(path)}; the model stays "
                   f"{self.model.value!r}.")

    def _on_model_file_typed(self):
        self._on_model_file(typed=True)

    @property
    def trust_pickle(self) -> CheckBox:
        """The trust checkbox under its old name (it covers more than pickles now), for scripts
        written against it."""
        return self.trust_code

    def _on_trust(self, _event=None):
        if self.trust_code.value:
            show_warning("napari-gradcam: model files that run code (pickled models, Python "
                         "factories, pickled .pt2 payloads) are now loaded; tick only for files "
                         "you trust, untick when done.")
            self._on_model_file()

    # ---- reading the controls -----------------------------------------------------------------

    def _region_args(self) -> dict:
        mode = self.threshold_mode.value
        return {
            "threshold": "otsu" if mode == "otsu" else float(self.threshold.value),
            "threshold_mode": "absolute" if mode == "otsu" else mode,
            "min_area": int(self.min_area.value),
            "simplify": float(self.simplify.value),
            "mask_mode": self.mask_mode.value,
        }

    def _current_index(self, layer, lead: int) -> tuple[int, ...]:
        """The leading indices of the slice the viewer shows for ``layer``."""
        point = np.asarray(self._viewer.dims.point, float)[-layer.ndim:]
        data = np.asarray(layer.world_to_data(point), float)[:lead]
        shape = layer.data[0].shape if layer.multiscale else layer.data.shape
        return tuple(int(np.clip(round(v), 0, s - 1)) for v, s in zip(data, shape[:lead]))

    def _mask_array(self, layer, offset: tuple[int, ...], spec: ModelSpec) -> np.ndarray | None:
        """The chosen mask for ``layer`` (its slice ``offset`` when one slice is explained),
        matched to the image's pixels through both layers' world coordinates: a mask of the
        pixels' shape applies to every image, one of the whole layer's shape image by
        image."""
        mask_layer = self.mask.value
        if mask_layer is None:
            return None
        data = mask_layer.data[0] if getattr(mask_layer, "multiscale", False) else mask_layer.data
        return np.asarray(self._fit_to_image(data, f"the mask {mask_layer.name!r}", "a mask",
                                             "or none", layer, offset, spec, mask_layer)) > 0

    def _fit_to_image(self, data, what: str, kind: str, instead: str, layer, offset, spec,
                      source=None):
        """``data`` (of the layer ``source``) on the image's pixels: the image's pixels' shape
        (for every image) or the layer's whole shape (cut to the slice ``offset`` when one
        slice is explained). A layer placed elsewhere in the world (another scale or
        translate, a one-frame layer at its frame) is looked up pixel by pixel; one with
        the image's own placement but other pixels raises a ValueError naming ``what`` it is
        and what to choose ``instead``."""
        full = image_shape(layer)
        dims = model_spatial_dims(spec.module)
        spatial = full[len(full) - dims:]
        same = True
        if source is not None:
            a, b = index_map(source, layer, self._viewer.dims.point)
            k = min(a.shape)
            same = a.shape[0] <= a.shape[1] and np.allclose(a[:, -k:], np.eye(k)) and \
                np.allclose(a[:, :-k], 0) and np.allclose(b, 0)
        if same and tuple(data.shape[len(data.shape) - dims:]) != spatial or \
                not same and data.ndim != source.ndim:
            raise ValueError(
                f"{what} has shape {tuple(data.shape)}, but the image's pixels are {spatial}; "
                f"choose {kind} of that size (or of the image layer's whole shape), {instead}."
            )
        if not same or tuple(data.shape) not in (spatial, full):
            region = layer_onto_image(data, source, layer, offset, self._viewer.dims.point)
            rest = full[len(offset):]
            if all(s == 1 for s in region.shape[:max(region.ndim - dims, 0)]):
                region = region.reshape(region.shape[max(region.ndim - dims, 0):])
                return np.broadcast_to(region, spatial)
            return np.broadcast_to(region, rest)
        if tuple(data.shape) == full and offset:
            return data[offset]
        return data

    def _target_region(self, inside: InsideLayer, layer, offset, spec):
        """The pixels of a "<class> inside layer <L>" target, for the image ``layer`` (its
        slice ``offset``): bool, the image's pixels' shape or the layer's whole shape. A
        Shapes layer's outlines are read and checked here but rasterised in the worker: an
        :class:`Outlines` then comes back, for :meth:`_shaped`."""
        source = inside.layer
        if source not in list(self._viewer.layers):
            raise ValueError(f"the layer {source.name!r} is no longer in the viewer; choose "
                             "another target.")
        if isinstance(source, Shapes):
            return shape_outlines(source, layer, offset)
        region = self._fit_to_image(labels_region(source), f"the Labels layer {source.name!r}",
                                    "a layer", "or another target", layer, offset, spec, source)
        if not region.any():
            if isinstance(source, Labels) and source.show_selected_label:
                raise ValueError(
                    f"the selected label {source.selected_label} of {source.name!r} marks no "
                    "pixel of the image explained; select a label that is there, or untick "
                    "'show selected' to use all its labels.")
            raise ValueError(f"no pixel of the image explained lies inside the Labels layer "
                             f"{source.name!r}; paint the region to explain, or choose another "
                             "target.")
        return np.ascontiguousarray(region)  # a broadcast view is read-only: torch warns

    @staticmethod
    def _shaped(outlines: Outlines, layer, offset, spec) -> np.ndarray:
        """Worker side of a Shapes target: the outlines rasterised, shaped as the job's
        target mask (2D shapes on a volume explained in 3D: the same outline in every
        plane; shapes drawn in planes of a stack: each image its own)."""
        region = outlines.rasterise()
        full = image_shape(layer)
        dims = model_spatial_dims(spec.module)
        target = full[-dims:] if region.ndim <= dims else full[len(offset):]
        return np.ascontiguousarray(np.broadcast_to(region, target))

    def job(self) -> Job:
        """Read and check the controls; raises ValueError / TypeError with what to change."""
        layer = self.image.value
        if layer is None:
            active = self._viewer.layers.selection.active
            what = (f"{active.name!r} is a {active.__class__.__name__} layer; "
                    if active is not None else "there is no image layer; ")
            raise ValueError(what + "CAM explains an Image layer: open or select an image.")
        methods = list(self.methods.value)
        if not methods:
            raise ValueError("no method chosen: pick at least one in the methods list.")
        spec = self._spec()
        if layer.multiscale and self.live.value:
            raise ValueError(LIVE_MULTISCALE.format(name=layer.name))
        data, level, downsample = self._level_data(layer)
        channel_axis = -1 if layer.rgb else False
        dims = model_spatial_dims(spec.module)
        lay = layout(data.shape, channel_axis, dims)  # empty / too few axes raise here
        check_channels(lay.channels, spec.in_channels)
        choice = self.target.value
        inside = choice if isinstance(choice, InsideLayer) else None
        if level and (inside is not None or self.mask.value is not None):
            # masks and target regions are matched to the image's full-resolution pixels
            raise ValueError(
                f"a mask or a target region is matched to level 0 of {layer.name!r}, but level "
                f"{level} is chosen; choose level 0, or the mask 'none' and a target without a "
                "layer.")
        if inside is not None:  # "<class> inside layer <L>": that class, over that region
            choice = inside.class_name
        found = choice == PRESENT
        if found and not spec.class_names:
            raise ValueError("this model has no class names, so 'every class' means nothing; "
                             "give class_names to load_model or pick 'predicted class'.")
        # one class by its index: a class literally named "found" must not mean every class
        # (a name the model lacks stays a name, for the job's error that lists its classes)
        names = list(spec.class_names or ())
        target = FOUND if found else None if choice == PREDICTED else \
            names.index(choice) if choice in names else choice
        offset: tuple[int, ...] = ()
        images, total = data, lay.count
        if lay.lead and self.scope.value == SCOPES[0]:
            offset = self._current_index(layer, len(lay.lead))
            images, total = data[offset], 1
        target_mask = None if inside is None else \
            self._target_region(inside, layer, offset, spec)
        outlines = None
        if isinstance(target_mask, Outlines):  # rasterised in the worker
            outlines, target_mask = target_mask, None
        # the job checks methods, target, device and region options before any pixel is read
        # (the automatic target layer is found once per model, not per run)
        explain = ExplainJob(
            spec, methods, target, regions=self._region_args(),
            mask=self._mask_array(layer, offset, spec), target_mask=target_mask,
            device=self.device.value, batch_size=int(self.batch_size.value) or None,
            target_layer=None if self.target_layer.value == AUTO else self.target_layer.value,
            **self._tile_settings())
        return Job(layer=layer, images=images, offset=offset, channel_axis=channel_axis,
                   explain=explain, total=total, outlines=outlines, level=level,
                   downsample=downsample)

    # ---- running ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._worker is not None

    def run(self, _event=None):
        """Start a run off the UI thread; returns the worker (None when the inputs are bad:
        a notification says what to change; None too while a model is loading: the run then
        starts once it is ready). With live on it explains the shown slice as live does (from
        the cache when it was explained before), also again after an error."""
        if self.live.value:
            return self._live_update(force=True)
        if self.running:
            show_info("napari-gradcam: a run is in progress; cancel it first.")
            return None
        if self.loading:  # the model isn't ready: run as soon as it is
            self._run_pending = True
            self.status.value = "loading the model …; the run starts when it is ready"
            return None
        try:
            job = self.job()
        except (ValueError, TypeError) as err:
            show_error(f"napari-gradcam: {err}")
            return None
        return self._start(compute, job, f"{job.methods[0]} on {job.layer.name}",
                           self._on_result, "running…")

    def add_segmentation(self, _event=None):
        """Add the segmentation model's predicted classes for the chosen image (the scope's
        slice or whole stack) as a Labels layer, computed off the UI thread like a run;
        returns the worker (None when the inputs are bad: a notification says why)."""
        if self.running:
            show_info("napari-gradcam: a run is in progress; cancel it first.")
            return None
        try:
            job = self._segment_job()
        except (ValueError, TypeError) as err:
            show_error(f"napari-gradcam: {err}")
            return None
        return self._start(segment, job, f"segmenting {job.layer.name}", self._on_segmented,
                           "segmenting…")

    def _start(self, work, job: Job, desc: str, on_result, status: str):
        """Run ``work(job)`` on a worker thread with a cancellable progress bar; ``on_result``
        gets its result on the UI thread. Returns the worker."""
        # the result reaches the UI thread once the warm-up is done: its layers compile nothing
        warmup.start()  # (started already unless every model load failed)
        worker = create_worker(warmup.after_warmup(work), job, _start_thread=False,
                               _ignore_errors=True)
        self._pbar = cancelable_progress(total=job.total, desc=desc,
                                         cancel_callback=self.cancel)
        worker.yielded.connect(self._alive(self._on_progress))
        worker.returned.connect(self._alive(on_result))
        worker.errored.connect(self._alive(self._on_error))
        worker.aborted.connect(self._alive(self._on_aborted))
        worker.finished.connect(self._alive(self._on_finished))
        self._worker = worker
        self._running_job = job
        self._update_buttons()
        self.cancel_button.enabled = True
        self.status.value = status
        worker.start()
        return worker

    def _segment_job(self) -> Job:
        """The chosen image, slice and model for "Add segmentation" (target, methods and
        masks play no part)."""
        layer = self.image.value
        if layer is None:
            raise ValueError("there is no image layer to segment: open or select an image.")
        spec = self._spec()
        if not self._is_segmentation():
            raise ValueError(f"the model {self.model.value!r} is a classifier (one score per "
                             "image), so it has no segmentation to add; choose a segmentation "
                             "model.")
        data, level, downsample = self._level_data(layer)  # a pyramid: the level chosen
        channel_axis = -1 if layer.rgb else False
        lay = layout(data.shape, channel_axis, model_spatial_dims(spec.module))
        check_channels(lay.channels, spec.in_channels)
        offset: tuple[int, ...] = ()
        images, total = data, lay.count
        if lay.lead and self.scope.value == SCOPES[0]:
            offset = self._current_index(layer, len(lay.lead))
            images, total = data[offset], 1
        explain = ExplainJob(spec, device=self.device.value,
                             batch_size=int(self.batch_size.value) or None)
        return Job(layer=layer, images=images, offset=offset, channel_axis=channel_axis,
                   explain=explain, total=total, level=level, downsample=downsample)

    def cancel(self, _event=None):
        """Stop the run after the current batch; existing layers stay as they were (with live
        on, the slice it was for is not run again until the slice or a setting changes)."""
        if self._worker is not None:
            if self._live.is_stale(self._worker):  # live stops it already: say nothing
                return
            if self._live.flight is not None and self._live.flight.worker is self._worker:
                self._live.cancelled()
            self._worker.quit()
            self.status.value = "cancelling…"

    def _on_progress(self, progress: Progress):
        """Images done so far (every method and target of a batch together); a tiled run
        counts tiles, said on the status line too."""
        if self._pbar is not None:
            if self._pbar.is_canceled:
                self.cancel()
            self._pbar.total = progress.total
            self._pbar.n = progress.done
            self._pbar.refresh()
        job = getattr(self, "_running_job", None)
        if job is not None and self._tiled(job, progress) and \
                not self.status.value.startswith("cancel"):
            self.status.value = f"running… {progress.done} / {progress.total} tiles"

    @staticmethod
    def _tiled(job: Job, progress: Progress) -> bool:
        """Whether a run's progress counts tiles: the job counts images, or, for an image it
        explains in tiles, tiles (a count that is not the run's number of images)."""
        return progress.total != job.total

    def _on_error(self, err: Exception):
        if self._live.flight is not None and self._live.flight.worker is self._worker:
            if self._live.failed(self._worker):  # the wanted slice failed: said once
                self._live_error(str(err))
            return  # a stale run's error is about a slice no longer shown
        self.status.value = "failed"
        show_error(f"napari-gradcam: {err}")

    def _on_aborted(self):
        if self._live.is_stale(self._worker):
            return  # live stopped it for another slice: that one's run says what happens
        self.status.value = "cancelled; layers unchanged"

    def _on_finished(self):
        if self._applying:  # its result is still being written: the run ends with it
            self._finish_pending = True
            return
        self._finish_pending = False
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._worker = None
        self._running_job = None
        self.cancel_button.enabled = False
        self._update_buttons()
        self._live_run_ended()

    def _on_result(self, result: Result):
        """Show a result: each heatmap, then the regions, then the status line. A run's result
        is written one step per event-loop turn, so the viewer repaints and answers between
        them instead of freezing for all of them at once; the run counts as running until the
        last step (whoever waits for the run sees every layer), and a Cancel pressed meanwhile
        lets the steps finish (every layer from the same result). A result shown with no run
        going (a cached one) is written at once."""
        if self._closed or self._gone(result):  # its image left the viewer: nothing to write
            return
        self._apply_now()  # a result still being written is finished first
        job, explained = result.job, result.explained
        self._last = result
        dims = model_spatial_dims(job.explain.spec.module)
        how = "; 3D regions" if dims == 3 else \
            "; 2D model: explained slice by slice" if len(image_shape(job.layer)) > 2 else ""
        before = f"{', '.join(job.methods)}: "
        after = (f"; {len(explained.regions)} regions{how}{self._tiled_text(result)}; "
                 f"{result.seconds:.2f} s on {describe_device(resolve_device(explained.device))}")
        self._said = (result, before, after, None)
        notes = list(explained.notes)  # e.g. a class with no pixels in its region: zero map

        def said():
            self._on_step()
            for note in notes:
                show_warning(f"napari-gradcam: {note}")

        self._applying = [functools.partial(self._show_heatmap, job, explained, method,
                                            result.pyramids.get(method))
                          for method in explained.methods]
        self._applying += [*self._regions_steps(job, explained), said]
        if self.running:
            self._apply_next()
        else:
            self._apply_now()

    @staticmethod
    def _tiled_text(result: Result) -> str:
        """The level explained (a multiscale image) and the tiles (a tiled run), for the
        status line."""
        job, tiling = result.job, getattr(result.explained, "tiling", None)
        text = ""
        if job.level is not None:
            shape = tuple(job.images.shape)
            h, w = (shape[:-1] if job.layer.rgb else shape)[-2:]
            text += f"; level {job.level} ({h} x {w})"
        if tiling is not None:
            (th, tw), (oh, ow) = tiling.tile, tiling.overlap
            text += f"; tiles of {th} x {tw} px, overlap {oh}" + (f" x {ow}" if ow != oh else "")
        return text

    def _apply_next(self):
        """Write the next step of the result being shown (and the steps after it that take
        no time: a layer that is already there, glyphs already drawn); a frame later, the
        next. After the last, the run ends if its worker has finished."""
        import time

        from .results import AGAIN, STEP_FRAME_MS, STEP_QUICK_S

        start = time.perf_counter()
        while self._applying:
            step = self._applying.pop(0)
            try:
                if step() is AGAIN:  # more of the same step, in the next turn
                    self._applying.insert(0, step)
            except Exception:
                self._applying = []  # the rest would build on a failed step
                self._applied()
                raise
            if time.perf_counter() - start > STEP_QUICK_S:
                break
        if self._applying:
            # a frame, not 0 ms: the repaint a step asked for, the input and the timers
            # waiting meanwhile all come first (a zero timer can fire before them: a step,
            # its repaint and the next step then block as one)
            self._apply_timer.start(STEP_FRAME_MS)
        else:
            self._applied()

    def _apply_now(self):
        """Write every step left at once."""
        self._apply_timer.stop()
        while self._applying:
            self._apply_next()
            self._apply_timer.stop()

    def _applied(self):
        if self._finish_pending:
            self._on_finished()

    def _on_segmented(self, result: Segmented):
        layer = self._show_segmentation(result.job, result.labels)
        names = dict(zip(layer.features["index"], layer.features["class"]))
        present = [names.get(v, str(v)) for v in np.unique(result.labels).tolist() if v]
        self.status.value = (f"segmentation: {', '.join(map(str, present)) or 'no class'} "
                             f"predicted; {result.seconds:.2f} s")

    def _on_step(self, _event=None):
        """The last run's status line, saying what the model found in the frame the viewer
        shows (a stack's frames differ); re-said as the user scrolls, from the stored rows, as
        long as that line is still the one shown (a later message is not overwritten). With
        live on, a move of the slider also explains the new slice."""
        if _event is not None and self.live.value and not self._closed:  # the slider
            here = self._shown_slice()
            if here is None or here != self._step_seen:  # a 3D model's volume: no new slice
                self._step_seen = here
                self._live_request(lead=True)
        if self._said is None:
            return
        result, before, after, shown = self._said
        if shown is not None and self.status.value != shown:
            self._said = None  # another message replaced it: scrolling leaves that alone
            return
        lead = len(result.explained.rows[0]["index"]) if result.explained.rows else 0
        try:
            frame = self._current_index(result.job.layer, lead) if lead else ()
        except (AttributeError, ValueError, IndexError):  # the image has gone or changed shape
            frame = None
        text = before + self._summary(result, frame) + after
        if text != self.status.value:
            self.status.value = text
        self._said = (result, before, after, text)

    def _shown_slice(self):
        """(the chosen image, the leading indices of the slice the model explains there), or
        None when that can't be told (then live looks anyway)."""
        layer, loaded = self.image.value, self._loaded()
        if layer is None or loaded is None:
            return None
        try:
            lead = len(image_shape(layer)) - model_spatial_dims(loaded.spec.module)
            return (layer.unique_id, self._current_index(layer, lead) if lead > 0 else ())
        except (AttributeError, ValueError, IndexError, TypeError):
            return None

    @staticmethod
    def _summary(result: Result, shown: tuple[int, ...] | None = None) -> str:
        """What the model said, from the job's rows: the classes found in (or the class and
        probability of) the image ``shown`` (the leading indices of the frame the viewer shows;
        the first image when it is not one of those explained). A segmentation model's score,
        a summed logit with no probability, is shown as it is."""
        rows, named = result.explained.rows, bool(result.explained.class_names)
        images = list(dict.fromkeys(tuple(r["index"]) for r in rows))
        n = len(images)
        here = shown if shown in images else images[0] if images else None

        def said(r):
            value = shown_score(r)  # None: no finite number to show, the class alone
            name = r["class"] if named else ""
            return name if value is None else f"{name} {value:.2f}"

        found = result.job.found
        mine = [r for r in rows if tuple(r["index"]) == here and (r["class_id"] >= 0 or not found)]
        text = ", ".join(map(said, mine)) or "no class found"
        frame = ", ".join(map(str, here or ()))
        return text if n == 1 else f"{text} in frame {frame} (of {n} explained)"

    # ---- regions from the existing heatmap ------------------------------------------------

    def _on_region_settings(self, _event=None):
        """Threshold, mode, area, tolerance or mask changed: new shapes from the heatmaps we
        have (the job result's ``rederive``, on a worker), without running the model again."""
        if self._last is None or self.running:
            return
        last = self._last
        job, explained = last.job, last.explained
        try:
            mask = self._mask_array(job.layer, job.offset, job.explain.spec)
        except ValueError as err:
            show_error(f"napari-gradcam: {err}")
            return
        self._region_generation += 1
        generation = self._region_generation
        worker = create_worker(_guarded(explained.rederive), mask=mask,
                               _start_thread=False, _ignore_errors=True,
                               **self._region_args())

        def done(new: JobResult):
            if generation == self._region_generation and self._last is last:
                old, last.explained = last.explained, new
                if _shown_mask_changed(old, new):  # the heatmap shown is masked differently
                    for method in new.methods:
                        self._show_heatmap(job, new, method)
                self._show_regions(job, new)

        worker.returned.connect(self._alive(done))
        worker.errored.connect(self._alive(self._on_error))

        def finished():
            if self._region_worker is worker:
                self._region_worker = None

        worker.finished.connect(finished)
        self._region_worker = worker
        worker.start()

    # ---- live mode ------------------------------------------------------------------------------

    def _on_live(self, _event=None):
        """Live ticked: explain the shown slice at once (the scope is held at the current
        slice meanwhile); unticked: stop following the slider (a run in flight still ends and
        is shown: it is for the slice on screen)."""
        self._on_image()  # the scope radio: held and disabled while live is on
        if self.live.value:
            self._live.reset()
            self._live_update()
        else:
            self._live_soon.stop()

    def _live_request(self, _event=None, *, lead: bool = False):
        """Something live follows changed: look at what is wanted once the events queued now
        are handled (a control reset by a model change fires several of these). ``lead`` (the
        slider): at once, unless a look is pending or was just taken (then the timer folds
        this step in), so the run starts, or the cached slice is written, before the viewer
        repaints the bare slice."""
        if not self.live.value:
            return
        if lead and self._live_soon.leads(LIVE_LEAD_MS):
            self._live_update(lead=True)
        else:
            self._live_soon()

    def _live_update(self, force: bool = False, lead: bool = False):
        """Show the explanation of the slice on screen with the current settings: from the
        cache, or by a run (after the stale run in flight, if any, has stopped). Returns the
        worker of a run it started, else None. ``lead`` (called inside the slider's event): a
        cached slice is written at once, a run is started from the timer (a slider event
        can also come from the viewer closing, when no run must start)."""
        self._live_soon.stop()
        if not self.live.value:
            return None
        if self.loading:  # _on_load_finished calls run(), which comes back here
            self._run_pending = True
            return None
        if self.running and self._live.flight is None:  # a Run or a segmentation from before:
            return None  # live looks again once it has ended (_live_run_ended)
        if self.image.value is None:  # the image was closed: nothing to follow, no error
            self.status.value = "live: open or select an image layer"
            return None
        try:
            job = self.job()
        except (ValueError, TypeError) as err:
            self._live_error(str(err))
            return None
        self._step_seen = (job.layer.unique_id, tuple(job.offset))  # the slice looked at
        key = self._live_key(job)
        decision = self._live.decide(key, force=force)
        if decision.action == SHOW:
            self._live_show(decision.result, job)
        elif decision.action == START:
            if lead:
                self._live_soon()
                return None
            return self._live_start(job, key)
        if not self.running and self._live_regions_stale(job):  # threshold etc. moved since
            self._on_region_settings()
        return None

    def _live_key(self, job: Job) -> LiveKey:
        """What the job's heatmaps depend on (the region settings and the mask are re-derived
        from them, so they are left out)."""
        choice = self.target.value
        inside = choice.layer if isinstance(choice, InsideLayer) else None
        return LiveKey(
            layer=job.layer.unique_id, pixels=self._pixels(job),
            index=tuple(job.offset), model=str(self.model.value), spec=id(job.explain.spec),
            methods=tuple(job.methods), target=(job.found, job.target),
            target_layer=str(self.target_layer.value), device=str(self.device.value),
            region=region_token(job.explain.target_mask, job.outlines),
            region_layer=None if inside is None else inside.unique_id,
            channel_axis=job.channel_axis)

    def _live_start(self, job: Job, key: LiveKey):
        started = []

        def returned(result):
            self._on_live_result(started[0] if started else self._worker, key, result)

        worker = self._start(compute, job, f"{job.methods[0]} on {job.layer.name} (live)",
                             returned, "running…")
        started.append(worker)
        self._live.started(key, worker)
        return worker

    def _on_live_result(self, worker, key: LiveKey, result: Result):
        """A live run's result: cached whatever happens (unless its image has left the viewer);
        shown only if its slice and settings are still the ones wanted (a stale run that
        slipped past its cancel is not)."""
        if self._gone(result):
            return
        cached = Cached(result.explained, result.seconds)
        if self._live.returned(worker, key, cached):
            self._on_result(result)
            self._said_once(result)
            cached.explained = result.explained

    def _live_show(self, cached: Cached, job: Job):
        """A cached result on screen, as a run's would be (no model run), with the ``job``
        the controls give now (same key: the same pixels, model and settings)."""
        result = Result(job, cached.explained, cached.seconds)
        self._on_result(result)
        self._said_once(result)
        cached.explained = result.explained  # its notes are not said again
        said = self._said
        if isinstance(said, tuple) and len(said) == 4 and said[0] is result:
            self._said = (result, said[1], said[2] + " (cached)", None)
            self._on_step()

    @staticmethod
    def _said_once(result: Result):
        """The result's notes were shown: scrolling back to its slice does not repeat them."""
        if result.explained.notes:
            result.explained = replace(result.explained, notes=[])

    def _live_run_ended(self):
        """The widget's run is over, its result written (live's own, or a Run or segmentation
        from before live was ticked): live looks at what is wanted now (the slider may have
        moved meanwhile)."""
        if self._live.flight is not None:  # the run that ended: there is one at a time
            self._live.finished(self._live.flight.worker)
        if self.live.value:
            self._live_update()

    def _live_regions_stale(self, job: Job) -> bool:
        """Whether the regions shown were derived with other settings or another mask than
        the controls say now (a cached slice, or a run started before the threshold moved)."""
        last = self._last
        if last is None or last.job.layer is None or \
                getattr(last.job.layer, "unique_id", None) != job.layer.unique_id:
            return False
        old = last.explained
        if old.region_options != job.explain.region_options:
            return True
        a, b = old.mask, job.explain.mask
        if a is None or b is None:
            return (a is None) != (b is None)
        return a.shape != b.shape or not np.array_equal(a, b)

    def _live_error(self, message: str):
        """An error in live mode: on the status line each time, as a notification once (until
        a run succeeds); live stays on."""
        self.status.value = f"live: {message}"
        if self._live.should_say(message):
            show_error(f"napari-gradcam: {message}")

    def _live_forget(self, event=None):
        """A layer left the viewer: its cached results go (and those its region targeted),
        and so does a live run in flight for it (its result has nowhere to go)."""
        uid = getattr(getattr(event, "value", None), "unique_id", None)
        if uid is not None:
            self._live.cache.drop_layer(uid)
            self._live.abandon(lambda key: key.layer == uid or key.region_layer == uid)
            self._edits.pop(uid, None)
            self._forget_digests(uid)
            self._redrawn_at.pop(uid, None)

    def _gone(self, result: Result) -> bool:
        """Whether the image of ``result`` left the viewer while it ran (nothing is written
        for it then; the status line says why)."""
        layer = result.job.layer
        if layer in list(self._viewer.layers):
            return False
        self.status.value = (f"the image {layer.name!r} was removed during the run; nothing "
                             "to show")
        return True

    def _live_forget_models(self):
        """A model loaded again under a name already in the list: its cached results go."""
        for name, loaded in self._models.items():
            if self._live_models.get(name, loaded) is not loaded:
                self._live.cache.drop_model(name)
            self._live_models[name] = loaded




# the geometry and naming helpers are used from here by scripts written against this module
__all__ = ["NAME_WIDTH", "GradCamWidget", "available_devices", "compute", "heat_colormap",
           "image_shape", "index_map", "labels_region", "layer_onto_image", "result_name",
           "shape_outlines", "shapes_region", "short_name"]
