"""Image geometry. The one coordinate convention of bnnctl:

**0-based pixel centres**: the centre of the top-left pixel is (0, 0) and pixel (i, j) covers
[i - 0.5, i + 0.5] x [j - 0.5, j + 0.5]. Dataset files that use other conventions (MPII's MATLAB
1-based coordinates) are converted once, where the file is read.

A person crop is defined by a centre, a scale (person box side = scale * SCALE_UNIT pixels, the MPII
convention) and a rotation; it maps that box onto the output image exactly.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

#: MPII's scale unit: ``scale`` is the person's size in units of 200 pixels.
SCALE_UNIT = 200.0


def crop_matrix(center: np.ndarray, scale: float, rotation: float, size: int) -> np.ndarray:
    """The 2x3 affine matrix mapping image coordinates to crop coordinates.

    The square box of side ``scale * SCALE_UNIT`` centred at ``center``, rotated by ``rotation``
    degrees (counter-clockwise in the image), maps onto the ``size`` x ``size`` crop.
    """
    zoom = size / (scale * SCALE_UNIT)
    theta = math.radians(rotation)
    cos, sin = math.cos(theta) * zoom, math.sin(theta) * zoom
    # image y points down, so a counter-clockwise rotation of the content is +theta here
    a = np.array([[cos, sin], [-sin, cos]])
    offset = np.full(2, (size - 1) / 2.0) - a @ np.asarray(center, dtype=np.float64)
    return np.concatenate([a, offset[:, None]], axis=1)


def invert_affine(m: np.ndarray) -> np.ndarray:
    a = m[:, :2]
    inv = np.linalg.inv(a)
    return np.concatenate([inv, (-inv @ m[:, 2])[:, None]], axis=1)


def apply_affine(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Map (N, 2) points by the 2x3 matrix ``m``."""
    points = np.asarray(points, dtype=np.float64)
    return points @ m[:, :2].T + m[:, 2]


def warp(image: Image.Image, m: np.ndarray, size: int) -> Image.Image:
    """Warp ``image`` by ``m`` (image -> crop) into a ``size`` x ``size`` crop, bilinear, zero fill."""
    inv = invert_affine(m)
    a = inv[:, :2]
    # PIL maps output to input in corner coordinates (pixel i spans [i, i + 1]); shift by 0.5.
    t = inv[:, 2] + 0.5 - a @ np.array([0.5, 0.5])
    data = (a[0, 0], a[0, 1], t[0], a[1, 0], a[1, 1], t[1])
    return image.transform((size, size), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)


def flip_points(points: np.ndarray, width: int, pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Mirror (J, 2) joints horizontally in an image ``width`` wide and swap left/right joints."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[:, 0] = width - 1 - out[:, 0]
    return swap_pairs(out, pairs)


def swap_pairs(values: np.ndarray, pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
    out = np.array(values, copy=True)
    for a, b in pairs:
        out[[a, b]] = out[[b, a]]
    return out
