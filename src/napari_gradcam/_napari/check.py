"""The widget's Check section: can the last run's heatmaps be trusted?

For the image (or slice) of the widget's last run and its methods: deletion / insertion curves
drawn in a dock of their own (with average drop / increase in the section), the cascading
randomisation's maps side by side in napari's grid with their correlations, and agreement with
a reader's Labels or Shapes layer. The numbers are the core's :mod:`napari_gradcam.metrics`;
this module only reads the last run, checks the inputs (a notification that says what to
change, every layer left untouched), runs the metric on a worker through the widget's own
``_start`` (its progress bar and Cancel, one job at a time: a Check and a Run never overlap)
and writes layers, the plot and the table on the main thread.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton, SpinBox, Table
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error, show_info

from .. import metrics as M
from ..explain_arrays import Progress, model_spatial_dims
from ..metrics._sanity import parameter_layers
from .geometry import Outlines, image_shape, shape_outlines
from .io import META_KEY
from .results import heat_colormap, result_name

if TYPE_CHECKING:
    from .widget import GradCamWidget, Result

CURVES_DOCK = "Grad-CAM check: deletion / insertion"
SANITY_ROLE = "sanity"
BASELINES = ("black", "blur")
# pointing game hit, distance of the peak (px), energy inside the boxes, IoU / Dice of heat >=
# threshold and of the regions
AGREEMENT_COLUMNS = ("pointing", "distance", "energy", "IoU", "Dice", "region IoU",
                     "region Dice")
HEADERS = ("hit", "dist", "energy", "IoU", "Dice", "reg IoU", "reg Dice")  # narrow columns


def _finite(value, fmt: str = ".2f") -> str:
    """A number for the user: never 'nan' (a dash where there is none)."""
    if value is None:
        return "\u2013"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    v = float(value)
    if not math.isfinite(v):
        return "\u2013"
    text = format(v, fmt)
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.00"


@dataclass
class Current:
    """The image the checks look at: the last run's image (its slice, or for a stack
    explained whole the frame the viewer shows), its heatmaps and the class they explain."""

    result: Any  # the widget's Result
    layer: Any  # the Image layer
    images: Any  # one image's pixels (channels kept)
    offset: tuple  # its leading indices in the layer
    channel_axis: Any
    heatmaps: dict  # method -> spatial heat
    target: int  # the class explained (scored)
    spec: Any
    methods: list
    total: int = 1  # progress units (the widget's progress bar)
    # filled by the section for one kind of check
    settings: dict = field(default_factory=dict)
    annotations: Any = None  # a bool mask on the image's pixels, or Outlines
    source: str = ""  # the annotation layer's name

    @property
    def dims(self) -> int:
        return model_spatial_dims(self.spec.module)

    def where(self) -> str:
        frame = f" frame {', '.join(map(str, self.offset))}" if self.offset else ""
        return f"{self.layer.name}{frame}"

    def regions(self, method: str) -> list:
        """The method's regions on this image, their index dropped (one image)."""
        explained = self.result.explained
        k = len(self.offset)
        return [dataclasses.replace(r, index=()) for r in explained.regions_of(method)
                if tuple(int(i) for i in r.index)[-k:] == tuple(self.offset)[-k:] or not k]


def _counted(gen, done: int, total: int):
    """Yield from a metric's generator, each of its Progress reported as one more unit of the
    whole check (``done`` before it), and return its result."""
    try:
        while True:
            try:
                progress = next(gen)
            except StopIteration as stop:
                return stop.value
            done += 1
            yield Progress(min(done, total), total, progress.method, progress.batch_size)
    finally:
        gen.close()  # Cancel: the metric stops at its next batch


def _device(current: Current):
    explained = current.result.explained
    return explained.device, (int(explained.batch_size) or None)


