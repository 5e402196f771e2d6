"""Fused binary inference (workers/fused.py): identical outputs to the float emulation for every model
family and option the export supports, thresholds exact at the boundary, and the fused path taken."""
import pytest
import torch
from torch import nn

from bnnctl.kernels import cpu
from bnnctl.workers import fused
from bnnctl.workers.binarize import BinarizeConfig
from bnnctl.workers.blocks import GateConfig
from bnnctl.workers.layers import ActivationConfig, BinaryConv2d, BinaryLinear
from bnnctl.workers.models import ModelConfig, build_model

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler for the CPU kernel")


def _randomize(model: nn.Module, seed: int = 1) -> None:
    """Trained-looking state: BatchNorm statistics and scales of both signs (some zero), PReLU
    slopes, learned alphas and gates away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.05)
                w = torch.randn(c, generator=g)
                w[::5] = 0.0
                m.weight.copy_(w)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5)
        for name, p in model.named_parameters():
            if name.endswith("alpha.value") or name.endswith("gate.gate"):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.1)
        for name, b in model.named_buffers():
            if name.endswith("gate.gate"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.2)


def _pair(cfg: ModelConfig, backend: str = "xnor"):
    torch.manual_seed(0)
    ref = build_model(cfg).eval()
    _randomize(ref)
    fast = build_model(ModelConfig(**{**cfg.__dict__, "backend": backend})).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fused.fuse(fast)


def _fusable_convs(model: nn.Module) -> int:
    """Binary convs the kernel takes (groups = 1) and binary linear layers (1x1 convs)."""
    return sum(((isinstance(m, BinaryConv2d) and m.groups == 1) or isinstance(m, BinaryLinear))
               and m.binary_weights and m.binary_inputs for m in model.modules())


def _runs(monkeypatch) -> list:
    calls = []
    real = cpu.ConvPlan.run
    monkeypatch.setattr(cpu.ConvPlan, "run", lambda self, x, **k: calls.append((self, x, k)) or real(self, x, **k))
    return calls


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, list) else [out]


HOURGLASS = dict(width=36, depth=2, num_outputs=5, input_size=32)  # 36: HPM channels 18, 9, 9; stem 9
CASES = {
    "hourglass-1-stack": ModelConfig(**HOURGLASS),
    "hourglass-2-stacks": ModelConfig(stacks=2, **HOURGLASS),
    "hourglass-3-stacks-real-joins": ModelConfig(stacks=3, join_binary=False, **HOURGLASS),
    "hourglass-basic": ModelConfig(block="basic", **HOURGLASS),
    "hourglass-bottleneck": ModelConfig(block="bottleneck", **HOURGLASS),
    "hourglass-scalar-gate": ModelConfig(gate=GateConfig("scalar"), **HOURGLASS),
    "hourglass-fixed-channel-gate": ModelConfig(gate=GateConfig("channel", 0.5, trainable=False), **HOURGLASS),
    "hourglass-learned-alpha": ModelConfig(binarize=BinarizeConfig(alpha="learned"), **HOURGLASS),
    "hourglass-no-alpha-relu": ModelConfig(binarize=BinarizeConfig(alpha="none"), activation=ActivationConfig("relu"),
                                           **HOURGLASS),
    "hourglass-leaky": ModelConfig(activation=ActivationConfig("leaky_relu", 0.2), **HOURGLASS),
    "hourglass-prelu-per-channel": ModelConfig(activation=ActivationConfig("prelu", per_channel=True), **HOURGLASS),
    "hourglass-no-activation": ModelConfig(activation=ActivationConfig("none"), **HOURGLASS),
    "unet": ModelConfig(arch="unet_hourglass", **HOURGLASS),
    "unet-grouped-merge": ModelConfig(arch="unet_hourglass", merge_groups=2, **HOURGLASS),
    "resnet18": ModelConfig(arch="resnet18", width=12, num_outputs=7, input_size=64),
    "resnet18-binary-downsample-learned": ModelConfig(arch="resnet18", width=12, num_outputs=7, input_size=64,
                                                      downsample_binary=True,
                                                      binarize=BinarizeConfig(alpha="learned")),
    "alexnet": ModelConfig(arch="alexnet", width=20, num_outputs=7),
}


@pytest.mark.parametrize("name", CASES)
def test_fused_outputs_equal_the_float_emulation(name, monkeypatch):
    cfg = CASES[name]
    ref, fast = _pair(cfg)
    size = cfg.resolved().input_size
    x = torch.randn(2, 3, size, size)
    expected = _outputs(ref, x)
    calls = _runs(monkeypatch)
    got = _outputs(fast, x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max().item()}"
    # every binary conv that the kernel can take (groups = 1) ran fused, once
    assert len(calls) == _fusable_convs(ref) > 0
    if cfg.arch == "alexnet":
        assert sum(isinstance(m, BinaryLinear) for m in ref.modules()) == 2  # both FCs in the kernel too
    if cfg.arch == "unet_hourglass" and cfg.merge_groups == 2:
        assert _fusable_convs(ref) < sum(isinstance(m, BinaryConv2d) for m in ref.modules())


def test_auto_takes_the_fused_path_with_the_same_outputs(monkeypatch):
    ref, fast = _pair(CASES["hourglass-2-stacks"], backend="auto")
    x = torch.randn(1, 3, 32, 32)
    calls = _runs(monkeypatch)
    assert torch.equal(_outputs(fast, x)[-1], _outputs(ref, x)[-1])  # checked against layer by layer
    calls.clear()
    assert torch.equal(_outputs(fast, x)[-1], _outputs(ref, x)[-1])
    assert len(calls) == _fusable_convs(ref)  # then fused only


def test_basic_and_bottleneck_blocks_keep_activations_packed_between_their_convs(monkeypatch):
    """Inside a block only the last conv writes floats; the others write the next conv's packed input."""
    for block, convs in (("basic", 2), ("bottleneck", 3)):
        ref, fast = _pair(ModelConfig(block=block, **HOURGLASS))
        calls = _runs(monkeypatch)
        with torch.no_grad():
            body = fast.stacks[0].post[0]
            x = torch.randn(1, 36, 8, 8)
            assert torch.equal(body(x), ref.stacks[0].post[0](x))
        kinds = [(type(inp).__name__, k.get("out") is not None, k.get("packed_out") is not None) for _, inp, k in calls]
        assert kinds == [("Tensor", False, True)] + [("PackedInput", False, True)] * (convs - 2) \
            + [("PackedInput", True, False)]
        monkeypatch.undo()


