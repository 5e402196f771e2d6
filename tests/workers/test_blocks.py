import pytest
import torch

from bnnctl.workers.binarize import BinarizeConfig
from bnnctl.workers.blocks import BLOCKS, GateConfig, HPMBlock, make_block
from bnnctl.workers.errors import UnknownNameError
from bnnctl.workers.layers import ActivationConfig, BinaryConv2d, ConvFactory

CONV = ConvFactory(BinarizeConfig(), ActivationConfig("prelu"))


def test_hpm_block_splits_channels_half_quarter_quarter_and_concatenates():
    block = HPMBlock(32, 32, CONV).eval()
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in (block.conv1, block.conv2, block.conv3)] == [
        (32, 16, 3), (16, 8, 3), (8, 8, 3)]
    assert block.proj is None
    x = torch.randn(2, 32, 8, 8)
    a = block.conv1(x)
    b = block.conv2(a)
    c = block.conv3(b)
    assert torch.equal(block(x), torch.cat((a, b, c), 1) + x)


@pytest.mark.parametrize("name", BLOCKS.names())
def test_projection_when_shape_changes(name):
    block = make_block(name, 8, 16, CONV, stride=2).eval()
    assert isinstance(block.proj, BinaryConv2d) and block.proj.kernel_size == 1 and block.proj.stride == 2
    assert block.proj.act.__class__.__name__ == "Identity"  # a linear projection
    assert block(torch.randn(1, 8, 8, 8)).shape == (1, 16, 4, 4)


@pytest.mark.parametrize("name", BLOCKS.names())
@pytest.mark.parametrize("kind,size", [("scalar", 1), ("channel", 16)])
def test_soft_gate_scales_the_skip_path(name, kind, size):
    block = make_block(name, 16, 16, CONV, gate=GateConfig(kind, init=0.5)).eval()
    assert block.gate.gate.shape == (1, size, 1, 1) and block.gate.gate.requires_grad
    x = torch.randn(2, 16, 6, 6)
    residual = block.residual(x)
    assert torch.allclose(block(x), residual + 0.5 * x)
    with torch.no_grad():
        block.gate.gate.zero_()
    assert torch.equal(block(x), residual)


def test_fixed_gate_is_not_trained():
    block = make_block("basic", 8, 8, CONV, gate=GateConfig("channel", init=0.3, trainable=False))
    assert "gate.gate" not in dict(block.named_parameters())
    assert "gate.gate" in block.state_dict()


def test_grouped_first_conv():
    block = make_block("hpm", 16, 8, CONV, groups=2)
    assert block.conv1.groups == 2 and block.proj.groups == 2
    assert block.conv1.weight_shape == (4, 8, 3, 3)


def test_unknown_block_lists_valid_names():
    with pytest.raises(UnknownNameError, match="unknown block 'dense'; valid names: basic, bottleneck, hpm"):
        make_block("dense", 8, 8, CONV)
