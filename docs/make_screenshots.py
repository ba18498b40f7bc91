"""Make the README's widget pictures: docs/side_by_side.png and docs/live_stack.png.

- side by side: the synthetic sample explained with CAM, Grad-CAM and Grad-CAM++; each grid
  cell is the image with one method's heatmap and regions, captioned with the method;
- live mode: the 16-frame sample stack with "live" ticked, scrolled to a later frame, whose
  heatmap and regions were explained as the slider moved.

The single-image picture is the demo's own: ``xvfb-run -a napari-gradcam demo --screenshot
docs/demo.png``.

    xvfb-run -a python docs/make_screenshots.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

SIZE = (1900, 900)  # window width, height in pixels: the canvas wide enough for three cells
LIVE_FRAME = 9  # the stack frame the live picture shows


def settle(widget, seconds: float = 120.0) -> None:
    """Process Qt events until the widget's runs, region workers and model loads are done,
    then a little longer so the canvas has drawn what they wrote."""
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + seconds
    while (widget.running or widget._region_worker is not None or widget.loading) and \
            time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.01)
    if widget.running:
        raise TimeoutError(f"the run did not finish in {seconds:.0f} s")
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def side_by_side(out: Path) -> Path:
    from napari_gradcam._napari.demo import open_demo

    viewer, widget, _worker = open_demo(methods=["cam", "gradcam", "gradcam++"])
    try:
        viewer.window.resize(*SIZE)
        settle(widget)
        widget.toggle_grid()
        settle(widget)
        viewer.reset_view()
        settle(widget)
        viewer.screenshot(str(out), canvas_only=False, flash=False)
    finally:
        viewer.close()
    return out


def live_stack(out: Path) -> Path:
    from napari_gradcam._napari.demo import open_demo

    viewer, widget, _worker = open_demo(stack=True)
    try:
        viewer.window.resize(*SIZE)
        settle(widget)
        widget.live.value = True  # explains the shown frame; the slider then drives it
        settle(widget)
        for frame in range(1, LIVE_FRAME + 1):  # scrolled frame by frame, as a user would
            viewer.dims.set_current_step(0, frame)
            settle(widget)
        viewer.reset_view()
        settle(widget)
        viewer.screenshot(str(out), canvas_only=False, flash=False)
    finally:
        viewer.close()
    return out


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path(__file__).parent
    folder.mkdir(parents=True, exist_ok=True)
    for make, name in ((side_by_side, "side_by_side.png"), (live_stack, "live_stack.png")):
        print(f"saved {make(folder / name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
