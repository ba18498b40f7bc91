"""The widget's result layers, written on the main thread: heatmaps as Image layers, regions as
one editable Shapes layer, a segmentation as a Labels layer, 3D boxes as wireframes; updated in
place on a re-run, found by their metadata, named by what they are first."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels, Shapes, Vectors

from ..annotations import (
    annotations_to_shapes,
    box_wireframe,
    class_color,
    class_name,
    regions_to_annotations,
)
from ..explain_arrays import model_spatial_dims
from ..job import JobResult
from ..models import ModelSpec
from ..render import heat_ramp
from .geometry import image_shape
from .io import META_KEY

if TYPE_CHECKING:
    from .widget import Job

# a heatmap volume in the 3D view: the hottest voxel along each ray, dimmed by what lies in
# front of it (attenuated MIP), so the hot spot stands out where it is, in depth
VOLUME_RENDERING = "attenuated_mip"
VOLUME_ATTENUATION = 0.05
# what the volume reader keeps in an image layer's metadata to write results back into the file
VOLUME_METADATA = ("affine", "header", "kind", "source", "file_order")

NAME_WIDTH = 14  # characters of the image's name kept in its result layers' names


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """An image's name cut to ``width`` characters for its result layers: its start and its
    last four characters (where numbered images differ), an ellipsis between."""
    if len(name) <= width:
        return name
    tail = min(4, width // 3)
    return name[:width - tail - 1].rstrip() + "\u2026" + name[len(name) - tail:]


def result_name(what: str, image: str, width: int = NAME_WIDTH) -> str:
    """A result layer's name, what it is first ("gradcam", "regions", ...) and the image's
    shortened name after it: napari's layer list elides the middle of long names, so both
    ends must tell the layers apart (the full image name is in the layer's metadata)."""
    return f"{what} \u00b7 {short_name(image, width)}"


def _shown_score(row) -> float:
    """What a label says the model scored: the probability, or the score itself (a
    segmentation model's summed logit) where there is none."""
    p = row.get("probability")
    return float(row["score"]) if p is None or not np.isfinite(p) else float(p)


def _add_probabilities(annotations: list, rows: list) -> None:
    """Each region's probability (its image's row for its class) as a property, so the
    features table keeps the logit ("score") beside it; NaN where the model gives none."""
    found = {(tuple(r["index"]), r["class_id"]): r.get("probability", np.nan) for r in rows}
    for a in annotations:
        image = tuple(a.index[:len(rows[0]["index"])]) if rows else ()
        p = found.get((image, a.properties.get("class_id")), np.nan)
        a.properties["probability"] = np.nan if p is None else float(p)


def heat_colormap():
    """Turbo colours whose opacity rises with the heat: cold pixels leave the image as it is,
    hot ones are painted red-yellow (the classic Grad-CAM overlay, without greying the rest)."""
    from napari.utils.colormaps import Colormap

    v, rgba = heat_ramp()  # the same ramp as the batch run's overlay PNGs
    return Colormap(rgba, controls=v, name="gradcam heat", interpolation="linear")


class ResultLayers:
    """Mixin for the widget: writes and finds its result layers (``self._viewer``)."""

    # ---- layers (main thread only) ----------------------------------------------------------

    def _find(self, role: str, image: str, method: str | None = None):
        """Our ``role`` layer made for the image named ``image`` (and ``method``), found by its
        metadata, not its name: names are shortened, and the user may rename a result."""
        for layer in self._viewer.layers:
            meta = layer.metadata.get(META_KEY, {})
            if meta.get("role") == role and meta.get("source", meta.get("image_name")) == image \
                    and (method is None or meta.get("method") == method):
                return layer
        return None

    def _name(self, what: str, image) -> str:
        """The name of ``image``'s ``what`` layer: the image's name shortened, or in full when
        another image's shortens the same (each image's results keep names of their own)."""
        short = short_name(image.name)
        twins = [layer for layer in self._viewer.layers if layer is not image
                 and not self._is_ours(layer) and short_name(layer.name) == short]
        return result_name(what, image.name, len(image.name) if twins else NAME_WIDTH)

    @staticmethod
    def _geometry(job: Job) -> dict:
        """Scale, translate, affine, units and axis labels of the source layer, for result
        layers: they lie on the image also when its affine is oblique (a scan's voxel-to-world
        matrix)."""
        src = job.layer
        out = {"scale": tuple(src.scale), "translate": tuple(src.translate),
               "affine": np.array(src.affine.affine_matrix)}
        for key in ("units", "axis_labels"):
            value = getattr(src, key, None)
            if value is not None:
                out[key] = tuple(value)
        return out

    def _upsert(self, name: str, role: str, ndim: int, create, update, job: Job,
                method: str | None = None):
        """Update our ``role`` layer of the job's image in place (``update(layer)``), or add
        ``create()`` (called ``name``); a layer whose dimensionality changed is replaced where
        it was."""
        layers = self._viewer.layers
        layer = self._find(role, job.layer.name, method)
        if layer is not None and layer.ndim == ndim:
            update(layer)
            return layer
        new = create()
        if layer is not None:
            index = layers.index(layer)
            layers.remove(layer)
            layers.insert(index, new)
        else:
            layers.append(new)
        return new

    @staticmethod
    def _place(layer, geometry: dict, metadata: dict):
        for key, value in geometry.items():
            setattr(layer, key, value)
        layer.metadata = {**layer.metadata, **metadata}

    def _placed(self, job: Job, data: np.ndarray):
        """A result array and the layer geometry that puts it on the image: for one slice, a
        layer one frame deep placed at that frame."""
        geo = self._geometry(job)
        if job.offset:
            k = len(job.offset)
            data = data.reshape((1,) * k + data.shape)
            geo["translate"] = tuple(
                t + i * s for t, i, s in zip(geo["translate"][:k], job.offset, geo["scale"][:k])
            ) + geo["translate"][k:]
        return data, geo

    def _show_heatmap(self, job: Job, explained: JobResult, method: str):
        heat = explained.heatmaps[method]  # "every class found": the classes' maps combined
        heat, geo = self._placed(job, heat)
        meta = {META_KEY: {"role": "heatmap", "source": job.layer.name, "method": method,
                           "target_layer": explained.target_layer,
                           "class_names": list(explained.class_names)}}
        if not job.offset:  # the scan's file geometry (NIfTI / DICOM reader): the heatmap
            # has the scan's shape, so it can be written back aligned with it
            meta.update({key: job.layer.metadata[key] for key in VOLUME_METADATA
                         if key in job.layer.metadata})
        name = self._name(method, job.layer)

        # a volume (a 3D model's, or a stack of planes): rendered in the 3D view as well
        volume = model_spatial_dims(job.explain.spec.module) == 3 or \
            len(image_shape(job.layer)) - len(job.offset) >= 3
        look = {"rendering": VOLUME_RENDERING} if volume else {}

        def update(layer):
            layer.data = heat
            self._place(layer, geo, meta)
            layer.contrast_limits = (0.0, 1.0)
            for key, value in look.items():
                setattr(layer, key, value)

        layer = self._upsert(name, "heatmap", heat.ndim, lambda: Image(
            heat, name=name, colormap=heat_colormap(), blending="translucent", opacity=0.7,
            contrast_limits=(0.0, 1.0), metadata=meta, **look, **geo), update, job, method)
        if volume:
            layer.attenuation = VOLUME_ATTENUATION
        return layer

    @staticmethod
    def label_classes(spec: ModelSpec, labels: np.ndarray) -> tuple[list, list]:
        """The label values of a segmentation and the class each means: value v is class v
        (softmax heads: 0 = background), or class v - 1 for multi-label heads, where 0 means
        no class (one output channel without ``output`` = multi-label, as the engine rules).
        Without class names, the values present, named by class index."""
        names = list(spec.class_names or ())
        multilabel = spec.output == "multilabel" or (spec.output is None and len(names) == 1)
        shift = 1 if multilabel else 0
        top = len(names) + shift if names else int(labels.max(initial=0)) + 1
        values = list(range(top))
        classes = [v - shift for v in values]
        return values, classes

    def _show_segmentation(self, job: Job, labels: np.ndarray):
        """The predicted labels as a Labels layer on the image (updated in place on a re-run),
        each class in its regions' colour, background transparent; hovering shows the class
        (the layer's features: one row per label value)."""
        from napari.utils.colormaps import DirectLabelColormap

        spec = job.explain.spec
        names = list(spec.class_names or ())
        values, classes = self.label_classes(spec, labels)
        features = {"index": np.array(values),
                    "class": np.array(["" if c < 0 else class_name(names, c, str(c))
                                       for c in classes], dtype=object),
                    "class_id": np.array(classes)}
        clear = (0.0, 0.0, 0.0, 0.0)
        colors = {None: clear, 0: clear, **{
            v: (*(np.array(class_color(c)) / 255), 1.0) for v, c in zip(values, classes)
            if v and c >= 0}}
        colormap = DirectLabelColormap(color_dict=colors)
        labels, geo = self._placed(job, labels)
        meta = {META_KEY: {"role": "segmentation", "source": job.layer.name,
                           "class_names": names, "label_classes": dict(zip(values, classes))}}
        name = self._name("segmentation", job.layer)

        def update(layer):
            layer.data = labels
            layer.features = features
            layer.colormap = colormap
            self._place(layer, geo, meta)

        return self._upsert(name, "segmentation", labels.ndim, lambda: Labels(
            labels, name=name, features=features, colormap=colormap, opacity=0.5,
            metadata=meta, **geo), update, job)

    def _show_regions(self, job: Job, explained: JobResult):
        """The first method's regions as one Shapes layer (the job indexes them in the layer's
        leading axes)."""
        names = list(explained.class_names)
        ndim = job.layer.ndim
        annotations = regions_to_annotations(explained.regions, names)
        _add_probabilities(annotations, explained.rows)
        data, types, features = annotations_to_shapes(annotations, ndim=ndim)
        if "probability" not in features:  # no regions: the column still exists
            features["probability"] = np.full(len(features["score"]), np.nan)
        features["label"] = np.array(
            [f"{c} {_shown_score({'score': s, 'probability': p}):.2f}" if c else ""
             for c, s, p in zip(features["class"], features["score"], features["probability"])],
            dtype=object)
        colors = np.array([[*class_color(None if np.isnan(c) else int(c)), 255]
                           for c in features["class_id"]], float).reshape(-1, 4) / 255
        # rows for shapes the user draws: blank (no class: what a hand-drawn shape shows is the
        # user's, not the model's), their kind filled in from the shape once drawn
        defaults = {key: ("" if col.dtype == object else np.nan) for key, col in features.items()}
        new_color = np.array([1.0, 1.0, 1.0, 1.0])
        meta = {META_KEY: {"role": "regions", "class_names": names,
                           "image_shape": list(image_shape(job.layer)),
                           "image_name": job.layer.name, "method": explained.methods[0]}}
        name = self._name("regions", job.layer)
        geo = self._geometry(job)

        def update(layer):
            layer.data = []
            if data:
                layer.add(list(zip(data, types)), edge_color=colors, edge_width=2,
                          face_color="transparent")
            layer.features = features
            self._place(layer, geo, meta)

        def create():
            return Shapes(
                data or None, ndim=ndim, shape_type=types or "polygon", name=name,
                features=features, edge_color=colors if data else "white", edge_width=2,
                face_color="transparent", metadata=meta,
                text={"string": "{label}", "anchor": "upper_left", "size": 9,
                      "color": "white"}, **geo)

        layer = self._upsert(name, "regions", ndim, create, update, job)
        layer.feature_defaults = defaults
        layer.current_edge_color = new_color
        layer.events.data.connect(self._kind_of_drawn)  # once: a bound method is not re-added
        self._show_wireframe(job, explained)
        return layer

    @staticmethod
    def _kind_of_drawn(event):
        """Shapes added to the regions layer by hand (or from Python) come with the default
        row, whose kind is blank: give them their shape type once they are added (a drawn
        polygon is a path until its last click, so only the end of the drawing is final)."""
        if str(getattr(event, "action", "")) != "added":
            return
        layer = event.source
        kinds = layer.features.get("kind")
        if kinds is None:
            return
        types = layer.shape_type
        blank = [i for i, k in enumerate(kinds) if i < len(types) and (not isinstance(k, str)
                                                                       or not k)]
        if blank:
            layer.features.loc[layer.features.index[blank], "kind"] = [types[i] for i in blank]
            layer.events.features()

    def _show_wireframe(self, job: Job, explained: JobResult):
        """The boxes of the 3D regions as edges in the 3D view (a Vectors layer, shown only
        while the viewer is in 3D: in a 2D slice the Shapes layer's rectangles are the boxes).
        No 3D regions and no such layer yet: nothing is added."""
        ndim = job.layer.ndim
        vectors, ids = box_wireframe(explained.regions, ndim=ndim)
        name = self._name("boxes 3D", job.layer)
        if not len(vectors) and self._find("wireframe", job.layer.name) is None:
            return None
        regions = explained.regions
        colors = np.array([[*class_color(regions[i].class_id), 255] for i in ids],
                          float).reshape(-1, 4) / 255
        features = {"region": ids, "region_label": np.array(
            [np.nan if getattr(regions[i], "label", None) is None else regions[i].label
             for i in ids], float)}
        meta = {META_KEY: {"role": "wireframe", "source": job.layer.name}}
        geo = self._geometry(job)
        style = {"edge_width": 1.0, "vector_style": "line", "length": 1.0}

        def update(layer):
            layer.data = vectors
            layer.features = features
            layer.edge_color = colors if len(vectors) else "white"
            self._place(layer, geo, meta)

        layer = self._upsert(name, "wireframe", ndim, lambda: Vectors(
            vectors, name=name, features=features, edge_color=colors if len(vectors) else
            "white", metadata=meta, **style, **geo), update, job)
        self._on_ndisplay()
        return layer

    def _on_ndisplay(self, _event=None):
        """In the 3D view an image with 3D regions shows their box wireframes and not its
        per-plane outlines (every plane's rectangle and polygon stacked hide the heat); in a
        2D slice the outlines, and not the wireframes (they would repeat the rectangles of the
        planes where the boxes begin and end)."""
        three = self._viewer.dims.ndisplay == 3
        ours = [(layer, layer.metadata.get(META_KEY, {})) for layer in self._viewer.layers]
        framed = {meta.get("source") for layer, meta in ours
                  if meta.get("role") == "wireframe" and len(layer.data)}
        for layer, meta in ours:
            if meta.get("role") == "wireframe":
                layer.visible = three
            elif meta.get("role") == "regions" and meta.get("image_name") in framed:
                layer.visible = not three

    def toggle_grid(self, _event=None):
        """Heatmaps side by side (napari grid mode), or back to one overlaid view."""
        canvas = getattr(self._viewer, "canvas", None)  # napari >= 0.9; before: viewer.grid
        grid = canvas.grid if canvas is not None and hasattr(canvas, "grid") else \
            self._viewer.grid
        grid.enabled = not grid.enabled
        self.grid_button.text = "Overlay" if grid.enabled else "Side by side"
        # alone in its cell a heatmap reads best opaque (cold = blue); over the image, it is
        # transparent where cold
        for layer in self._viewer.layers:
            if layer.metadata.get(META_KEY, {}).get("role") == "heatmap":
                layer.colormap = "turbo" if grid.enabled else heat_colormap()
                layer.opacity = 1.0 if grid.enabled else 0.7
