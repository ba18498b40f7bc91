"""``napari-gradcam demo``: napari with the synthetic sample, the widget, and a Grad-CAM run."""

from __future__ import annotations

import os
import sys

from .sample_data import synthetic_image, synthetic_stack, synthetic_volume


def has_display() -> bool:
    """False on a Linux box without X11 / Wayland (where Qt would abort)."""
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or os.environ.get("QT_QPA_PLATFORM"))


# napari camera angles (degrees) for the 3D demo: tilted so that depth shows
VOLUME_ANGLES = (-20.0, 30.0, 140.0)


def open_demo(viewer=None, *, stack: bool = False, volume: bool = False, methods=None,
              device: str = "auto"):
    """Add the sample, dock the widget and start the run; returns (viewer, widget, worker).
    ``volume``: the synthetic volume and the 3D demo model, shown in napari's 3D view."""
    import napari

    from .widget import PRESENT

    if viewer is None:
        viewer = napari.Viewer(title="napari-gradcam demo")
    sample = synthetic_volume if volume else synthetic_stack if stack else synthetic_image
    data, kwargs, _kind = sample()[0]
    viewer.add_image(data, **kwargs)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM")
    widget.wait_until_ready()  # the demo model loads on a worker; its classes come with it
    if volume:
        widget.set_model("demo3d", name="demo3d")
        widget.wait_until_ready()
        viewer.dims.ndisplay = 3
        viewer.camera.angles = VOLUME_ANGLES
    widget.methods.value = list(methods or ["gradcam"])
    widget.target.value = PRESENT  # the demo model is multi-label: show every object it finds
    widget.device.value = device
    if stack:
        widget.scope.value = "whole stack"
    return viewer, widget, widget.run()


def run_demo(*, stack: bool = False, volume: bool = False, methods=None, device: str = "auto",
             screenshot: str | None = None, size=(1400, 860)) -> int:
    """Open the demo window and run napari's event loop. With ``screenshot``, save a picture
    of the whole window once the run has finished and close."""
    if not has_display():
        raise ValueError(
            "no display found (DISPLAY is not set): run `napari-gradcam example` for the "
            "text-only version, or start the demo under a virtual display, e.g. "
            "`xvfb-run -a napari-gradcam demo --screenshot demo.png`."
        )
    import napari
    from qtpy.QtCore import QTimer

    viewer, _widget, worker = open_demo(stack=stack, volume=volume, methods=methods,
                                        device=device)
    viewer.window.resize(*size)
    if screenshot:
        def shoot():
            viewer.reset_view(reset_camera_angle=False)  # keep the 3D demo's tilt
            viewer.screenshot(screenshot, canvas_only=False, flash=False)
            print(f"napari-gradcam: saved {screenshot}")
            viewer.close()

        if worker is None:  # bad input: the notification is in the window, take it too
            QTimer.singleShot(1500, shoot)
        else:
            worker.finished.connect(lambda: QTimer.singleShot(1500, shoot))
    napari.run()
    return 0
