"""Make docs/volume.png: the 3D demo model on its sample volume, seen in napari's 3D view.

The widget explains the synthetic volume (a sphere, a cube and a cone) for every class found;
the picture shows the scan, the heat rendered as an attenuated maximum intensity projection,
and the boxes of the 3D regions as wireframes, from an angle that shows depth.

    xvfb-run -a python docs/make_volume_png.py [OUT.png]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from napari_gradcam._napari.demo import VOLUME_ANGLES as ANGLES  # the demo's: depth shows

SIZE = (900, 700)  # canvas width, height in pixels


def wait(widget, timeout: float = 300.0) -> None:
    """Process Qt events until the widget's run and region workers are done."""
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while (widget.running or widget._region_worker is not None or widget.loading) and \
            time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    if widget.running:
        raise TimeoutError(f"the run did not finish in {timeout:.0f} s")


def make(out: Path, spec=None) -> Path:
    """Run the widget on the 3D sample and save the 3D view to ``out``; ``spec``: the model
    (default: the bundled demo3d)."""
    import imageio.v3 as iio
    import napari

    import napari_gradcam as ng
    from napari_gradcam.models.demo3d.synthetic import sample_volume

    spec = spec if spec is not None else ng.load_model("demo3d")
    viewer = napari.Viewer(show=True)
    try:
        viewer.window._qt_window.resize(SIZE[0] + 420, SIZE[1] + 120)
        item = sample_volume()
        viewer.add_image(item.volume, name="sample", colormap="gray", rendering="mip",
                         contrast_limits=(0.2, 1.0), opacity=0.9)
        _dock, w = viewer.window.add_plugin_dock_widget("napari-gradcam", "Grad-CAM")
        w.wait_until_ready()
        w.set_model(spec, name="demo3d")
        w.wait_until_ready()
        w.target.value = "every class found"
        if w.run() is None:
            raise RuntimeError(f"the run did not start: {w.status.value}")
        wait(w)
        print(w.status.value)
        viewer.dims.ndisplay = 3  # the widget shows the wireframes instead of the outlines
        viewer.reset_view()
        viewer.camera.angles = ANGLES
        viewer.camera.zoom *= 0.9
        shot = viewer.screenshot(canvas_only=True, flash=False, size=SIZE[::-1])
        iio.imwrite(out, shot[..., :3])
    finally:
        viewer.close()
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("volume.png")
    print(make(target))
