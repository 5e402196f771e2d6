"""Stacked hourglass networks (Newell et al.) with binary blocks, and SG's HourGlass/U-Net hybrid.

Layout (HB / IT): a real 7x7 stride-2 conv, three blocks with a 2x max-pool (input / 4), then
``stacks`` hourglasses. Each hourglass level has three pathways of blocks -- ``up`` (the skip at this
resolution), ``low1`` (after pooling) and ``low3`` (before upsampling) -- and the lowest level adds a
``bottom`` block. After each hourglass: blocks, a 1x1 layer, and a real 1x1 heatmap head
(intermediate supervision on every stack). Stacks are joined by 1x1 layers from the features and
from the heatmaps, binarized unless ``join_binary`` is off (IT §3.5).

The U-Net hybrid (SG) concatenates the skip and the upsampled features and processes them with a
block (2C -> C), grouped by source when ``merge_groups`` is 2, instead of summing them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import make_block
from ..layers import ActivationConfig, UpsampleAdd
from .config import MODELS, Architecture, ModelConfig

BlockMaker = Callable[..., nn.Module]

_LINEAR = ActivationConfig(kind="none")

#: The three pathways of each hourglass level, in the order of ``levels[d]``.
PATHWAYS = ("up", "low1", "low3")


def _blocks(make: BlockMaker, channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*[make(channels, channels) for _ in range(count)])


class Hourglass(nn.Module):
    """One hourglass of ``depth`` levels at constant width."""

    def __init__(self, depth: int, width: int, blocks_per_level: int, make: BlockMaker,
                 merge: str = "sum", merge_groups: int = 1) -> None:
        super().__init__()
        self.merge = merge
        self.pool = nn.MaxPool2d(2)
        self.upsample_add = UpsampleAdd()
        self.levels = nn.ModuleList(
            nn.ModuleList(_blocks(make, width, blocks_per_level) for _ in PATHWAYS) for _ in range(depth)
        )
        self.bottom = _blocks(make, width, blocks_per_level)
        if merge == "concat":
            self.merges = nn.ModuleList(make(2 * width, width, groups=merge_groups) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for up, low1, _ in self.levels:
            skips.append(up(x))
            x = low1(self.pool(x))
        x = self.bottom(x)
        for d in reversed(range(len(self.levels))):
            x = self.levels[d][2](x)
            if self.merge == "concat":
                x = F.interpolate(x, size=skips[d].shape[-2:], mode="nearest")
                x = self.merges[d](torch.cat((skips[d], x), dim=1))
            else:
                x = self.upsample_add(x, skips[d])
        return x


class HourglassStack(nn.Module):
    """An hourglass with its post-processing, heatmap head and (between stacks) joining layers."""

    def __init__(self, cfg: ModelConfig, make: BlockMaker, last: bool, merge: str) -> None:
        super().__init__()
        width, conv = cfg.width, cfg.conv_factory()
        assert width is not None and cfg.num_outputs is not None
        self.hourglass = Hourglass(cfg.depth, width, cfg.blocks_per_level, make, merge, cfg.merge_groups)
        self.post = _blocks(make, width, cfg.blocks_per_level)
        self.lin = conv(width, width, 1)
        self.head = nn.Conv2d(width, cfg.num_outputs, 1)  # the last layer stays real
        if not last:
            join = conv if cfg.join_binary else conv.real()
            self.join_features = join(width, width, 1, activation=_LINEAR)
            self.join_heatmaps = join(cfg.num_outputs, width, 1, activation=_LINEAR)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.lin(self.post(self.hourglass(x)))
        return features, self.head(features)


class StackedHourglass(nn.Module):
    """Returns the list of heatmaps of every stack (intermediate supervision); the last is the prediction."""

    def __init__(self, cfg: ModelConfig, merge: str = "sum") -> None:
        super().__init__()
        cfg = cfg.resolved()
        assert cfg.width is not None and cfg.block is not None
        w = cfg.width
        conv = cfg.conv_factory()

        def make(cin: int, cout: int, **kwargs) -> nn.Module:
            return make_block(cfg.block, cin, cout, conv, gate=cfg.gate, **kwargs)

        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w // 4, 7, 2, 3, bias=False),  # the first layer stays real
            nn.BatchNorm2d(w // 4),
            nn.ReLU(inplace=True),
            make(w // 4, w // 2),
            nn.MaxPool2d(2),
            make(w // 2, w // 2),
            make(w // 2, w),
        )
        self.stacks = nn.ModuleList(
            HourglassStack(cfg, make, last=(i == cfg.stacks - 1), merge=merge) for i in range(cfg.stacks)
        )

    def forward(self, x: Tensor, return_features: bool = False):
        """Heatmaps of every stack; with ``return_features``, also each stack's features before
        its head (used for feature-matching distillation)."""
        x = self.stem(x)
        outputs, features_out = [], []
        for stack in self.stacks:
            features, heatmaps = stack(x)
            outputs.append(heatmaps)
            features_out.append(features)
            if hasattr(stack, "join_features"):
                x = x + stack.join_features(features) + stack.join_heatmaps(heatmaps)
        return (outputs, features_out) if return_features else outputs


MODELS.register("hourglass")(Architecture(lambda cfg: StackedHourglass(cfg, "sum"), "pose", 256, 16, 256))
MODELS.register("unet_hourglass")(Architecture(lambda cfg: StackedHourglass(cfg, "concat"), "pose", 256, 16, 256))
