import pytest

from bnnctl.workers.config import from_dict, to_dict, with_overrides
from bnnctl.workers.errors import ConfigError, UnknownNameError
from bnnctl.workers.models import ModelConfig


def test_round_trip_and_overrides():
    cfg = from_dict(ModelConfig, {"arch": "resnet18", "activation": {"kind": "leaky_relu", "slope": 0.2}})
    assert cfg.activation.negative_slope == 0.2
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    new = with_overrides(cfg, {"activation.kind": "prelu", "decomposition.kind": "svd", "width": 8})
    assert (new.activation.kind, new.decomposition.kind, new.width) == ("prelu", "svd", 8)
    assert cfg.activation.kind == "leaky_relu"  # frozen: the original is unchanged


@pytest.mark.parametrize("data,path,words", [
    ({"archh": "x"}, "model.archh", "unknown key"),
    ({"width": "wide"}, "model.width", "expected an integer"),
    ({"width": 2}, "model.width", "at least 4"),
    ({"stacks": True}, "model.stacks", "expected an integer"),
    ({"binarize": {"alpha": "median"}}, "model.binarize.alpha", "valid names: analytic, learned, none"),
    ({"binarize": {"activations": "yes"}}, "model.binarize.activations", "boolean"),
    ({"decomposition": {"rank": 1.5}}, "model.decomposition.rank", "(0, 1]"),
    ({"gate": {"kind": "sigmoid"}}, "model.gate.kind", "valid names: channel, identity, scalar"),
    ({"activation": "prelu"}, "model.activation", "mapping"),
    ({"merge_groups": 3}, "model.merge_groups", "1 or 2"),
])
def test_errors_name_the_dotted_path(data, path, words):
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, data, "model")
    assert err.value.path == path
    assert words in str(err.value)


@pytest.mark.parametrize("data,kind,valid", [
    ({"arch": "vgg"}, "model", "alexnet, hourglass, resnet18, unet_hourglass"),
    ({"block": "dense"}, "block", "basic, bottleneck, hpm"),
    ({"activation": {"kind": "gelu"}}, "activation", "leaky_relu, none, prelu, relu"),
    ({"backend": "xnor9"}, "conv backend", "auto, float, xnor"),
])
def test_unknown_names_list_the_valid_ones(data, kind, valid):
    with pytest.raises(UnknownNameError) as err:
        from_dict(ModelConfig, data, "model")
    assert f"unknown {kind}" in str(err.value) and f"valid names: {valid}" in str(err.value)


def test_unknown_decomposition_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="decomposition.kind: unknown decomposition 'cp'; valid names: holistic_tucker, none, svd, tucker"):
        from_dict(ModelConfig, {"decomposition": {"kind": "cp"}})


def test_override_of_a_missing_path_is_an_error():
    with pytest.raises(ConfigError) as err:
        with_overrides(ModelConfig(), {"activation.colour": 1}, "model")
    assert err.value.path == "model.activation.colour"
