import pytest
import torch

from bnnctl.workers.binarize import BinarizeConfig
from bnnctl.workers.layers import DenseWeight, binary_layers
from bnnctl.workers.models import ModelConfig, build_model
from bnnctl.workers.reparam import (DecompositionConfig, HolisticSlice, SVDWeight, TuckerWeight,
                                    holistic_groups, materialize)

HG = dict(width=16, depth=2, stacks=2, num_outputs=3)


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (8, 24, 1, 1), (5, 7, 3, 3), (64, 40)])
def test_full_rank_svd_and_tucker_reconstruct_the_weight(shape):
    w = torch.randn(shape)
    for source in (SVDWeight(w), TuckerWeight(w)):
        assert source().shape == w.shape
        assert (source() - w).abs().max() < 1e-5


def test_low_rank_has_fewer_parameters_and_factors_are_trained():
    w = torch.randn(32, 16, 3, 3)
    full, half = TuckerWeight(w), TuckerWeight(w, rank=0.5)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(half) < n(full)
    assert half.core.shape == (16, 8, 2, 2)
    half().square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in half.parameters())


def test_holistic_tucker_groups_the_hourglass_by_stack_depth_and_pathway():
    model = build_model(ModelConfig(decomposition=DecompositionConfig("holistic_tucker"), **HG))
    groups = holistic_groups(model)
    main = [g for g in groups if any("hourglass.levels" in n for n in g.member_names)]
    # 2 stacks x 2 levels x 3 pathways, one tensor per conv shape of the HPM block (C/2, C/4, C/4)
    assert sorted(g.structure for g in main) == [(2, 2, 3)] * 3
    assert {g.weight_shape for g in main} == {(8, 16, 3, 3), (4, 8, 3, 3), (4, 4, 3, 3)}
    assert all(g.order == 7 for g in main)


def test_holistic_tucker_of_resnet18_is_mts_three_5th_order_groups():
    """MT §4.2.3: "we create 3 groups of convolutional layers based on the macro-module structure
    [...] Each of these groups is then parameterized with a single 5-th order tensor"."""
    model = build_model(ModelConfig(arch="resnet18", width=8, num_outputs=10, input_size=32,
                                    decomposition=DecompositionConfig("holistic_tucker", n_iter=1)))
    groups = holistic_groups(model)
    assert len(groups) == 3 and all(g.order == 5 for g in groups)
    assert [(g.structure, g.weight_shape) for g in groups] == [((3,), (c, c, 3, 3)) for c in (16, 32, 64)]
    assert [g.member_names for g in groups] == [[f"layers.{i}.0.conv2", f"layers.{i}.1.conv1", f"layers.{i}.1.conv2"]
                                                for i in (1, 2, 3)]
    # every other binary-path layer (the first macro-module, the strided convs) is layer-wise Tucker
    rest = [(n, type(l.weight_source)) for n, l in binary_layers(model)
            if l.reparametrizable and not isinstance(l.weight_source, HolisticSlice)]
    assert {t for _, t in rest} == {TuckerWeight} and len(rest) == 4 + 3


def test_holistic_tucker_shares_one_core():
    model = build_model(ModelConfig(decomposition=DecompositionConfig("holistic_tucker"), **HG))
    group = max(holistic_groups(model), key=lambda g: len(g.member_names))
    members = [l for _, l in binary_layers(model)
               if isinstance(l.weight_source, HolisticSlice) and l.weight_source.group is group]
    assert len(members) == 12
    # one core parameter in the whole model for this group, not one per layer
    cores = [p for n, p in model.named_parameters() if p is group.core]
    assert len(cores) == 1
    before = [l.latent_weight().detach().clone() for l in members]
    with torch.no_grad():
        group.core.add_(0.1 * torch.randn_like(group.core))
    after = [l.latent_weight().detach() for l in members]
    assert all(not torch.allclose(a, b) for a, b in zip(before, after))
    # and gradients from every member reach the same core
    model(torch.randn(1, 3, 32, 32))[-1].sum().backward()
    assert group.core.grad is not None and group.core.grad.abs().sum() > 0


def test_holistic_full_rank_reproduces_the_initial_weights():
    torch.manual_seed(3)
    plain = build_model(ModelConfig(**HG))
    torch.manual_seed(3)
    holistic = build_model(ModelConfig(decomposition=DecompositionConfig("holistic_tucker"), **HG))
    for (n1, a), (n2, b) in zip(binary_layers(plain), binary_layers(holistic)):
        assert n1 == n2
        assert (a.latent_weight() - b.latent_weight()).abs().max() < 1e-5


@pytest.mark.parametrize("dec", ["none", "svd", "tucker", "holistic_tucker"])
@pytest.mark.parametrize("alpha", ["analytic", "learned", "none"])
@pytest.mark.parametrize("quantizer", ["sign", "tanh"])
def test_materialize_keeps_eval_outputs_and_drops_factors(dec, alpha, quantizer):
    cfg = ModelConfig(decomposition=DecompositionConfig(dec),
                      binarize=BinarizeConfig(alpha=alpha, quantizer=quantizer, weight_quantizer=quantizer), **HG)
    model = build_model(cfg)
    # train one step so that factors, alphas and BatchNorm statistics move away from initialization
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 32, 32))[-1].square().mean().backward()
    opt.step()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        materialize(model)
        after = model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(isinstance(layer.weight_source, DenseWeight) for _, layer in binary_layers(model))
    assert not holistic_groups(model)
    names = list(model.state_dict())
    assert not any(k in n for n in names for k in ("core", "factors", ".U", ".S", ".V", "reparam_groups"))
    for _, layer in binary_layers(model):
        if layer.binary_weights:
            assert set(torch.unique(layer.latent_weight()).tolist()) <= {-1.0, 1.0}
    # a materialized model saved and loaded into a materialized twin gives the same outputs
    twin = materialize(build_model(cfg)).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(twin(x), after))


def test_materialize_real_weights_keeps_reconstruction():
    cfg = ModelConfig(decomposition=DecompositionConfig("tucker"),
                      binarize=BinarizeConfig(activations=True, weights=False), **HG)
    model = build_model(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)[-1]
        after = materialize(model)(x)[-1]
    assert torch.allclose(before, after, atol=1e-5)
