import math

import pytest

from bnnctl.workers.binarize import BinarizeConfig
from bnnctl.workers.config import from_dict
from bnnctl.workers.errors import ConfigError
from bnnctl.workers.models import ModelConfig, build_model
from bnnctl.workers.schedules import LambdaSchedule, LambdaScheduler, quantizers, set_lambda


def test_schedule_values():
    lin = LambdaSchedule("linear", 1.0, 9.0, total=8)
    assert [lin.value(t) for t in (0, 2, 4, 8, 20)] == [1.0, 3.0, 5.0, 9.0, 9.0]
    exp = LambdaSchedule("exponential", 1.0, 100.0, total=10)
    assert math.isclose(exp.value(5), 10.0) and math.isclose(exp.value(10), 100.0)
    step = LambdaSchedule("step", 1.0, 1000.0, total=40, steps=4)
    assert [round(step.value(t), 6) for t in (0, 9, 10, 25, 39, 40)] == [1.0, 1.0, 10.0, 100.0, 1000.0, 1000.0]
    assert LambdaSchedule("constant", 3.0, 3.0).value(100) == 3.0
    # the total may come from the trainer
    assert LambdaSchedule("linear", 0.0 + 1.0, 3.0).value(1, total=2) == 2.0


@pytest.mark.parametrize("data,path", [
    ({"kind": "linear", "lambda_start": 10.0, "lambda_end": 1.0}, "schedule.lambda_end"),
    ({"kind": "linear", "lambda_start": -1.0}, "schedule.lambda_start"),
    ({"kind": "cosine"}, "schedule.kind"),
    ({"kind": "step", "steps": 1}, "schedule.steps"),
])
def test_bad_schedules_name_the_field(data, path):
    with pytest.raises(ConfigError) as err:
        from_dict(LambdaSchedule, data, "schedule")
    assert err.value.path == path


def test_scheduler_sets_the_lambda_buffers_of_a_model_and_of_one_group():
    cfg = ModelConfig(width=16, depth=1, stacks=2, num_outputs=2,
                      binarize=BinarizeConfig(quantizer="tanh", weight_quantizer="tanh"))
    model = build_model(cfg)
    scheduler = LambdaScheduler(model, LambdaSchedule("linear", 1.0, 5.0, total=4))
    assert all(float(q.lam) == 1.0 for q in quantizers(model))
    assert scheduler.step(2) == 3.0
    assert {float(q.lam) for q in quantizers(model)} == {3.0}
    groups = {q.group for q in quantizers(model)}
    assert {"stem", "stacks.0", "stacks.1"} <= groups
    n = set_lambda(model, 42.0, group="stacks.1")
    assert n == len(quantizers(model, "stacks.1")) > 0
    assert {float(q.lam) for q in quantizers(model, "stacks.0")} == {3.0}
    assert {float(q.lam) for q in quantizers(model, "stacks.1")} == {42.0}


def test_per_group_schedules_override_the_main_one_for_their_group():
    cfg = ModelConfig(width=16, depth=1, stacks=2, num_outputs=2, binarize=BinarizeConfig(quantizer="tanh"))
    model = build_model(cfg)
    late = LambdaSchedule("linear", 2.0, 50.0, total=4, group="stacks.1")
    scheduler = LambdaScheduler(model, LambdaSchedule("linear", 1.0, 5.0), total=4, groups=(late,))
    scheduler.step(2)
    assert {float(q.lam) for q in quantizers(model, "stacks.0")} == {3.0}
    assert {float(q.lam) for q in quantizers(model, "stem")} == {3.0}
    assert {float(q.lam) for q in quantizers(model, "stacks.1")} == {26.0}
    assert scheduler.per_group == {"stacks.1": 26.0} and scheduler.current == 3.0
    with pytest.raises(ConfigError, match="no quantizer in group 'stack.1'; groups of this model: stacks.0, stacks.1, stem"):
        LambdaScheduler(model, LambdaSchedule(), 4, (LambdaSchedule(group="stack.1"),))


