import pytest
import torch

from bnnctl.workers.binarize import BinarizeConfig
from bnnctl.workers.diagnostics import FlipTracker, clip_fractions
from bnnctl.workers.models import ModelConfig, build_model


def _model(**kw):
    return build_model(ModelConfig(width=16, depth=1, num_outputs=2, **kw))


def test_flip_ratio_counts_sign_changes_since_last_evaluation():
    model = _model()
    tracker = FlipTracker(model)
    layer = model.stem[3].conv1
    w = layer.weight_source.weight
    flat = w.data.view(-1)
    negative = int(next(i for i in range(10, flat.numel()) if flat[i] < 0))
    with torch.no_grad():
        flat[:10] *= -1
        flat[negative] = 0.0  # a negative weight set to 0 flips too: sign(0) = +1
    ratios = tracker.update()
    assert ratios["stem.3.conv1"] == pytest.approx(11 / w.numel())
    assert all(v == 0.0 for k, v in ratios.items() if k != "stem.3.conv1")
    assert tracker.update()["stem.3.conv1"] == 0.0  # nothing changed since


def test_clip_fraction():
    model = _model(binarize=BinarizeConfig(quantizer="tanh"))
    layer = model.stem[3].conv2
    w = layer.weight_source.weight
    with torch.no_grad():
        w.zero_()
        w.flatten()[: w.numel() // 4] = 2.0
    assert clip_fractions(model)["stem.3.conv2"] == (w.numel() // 4) / w.numel()