def test_hpm_writes_its_concatenation_in_place_and_packs_for_the_next_conv(monkeypatch):
    ref, fast = _pair(ModelConfig(**HOURGLASS))
    calls = _runs(monkeypatch)
    block, x = fast.stacks[0].post[0], torch.randn(2, 36, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), ref.stacks[0].post[0](x))
    kinds = [(type(inp).__name__, k["out"].shape[1], k.get("packed_out") is not None) for _, inp, k in calls]
    assert kinds == [("Tensor", 18, True), ("PackedInput", 9, True), ("PackedInput", 9, False)]


def test_not_fused_while_training_or_with_gradients(monkeypatch):
    ref, fast = _pair(CASES["hourglass-1-stack"])
    x = torch.randn(2, 3, 32, 32)
    calls = _runs(monkeypatch)
    assert torch.equal(fast(x)[-1], ref(x)[-1])  # eval, gradients on
    fast.train()
    with torch.no_grad():
        fast(x)
    assert calls == []


def test_auto_keeps_the_layer_by_layer_path_where_the_fused_kernel_disagrees(monkeypatch):
    """A wrong fused result must not change what auto returns: it is compared once per module and
    shape with the layer-by-layer path, which is kept, with a warning."""
    real = cpu.ConvPlan.run

    def faulty(self, x, **k):
        real(self, x, **k)
        if k.get("out") is not None:
            k["out"].add_(1.0)  # injected fault

    ref, fast = _pair(CASES["hourglass-1-stack"], backend="auto")
    monkeypatch.setattr(cpu.ConvPlan, "run", faulty)
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="fused inference disagreed"):
        assert torch.equal(_outputs(fast, x)[-1], _outputs(ref, x)[-1])
    assert torch.equal(_outputs(fast, x)[-1], _outputs(ref, x)[-1])  # remembered, still right