def test_per_group_schedules_in_the_config_are_addressable_by_index_and_keep_old_identities():
    import dataclasses

    from bnnctl.orchestrator.plan import identity
    from bnnctl.workers.config import to_dict, with_overrides
    from bnnctl.workers.train import TrainConfig

    base = from_dict(TrainConfig, {"loss": "mse"})
    grouped = with_overrides(base, {"lambda_groups": [{"group": "stem", "kind": "linear", "lambda_end": 5.0}]})
    tuned = with_overrides(grouped, {"lambda_groups[0].lambda_end": 40.0})
    assert tuned.lambda_groups[0].lambda_end == 40.0 and tuned.lambda_groups[0].group == "stem"
    with pytest.raises(ConfigError, match=r"lambda_groups\[1\]: no item 1 \(the list has 1\)"):
        with_overrides(grouped, {"lambda_groups[1].lambda_end": 40.0})
    with pytest.raises(ConfigError, match="needs its `group`"):
        with_overrides(base, {"lambda_groups": [{"kind": "linear"}]})
    # a config without per-group schedules keeps the identity it had before the field existed
    import hashlib
    import json

    def before_later_fields(cfg):
        """The config as bnnctl 0.1 wrote it: without the fields added since (at their defaults)."""
        old = to_dict(cfg)
        for later in ("lambda_groups", "schedule_offset", "schedule_epochs", "deterministic",  # added since
                      "recalibrate_bn", "recalibrate_batches", "ranks", "sync_batchnorm",
                      "latency"):  # a run-only field, never part of an identity
            del old[later]
        del old["model"]["gate"]["init_range"], old["data"]["pose_layout"]  # nested fields added since
        del old["data"]["class_augment"]["crop"], old["data"]["class_augment"]["resize"]
        return old

    old = before_later_fields(base)
    payload = json.dumps({"config": old, "deps": []}, sort_keys=True)
    assert identity(base, ()) == hashlib.sha256(payload.encode()).hexdigest()[:20]
    assert identity(grouped, ()) != identity(base, ()) != identity(dataclasses.replace(base, seed=1), ())
    # a progressive schedule's identity says which meaning of the schedule trained it (lambda_end reached
    # at the last epoch since LAMBDA_RULE 2): old results are never reused under the new meaning
    progressive = with_overrides(base, {"lambda_schedule.kind": "linear", "lambda_schedule.lambda_end": 5.0})
    body = {"config": before_later_fields(progressive), "deps": [], "lambda_rule": 2}
    assert identity(progressive, ()) == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def test_results_of_a_changed_meaning_get_new_identities_and_no_other_does():
    """Each fix of the trainer's meaning (issue: techniques as the papers define them) enters the
    identity of exactly the variants whose results it changes."""
    from bnnctl.orchestrator.plan import identity, meaning_rules
    from bnnctl.workers.config import with_overrides
    from bnnctl.workers.train import TrainConfig

    base = from_dict(TrainConfig, {"loss": "bce", "epochs": 16, "optim": {"lr_steps": [12]}})
    assert meaning_rules(base) == {}
    tanh = {"model.binarize.quantizer": "tanh", "model.binarize.weight_quantizer": "tanh"}
    progressive = with_overrides(base, tanh)  # scale-free weights, BatchNorm re-estimated
    assert meaning_rules(progressive) == {"progressive_rule": 1}
    stage1 = with_overrides(progressive, {"model.binarize.weights": False, "epochs": 8, "schedule_epochs": 16})
    assert meaning_rules(stage1) == {"progressive_rule": 1}  # its activations are smooth
    real_stage1 = with_overrides(stage1, {"model.binarize.activations": False})
    assert meaning_rules(real_stage1) == {}  # nothing smooth, learning rate as before: the same result
    stage2 = with_overrides(base, {"epochs": 8, "schedule_offset": 8, "schedule_epochs": 16})
    assert meaning_rules(stage2) == {"lr_rule": 1}  # the drop at 12 now falls in its epoch 4
    late = with_overrides(stage2, {"optim.lr_steps": [40]})
    assert meaning_rules(late) == {}  # no drop inside it either way
    resnet = from_dict(TrainConfig, {"loss": "ce", "model": {"arch": "resnet18", "decomposition": {"kind": "holistic_tucker"}},
                                     "data": {"dataset": "imagenet"}})
    assert meaning_rules(resnet) == {"holistic_rule": 1}
    assert meaning_rules(with_overrides(base, {"distill.feature_weight": 1.0})) == {"feature_matching_rule": 1}
    keys = {identity(c, ()) for c in (base, progressive, stage2, late)}
    assert len(keys) == 4


def test_epoch_values_follow_the_trainers_rule():
    from bnnctl.workers.schedules import epoch_values

    assert epoch_values(LambdaSchedule("linear", 1.0, 4.0), 4) == [1.0, 2.0, 3.0, 4.0]  # the last epoch at lambda_end
    exp = epoch_values(LambdaSchedule("exponential", 1.0, 100.0), 3)
    assert exp == [1.0, pytest.approx(10.0), pytest.approx(100.0)]
    assert epoch_values(LambdaSchedule("constant", 2.0, 2.0), 5) == [2.0] * 5
    steps = epoch_values(LambdaSchedule("linear", 1.0, 2.0, unit="step"), 4, steps_per_epoch=10)
    assert steps == [1.0 + k * 10 / 39 for k in range(4)]  # each epoch's first step of 40
    assert epoch_values(LambdaSchedule("linear", 1.0, 2.0), 1) == [1.0]
