"""Matrix and tensor re-parametrizations of the to-be-binarized weights (MT §4).

During training a layer's latent weight is reconstructed from real-valued factors and then binarized:
W_b = alpha * sign(reconstruct(factors)). The factors are the trained parameters; at inference only
the binary weights are kept (:func:`materialize`).

- "svd": layer-wise; the weight reshaped to (out, in*kh*kw) = U diag(S) V^T with U, S, V learned.
- "tucker": layer-wise Tucker of the 4-way kernel (out, in, kh, kw): a core and one factor per mode.
- "holistic_tucker": identically shaped weights that sit at corresponding places of the network
  (the same module path up to indices) are stacked into one higher-order tensor with one shared
  core. The extra modes come from the indices in the module path: for the stacked hourglass
  ``stacks.S.hourglass.levels.D.P.B.convK`` gives modes (#HGs, depth, 3 pathways, #blocks) in front
  of (out, in, kh, kw), as in MT §4.2.3; modes of size 1 are dropped. When the members do not fill
  a full grid of indices, they are stacked along a single mode instead. A model may declare its
  groups itself (``holistic_group(name, layer)``): ResNet-18 gives MT's three 5th-order groups, one
  per strided macro-module (see models/resnet.py), each stacked along one mode. Layers in no group
  fall back to layer-wise Tucker, as the paper does for "the remaining few layers".

Ranks: ``rank`` is a fraction of each mode's full rank (1.0 = full rank, the default), so at full
rank the initial factors reconstruct the initial weights exactly (to float32 precision).
Decompositions are computed with tensorly on its PyTorch backend.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .binarize import AlphaScale, hard_sign
from .config import require
from .layers import DenseWeight, WeightSource, binary_layers
from .registry import Registry

#: Decompositions by name: each re-parametrizes the given binary-path layers of a model in place
#: (None: no re-parametrization). Adding one = registering its function here.
DECOMPOSITIONS: Registry[Callable[[nn.Module, list, "DecompositionConfig"], None] | None] = Registry("decomposition")
DECOMPOSITIONS.register("none")(None)


@dataclass(frozen=True)
class DecompositionConfig:
    """Which re-parametrization the to-be-binarized weights use during training.

    Attributes:
        kind: "none", "svd", "tucker" or "holistic_tucker".
        rank: fraction (0, 1] of the full rank kept in every mode (1.0 = full rank).
        n_iter: HOOI iterations used to initialize Tucker factors.
    """

    kind: str = "none"
    rank: float = 1.0
    n_iter: int = 10

    def __post_init__(self) -> None:
        DECOMPOSITIONS.get(self.kind, "kind")
        require(0.0 < self.rank <= 1.0, "rank", f"must be in (0, 1] (a fraction of full rank), got {self.rank}")
        require(self.n_iter >= 1, "n_iter", f"must be >= 1, got {self.n_iter}")


@contextmanager
def pytorch_backend() -> Iterator[None]:
    """Run tensorly on its PyTorch backend in this thread, restoring the previous backend."""
    import tensorly as tl

    previous = tl.get_backend()
    tl.set_backend("pytorch", local_threadsafe=True)
    try:
        yield
    finally:
        tl.set_backend(previous, local_threadsafe=True)


def _ranks(shape: tuple[int, ...], fraction: float) -> list[int]:
    """Per-mode Tucker ranks: ``fraction`` of each mode, never above the unfolding's rank."""
    total = math.prod(shape)
    return [max(1, min(math.ceil(s * fraction), total // s)) for s in shape]


def _tucker_init(tensor: Tensor, fraction: float, n_iter: int) -> tuple[Tensor, list[Tensor]]:
    from tensorly.decomposition import tucker

    with pytorch_backend():
        core, factors = tucker(tensor.detach().double(), rank=_ranks(tuple(tensor.shape), fraction),
                               init="svd", n_iter_max=n_iter)
    return core.float(), [f.float() for f in factors]


def _tucker_reconstruct(core: Tensor, factors: list[Tensor]) -> Tensor:
    import tensorly as tl

    with pytorch_backend():
        return tl.tucker_to_tensor((core, list(factors)))


class SVDWeight(WeightSource):
    """W.reshape(out, -1) = U diag(S) V^T with learned U (out x r), S (r), V (n x r)."""

    def __init__(self, weight: Tensor, rank: float = 1.0) -> None:
        super().__init__()
        self.shape = tuple(weight.shape)
        matrix = weight.detach().double().reshape(self.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = max(1, math.ceil(s.numel() * rank))
        self.U = nn.Parameter(u[:, :r].float().contiguous())
        self.S = nn.Parameter(s[:r].float().contiguous())
        self.V = nn.Parameter(vh[:r].T.float().contiguous())

    def forward(self) -> Tensor:
        return ((self.U * self.S) @ self.V.T).reshape(self.shape)


class TuckerWeight(WeightSource):
    """Layer-wise Tucker: W = core x_1 F_out x_2 F_in x_3 F_h x_4 F_w (keeps the spatial structure)."""

    def __init__(self, weight: Tensor, rank: float = 1.0, n_iter: int = 10) -> None:
        super().__init__()
        self.shape = tuple(weight.shape)
        core, factors = _tucker_init(weight, rank, n_iter)
        self.core = nn.Parameter(core)
        self.factors = nn.ParameterList([nn.Parameter(f) for f in factors])

    def forward(self) -> Tensor:
        return _tucker_reconstruct(self.core, list(self.factors))


class HolisticTuckerGroup(nn.Module):
    """One Tucker decomposition (one shared core) of a stack of identically shaped weights.

    The tensor's modes are ``structure`` (positions in the network) followed by the weight's modes.
    """

    def __init__(self, weights: Tensor, structure: tuple[int, ...], rank: float = 1.0, n_iter: int = 10) -> None:
        super().__init__()
        self.structure = tuple(structure)
        self.weight_shape = tuple(weights.shape[len(structure):])
        assert tuple(weights.shape[: len(structure)]) == self.structure
        core, factors = _tucker_init(weights, rank, n_iter)
        self.core = nn.Parameter(core)
        self.factors = nn.ParameterList([nn.Parameter(f) for f in factors])
        self.member_names: list[str] = []

    @property
    def order(self) -> int:
        return len(self.structure) + len(self.weight_shape)

    def member(self, index: tuple[int, ...]) -> Tensor:
        """The weight at ``index`` in the structural modes (only its rows of those factors are used)."""
        n = len(self.structure)
        factors = [self.factors[m][i : i + 1] for m, i in enumerate(index)] + list(self.factors[n:])
        return _tucker_reconstruct(self.core, factors).reshape(self.weight_shape)

    def extra_repr(self) -> str:
        return f"structure={self.structure}, weight={self.weight_shape}, members={len(self.member_names)}"


class HolisticSlice(WeightSource):
    """A layer's view into a :class:`HolisticTuckerGroup` (the group is owned by the model root)."""

    def __init__(self, group: HolisticTuckerGroup, index: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = group.weight_shape
        self._group = (group,)  # a tuple, so the shared group is not registered once per layer
        self.index = tuple(index)

    @property
    def group(self) -> HolisticTuckerGroup:
        return self._group[0]

    def forward(self) -> Tensor:
        return self.group.member(self.index)

    def extra_repr(self) -> str:
        return f"index={self.index}"


def _structure_key(name: str) -> tuple[tuple[str, ...], tuple[object, ...]]:
    """('stacks', '#', 'hourglass', ...) template of a module path and its coordinates (indices, leaf)."""
    parts = name.split(".")
    template = tuple("#" if p.isdigit() else p for p in parts[:-1])
    coords = tuple(int(p) for p in parts[:-1] if p.isdigit()) + (parts[-1],)
    return template, coords


def _grid(coords: list[tuple[object, ...]]) -> tuple[tuple[int, ...], list[tuple[int, ...]]] | None:
    """If ``coords`` fill a full grid, its mode sizes (size-1 modes dropped) and each member's index."""
    positions = []
    for p in range(len(coords[0])):
        values = sorted({c[p] for c in coords}, key=lambda v: (isinstance(v, str), v))
        if len(values) > 1:
            positions.append((p, {v: i for i, v in enumerate(values)}))
    sizes = tuple(len(lookup) for _, lookup in positions)
    if math.prod(sizes) != len(coords) or len(set(coords)) != len(coords):
        return None
    return sizes, [tuple(lookup[c[p]] for p, lookup in positions) for c in coords]


def decomposable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers on the binary path (those a decomposition re-parametrizes)."""
    return [(n, m) for n, m in binary_layers(model) if m.reparametrizable]


def apply_decomposition(model: nn.Module, cfg: DecompositionConfig) -> nn.Module:
    """Re-parametrize the weights of ``model``'s binary-path layers in place, initialized from their
    current values; learned alphas are re-initialized from the reconstructed weights."""
    apply = DECOMPOSITIONS.get(cfg.kind, "kind")
    if apply is None:
        return model
    layers = decomposable_layers(model)
    apply(model, layers, cfg)
    for _, layer in layers:
        if layer.alpha is not None:
            layer.alpha.reset(layer.latent_weight().detach())
    return model


@DECOMPOSITIONS.register("svd")
def _apply_svd(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg: DecompositionConfig) -> None:
    """Layer-wise SVD of each weight reshaped to a matrix (MT §4.2)."""
    for _, layer in layers:
        layer.set_weight_source(SVDWeight(layer.latent_weight(), cfg.rank))


@DECOMPOSITIONS.register("tucker")
def _apply_tucker(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg: DecompositionConfig) -> None:
    """Layer-wise Tucker of each 4-d weight (MT §4.2)."""
    for _, layer in layers:
        layer.set_weight_source(TuckerWeight(layer.latent_weight(), cfg.rank, cfg.n_iter))


@DECOMPOSITIONS.register("holistic_tucker")
def _apply_holistic(model: nn.Module, layers: list[tuple[str, nn.Module]], cfg: DecompositionConfig) -> None:
    """One Tucker decomposition per group of identically shaped weights at corresponding places of
    the network (MT §4.2's holistic variant)."""
    buckets: dict[tuple, list[tuple[str, nn.Module, tuple]]] = {}
    declared = getattr(model, "holistic_group", None)  # a model may name its groups (ResNet-18)
    for name, layer in layers:
        template, coords = _structure_key(name)
        if declared is not None:
            group_name = declared(name, layer)
            key: tuple = ("group", group_name) if group_name else ("layer", name)
            coords = ()  # stacked along one mode, in module order
        else:
            key = (template, layer.weight_shape)
        buckets.setdefault(key, []).append((name, layer, coords))
    groups = nn.ModuleDict()
    for members in buckets.values():
        if len(members) == 1:
            _, layer, _ = members[0]
            layer.set_weight_source(TuckerWeight(layer.latent_weight(), cfg.rank, cfg.n_iter))
            continue
        grid = _grid([c for _, _, c in members]) if members[0][2] else None
        structure, indices = grid if grid else ((len(members),), [(i,) for i in range(len(members))])
        stacked = torch.stack([layer.latent_weight().detach() for _, layer, _ in members])
        tensor = torch.empty((*structure, *stacked.shape[1:]), dtype=stacked.dtype)
        for i, index in enumerate(indices):
            tensor[index] = stacked[i]
        group = HolisticTuckerGroup(tensor, structure, cfg.rank, cfg.n_iter)
        for (name, layer, _), index in zip(members, indices):
            group.member_names.append(name)
            layer.set_weight_source(HolisticSlice(group, index))
        groups[f"g{len(groups)}"] = group
    model.reparam_groups = groups


def holistic_groups(model: nn.Module) -> list[HolisticTuckerGroup]:
    groups = getattr(model, "reparam_groups", None)
    return list(groups.values()) if groups is not None else []


@torch.no_grad()
def materialize(model: nn.Module) -> nn.Module:
    """Replace every re-parametrization by the weights it encodes, in place.

    Binary layers keep sign(W) as a plain ±1 parameter and alpha frozen at its current value
    ("fixed"); real-weight layers keep the reconstructed real weight. Factors and holistic groups
    are removed, so a saved model holds no factors and gives identical outputs in eval mode.
    """
    for _, layer in binary_layers(model):
        latent = layer.latent_weight().detach()
        if layer.weight_quantizer is None:
            layer.set_weight_source(DenseWeight(layer.weight_shape, latent))
            continue
        assert layer.alpha is not None
        alpha = layer.alpha(latent)
        layer.set_weight_source(DenseWeight(layer.weight_shape, hard_sign(latent)))
        layer.weight_quantizer.kind = "sign"
        if alpha is not None:
            fixed = AlphaScale("fixed", layer.weight_shape[0]).to(latent.device)
            fixed.value.copy_(alpha.detach())
            layer.alpha = fixed
    if hasattr(model, "reparam_groups"):
        del model.reparam_groups
    return model
