"""The heat colours, shared by the batch run's overlay PNGs and the napari widget's heat layer.

Heat in [0, 1] is drawn with turbo up to its bright red (turbo's last tenth darkens to maroon,
which reads as cold), and its opacity rises with the heat: cold pixels leave the image as it
is, hot ones are painted red-yellow (the classic Grad-CAM overlay, without greying the rest).
"""

from __future__ import annotations

import numpy as np

TURBO_TOP = 0.88  # the part of turbo used: up to its bright red
ALPHA_START, ALPHA_RISE = 0.08, 0.45  # transparent below 0.08 heat, opaque from 0.53
OVERLAY_OPACITY = 0.7  # the widget's heat layer opacity; overlays are painted the same


def turbo(v: np.ndarray) -> np.ndarray:
    """Google's polynomial approximation of the turbo colormap; v in [0, 1] -> RGB in [0, 1]."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0, 1)[..., None]
    r = np.array([0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943])
    g = np.array([0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604])
    b = np.array([0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973])
    powers = v ** np.arange(6)
    return np.clip(np.stack([powers @ r, powers @ g, powers @ b], -1), 0, 1)


def heat_rgba(heat: np.ndarray) -> np.ndarray:
    """RGBA in [0, 1] for heat in [0, 1]: the colour and the opacity of the heat ramp."""
    heat = np.asarray(heat, dtype=np.float64)
    alpha = np.clip((heat - ALPHA_START) / ALPHA_RISE, 0.0, 1.0)
    return np.concatenate([turbo(heat * TURBO_TOP), alpha[..., None]], -1)


def heat_ramp(steps: int = 33) -> tuple[np.ndarray, np.ndarray]:
    """``(controls, rgba)``: the ramp sampled at ``steps`` evenly spaced heat values, for a
    viewer's linear colormap."""
    v = np.linspace(0.0, 1.0, steps)
    return v, heat_rgba(v)


def overlay_rgb(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The image in grey with the heat painted over it (transparent where cold), uint8 RGB."""
    grey = image.astype(np.float32)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(-1)
    lo, hi = np.percentile(grey, [0.5, 99.5]) if grey.size else (0, 1)
    grey = np.clip((grey - lo) / (hi - lo if hi > lo else 1), 0, 1)[..., None]
    rgba = heat_rgba(heat)
    alpha = rgba[..., 3:] * OVERLAY_OPACITY
    rgb = grey * (1 - alpha) + rgba[..., :3] * alpha
    return (rgb * 255 + 0.5).astype(np.uint8)


__all__ = ["heat_ramp", "heat_rgba", "overlay_rgb", "turbo"]
