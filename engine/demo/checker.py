"""An analytic judge of pictures against their captions, independent of any generator: the quality gate's
checker, and the features its distribution distance is measured in.

    verdict = judge(image, scene)        # which of shape, colour, background, size, position match
    features(image)                      # (10,) float: foreground and background RGB, fill, width, centre

How it reads a picture (RGB, any size): the background is the nearest palette colour to the median of the
border pixels; the foreground's colour is the nearest palette colour to the median of the pixels farthest from
the background; the shape's outline is where pixels are nearer the foreground's colour than the background's;
its shape follows from the widths of its rows near the top and the bottom of its box (a triangle narrows to
the top, a square does not narrow, a circle narrows a little at both); its size from its box's width; its
position from the box's centre. On fresh renders it is right every time (tests/test_quality.py); with blur and
noise of 10 RGB levels too, and 93-98% at 20.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.demo.shapes import COLOURS, POSITIONS, SIZES, Scene

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is foreground
# Shapes by the widths of their rows, relative to the box's width, in a band near the top and one near the
# bottom: a triangle is narrow at the top (top/bottom ~0.3), a square full in both (1.0), a circle in between
# (~0.75 in these bands). Bands, not single rows, so that noise and blurred corners average out.
TOP_BAND, BOTTOM_BAND = (0.1, 0.25), (0.75, 0.9)
TRIANGLE_TOP_OVER_BOTTOM = 0.6
SQUARE_BAND_WIDTH = 0.88
ASPECTS = ("shape", "colour", "background", "size", "position")
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # (9, 3)
_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Reading:
    """What the checker sees in a picture."""

    scene: Scene | None  # None when no foreground stands out (or it is the background's colour)
    features: np.ndarray  # (10,): foreground RGB, background RGB (0..1), fill, width, centre x, centre y


def _nearest(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def read(image) -> Reading:
    if not isinstance(image, Image.Image):  # [0, 1] floats (H, W, 3) as output_type="np" gives, or uint8
        array = np.asarray(image)
        image = Image.fromarray((array * 255).round().astype(np.uint8) if array.dtype.kind == "f" else array)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    side = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (4 side, 3)
    background_rgb = np.median(border, axis=0)
    distance = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=-1))  # (H, W)
    candidates = distance > FOREGROUND_DISTANCE
    if candidates.sum() < 2:
        return Reading(None, np.concatenate([np.zeros(3), background_rgb / 255, np.zeros(4)]))
    # The foreground's colour from its core (the farthest quarter from the background): blurred edge pixels
    # mix the two colours (red on yellow edges look orange).
    core = candidates & (distance >= np.percentile(distance[candidates], 75))
    foreground_rgb = np.median(pixels[core], axis=0)
    # The shape's outline where a pixel is nearer the foreground's colour than the background's: the 50%
    # contour of a blurred edge, so blur does not fatten the shape.
    direction = foreground_rgb - background_rgb
    mask = ((pixels - background_rgb) @ direction) / max(float(direction @ direction), 1e-9) > 0.5
    if mask.sum() < 2:
        return Reading(None, np.concatenate([np.zeros(3), background_rgb / 255, np.zeros(4)]))
    ys, xs = np.nonzero(mask)
    # The box holding all but the outermost 1% of foreground pixels on each side (stray pixels do not count).
    x0, x1 = np.percentile(xs, [1, 99]).round().astype(int)
    y0, y1 = np.percentile(ys, [1, 99]).round().astype(int)
    width, height = (x1 - x0 + 1) / side, (y1 - y0 + 1) / side
    fill = mask[y0:y1 + 1, x0:x1 + 1].sum() / ((x1 - x0 + 1) * (y1 - y0 + 1))
    # The centre of the box, not the centroid: a triangle's centroid sits low.
    cx, cy = (x0 + x1 + 1) / 2 / side, (y0 + y1 + 1) / 2 / side
    shape = _shape(mask[y0:y1 + 1, x0:x1 + 1])
    size = min(SIZES, key=lambda s: abs(SIZES[s] - max(width, height)))
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0][0] - cx) ** 2 + (POSITIONS[p][0][1] - cy) ** 2)
    colour, background = _nearest(foreground_rgb), _nearest(background_rgb)
    features = np.concatenate([foreground_rgb / 255, background_rgb / 255, [fill, width, cx, cy]])
    if colour == background:
        return Reading(None, features)
    return Reading(Scene(shape, colour, background, size, position), features)


def _shape(box: np.ndarray) -> str:
    """circle, square or triangle from the foreground mask cropped to its box (h, w)."""
    rows = box.sum(axis=1) / box.shape[1]  # (h,) each row's width as a fraction of the box's

    def band(lo, hi):
        a, b = int(lo * len(rows)), max(int(hi * len(rows)), int(lo * len(rows)) + 1)
        return float(rows[a:b].mean())

    top, bottom = band(*TOP_BAND), band(*BOTTOM_BAND)
    if top < TRIANGLE_TOP_OVER_BOTTOM * bottom:
        return "triangle"
    return "square" if min(top, bottom) > SQUARE_BAND_WIDTH else "circle"


def judge(image, scene: Scene) -> dict[str, bool]:
    """Aspect -> whether the picture shows it as the scene says; "all" when every aspect does."""
    seen = read(image).scene
    verdict = {aspect: seen is not None and getattr(seen, aspect) == getattr(scene, aspect) for aspect in ASPECTS}
    verdict["all"] = all(verdict.values())
    return verdict


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two sets of feature vectors (N, F) and (M, F), each taken as a Gaussian."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # trace(sqrt(cov_a cov_b)) is the sum of the square roots of the product's eigenvalues (real, >= 0 for
    # covariance matrices; clipped for rounding).
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b)
    trace_root = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
