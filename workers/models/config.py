"""The typed configuration every model is built from, and the registry of architectures."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal

from torch import nn

from ..binarize import BinarizeConfig
from ..blocks import BLOCKS, GateConfig
from ..config import require
from ..backends import CONV_BACKENDS
from ..layers import ActivationConfig, ConvFactory
from ..registry import Registry
from ..reparam import DecompositionConfig


@dataclass(frozen=True)
class Architecture:
    """A registered model family and its defaults (the papers' settings)."""

    build: Callable[["ModelConfig"], nn.Module]
    task: Literal["pose", "classification"]
    width: int
    outputs: int
    input_size: int
    block: str | None = "hpm"  # None: the architecture has no residual blocks


MODELS: Registry[Architecture] = Registry("model")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model.

    Attributes:
        arch: "hourglass" (stacked), "unet_hourglass" (SG's HourGlass/U-Net hybrid), "resnet18",
            "alexnet".
        binarize: what is binarized (``BinarizeConfig.real()`` for the real-valued network).
        activation: the non-linearity after each binary conv.
        block: residual block ("hpm", "basic", "bottleneck"); ``None`` = the architecture's own
            (hpm for hourglasses, basic for ResNet-18; AlexNet has none).
        gate: soft gate on every block's skip path (SG).
        decomposition: MT re-parametrization of the to-be-binarized weights.
        width: channels of the main body (hourglass: 256; ResNet-18: 64 in the first stage;
            AlexNet: 96 in the first conv, the rest scaled alike). ``None`` = the papers' value.
        stacks, depth, blocks_per_level: stacked hourglass shape (depth 4 = 64 -> 4 px at 256 input).
        join_binary: binarize the 1x1 layers joining stacks (IT §3.5) or keep them real.
        merge_groups: the U-Net hybrid's merge conv: 1 = one conv over the concatenation, 2 =
            grouped by source (encoder / decoder).
        downsample_binary: ResNet-18's strided 1x1 projections binary (default: real).
        num_outputs: joints (pose) or classes; ``None`` = 16 (MPII) or 1000 (ImageNet).
        input_size: side of the square input used for accounting; ``None`` = 256 or 224.
        in_channels: image channels.
        backend: conv backend of the binary layers ("float" emulation; kernels add "xnor").
    """

    arch: str = "hourglass"
    binarize: BinarizeConfig = field(default_factory=BinarizeConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    block: str | None = None
    gate: GateConfig = field(default_factory=GateConfig)
    decomposition: DecompositionConfig = field(default_factory=DecompositionConfig)
    width: int | None = None
    stacks: int = 1
    depth: int = 4
    blocks_per_level: int = 1
    join_binary: bool = True
    merge_groups: int = 1
    downsample_binary: bool = False
    num_outputs: int | None = None
    input_size: int | None = None
    in_channels: int = 3
    backend: str = "float"

    def __post_init__(self) -> None:
        MODELS.get(self.arch, "arch")
        if self.block is not None:
            BLOCKS.get(self.block, "block")
        CONV_BACKENDS.get(self.backend, "backend")
        for name, top in (("stacks", 16), ("depth", 16), ("blocks_per_level", 64), ("in_channels", 64)):
            value = getattr(self, name)
            require(1 <= value <= top, name, f"must be an integer in [1, {top}], got {value}")
        for name, top in (("width", 8192), ("num_outputs", 100_000), ("input_size", 4096)):
            value = getattr(self, name)
            require(value is None or 1 <= value <= top, name, f"must be an integer in [1, {top}], got {value}")
        require(self.width is None or self.width >= 4, "width", f"must be at least 4, got {self.width}")
        require(self.merge_groups in (1, 2), "merge_groups", f"must be 1 or 2, got {self.merge_groups}")

    @property
    def uses_block(self) -> bool:
        return self.architecture.block is not None

    @property
    def architecture(self) -> Architecture:
        return MODELS.get(self.arch)

    def resolved(self) -> "ModelConfig":
        """The same config with every ``None`` default replaced by the architecture's value."""
        a = self.architecture
        return dataclasses.replace(
            self,
            block=self.block or a.block,
            width=self.width or a.width,
            num_outputs=self.num_outputs or a.outputs,
            input_size=self.input_size or a.input_size,
        )

    def conv_factory(self) -> ConvFactory:
        return ConvFactory(self.binarize, self.activation, self.backend)

    def real(self) -> "ModelConfig":
        """The same architecture fully real-valued (teachers and baselines), without re-parametrization."""
        return dataclasses.replace(self, binarize=BinarizeConfig.real(), decomposition=DecompositionConfig())
