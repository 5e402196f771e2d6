"""Binary AlexNet (IT §5, after XNOR-Net): five convs and three fully connected layers; the first
conv and the last linear layer stay real, the others are binary (BatchNorm -> sign -> op -> act).

Widths follow Krizhevsky et al. (96, 256, 384, 384, 256; FC 4096) scaled by ``width / 96``.
"""
from __future__ import annotations

from torch import Tensor, nn

from .config import MODELS, Architecture, ModelConfig

_CONV_WIDTHS = (96, 256, 384, 384, 256)
_FC_WIDTH = 4096


class BinaryAlexNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        assert cfg.width is not None and cfg.num_outputs is not None
        c = [max(1, round(base * cfg.width / 96)) for base in _CONV_WIDTHS]
        fc = max(1, round(_FC_WIDTH * cfg.width / 96))
        conv = cfg.conv_factory()
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_channels, c[0], 11, 4, 2),  # the first layer stays real
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            conv(c[0], c[1], 5),
            nn.MaxPool2d(3, 2),
            conv(c[1], c[2], 3),
            conv(c[2], c[3], 3),
            conv(c[3], c[4], 3),
            nn.MaxPool2d(3, 2),
            nn.AdaptiveAvgPool2d(6),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            conv.linear(c[4] * 36, fc),
            conv.linear(fc, fc),
            nn.Linear(fc, cfg.num_outputs),  # the last layer stays real
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


MODELS.register("alexnet")(Architecture(BinaryAlexNet, "classification", 96, 1000, 224, block=None))
