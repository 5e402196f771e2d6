"""Binary ResNet-18 (IT §5, MT §5): pre-activation basic blocks, first and last layers real.

The stem (7x7 stride-2 conv, BatchNorm, ReLU, 3x3 max-pool) and the classifier (BatchNorm, ReLU,
global average pool, linear) are real-valued. The strided 1x1 projections stay real unless
``downsample_binary`` is set (keeping them real is the common choice for binary ResNets).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..blocks import make_block
from .config import MODELS, Architecture, ModelConfig

#: Blocks per stage of ResNet-18.
RESNET18_LAYERS = (2, 2, 2, 2)


class BinaryResNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: tuple[int, ...] = RESNET18_LAYERS) -> None:
        super().__init__()
        cfg = cfg.resolved()
        assert cfg.width is not None and cfg.num_outputs is not None and cfg.block is not None
        w = self.width = cfg.width
        conv = cfg.conv_factory()
        project = conv if cfg.downsample_binary else conv.real()
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w, 7, 2, 3, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        cin = w
        for i, count in enumerate(layers):
            cout = w * 2**i
            blocks = [make_block(cfg.block, cin if j == 0 else cout, cout, conv,
                                 stride=2 if (i > 0 and j == 0) else 1, gate=cfg.gate, project=project)
                      for j in range(count)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layers = nn.ModuleList(stages)
        self.head = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(cin, cfg.num_outputs),
        )

    def holistic_group(self, name: str, layer: nn.Module) -> str | None:
        """The holistic Tucker group of a binary-path layer (None: decomposed layer-wise).

        MT §4.2.3: "For ResNet-18 [...] we create 3 groups of convolutional layers based on the
        macro-module structure characterizing the architecture. Each of these groups is then
        parameterized with a single 5-th order tensor obtained by concatenating the weights of the
        convolutional layers in this group." ResNet-18 has four macro-modules and the paper does not
        say which three; we read them as the three that open with a strided convolution (MT §5.2:
        "At the beginning of each macro-module the resolution is dropped using a convolutional layer
        with a stride"), each group stacking its three identically shaped 3x3 convolutions into a
        (3, C, C, 3, 3) tensor. The first macro-module's convolutions and the strided ones are
        decomposed layer-wise, as MT does for "the remaining few layers" of the hourglass.
        """
        parts = name.split(".")
        if parts[0] != "layers" or parts[1] == "0":
            return None
        c = self.width * 2 ** int(parts[1])
        return f"layers.{parts[1]}" if tuple(layer.weight_shape) == (c, c, 3, 3) else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.layers:
            x = stage(x)
        return self.head(x)


MODELS.register("resnet18")(Architecture(BinaryResNet, "classification", 64, 1000, 224, block="basic"))
