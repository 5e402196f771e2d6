import pytest
import torch
import torch.nn.functional as F

from bnnctl.workers.binarize import QUANTIZERS, AlphaScale, BinarizeConfig, Quantizer, hard_sign, sign_ste
from bnnctl.workers.errors import ConfigError
from bnnctl.workers.layers import ActivationConfig, BinaryConv2d


def test_sign_maps_zero_to_plus_one_and_is_exactly_two_valued():
    x = torch.tensor([-2.0, -1e-30, 0.0, -0.0, 1e-30, 3.0])
    assert hard_sign(x).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]


def test_ste_gradient_is_one_inside_clip_and_zero_outside():
    x = torch.tensor([-3.0, -1.5, -1.0, -0.3, 0.0, 0.7, 1.0, 1.0001, 2.0], requires_grad=True)
    sign_ste(x).backward(torch.full_like(x, 2.0))
    assert x.grad.tolist() == [0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", [n for n in QUANTIZERS.names() if not QUANTIZERS.get(n).exact])
def test_approximation_tends_to_sign_with_finite_gradient(kind):
    fn = QUANTIZERS.get(kind).forward
    x = torch.cat([torch.linspace(-2, -0.05, 50), torch.linspace(0.05, 2, 50)])
    errors = []
    for lam in (1.0, 10.0, 100.0, 1e3, 1e4, 1e5):
        xi = x.clone().requires_grad_(True)
        y = fn(xi, torch.tensor(lam))
        assert y.abs().max() <= 1.0
        errors.append(float((y.detach() - hard_sign(x)).abs().max()))
        y.sum().backward()
        assert torch.isfinite(xi.grad).all()
        # also at exactly 0, where the slope is steepest
        z = torch.zeros(3, requires_grad=True)
        fn(z, torch.tensor(lam)).sum().backward()
        assert torch.isfinite(z.grad).all() and (z.grad > 0).all()
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.5 and errors[2] < errors[1] and errors[-1] < 1e-3


def test_quantizer_uses_approximation_in_training_and_exact_sign_in_eval():
    q = Quantizer("tanh", lambda_init=2.0)
    x = torch.tensor([-0.5, 0.1, 0.8])
    assert torch.allclose(q(x), torch.tanh(2.0 * x))
    q.lam.fill_(5.0)
    assert torch.allclose(q(x), torch.tanh(5.0 * x))
    assert "lam" in q.state_dict()
    q.eval()
    assert q(x).tolist() == [-1.0, 1.0, 1.0]


@pytest.mark.parametrize("alpha", ["none", "analytic", "learned"])
def test_binarized_weights_take_exactly_plus_minus_alpha_per_channel(alpha):
    layer = BinaryConv2d(6, 5, 3, binarize=BinarizeConfig(alpha=alpha))
    if alpha == "learned":  # free to change sign and magnitude
        with torch.no_grad():
            layer.alpha.value.copy_(torch.tensor([0.5, -2.0, 1e-3, 3.0, -0.1]))
    signs, scale = layer.quantized_weight()
    w = (signs if scale is None else signs * scale.view(-1, 1, 1, 1)).detach()  # what the layer multiplies by
    latent = layer.latent_weight().detach()
    expected_alpha = {"none": torch.ones(5), "analytic": latent.abs().flatten(1).mean(1),
                      "learned": torch.tensor([0.5, -2.0, 1e-3, 3.0, -0.1])}[alpha]
    for o in range(5):
        values = set(w[o].flatten().tolist())
        a = float(expected_alpha[o])
        assert values <= {a, -a} and len(values) == 2
        assert torch.equal(w[o], a * hard_sign(latent[o]))


def test_learned_alpha_starts_at_the_analytic_value_and_receives_gradient():
    layer = BinaryConv2d(4, 3, 3, binarize=BinarizeConfig(alpha="learned"))
    latent = layer.latent_weight().detach()
    assert torch.allclose(layer.alpha.value, latent.abs().flatten(1).mean(1))
    layer(torch.randn(2, 4, 6, 6)).square().sum().backward()
    assert layer.alpha.value.grad is not None and layer.alpha.value.grad.abs().sum() > 0


def test_weight_gradient_is_zero_beyond_the_ste_clip():
    layer = BinaryConv2d(2, 2, 1, binarize=BinarizeConfig(alpha="none"), activation=ActivationConfig("none"))
    with torch.no_grad():
        layer.weight_source.weight.copy_(torch.tensor([1.5, -0.5, 0.2, -3.0]).view(2, 2, 1, 1))
    out = layer(torch.randn(4, 2, 3, 3))
    (out * torch.randn_like(out)).sum().backward()
    g = layer.weight_source.weight.grad.flatten()
    assert g[0] == 0 and g[3] == 0 and g[1] != 0 and g[2] != 0


@pytest.mark.parametrize("acts,weights", [(True, True), (True, False), (False, True), (False, False)])
def test_independent_switches_for_activations_and_weights(acts, weights):
    layer = BinaryConv2d(3, 4, 3, binarize=BinarizeConfig(activations=acts, weights=weights),
                         activation=ActivationConfig("none")).eval()
    x = torch.randn(2, 3, 5, 5)
    normed = layer.bn(x)
    xin = hard_sign(normed) if acts else normed
    latent = layer.latent_weight()
    w = latent.abs().flatten(1).mean(1).view(-1, 1, 1, 1) * hard_sign(latent) if weights else latent
    assert torch.allclose(layer(x), F.conv2d(xin, w, padding=1), atol=1e-5)
    assert (layer.input_quantizer is not None) == acts and (layer.weight_quantizer is not None) == weights


def test_bad_binarize_settings_are_rejected():
    with pytest.raises(ConfigError, match="lambda_init"):
        BinarizeConfig(lambda_init=0.0)
    with pytest.raises(ConfigError, match="alpha"):
        AlphaScale("median", 3)
    with pytest.raises(ConfigError, match="unknown quantizer 'arctan'; valid names: sigmoid, sign, softsign, tanh"):
        Quantizer("arctan")
    with pytest.raises(ConfigError, match="alpha.*valid names: analytic, learned, none"):
        BinarizeConfig(alpha="fixed")  # only what materialization leaves behind


def test_a_new_quantizer_is_one_registration(monkeypatch):
    """Adding a technique to an axis = registering one object: specs, layers, the schedules' list
    of approximating quantizers and the exact/inexact decision (XNOR kernel or not) follow."""
    from bnnctl.workers.binarize import approximation
    from bnnctl.workers.layers import BinaryConv2d
    from bnnctl.workers.train.loop import _approximating

    monkeypatch.setattr(QUANTIZERS, "_items", dict(QUANTIZERS._items))  # undone after the test
    approximation("clipped_linear")(lambda x, lam: (lam * x).clamp(-1, 1))
    cfg = BinarizeConfig(quantizer="clipped_linear", lambda_init=2.0)
    layer = BinaryConv2d(4, 4, binarize=cfg).train()
    assert not layer.exact_binary() and _approximating(layer) == [layer.input_quantizer]
    x = torch.tensor([-1.0, -0.25, 0.1, 3.0])
    assert layer.input_quantizer(x).tolist() == [-1.0, -0.5, 0.20000000298023224, 1.0]
    assert layer.eval().exact_binary()  # evaluation is always the exact sign


def test_the_weights_smooth_argument_is_scale_free():
    """tanh(lambda * W / mean|W|) per output channel: weights 10x larger (or smaller) binarize the same
    way at the same lambda (the features' unit scale, IT Fig. 5); sign is unchanged."""
    layer = BinaryConv2d(8, 6, 3, binarize=BinarizeConfig(quantizer="tanh", weight_quantizer="tanh", alpha="none"))
    q = layer.weight_quantizer
    assert q.scale_free and not layer.input_quantizer.scale_free  # activations: BatchNorm gives them unit scale
    q.lam.fill_(3.0)
    w = layer.latent_weight().detach()
    scale = w.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(q(w), torch.tanh(3.0 * w / scale))
    assert torch.allclose(q(10 * w), q(w), atol=1e-6) and torch.allclose(q(0.01 * w), q(w), atol=1e-6)
    x = torch.randn(2, 8, 7, 7)
    out = layer(x)
    with torch.no_grad():
        layer.weight_source.weight.mul_(10)
    assert torch.allclose(layer(x), out, atol=1e-5)  # the layer's forward is unchanged (alpha none)
    q.eval()
    assert torch.equal(q(w), hard_sign(w))
    # a channel of zeros has no scale: its argument stays 0 (tanh 0), never NaN
    z = torch.zeros(2, 3, 3, 3)
    q.train()
    assert torch.equal(q(z), torch.zeros_like(z))


def test_a_quantizer_counts_what_its_approximation_leaves_far_from_sign():
    q = Quantizer("tanh", lambda_init=2.0)
    q.tally = [0, 0]
    q(torch.tensor([-1.0, -0.4, 0.1, 0.6, 2.0]))  # |2x| < 1 for -0.4 and 0.1
    assert q.tally == [2, 5]
