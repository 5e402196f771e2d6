"""Residual blocks built from injected conv factories, with an optional soft gate on the skip.

- "hpm": the hierarchical, parallel and multi-scale block of HB (ICCV 2017): three chained 3x3
  binary convs producing C/2, C/4 and C/4 channels, concatenated, plus the skip.
- "basic": the pre-activation basic block (two 3x3 convs), as in binary ResNet-18.
- "bottleneck": 1x1 (C/4) -> 3x3 (C/4) -> 1x1 (C), plus the skip.

Every conv is a :class:`BinaryConv2d` (BatchNorm -> binarize -> conv -> activation), so the
pre-activation order is built into the layer. When channel counts or resolution change, the skip is a
1x1 projection. SG's soft gate multiplies the skip path by a learned scalar or per-channel value.

A block's ``forward`` is its definition and nothing else. For fused inference a block *declares*
its structure with :meth:`fusion_plan` (the chain of convs its residual is, or None), and
``fused.fuse(model)`` compiles the blocks that declare one; a block returning None (the default)
runs layer by layer, each of its binary layers still fused on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from .config import require
from .layers import ActivationConfig, BinaryConv2d, ConvFactory
from .registry import Registry



@dataclass(frozen=True)
class GateKind:
    """A registered kind of soft gate: ``gated`` False is the plain residual; else one gate for all
    channels, or one per channel."""

    gated: bool = True
    per_channel: bool = False


#: Gate kinds by name (SG). Adding one = registering it here.
GATES: Registry[GateKind] = Registry("gate")
GATES.register("identity")(GateKind(gated=False))
GATES.register("scalar")(GateKind())
GATES.register("channel")(GateKind(per_channel=True))


@dataclass(frozen=True)
class GateConfig:
    """The soft gate on a block's skip path (SG).

    Attributes:
        kind: "identity" (plain residual), "scalar" (one gate for all channels) or "channel" (one
            per channel, SG's best).
        init: the gate's initial value (every channel's, unless ``init_range`` is given).
        init_range: ``[low, high]``: a channel-wise gate starts from values drawn uniformly from
            this range per channel (from the run's seed), so that, fixed, it is a per-channel gate
            and not the scalar one repeated.
        trainable: learn the gate (False keeps it fixed at its initial values: SG's "fixed" rows).
    """

    kind: str = "identity"
    init: float = 1.0
    init_range: tuple[float, float] | None = None
    trainable: bool = True

    def __post_init__(self) -> None:
        spec = GATES.get(self.kind, "kind")
        require(self.init == self.init, "init", "must be a number")
        if self.init_range is not None:
            require(spec.per_channel, "init_range", f"draws one value per channel: it needs kind: channel, "
                    f"not {self.kind!r}")
            low, high = self.init_range
            require(low < high, "init_range", f"must be [low, high] with low < high, got {list(self.init_range)}")


class SoftGate(nn.Module):
    """y = gate * x with a scalar or per-channel gate; identity when kind is "identity"."""

    def __init__(self, cfg: GateConfig, channels: int) -> None:
        super().__init__()
        self.kind = cfg.kind
        spec = GATES.get(cfg.kind)
        if not spec.gated:
            self.gate = None
            return
        size = channels if spec.per_channel else 1
        if cfg.init_range is not None:
            low, high = cfg.init_range
            value = torch.empty((1, size, 1, 1)).uniform_(low, high)
        else:
            value = torch.full((1, size, 1, 1), float(cfg.init))
        if cfg.trainable:
            self.gate = nn.Parameter(value)
        else:
            self.register_buffer("gate", value)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.gate is None else x * self.gate

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


@dataclass(frozen=True, eq=False)
class FusionPlan:
    """What a residual block is, for fused inference: ``out = residual(x) + gate(skip(x))`` where
    the residual chains ``convs`` (each conv's output is the next one's only input) and is the
    concatenation of every conv's output (``concat``, HPM) or the last conv's output; ``proj`` is
    the skip's 1x1 projection (None: the identity) and ``gate`` the skip's :class:`SoftGate`."""

    convs: tuple[BinaryConv2d, ...]
    concat: bool
    proj: BinaryConv2d | None
    gate: "SoftGate"


class BlockBuilder(Protocol):
    def __call__(self, in_channels: int, out_channels: int, conv: ConvFactory, *, stride: int = 1,
                 groups: int = 1, gate: GateConfig = ..., project: ConvFactory | None = None) -> nn.Module: ...


BLOCKS: Registry[BlockBuilder] = Registry("block")

_LINEAR = ActivationConfig(kind="none")


class Residual(nn.Module):
    """out = residual(x) + gate(skip(x)); subclasses define ``residual``."""

    def _init_skip(self, in_channels: int, out_channels: int, stride: int, groups: int,
                   gate: GateConfig, project: ConvFactory) -> None:
        if in_channels != out_channels or stride != 1:
            self.proj: nn.Module | None = project(in_channels, out_channels, 1, stride, groups,
                                                  activation=_LINEAR)
        else:
            self.proj = None
        self.gate = SoftGate(gate, out_channels)

    def residual(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def fusion_plan(self) -> FusionPlan | None:
        """The block's structure for ``fused.fuse``, or None: run it layer by layer (the default:
        a block is fused only where its author declared what it computes)."""
        return None

    def _chain(self, *convs: nn.Module, concat: bool = False) -> FusionPlan | None:
        if not all(isinstance(c, BinaryConv2d) for c in convs) or not isinstance(self.proj, (BinaryConv2d, type(None))):
            return None  # e.g. a layer replaced by something else: nothing to promise
        return FusionPlan(tuple(convs), concat, self.proj, self.gate)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.proj is None else self.proj(x)
        return self.residual(x) + self.gate(skip)


@BLOCKS.register("hpm")
class HPMBlock(Residual):
    """HB's hierarchical, parallel & multi-scale block: C/2, C/4, C/4 chained 3x3 convs, concatenated."""

    def __init__(self, in_channels: int, out_channels: int, conv: ConvFactory, *, stride: int = 1,
                 groups: int = 1, gate: GateConfig = GateConfig(), project: ConvFactory | None = None) -> None:
        super().__init__()
        c1 = out_channels // 2
        c2 = out_channels // 4
        c3 = out_channels - c1 - c2
        if min(c1, c2, c3) < 1:
            raise ValueError(f"hpm block needs at least 4 output channels, got {out_channels}")
        self.conv1 = conv(in_channels, c1, 3, stride, groups)
        self.conv2 = conv(c1, c2, 3)
        self.conv3 = conv(c2, c3, 3)
        self._init_skip(in_channels, out_channels, stride, groups, gate, project or conv)

    def residual(self, x: Tensor) -> Tensor:
        a = self.conv1(x)
        b = self.conv2(a)
        c = self.conv3(b)
        return torch.cat((a, b, c), dim=1)

    def fusion_plan(self) -> FusionPlan | None:
        return self._chain(self.conv1, self.conv2, self.conv3, concat=True)


@BLOCKS.register("basic")
class PreActBasicBlock(Residual):
    """Pre-activation basic block: two 3x3 convs (each BatchNorm -> binarize -> conv -> activation)."""

    def __init__(self, in_channels: int, out_channels: int, conv: ConvFactory, *, stride: int = 1,
                 groups: int = 1, gate: GateConfig = GateConfig(), project: ConvFactory | None = None) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 3, stride, groups)
        self.conv2 = conv(out_channels, out_channels, 3)
        self._init_skip(in_channels, out_channels, stride, groups, gate, project or conv)

    def residual(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))

    def fusion_plan(self) -> FusionPlan | None:
        return self._chain(self.conv1, self.conv2)


@BLOCKS.register("bottleneck")
class BottleneckBlock(Residual):
    """Bottleneck block: 1x1 to C/4, 3x3 (carrying the stride), 1x1 back to C."""

    def __init__(self, in_channels: int, out_channels: int, conv: ConvFactory, *, stride: int = 1,
                 groups: int = 1, gate: GateConfig = GateConfig(), project: ConvFactory | None = None) -> None:
        super().__init__()
        mid = max(out_channels // 4, 1)
        self.conv1 = conv(in_channels, mid, 1, 1, groups)
        self.conv2 = conv(mid, mid, 3, stride)
        self.conv3 = conv(mid, out_channels, 1)
        self._init_skip(in_channels, out_channels, stride, groups, gate, project or conv)

    def residual(self, x: Tensor) -> Tensor:
        return self.conv3(self.conv2(self.conv1(x)))

    def fusion_plan(self) -> FusionPlan | None:
        return self._chain(self.conv1, self.conv2, self.conv3)


def make_block(name: str, in_channels: int, out_channels: int, conv: ConvFactory, **kwargs) -> nn.Module:
    """Build the block registered as ``name`` (raises UnknownNameError listing valid blocks)."""
    return BLOCKS.get(name)(in_channels, out_channels, conv, **kwargs)