def faithfulness(current: Current):
    """Worker body: deletion / insertion curves and average drop / increase per method."""
    t0 = time.perf_counter()
    device, _batch = _device(current)
    steps, baseline = current.settings["steps"], current.settings["baseline"]
    curves, drops, done = {}, {}, 0
    for method in current.methods:
        heat = current.heatmaps[method]
        curves[method] = yield from _counted(M.iter_deletion_insertion(
            current.images, current.spec, heat, current.target, steps, baseline=baseline,
            device=device, channel_axis=current.channel_axis), done, current.total)
        done += 1
        drops[method] = yield from _counted(M.iter_average_drop_increase(
            current.images, current.spec, heat, current.target, baseline=baseline,
            device=device, channel_axis=current.channel_axis), done, current.total)
        done += 1
    return Checked("faithfulness", current, {"curves": curves, "drops": drops},
                   time.perf_counter() - t0)


def sanity(current: Current):
    """Worker body: the first method's cascading randomisation on the image."""
    t0 = time.perf_counter()
    device, _batch = _device(current)
    explained = current.result.explained
    result = yield from _counted(M.iter_sanity_check(
        current.images, current.spec, current.methods[0], current.target,
        stages=current.settings["stages"], seed=0, device=device,
        channel_axis=current.channel_axis, target_layer=explained.target_layer),
        0, current.total)
    return Checked("sanity", current, {"sanity": result}, time.perf_counter() - t0)


def agreement(current: Current):
    """Worker body: agreement of every method's heatmap and regions with the annotation."""
    t0 = time.perf_counter()
    masks = current.annotations
    if isinstance(masks, Outlines):
        masks = masks.rasterise()
    masks = np.asarray(masks, bool)
    out = {}
    for i, method in enumerate(current.methods):
        out[method] = M.agreement(current.heatmaps[method], masks,
                                  threshold=current.settings["threshold"],
                                  regions=current.regions(method), spatial_dims=current.dims)
        yield Progress(i + 1, current.total, method, 0)
    return Checked("agreement", current, {"agreement": out}, time.perf_counter() - t0)


@dataclass
class Checked:
    kind: str
    current: Current
    values: dict
    seconds: float = 0.0


