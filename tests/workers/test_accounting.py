from torch import nn

from bnnctl.workers.accounting import account
from bnnctl.workers.binarize import BinarizeConfig
from bnnctl.workers.layers import ActivationConfig, BinaryConv2d
from bnnctl.workers.models import ModelConfig, build_model
from bnnctl.workers.reparam import DecompositionConfig, apply_decomposition


class Tiny(nn.Module):
    def __init__(self, binarize):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1, bias=False)          # 3*4*9 = 108 params
        self.mid = BinaryConv2d(4, 8, 3, stride=2, binarize=binarize,   # 8*4*9 = 288 weights
                                activation=ActivationConfig("prelu"))   # BN 8 + PReLU 1 (+ alpha 8)
        self.last = nn.Conv2d(8, 2, 1)                                  # 16 + 2 params

    def forward(self, x):
        return self.last(self.mid(self.first(x)))


def test_hand_computed_counts_binary():
    acc = account(Tiny(BinarizeConfig()), 10)
    # first: 10x10x4 outputs x 27 MACs; mid: 5x5x8 outputs x 36 binary MACs; last: 5x5x2 x 8 MACs
    assert acc.flops == 10 * 10 * 4 * 27 + 5 * 5 * 2 * 8
    assert acc.bops == 5 * 5 * 8 * 36
    assert acc.binary_params == 288
    assert acc.real_params == 108 + 8 + 1 + 8 + 18  # first, BN affine, PReLU, analytic alpha, last
    assert acc.trained_params == 108 + 288 + 8 + 1 + 18
    bn_stats = 2 * 4
    assert acc.trained_bytes == 4 * (acc.trained_params + bn_stats)
    assert acc.deployed_bytes == 288 // 8 + 4 * (acc.real_params + bn_stats)
    assert [r.kind for r in acc.layers] == ["real", "binary", "real"]


def test_hand_computed_counts_real_and_stage1():
    real = account(Tiny(BinarizeConfig.real()), 10)
    assert real.bops == 0 and real.binary_params == 0
    assert real.flops == 10 * 10 * 4 * 27 + 5 * 5 * 8 * 36 + 5 * 5 * 2 * 8
    assert real.deployed_bytes == real.trained_bytes
    stage1 = account(Tiny(BinarizeConfig(activations=True, weights=False)), 10)
    assert stage1.bops == 0 and stage1.layers[1].kind == "binary-act"


def test_decomposition_changes_trained_but_not_deployed_counts():
    base = Tiny(BinarizeConfig())
    plain = account(base, 10)
    apply_decomposition(base, DecompositionConfig("svd"))
    svd = account(base, 10)
    # SVD of the 8 x 36 matrix at full rank: U 8x8, S 8, V 36x8
    assert svd.trained_params == plain.trained_params - 288 + 64 + 8 + 288
    assert (svd.binary_params, svd.real_params, svd.bops) == (plain.binary_params, plain.real_params, plain.bops)


def test_binary_layers_deploy_about_32x_smaller():
    acc = account(build_model(ModelConfig()), 64)
    assert 20 < acc.compression < 32
    assert acc.ops < acc.flops + acc.bops