# ------------------------------------------------------------------ thresholds


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 3)
        bn.running_var.copy_(torch.rand(c, generator=g) * 5 + 1e-4)
        w = torch.randn(c, generator=g)
        w[:3] = torch.tensor([0.0, -0.0, 1e-30])  # constant channels, and a tiny scale
        bn.weight.copy_(w)
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def _bits(t, x):
    """Thresholds applied to x: (N, C, ...) -> bits, as the kernel packs them."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    value, flip = t.value.view(shape), t.flip.bool().view(shape)
    return torch.where(flip, x <= value, x >= value)


@pytest.mark.parametrize("seed", range(4))
def test_thresholds_decide_exactly_as_batchnorm_then_sign(seed):
    bn = _bn(40, seed)
    t = fused.sign_thresholds(bn)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 40, 9, 9, generator=g) * 4
    with torch.no_grad():
        assert torch.equal(_bits(t, x), bn(x) >= 0)
        # at the threshold and one float either side of it, where rounding decides
        finite = torch.isfinite(t.value)
        v = torch.where(finite, t.value, torch.zeros(()))
        edge = torch.stack([torch.nextafter(v, torch.tensor(-float("inf"))), v,
                            torch.nextafter(v, torch.tensor(float("inf")))], dim=1).view(1, 40, 3, 1)
        assert torch.equal(_bits(t, edge), bn(edge) >= 0)
    flips = t.flip.bool()
    assert flips[5:].eq(bn.weight[5:] < 0).all()  # a negative scale flips the comparison
    assert not finite[:2].any() and finite[2]  # constant channels; a tiny scale still decides
    # kept while the statistics are unchanged, recomputed when they change
    assert fused.sign_thresholds(bn) is t
    with torch.no_grad():
        bn.running_mean.add_(1.0)
    assert fused.sign_thresholds(bn) is not t


def test_packing_with_thresholds_equals_batchnorm_then_sign_in_both_kernels():
    from bnnctl import kernels

    bn = _bn(70, 7)
    t = fused.sign_thresholds(bn)
    x = torch.randn(2, 70, 6, 11) * 3
    w = torch.randn(5, 70, 3, 3)
    with torch.no_grad():
        expected = kernels.xnor_conv2d(bn(x), w, None, 1, 1)
    for portable in (False, True):
        plan = cpu.ConvPlan(tuple(x.shape), cpu.pack_weight(w), 1, 1, thresholds=t)
        out = torch.empty(plan.out_shape)
        plan.run(x, out=out, portable=portable)
        assert torch.equal(out, expected)


# ------------------------------------------------------------------ pooling and upsampling


@pytest.mark.parametrize("shape,k,s,p", [((1, 64, 128, 128), 2, 2, 0), ((2, 7, 13, 11), 3, 2, 1), ((1, 96, 55, 55), 3, 2, 0),
                                         ((1, 3, 7, 9), 3, 1, 1), ((2, 2, 9, 9), 2, 3, 0), ((1, 5, 40, 37), 2, 2, 0)])
def test_compiled_max_pool_equals_pytorchs_including_nan(shape, k, s, p):
    import torch.nn.functional as F

    x = torch.randn(*shape)
    x[0, 0, 0, 0] = float("nan")  # NaN propagates, as in PyTorch
    x[-1, -1, -1, -1] = float("inf")
    ref, got = F.max_pool2d(x, k, s, p), cpu.max_pool2d(x, k, s, p)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0))
    assert torch.equal(fused.max_pool2d(x, k, s, p).nan_to_num(7.0), ref.nan_to_num(7.0))


@pytest.mark.parametrize("shape", [(1, 128, 32, 32), (2, 3, 5, 7), (1, 4, 1, 1)])
def test_upsample_add_equals_interpolate_then_add(shape):
    import torch.nn.functional as F

    n, c, h, w = shape
    x, skip = torch.randn(*shape), torch.randn(n, c, 2 * h, 2 * w)
    expected = F.interpolate(x, scale_factor=2, mode="nearest") + skip
    assert torch.equal(cpu.upsample2x_add(x, skip), expected)
    assert torch.equal(fused.upsample_add(x, skip), expected)
    odd = torch.randn(n, c, 2 * h + 1, 2 * w)  # not exactly twice: the two-step form
    assert torch.equal(fused.upsample_add(x, odd), F.interpolate(x, size=odd.shape[-2:], mode="nearest") + odd)


def test_the_stems_batchnorm_and_relu_fold_into_the_first_blocks_thresholds(monkeypatch):
    """Hourglass stem: conv -> BatchNorm -> ReLU -> a block with a projection; in fused inference
    the BatchNorm and ReLU never run on the data (their effect is in the block's input thresholds),
    and the outputs are the float emulation's."""
    ref, fast = _pair(CASES["hourglass-1-stack"])
    x = torch.randn(2, 3, 32, 32)
    _outputs(fast, x)  # thresholds calibrated (through the modules themselves) on the first call
    seen = []
    for module in (fast.stem[1], fast.stem[2]):
        module.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    for a, b in zip(_outputs(fast, x), _outputs(ref, x)):
        assert torch.equal(a, b)
    assert seen == []
    with torch.no_grad():  # a changed BatchNorm is noticed: recalibrated, still identical
        for model in (ref, fast):
            model.stem[1].running_mean.add_(0.3)
    assert torch.equal(_outputs(fast, x)[-1], _outputs(ref, x)[-1])


def test_nan_statistics_fold_exactly_and_a_failed_fold_runs_layer_by_layer(monkeypatch):
    """A NaN variance makes a channel's BatchNorm output NaN, whose sign is -1 for every input: a
    constant channel, folded exactly. Where a fold fails (BatchNorm's sign found non-monotone),
    that layer's block runs layer by layer; nothing fails, outputs stay the emulation's."""
    ref, fast = _pair(CASES["hourglass-1-stack"])
    with torch.no_grad():
        for model in (ref, fast):
            model.stacks[0].post[0].conv2.bn.running_var[3] = float("nan")
    x = torch.randn(1, 3, 32, 32)
    calls = _runs(monkeypatch)
    for a, b in zip(_outputs(fast, x), _outputs(ref, x)):
        assert torch.equal(a, b)
    assert len(calls) == _fusable_convs(ref)  # everything fused, the NaN channel too
    calls.clear()
    real = fused._calibrate
    broken = fast.stacks[0].post[0].conv2.bn

    def calibrate(chain):
        if chain[-1] is broken:
            raise ArithmeticError("BatchNorm's sign is not monotone in its input")
        return real(chain)

    monkeypatch.setattr(fused, "_calibrate", calibrate)
    with torch.no_grad():
        broken.running_mean.add_(0.1)  # new statistics: calibrated again
        ref.stacks[0].post[0].conv2.bn.running_mean.add_(0.1)
    for a, b in zip(_outputs(fast, x), _outputs(ref, x)):
        assert torch.equal(a, b)
    # the post block ran layer by layer: its conv1 and conv3 fused one at a time, conv2 not at all
    assert len(calls) == _fusable_convs(ref) - 1


# ------------------------------------------------------------------ fuse() as an explicit step


def _block_pair(name: str, backend: str, cin: int = 16, cout: int = 16, stride: int = 1):
    from bnnctl.workers.blocks import make_block
    from bnnctl.workers.layers import ConvFactory

    torch.manual_seed(3)
    gate = GateConfig("channel", init_range=(0.3, 1.2))
    ref = make_block(name, cin, cout, ConvFactory(), stride=stride, gate=gate).eval()
    _randomize(ref)
    other = make_block(name, cin, cout, ConvFactory(backend=backend), stride=stride, gate=gate).eval()
    other.load_state_dict(ref.state_dict())
    return ref, other


def _registered(registry_path: str) -> list[str]:
    from bnnctl.workers import backends, blocks

    return {"blocks": blocks.BLOCKS, "backends": backends.CONV_BACKENDS}[registry_path].names()


@pytest.mark.parametrize("backend", _registered("backends"))
@pytest.mark.parametrize("name", _registered("blocks"))
@pytest.mark.parametrize("shape", [(16, 16, 1), (8, 16, 2)])  # identity skip; projection with stride
def test_every_registered_block_with_every_conv_backend_in_eval_without_gradients(name, backend, shape, monkeypatch):
    """The path validation takes (eval + no_grad), for every block and conv backend registered: the
    block as built, and fuse(block), give the float emulation's bits; where the backend fuses and
    the block declares a plan, the fused path runs, one kernel call per conv (projection included)."""
    from bnnctl.workers.backends import CONV_BACKENDS

    assert {"hpm", "basic", "bottleneck"} <= set(_registered("blocks"))
    assert {"float", "xnor", "auto"} <= set(_registered("backends"))
    cin, cout, stride = shape
    ref, block = _block_pair(name, backend, cin, cout, stride)
    # an exact backend gives the emulation's bits; one that is not, its values to float32 rounding
    same = torch.equal if CONV_BACKENDS.get(backend).exact else (lambda a, b: torch.allclose(a, b, atol=1e-5))
    x = torch.randn(2, cin, 12, 12)
    calls = _runs(monkeypatch)
    with torch.no_grad():
        expected = ref(x)
        assert calls == []  # nothing runs fused unless fuse() compiled it
        assert same(block(x), expected)
        compiled = fused.fuse(block)
        assert same(compiled(x), expected)  # "auto" also compares with layer by layer here
        calls.clear()
        assert same(compiled(x), expected)
    plan = block.fusion_plan()
    fuses = CONV_BACKENDS.get(backend).fuses and plan is not None
    assert isinstance(compiled, fused.FusedBlock) == fuses
    if fuses:
        assert len(calls) == len(plan.convs) + (plan.proj is not None)
    if name in ("hpm", "basic", "bottleneck") and fuses:
        assert len(calls) == {"hpm": 3, "basic": 2, "bottleneck": 3}[name] + (cin != cout)
    if not CONV_BACKENDS.get(backend).fuses:
        assert calls == [] and compiled is block
    assert list(compiled.state_dict()) == list(ref.state_dict())  # the same names for the same tensors
    assert not any(isinstance(m, fused.Compiled) for m in block.modules())  # the original is unchanged


def test_a_block_that_is_not_a_chain_runs_unfused_layer_by_layer(monkeypatch):
    """A block whose residual is not a chain of convs (two parallel convs, summed) declares no
    fusion plan: fuse() leaves it to its own forward, each binary layer fused on its own, and the
    model's outputs stay the emulation's. Registered from this test module alone."""
    from bnnctl.workers.blocks import BLOCKS, Residual, GateConfig as Gate

    class ParallelBlock(Residual):
        def __init__(self, in_channels, out_channels, conv, *, stride=1, groups=1, gate=Gate(), project=None):
            super().__init__()
            self.left = conv(in_channels, out_channels, 3, stride, groups)
            self.right = conv(in_channels, out_channels, 1, stride, groups)
            self._init_skip(in_channels, out_channels, stride, groups, gate, project or conv)

        def residual(self, x):
            return self.left(x) + self.right(x)

    monkeypatch.setattr(BLOCKS, "_items", dict(BLOCKS._items))  # undone after the test
    BLOCKS.register("parallel")(ParallelBlock)
    ref, fast = _pair(ModelConfig(block="parallel", **HOURGLASS))
    x = torch.randn(1, 3, 32, 32)
    calls = _runs(monkeypatch)
    for a, b in zip(_outputs(fast, x), _outputs(ref, x)):
        assert torch.equal(a, b)
    assert not any(isinstance(m, fused.FusedBlock) for m in fast.modules())
    assert sum(isinstance(m, fused.FusedLayer) for m in fast.modules()) == _fusable_convs(ref)
    assert len(calls) == _fusable_convs(ref) > 0  # every binary layer in the kernel, one call each


def test_fuse_shares_the_parameters_and_leaves_a_float_model_alone():
    ref, fast = _pair(CASES["hourglass-1-stack"])
    assert fused.fuse(ref) is ref  # nothing fuses with the float backend
    assert list(fast.state_dict()) == list(ref.state_dict())
    built = build_model(ModelConfig(backend="xnor", **HOURGLASS)).eval()
    compiled = fused.fuse(built)
    assert compiled is not built and not any(isinstance(m, fused.Compiled) for m in built.modules())
    with torch.no_grad():  # a write to the original's weights is seen by the compiled copy
        for (_, a), (_, b) in zip(built.named_parameters(), compiled.named_parameters()):
            assert a is b