class CurvesPlot:
    """The deletion / insertion curves: a matplotlib figure on Qt's canvas, one colour per
    method, deletion solid and insertion dashed, each curve's AUC in the legend."""

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from qtpy.QtWidgets import QVBoxLayout, QWidget

        self.figure = Figure(figsize=(5, 3.6), dpi=100, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.widget = QWidget()
        self.widget.setObjectName(CURVES_DOCK)
        box = QVBoxLayout(self.widget)
        box.setContentsMargins(2, 2, 2, 2)
        box.addWidget(self.canvas)
        self.widget.setMinimumSize(320, 240)
        self.axes = None

    def draw(self, curves: dict, title: str):
        self.figure.clear()
        ax = self.axes = self.figure.add_subplot()
        for i, (method, di) in enumerate(curves.items()):
            x = np.asarray(di.fractions)
            dele = np.asarray(di.deletion).reshape(-1, x.size)[0]
            ins = np.asarray(di.insertion).reshape(-1, x.size)[0]
            colour = f"C{i}"
            a_del = _finite(di.deletion_auc.reshape(-1)[0], ".3f")
            a_ins = _finite(di.insertion_auc.reshape(-1)[0], ".3f")
            ax.plot(x, dele, color=colour, linestyle="-",
                    label=f"{method} deletion (AUC {a_del})")
            ax.plot(x, ins, color=colour, linestyle="--",
                    label=f"{method} insertion (AUC {a_ins})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("share of pixels removed (deletion) / revealed (insertion)", fontsize=8)
        ax.set_ylabel("probability of the class", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
        self.canvas.draw()


class CheckSection(Container):
    """The Check section of :class:`GradCamWidget`: faithfulness, sanity check and agreement
    for the image and methods of its last run."""

    def __init__(self, widget: GradCamWidget):
        super().__init__(labels=True)
        self._w = widget
        self._plot: CurvesPlot | None = None
        self.header = Label(value="<b>Check</b> (the last run's image and methods)")
        self.steps = SpinBox(label="steps", min=1, max=1000, value=50,
                             tooltip="Deletion / insertion: pixels are removed (revealed) in "
                                     "this many steps, hottest first.")
        self.baseline = ComboBox(label="baseline", choices=list(BASELINES), value="black",
                                 tooltip="What a deleted pixel becomes: black (zero intensity) "
                                         "or a blurred copy of the image. Insertion starts "
                                         "from the blurred image.")
        self.faithfulness_button = PushButton(
            text="Faithfulness",
            tooltip="Deletion and insertion curves of each method's heatmap (a plot in a dock, "
                    "AUCs in its legend) and the average drop / increase in confidence.")
        self.stages = SpinBox(label="stages", min=1, max=64, value=4,
                              tooltip="Sanity check: the model's layers are re-initialised "
                                      "from the head down in this many groups; each group's "
                                      "map is shown beside the original.")
        self.sanity_button = PushButton(
            text="Sanity check",
            tooltip="Model-parameter randomisation of the first method: the maps after each "
                    "stage side by side with their Spearman correlation (\u03c1) and SSIM with "
                    "the original. A trustworthy method decorrelates.")
        self.stages_button = PushButton(
            text="Stages side by side", enabled=False,
            tooltip="Show the sanity check's maps side by side again, or leave the grid.")
        self.annotations = ComboBox(
            label="annotations", choices=self._annotation_choices, nullable=True,
            tooltip="A reader's annotation: a Labels layer (labels > 0) or a Shapes layer (its "
                    "selected shapes, all when none is selected), matched to the image where "
                    "it lies in the viewer (scale and translate).")
        self.agreement_button = PushButton(
            text="Agreement",
            tooltip="Pointing game, energy inside the annotation's boxes, IoU / Dice of the "
                    "heat >= threshold and of the regions, for each method.")
        self.result = Label(value="")
        self.result.native.setWordWrap(True)
        self.table = Table(value={"data": [], "index": [], "columns": list(HEADERS)},
                           tooltip="hit: the pointing game (the heatmap's peak inside the "
                                   "annotation or within 15 px); dist: the peak's distance to it "
                                   "(px); energy: the share of heat inside the annotation's "
                                   "boxes; IoU / Dice: heat >= threshold vs the annotation; reg: "
                                   "the same for the regions.")
        self.table.read_only = True
        self.table.visible = False
        from qtpy.QtWidgets import QHeaderView, QStyledItemDelegate

        # the numbers are shown as formatted here (magicgui's delegate would re-format them)
        self.table.native.setItemDelegate(QStyledItemDelegate(self.table.native))
        self.table.native.horizontalHeader().setSectionResizeMode(
            QHeaderView.ResizeMode.ResizeToContents)
        self.table.native.verticalHeader().setDefaultSectionSize(22)
        self.table.native.setMaximumHeight(150)
        self.extend([
            self.header,
            Container(widgets=[self.steps, self.baseline], layout="horizontal"),
            self.faithfulness_button,
            Container(widgets=[self.stages], layout="horizontal"),
            Container(widgets=[self.sanity_button, self.stages_button], layout="horizontal",
                      labels=False),
            self.annotations, self.agreement_button,
            Container(widgets=[self.result, self.table], labels=False),  # the full width
        ])
        self.faithfulness_button.changed.connect(self.check_faithfulness)
        self.sanity_button.changed.connect(self.check_sanity)
        self.stages_button.changed.connect(self.toggle_stages)
        self.agreement_button.changed.connect(self.check_agreement)
        widget._viewer.layers.events.removed.connect(self._on_layer_removed)

    # ---- choices ------------------------------------------------------------------------------

    def _annotation_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self._w._viewer.layers
                if isinstance(layer, (Labels, Shapes)) and not self._w._is_ours(layer)]

    def set_enabled(self, enabled: bool):
        """Off while a run or a check is going (one at a time)."""
        for button in (self.faithfulness_button, self.sanity_button, self.agreement_button):
            button.enabled = enabled

    # ---- what the checks look at ---------------------------------------------------------------

    def current(self, need_model: bool = True) -> Current:
        """The last run's image and heatmaps, checked; raises ValueError saying what to do."""
        w = self._w
        last: Result | None = w._last
        if last is None:
            raise ValueError("nothing to check yet: press Run first (the checks look at the "
                             "last run's image and methods).")
        job, explained = last.job, last.explained
        layer = job.layer
        if layer not in list(w._viewer.layers):
            raise ValueError(f"the image {layer.name!r} of the last run is no longer in the "
                             "viewer; run again on an image first.")
        data = layer.data[0] if layer.multiscale else layer.data
        if not _same_pixels(job, data):
            raise ValueError(f"the image {layer.name!r} changed since the last run (its "
                             "pixels were replaced); run again first, so the heatmaps "
                             "match it.")
        spec = job.explain.spec
        if need_model and job.explain.segmentation:
            raise ValueError("the last run's model is a segmentation model; deletion / "
                             "insertion and the sanity check score a classifier's one class "
                             "per image: run a classification model first.")
        dims = model_spatial_dims(spec.module)
        heat0 = explained.heatmaps[explained.methods[0]]
        lead = heat0.ndim - dims
        frame: tuple = ()
        if lead:  # a stack explained whole: the frame the viewer shows
            full = w._current_index(layer, len(job.offset) + lead)
            frame = full[len(job.offset):]
        images = job.images[frame] if frame else job.images
        heatmaps = {m: np.asarray(explained.heatmaps[m][frame] if frame else
                                  explained.heatmaps[m], np.float32)
                    for m in explained.methods}
        ids = np.asarray(explained.class_ids)[frame] if frame else np.asarray(
            explained.class_ids)
        scores = np.asarray(explained.scores)[frame] if frame else np.asarray(explained.scores)
        kept = np.asarray(explained.kept)[frame] if frame else np.asarray(explained.kept)
        ids, scores, kept = ids.reshape(-1), scores.reshape(-1), kept.reshape(-1)
        pick = np.where(kept, scores, -np.inf) if kept.any() else scores
        target = int(ids[int(np.argmax(pick))]) if ids.size else 0
        if target < 0:
            raise ValueError("the last run found no class in this image; run again with one "
                             "class as the target.")
        return Current(result=last, layer=layer, images=images,
                       offset=tuple(job.offset) + tuple(frame), channel_axis=job.channel_axis,
                       heatmaps=heatmaps, target=target, spec=spec,
                       methods=list(explained.methods))

    def _busy(self) -> bool:
        if self._w.running:
            show_info("napari-gradcam: a run or check is in progress; wait for it or cancel "
                      "it first.")
            return True
        return False

    def _start(self, work, current: Current, desc: str, on_result, status: str):
        return self._w._start(work, current, desc, on_result, status)

    # ---- faithfulness ---------------------------------------------------------------------------

    def check_faithfulness(self, _event=None):
        """Deletion / insertion curves and average drop / increase of each method of the last
        run on its image, off the UI thread; returns the worker (None on bad input)."""
        if self._busy():
            return None
        try:
            current = self.current()
        except (ValueError, TypeError) as err:
            show_error(f"napari-gradcam: {err}")
            return None
        current.settings = {"steps": int(self.steps.value), "baseline": self.baseline.value}
        current.total = 2 * len(current.methods)
        return self._start(faithfulness, current, f"faithfulness on {current.layer.name}",
                           self._on_faithfulness, "checking faithfulness…")

    def _on_faithfulness(self, checked: Checked):
        current, curves, drops = checked.current, checked.values["curves"], \
            checked.values["drops"]
        names = list(current.result.explained.class_names)
        cls = names[current.target] if 0 <= current.target < len(names) else \
            str(current.target)
        self._show_curves(curves, f"{current.where()} \u00b7 class {cls} \u00b7 "
                                  f"{current.settings['steps']} steps, "
                                  f"{current.settings['baseline']} baseline")
        lines = []
        for method in current.methods:
            di, ad = curves[method], drops[method]
            lines.append(
                f"{method}: deletion AUC {_finite(di.deletion_auc.reshape(-1)[0], '.3f')}, "
                f"insertion AUC {_finite(di.insertion_auc.reshape(-1)[0], '.3f')}, "
                f"drop {_finite(ad.average_drop, '.1f')} %, increase "
                f"{_finite(bool(ad.increase.reshape(-1)[0]))}")
        self.result.value = "\n".join(lines)
        self._w.status.value = (f"faithfulness of {', '.join(current.methods)} on "
                                f"{current.where()} ({cls}); {checked.seconds:.2f} s")

    def _show_curves(self, curves: dict, title: str):
        """Draw in the curves dock: the one already docked, or a new one if there is none
        (it was closed, or this is the first)."""
        if self._plot is None:
            self._plot = CurvesPlot()
        self._plot.draw(curves, title)
        window = self._w._viewer.window
        if CURVES_DOCK not in window.dock_widgets:
            window.add_dock_widget(self._plot.widget, name=CURVES_DOCK, area="right")
        dock = self._plot.widget.parent()
        if dock is not None:
            dock.show()
            dock.raise_()

    @property
    def plot(self) -> CurvesPlot | None:
        """The curves plot (its figure and axes), once drawn."""
        return self._plot

    # ---- sanity check ----------------------------------------------------------------------------

    def check_sanity(self, _event=None):
        """The first method's cascading randomisation on the last run's image, off the UI
        thread; its maps then go side by side in napari's grid. Returns the worker (None on
        bad input)."""
        if self._busy():
            return None
        try:
            current = self.current()
            layers = parameter_layers(current.spec.module)
            if not layers:
                raise ValueError("the last run's model has no parameters, so there are no "
                                 "weights to randomise; the sanity check needs a model with "
                                 "learnt layers.")
        except (ValueError, TypeError) as err:
            show_error(f"napari-gradcam: {err}")
            return None
        stages = min(int(self.stages.value), len(layers))
        current.settings = {"stages": stages}
        current.total = stages
        return self._start(sanity, current, f"sanity check on {current.layer.name}",
                           self._on_sanity, "sanity check…")

    def _sanity_layers(self) -> list:
        return [layer for layer in self._w._viewer.layers
                if layer.metadata.get(META_KEY, {}).get("role") == SANITY_ROLE]

    def _sanity_source(self, heats: list | None = None):
        """The image layer the sanity check's maps were computed on, or None when it has left
        the viewer (the maps then have nothing to be shown beside)."""
        heats = self._sanity_layers() if heats is None else heats
        if not heats:
            return None
        source = heats[0].metadata[META_KEY]["source"]
        return next((layer for layer in self._w._viewer.layers if isinstance(layer, Image)
                     and layer.name == source and not self._w._is_ours(layer)), None)

    def _on_layer_removed(self, event=None):
        """The sanity check's image left the viewer: its maps, hidden outside the grid, would
        stay in the layer list with no image to compare them with, so they go too."""
        heats = self._sanity_layers()
        if not heats or self._sanity_source(heats) is not None:
            return
        if self.in_stages():
            self._w._leave_grid()
        layers = self._w._viewer.layers
        for layer in self._sanity_layers():
            if layer in layers:
                layers.remove(layer)
        grid_state_changed(self)

    def _on_sanity(self, checked: Checked):
        w, current, sc = self._w, checked.current, checked.values["sanity"]
        layers = w._viewer.layers
        if current.layer not in list(layers):
            show_info(f"napari-gradcam: the image {current.layer.name!r} was removed during "
                      "the sanity check; nothing to show.")
            return
        if getattr(w, "_grid_state", None) is not None:
            w._leave_grid()
        for layer in self._sanity_layers():
            layers.remove(layer)
        place = _Placed(current.layer, current.offset)
        maps = [np.asarray(sc.original)] + [np.asarray(m) for m in sc.maps]
        k = len(sc.stages)
        captions = ["original (trained)"] + [
            f"stage {s + 1}{' (all)' if s == k - 1 else ''}: {sc.stages[s]} \u00b7 "
            f"\u03c1 {_finite(sc.spearman.reshape(-1)[s])} \u00b7 "
            f"SSIM {_finite(sc.ssim.reshape(-1)[s])}" for s in range(k)]
        for s, (heat, caption) in enumerate(zip(maps, captions)):
            data, geo = w._placed(place, heat)
            rho, sim = sc.spearman.reshape(-1), sc.ssim.reshape(-1)
            meta = {META_KEY: {"role": SANITY_ROLE, "source": current.layer.name,
                               "method": sc.method, "stage": s, "caption": caption,
                               "layer": None if s == 0 else sc.stages[s - 1],
                               "spearman": None if s == 0 else float(rho[s - 1]),
                               "ssim": None if s == 0 else float(sim[s - 1])}}
            name = result_name(f"{sc.method} stage {s}", current.layer.name)
            layers.append(Image(data, name=name, colormap=heat_colormap(),
                                blending="translucent", opacity=0.7, contrast_limits=(0.0, 1.0),
                                visible=False, metadata=meta, **geo))
        self.enter_stages()
        arrow = " \u2192 "
        path = arrow.join(_finite(r) for r in sc.spearman.reshape(-1))
        self.result.value = (f"sanity check of {sc.method} on {current.where()}: Spearman "
                             f"\u03c1 with the original {path} after {k} "
                             f"stage{'s' * (k != 1)} (near 0: the map depends on the learnt "
                             "weights)")
        w.status.value = f"sanity check of {sc.method}; {checked.seconds:.2f} s"

    def enter_stages(self) -> bool:
        """The sanity check's maps side by side in napari's grid: a cell per stage, the image
        under the stage's map, captioned with its stage and correlations; the widget's
        Side-by-side button (or this section's) leaves it as the widget's own grid is left
        (cells removed, every layer back where and as it was, the grid as it was)."""
        w = self._w
        heats = sorted(self._sanity_layers(),
                       key=lambda layer: layer.metadata[META_KEY]["stage"])
        if not heats:
            show_info("napari-gradcam: no sanity check to show; press Sanity check first.")
            return False
        source = heats[0].metadata[META_KEY]["source"]
        image = self._sanity_source(heats)
        if image is None:
            show_info(f"napari-gradcam: the image {source!r} of the sanity check is no longer "
                      "in the viewer; run the check again.")
            return False

        def make_cells():
            views = [w._image_view(image, heat.metadata[META_KEY]["caption"]) for heat in heats]
            return list(zip(views, heats)), views

        w._enter_cells(make_cells, 2, image=image.name, kind=SANITY_ROLE)  # the image, a map
        w._grid_model().events.enabled.connect(self._on_grid_enabled)  # a function: once
        grid_state_changed(self)
        return True

    def _on_grid_enabled(self, _event=None):
        """napari's grid switched (its own button, or the widget's): the stages button says
        what it does once the widget has left the grid."""
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, lambda: grid_state_changed(self))

    def in_stages(self) -> bool:
        state = getattr(self._w, "_grid_state", None)
        return state is not None and state.get("kind") == SANITY_ROLE

    def toggle_stages(self, _event=None):
        """Leave the stages' grid, or show the stages side by side again."""
        if self.in_stages():
            self._w._leave_grid()
        else:
            self.enter_stages()
        grid_state_changed(self)

    # ---- agreement ------------------------------------------------------------------------------

    def check_agreement(self, _event=None):
        """Agreement of each method's heatmap and regions with the chosen annotation layer,
        off the UI thread; returns the worker (None on bad input)."""
        if self._busy():
            return None
        try:
            current = self.current(need_model=False)
            current.annotations = self._annotation_mask(current)
        except (ValueError, TypeError) as err:
            show_error(f"napari-gradcam: {err}")
            return None
        current.settings = {"threshold": float(self._w.threshold.value)}
        current.source = self.annotations.value.name
        current.total = len(current.methods)
        return self._start(agreement, current, f"agreement on {current.layer.name}",
                           self._on_agreement, "checking agreement…")

    def _annotation_mask(self, current: Current):
        """The chosen layer on the image's pixels: a bool mask (Labels: labels > 0) or the
        Shapes' outlines (rasterised on the worker)."""
        source = self.annotations.value
        w = self._w
        if source is None:
            raise ValueError("no annotation layer chosen: add a Labels or Shapes layer with the "
                             "reader's annotation and choose it under 'annotations'.")
        if source not in list(w._viewer.layers):
            raise ValueError(f"the layer {source.name!r} is no longer in the viewer; choose "
                             "another annotation layer.")
        dims = current.dims
        if isinstance(source, Shapes):
            if not len(source.data):
                raise ValueError(f"the Shapes layer {source.name!r} has no shapes; draw the "
                                 "reader's annotation around the finding, or choose another "
                                 "layer.")
            if dims != 2:
                raise ValueError("Shapes annotate 2D images; for a volume explained in 3D "
                                 "choose a Labels layer.")
            return shape_outlines(source, current.layer, current.offset,
                                  looks="the check looks at")
        data = source.data[0] if getattr(source, "multiscale", False) else source.data
        data = np.asarray(data)
        if not (data > 0).any():
            raise ValueError(f"the Labels layer {source.name!r} has no labels; paint the "
                             "reader's annotation (labels > 0), or choose another layer.")
        region = w._fit_to_image(data > 0, f"the annotation layer {source.name!r}",
                                 "a layer", "or another annotation layer", current.layer,
                                 current.offset, current.spec, source)
        spatial = image_shape(current.layer)[-dims:]
        region = np.asarray(region)
        if region.shape != spatial:  # the layer's whole shape, cut to the image checked
            region = region.reshape(region.shape[region.ndim - dims:]) \
                if region.size == math.prod(spatial) else region
        if region.shape != spatial:
            raise ValueError(f"the annotation layer {source.name!r} gives {region.shape} "
                             f"pixels for the image's {spatial}; choose a layer of the "
                             "image's size or plane.")
        if not region.any():
            where = " in the frame checked" if current.offset else ""
            raise ValueError(f"the Labels layer {source.name!r} marks no pixel of "
                             f"{current.layer.name!r}{where}; paint the annotation on this "
                             "image (or plane), or choose another layer.")
        return np.ascontiguousarray(region)

    def _on_agreement(self, checked: Checked):
        current, found = checked.current, checked.values["agreement"]
        rows = []
        for method in current.methods:
            s = found[method].summary()
            row = found[method].rows()[0]
            rows.append([_finite(bool(row["pointing"])), _finite(row["distance"], ".1f"),
                         _finite(s["energy"]), _finite(s["iou"]), _finite(s["dice"]),
                         _finite(s.get("region_iou")), _finite(s.get("region_dice"))])
        self.table.value = {"data": rows, "index": list(current.methods),
                            "columns": list(HEADERS)}
        self.table.visible = True
        self.result.value = (f"agreement with {current.source!r} on {current.where()} "
                             f"(heat \u2265 {current.settings['threshold']:.2f})")
        self._w.status.value = (f"agreement with {current.source!r}; "
                                f"{checked.seconds:.2f} s")

    @property
    def agreement_values(self) -> dict:
        """The table's numbers as shown, per method (for scripts and tests)."""
        out = {}
        for method, row in zip(self.table.row_headers, self.table.data):
            out[method] = dict(zip(AGREEMENT_COLUMNS, row))
        return out


def grid_state_changed(section: CheckSection):
    """The section's stages button says what it does now."""
    inside = section.in_stages()
    section.stages_button.text = "Leave grid" if inside else "Stages side by side"
    section.stages_button.enabled = inside or section._sanity_source() is not None


@dataclass
class _Placed:
    """What ``ResultLayers._placed`` needs to put a map on its image and slice."""

    layer: Any
    offset: tuple


def _same_pixels(job, data) -> bool:
    """Whether the layer still holds the pixels the last run explained (its data array was
    not replaced, nor its shape changed)."""
    images = job.images
    if images is data:
        return True
    if isinstance(images, np.ndarray) and isinstance(data, np.ndarray):
        return bool(np.shares_memory(images, data))
    try:
        now = data[tuple(job.offset)] if job.offset else data
        return tuple(now.shape) == tuple(images.shape) and bool(
            np.array_equal(np.asarray(now), np.asarray(images)))
    except (IndexError, ValueError, TypeError):
        return False


__all__ = ["CURVES_DOCK", "CheckSection", "CurvesPlot", "agreement", "faithfulness", "sanity"]
