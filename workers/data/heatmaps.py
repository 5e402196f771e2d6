"""Gaussian heatmap targets and their decoding, kept together (encode and decode are inverses).

Heatmap coordinates are 0-based pixel centres of the heatmap grid. With ``stride = input / heatmap``,
input pixel q and heatmap pixel h are related by ``h = (q + 0.5) / stride - 0.5`` (both grids cover
the same area), so no half-pixel shift is needed when flipping.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: The sub-pixel refinement of the argmax: a quarter pixel towards the higher neighbour.
QUARTER_OFFSET = 0.25


@dataclass(frozen=True)
class HeatmapCodec:
    """Encodes joints (input-crop pixels) as Gaussian heatmaps and decodes heatmaps back."""

    input_size: int
    heatmap_size: int
    sigma: float = 1.0

    @property
    def stride(self) -> float:
        return self.input_size / self.heatmap_size

    def to_heatmap(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) + 0.5) / self.stride - 0.5

    def to_input(self, points: np.ndarray | Tensor):
        return (points + 0.5) * self.stride - 0.5

    def encode(self, joints: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(J, 2) joints in input-crop pixels and (J,) visibility -> (J, H, H) heatmaps, (J,) weights.

        A joint that is unlabeled or falls outside the heatmap gets an all-zero map and weight 0.
        """
        n = self.heatmap_size
        centres = self.to_heatmap(joints)
        grid = np.arange(n, dtype=np.float64)
        weights = np.asarray(visible, dtype=np.float32).copy()
        inside = np.all((centres >= -0.5) & (centres <= n - 0.5), axis=1)
        weights[~inside] = 0.0
        dx = (grid[None, :] - centres[:, 0:1]) ** 2  # (J, W)
        dy = (grid[None, :] - centres[:, 1:2]) ** 2  # (J, H)
        maps = np.exp(-(dy[:, :, None] + dx[:, None, :]) / (2.0 * self.sigma**2))
        maps *= weights[:, None, None] > 0
        return maps.astype(np.float32), weights

    def decode(self, heatmaps: Tensor) -> tuple[Tensor, Tensor]:
        """(N, J, H, W) heatmaps -> ((N, J, 2) joints in input-crop pixels, (N, J) peak values).

        The argmax is refined by a quarter pixel towards the higher neighbour in x and in y.
        """
        n, j, h, w = heatmaps.shape
        flat = heatmaps.reshape(n, j, -1)
        maxvals, idx = flat.max(dim=2)
        x = (idx % w).long()
        y = torch.div(idx, w, rounding_mode="floor").long()
        coords = torch.stack([x, y], dim=-1).to(heatmaps.dtype)
        hm = heatmaps.reshape(n * j, h, w)
        xf, yf = x.reshape(-1), y.reshape(-1)
        rows = torch.arange(n * j, device=heatmaps.device)
        has_x = (xf > 0) & (xf < w - 1)
        has_y = (yf > 0) & (yf < h - 1)
        dx = torch.zeros_like(xf, dtype=heatmaps.dtype)
        dy = torch.zeros_like(yf, dtype=heatmaps.dtype)
        dx[has_x] = torch.sign(hm[rows[has_x], yf[has_x], xf[has_x] + 1] - hm[rows[has_x], yf[has_x], xf[has_x] - 1])
        dy[has_y] = torch.sign(hm[rows[has_y], yf[has_y] + 1, xf[has_y]] - hm[rows[has_y], yf[has_y] - 1, xf[has_y]])
        coords = coords + QUARTER_OFFSET * torch.stack([dx, dy], dim=-1).reshape(n, j, 2)
        return self.to_input(coords), maxvals


def flip_heatmaps(heatmaps: Tensor, pairs: tuple[tuple[int, int], ...]) -> Tensor:
    """Mirror (N, J, H, W) heatmaps horizontally and swap left/right joint channels."""
    out = heatmaps.flip(-1)
    order = list(range(out.shape[1]))
    for a, b in pairs:
        order[a], order[b] = order[b], order[a]
    return out[:, order]


def flip_test(predict, images: Tensor, pairs: tuple[tuple[int, int], ...]) -> Tensor:
    """Average of the heatmaps of the images and of their mirror images (mapped back)."""
    return 0.5 * (predict(images) + flip_heatmaps(predict(images.flip(-1)), pairs))
