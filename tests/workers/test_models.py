"""Every model runs forward and backward at a tiny size in every combination of
block x activation x decomposition x binary/real (timm-style registry test)."""
import itertools

import pytest
import torch

from bnnctl.workers.accounting import account
from bnnctl.workers.binarize import BinarizeConfig
from bnnctl.workers.blocks import BLOCKS
from bnnctl.workers.errors import UnknownNameError
from bnnctl.workers.layers import ACTIVATIONS, ActivationConfig, binary_layers
from bnnctl.workers.models import MODELS, ModelConfig, build_model
from bnnctl.workers.reparam import DecompositionConfig

TINY = {
    "hourglass": (dict(width=16, depth=2, stacks=2, num_outputs=3), 32),
    "unet_hourglass": (dict(width=16, depth=2, stacks=2, num_outputs=3, merge_groups=2), 32),
    "resnet18": (dict(width=8, num_outputs=5), 32),
    "alexnet": (dict(width=8, num_outputs=5), 64),
}
DECOMPOSITIONS = ["none", "svd", "tucker", "holistic_tucker"]


def _pairwise(cases: list[tuple]) -> set[tuple]:
    """A subset of ``cases`` in which every pair of values of two dimensions that some case holds
    appears at least once (greedy: each pick covers the most pairs not yet covered)."""
    def pairs(case):
        return {(i, a, j, b) for i, a in enumerate(case) for j, b in enumerate(case) if i < j}

    todo, chosen = set().union(*map(pairs, cases)), set()
    while todo:
        best = max(cases, key=lambda c: len(pairs(c) & todo))
        chosen.add(best)
        todo -= pairs(best)
    return chosen


def _cases():
    """Every combination; those outside a pairwise cover of them are marked slow (``make test``
    runs them all, ``make test-fast`` every pair of choices)."""
    full = [(arch, block, act, dec, binary) for arch in MODELS.names()
            for block in (BLOCKS.names() if MODELS.get(arch).block else [None])
            for act, dec, binary in itertools.product(ACTIVATIONS.names(), DECOMPOSITIONS, (True, False))]
    cover = _pairwise(full)
    for case in full:
        arch, block, act, dec, binary = case
        yield pytest.param(*case, id=f"{arch}-{block}-{act}-{dec}-{'bin' if binary else 'real'}",
                           marks=() if case in cover else pytest.mark.slow)


def test_the_fast_subset_covers_every_pair_of_choices():
    cases = [tuple(p.values) for p in _cases()]
    fast = [c for c, p in zip(cases, _cases()) if not p.marks]
    assert len(fast) < len(cases) / 5
    for i, j in itertools.combinations(range(5), 2):
        assert {(c[i], c[j]) for c in fast} == {(c[i], c[j]) for c in cases}


@pytest.mark.parametrize("arch,block,act,dec,binary", list(_cases()))
def test_forward_backward_every_combination(arch, block, act, dec, binary):
    kwargs, size = TINY[arch]
    cfg = ModelConfig(arch=arch, block=block, activation=ActivationConfig(act),
                      decomposition=DecompositionConfig(dec),
                      binarize=BinarizeConfig() if binary else BinarizeConfig.real(), **kwargs)
    model = build_model(cfg)
    outputs = model(torch.randn(2, 3, size, size))
    outputs = outputs if isinstance(outputs, list) else [outputs]
    if arch.endswith("hourglass"):
        assert len(outputs) == 2 and outputs[-1].shape == (2, 3, size // 4, size // 4)
    else:
        assert outputs[0].shape == (2, 5)
    loss = sum(o.square().mean() for o in outputs)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    with_grad = [p for p in trainable if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) > 0.5 * len(trainable)
    assert all(torch.isfinite(p.grad).all() for p in trainable if p.grad is not None)
    layers = binary_layers(model)
    assert layers and all(l.binary_inputs == binary and l.binary_weights == binary
                          for n, l in layers if getattr(l, "reparametrizable", True))


def test_binary_layers_see_only_plus_minus_one_inputs_in_eval():
    model = build_model(ModelConfig(width=16, depth=2, num_outputs=3)).eval()
    seen = []
    for _, layer in binary_layers(model):
        layer.input_quantizer.register_forward_hook(lambda m, i, o: seen.append(o))
    model(torch.randn(1, 3, 32, 32))
    assert seen and all(set(torch.unique(o).tolist()) <= {-1.0, 1.0} for o in seen)


def test_join_layers_binary_or_real():
    binary = build_model(ModelConfig(width=16, depth=1, stacks=2, num_outputs=3))
    real = build_model(ModelConfig(width=16, depth=1, stacks=2, num_outputs=3, join_binary=False))
    assert binary.stacks[0].join_features.binary_weights and binary.stacks[0].join_heatmaps.binary_inputs
    assert not real.stacks[0].join_features.binary_weights and not real.stacks[0].join_heatmaps.binary_inputs
    assert not hasattr(binary.stacks[1], "join_features")  # the last stack has no joining layers


def _weight_layers_in_call_order(model, size):
    """Every layer with a weight, binary or real, in the order a forward pass calls them."""
    from bnnctl.workers.layers import BinaryConv2d, BinaryLinear

    kinds = (torch.nn.Conv2d, torch.nn.Linear, BinaryConv2d, BinaryLinear)
    called, hooks = [], []
    for m in model.modules():
        if isinstance(m, kinds):
            hooks.append(m.register_forward_hook(lambda mod, args, out: called.append(mod)))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return called


def _real_ends(model, size) -> tuple[bool, bool]:
    """(first layer real and image-facing, last layer real), as the papers keep them."""
    from bnnctl.workers.layers import BinaryConv2d, BinaryLinear

    layers = _weight_layers_in_call_order(model, size)
    binary = (BinaryConv2d, BinaryLinear)
    first, last = layers[0], layers[-1]
    return (not isinstance(first, binary) and first.weight.shape[1] == 3), not isinstance(last, binary)


def test_first_and_last_layers_stay_real():
    for arch, (kwargs, size) in TINY.items():
        model = build_model(ModelConfig(arch=arch, **kwargs))
        assert any(isinstance(m, torch.nn.Module) and type(m).__name__.startswith("Binary") for m in model.modules())
        assert _real_ends(model, size) == (True, True), arch


def test_the_real_ends_check_sees_a_binary_head():
    """The check above fails on a model whose last layer is binary (every hourglass head made binary)."""
    from bnnctl.workers.layers import BinaryConv2d

    kwargs, size = TINY["hourglass"]
    model = build_model(ModelConfig(arch="hourglass", **kwargs))
    heads = [m for m in model.modules() if hasattr(m, "head") and isinstance(m.head, torch.nn.Conv2d)]
    assert len(heads) == kwargs["stacks"]
    for m in heads:
        m.head = BinaryConv2d(m.head.in_channels, m.head.out_channels, 1)
    assert _real_ends(model, size) == (True, False)


def test_paper_width_hourglass_has_the_papers_parameter_count():
    """IT Table 2: 1-stack binary hourglass with HPM blocks, 6.2M parameters."""
    acc = account(build_model(ModelConfig()), 64)
    assert abs(acc.params - 6.2e6) / 6.2e6 < 0.01
    assert acc.binary_params > 0.99 * acc.params


def test_resnet18_real_has_resnet18_size():
    acc = account(build_model(ModelConfig(arch="resnet18").real()), 64)
    assert abs(acc.params - 11.69e6) / 11.69e6 < 0.005


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid names: alexnet, hourglass, resnet18, unet_hourglass"):
        ModelConfig(arch="vgg16")
