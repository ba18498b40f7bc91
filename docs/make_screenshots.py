"""Make the README's widget pictures: docs/side_by_side.png, docs/live_stack.png and
docs/slide.png.

- side by side: the synthetic sample explained with CAM, Grad-CAM and Grad-CAM++; each grid
  cell is the image with one method's heatmap and regions, captioned with the method;
- live mode: the 16-frame sample stack with "live" ticked, scrolled to a later frame, whose
  heatmap and regions were explained as the slider moved;
- slide: a 4096 x 4096 three-level pyramid of the demo's scenes opened as a multiscale layer,
  its level 1 explained in tiles of 512; the heat comes back as a multiscale layer on the
  image, the regions in level-0 pixels.

The single-image picture is the demo's own: ``xvfb-run -a napari-gradcam demo --screenshot
docs/demo.png``.

    xvfb-run -a python docs/make_screenshots.py [OUT_DIR [NAME.png ...]]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

SIZE = (1900, 900)  # window width, height in pixels: the canvas wide enough for three cells
LIVE_FRAME = 9  # the stack frame the live picture shows


def settle(widget, seconds: float = 120.0) -> None:
    """Wait as the 3D picture's script does until the widget's runs, region workers and model
    loads are done, then a little longer so the canvas has drawn what they wrote."""
    from make_volume_png import wait
    from qtpy.QtWidgets import QApplication

    wait(widget, seconds)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def demo_picture(out: Path, steps, **demo) -> Path:
    """Open the demo (``open_demo(**demo)``) in a window of ``SIZE``, let it run, do
    ``steps(viewer, widget)``, show everything and save the window to ``out``."""
    from napari_gradcam._napari.demo import open_demo

    viewer, widget, _worker = open_demo(**demo)
    try:
        viewer.window.resize(*SIZE)
        settle(widget)
        steps(viewer, widget)
        viewer.reset_view()
        settle(widget)
        viewer.screenshot(str(out), canvas_only=False, flash=False)
    finally:
        viewer.close()
    return out


def side_by_side(out: Path) -> Path:
    def steps(_viewer, widget):
        widget.toggle_grid()
        settle(widget)

    return demo_picture(out, steps, methods=["cam", "gradcam", "gradcam++"])


def live_stack(out: Path) -> Path:
    def steps(viewer, widget):
        widget.live.value = True  # explains the shown frame; the slider then drives it
        settle(widget)
        for frame in range(1, LIVE_FRAME + 1):  # scrolled frame by frame, as a user would
            viewer.dims.set_current_step(0, frame)
            settle(widget)

    return demo_picture(out, steps, stack=True)


def slide(out: Path) -> Path:
    import napari
    import numpy as np

    from napari_gradcam._napari.widget import GradCamWidget
    from napari_gradcam.models.demo.synthetic import make_image

    side, scene = 4096, 256
    n = side // scene
    pixels = np.vstack([np.hstack([make_image(scene, seed=r * n + c).image for c in range(n)])
                        for r in range(n)])
    pixels = (np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    viewer = napari.Viewer(show=True)
    try:
        viewer.window.resize(*SIZE)
        viewer.add_image([pixels, pixels[::2, ::2], pixels[::4, ::4]], multiscale=True,
                         name="slide")
        widget = GradCamWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Grad-CAM", area="right")
        settle(widget)
        widget.target.value = "disc"
        widget.level.value = 1
        widget.tile.value, widget.overlap.value = 512, 64
        widget.run()
        settle(widget, 600)
        regions = viewer.layers["regions · slide"]
        viewer.layers.selection.active = regions  # its controls, as a user editing boxes sees
        # close enough to read: about two scenes across, around the region nearest the
        # slide's middle (so the view has slide all around it)
        centres = [regions.data_to_world(np.mean(v, axis=0)) for v in regions.data]
        middle = min(centres, key=lambda c: np.hypot(c[0] - side / 2, c[1] - side / 2))
        viewer.scene.camera.center = tuple(middle)
        viewer.scene.camera.zoom = viewer.scene.camera.zoom * 6
        settle(widget)
        viewer.screenshot(str(out), canvas_only=False, flash=False)
    finally:
        viewer.close()
    return out


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path(__file__).parent
    folder.mkdir(parents=True, exist_ok=True)
    makers = {"side_by_side.png": side_by_side, "live_stack.png": live_stack,
              "slide.png": slide}
    only = argv[1:] or list(makers)  # e.g. docs slide.png: make one picture
    for name, make in ((name, makers[name]) for name in only):
        print(f"saved {make(folder / name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
