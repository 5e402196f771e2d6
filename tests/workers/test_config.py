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


def _parsed_again(cfg, overrides: dict):
    """The definition with_overrides keeps: the whole config as data, the overrides written into it,
    parsed again from scratch."""
    from bnnctl.workers.config import path_steps

    data = to_dict(cfg)
    for dotted, value in overrides.items():
        *head, last = path_steps(dotted)
        node = data
        for step in head:
            node = node[step]
        node[last] = to_dict(value)
    return from_dict(type(cfg), data)


def test_overrides_equal_parsing_the_edited_data_for_every_shipped_row():
    """with_overrides rebuilds only the sections on an override's path: every row of every shipped
    study gives the config that parsing the whole edited config from data gives, and the base is
    left untouched (nothing it holds was edited in place)."""
    from pathlib import Path

    from bnnctl.orchestrator.yamlio import read_yaml
    from bnnctl.workers.train.config import TrainConfig

    rows = 0
    for f in sorted(Path(__file__).resolve().parents[2].joinpath("studies").glob("*.yaml")):
        spec = read_yaml(f)[0]  # the specs' own reader (YAML 1.2 numbers: 1e-3 is a number)
        if "ablations" not in spec:
            continue
        base = from_dict(TrainConfig, {k: v for k, v in spec["base"].items() if k != "ranks"})
        before = to_dict(base)
        sets = [t.get("set") or {} for t in (spec.get("teachers") or {}).values()]
        for ab in spec["ablations"]:
            so_far: dict = {}
            for row in ab.get("rows") or []:
                so_far = {**so_far, **(row.get("set") or {})}  # an incremental table's rows add up
                sets += [row.get("set") or {}, so_far]
        for overrides in sets:
            if not overrides:
                continue
            try:
                expected = _parsed_again(base, overrides)
            except ConfigError:
                continue  # a combination that is not valid on its own (its table's base makes it so)
            assert with_overrides(base, overrides) == expected, (f.name, overrides)
            rows += 1
        assert to_dict(base) == before
    assert rows >= 20  # the check covered the shipped tables


def test_overrides_of_list_items_and_mappings_leave_the_original_alone():
    from bnnctl.workers.train.config import TrainConfig

    base = from_dict(TrainConfig, {"optim": {"lr_steps": [4, 8]}, "lambda_groups": [{"group": "stem", "lambda_end": 10}]})
    before = to_dict(base)
    changed = with_overrides(base, {"optim.lr_steps[1]": 9, "lambda_groups[0].lambda_end": 50, "optim.lr": 0.5})
    assert changed.optim.lr_steps == (4, 9) and changed.lambda_groups[0].lambda_end == 50 and changed.optim.lr == 0.5
    assert to_dict(base) == before and changed == _parsed_again(base, {"optim.lr_steps[1]": 9,
                                                                       "lambda_groups[0].lambda_end": 50,
                                                                       "optim.lr": 0.5})
    with pytest.raises(ConfigError) as err:
        with_overrides(base, {"optim.lr_steps[5]": 1})
    assert err.value.path == "optim.lr_steps[5]"
