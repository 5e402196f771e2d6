"""The variant trainer, end to end on tiny configurations of the embedded data sets."""
import dataclasses

import numpy as np
import pytest
import torch

from bnnctl.workers.binarize import BinarizeConfig
from bnnctl.workers.config import from_dict
from bnnctl.workers.data.synthetic import SyntheticConfig
from bnnctl.workers.errors import ConfigError, TrainingError
from bnnctl.workers.layers import binary_layers
from bnnctl.workers.models import ModelConfig
from bnnctl.workers.schedules import LambdaSchedule
from bnnctl.workers.train import DataConfig, DistillConfig, LocalReporter, OptimConfig, TrainConfig, run_variant
from bnnctl.workers.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data") / "synthetic")


def tiny(root, **kw):
    base = dict(
        model=ModelConfig(width=16, depth=2),
        data=DataConfig(root=root, synthetic=SyntheticConfig(train=48, valid=16), input_size=32),
        optim=OptimConfig(lr=2e-3), epochs=3, batch_size=8, loss="mse", threads=1, seed=1,
        latency=False,  # measured in the latency tests below (about a second per run)
    )
    base.update(kw)
    return TrainConfig(**base)


def test_short_training_lowers_the_loss(synth_root, tmp_path):
    rep = LocalReporter(tmp_path / "ck")
    result = run_variant(tiny(synth_root, epochs=4, model=ModelConfig(width=16, depth=2).real()), rep)
    losses = [m["train_loss"] for _, m in rep.history]
    assert losses[-1] < 0.7 * losses[0]
    assert result.status == "completed" and result.epochs_done == 4
    assert set(result.per_joint) >= {"r_ankle", "head_top"} and 0 <= result.metrics["pckh"] <= 100
    assert result.accounting["binary_params"] == 0 and result.accounting["params"] > 0
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt["epoch"] == 4 and ckpt["config"]["epochs"] == 4
    from PIL import Image

    from bnnctl.workers.train.tasks import CENTRE_COLOUR, LEFT_COLOUR, RIGHT_COLOUR, TRUTH_COLOUR

    with Image.open(result.predictions_image) as im:  # predictions drawn on 8 validation crops, a legend under them
        assert im.size[0] == 8 * 128 and 128 + 10 <= im.size[1] <= 128 + 40
        legend = im.crop((0, 128, im.size[0], im.size[1])).convert("RGB")
        colours = {c for _, c in legend.getcolors(1 << 16)}
        assert {LEFT_COLOUR, RIGHT_COLOUR, CENTRE_COLOUR, TRUTH_COLOUR} <= colours
        crops = im.crop((0, 0, im.size[0], 128)).convert("RGB")
        # every labeled true joint is a white ring: the pixel 3 to the right of its centre, in some crop
        assert sum(n for n, c in crops.getcolors(1 << 20) if c == TRUTH_COLOUR) > 8 * 4


def test_stop_and_resume_ends_exactly_like_an_uninterrupted_run(synth_root, tmp_path):
    cfg = tiny(synth_root, model=ModelConfig(width=16, depth=2, binarize=BinarizeConfig(quantizer="tanh", alpha="learned")),
               lambda_schedule=LambdaSchedule("linear", 1.0, 20.0))
    full = run_variant(cfg, LocalReporter(tmp_path / "full"))
    first_rep = LocalReporter(tmp_path / "split", stop_after=1)
    first = run_variant(cfg, first_rep)
    assert first.status == "stopped" and first.epochs_done == 1
    resumed_rep = LocalReporter(tmp_path / "split")
    resumed = run_variant(cfg, resumed_rep)
    assert [e for e, _ in resumed_rep.history] == [2, 3]  # only the missing epochs ran
    # the epoch the first attempt reported is said again (a crashed driver may never have got it)
    ((epoch, said),) = resumed_rep.restored_history
    ((_, reported),) = first_rep.history
    assert epoch == 1 and said == reported and said["pckh"] == load_checkpoint(full.last_checkpoint)["history"][0][1]["pckh"]
    assert resumed.status == "completed"
    for key in ("pckh", "val_loss", "train_loss", "pckh_approx", "lambda"):
        assert resumed.metrics[key] == full.metrics[key], key
    a = load_checkpoint(full.last_checkpoint)["model"]
    b = load_checkpoint(resumed.last_checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_per_group_lambda_schedules_are_reported_each_epoch(synth_root, tmp_path):
    cfg = tiny(synth_root, epochs=2, model=ModelConfig(width=16, depth=2, binarize=BinarizeConfig(quantizer="tanh")),
               lambda_schedule=LambdaSchedule("linear", 1.0, 3.0),
               lambda_groups=(LambdaSchedule("exponential", 2.0, 200.0, group="stem"),))
    rep = LocalReporter(tmp_path / "ck")
    run_variant(cfg, rep)
    # lambda during epoch e (0-based) is the schedule at t = e; the last epoch runs at lambda_end
    assert [(m["lambda"], m["lambda/stem"]) for _, m in rep.history] == [(1.0, 2.0), (3.0, 200.0)]


def test_lambda_runs_over_both_stages_of_a_row_and_ends_at_lambda_end(synth_root, tmp_path):
    """A two-stage row of 4 epochs (2 + 2): stage 2 continues stage 1's schedule."""
    model = ModelConfig(width=16, depth=2, binarize=BinarizeConfig(quantizer="tanh"))
    schedule = LambdaSchedule("linear", 1.0, 20.0)
    stage1 = tiny(synth_root, epochs=2, schedule_epochs=4, lambda_schedule=schedule,
                  model=dataclasses.replace(model, binarize=BinarizeConfig(quantizer="tanh", weights=False)))
    first = LocalReporter(tmp_path / "s1")
    done1 = run_variant(stage1, first)
    stage2 = tiny(synth_root, epochs=2, schedule_offset=2, schedule_epochs=4, lambda_schedule=schedule, model=model,
                  init_from=done1.last_checkpoint)
    second = LocalReporter(tmp_path / "s2")
    run_variant(stage2, second)
    lambdas = [m["lambda"] for _, m in first.history + second.history]
    assert lambdas == pytest.approx([1.0, 1.0 + 19 / 3, 1.0 + 38 / 3, 20.0])


def test_best_metrics_are_each_values_best_epoch(synth_root, tmp_path):
    rep = LocalReporter(tmp_path / "ck")
    result = run_variant(tiny(synth_root, epochs=3), rep)
    pckh = [m["pckh"] for _, m in rep.history]
    losses = [m["val_loss"] for _, m in rep.history]
    assert result.best_metrics["pckh"] == max(pckh) and result.best_epochs["pckh"] == pckh.index(max(pckh)) + 1
    assert result.best_metrics["val_loss"] == min(losses)  # lower is better for losses
    assert result.best_metrics["pckh"] == result.best_metric


def test_a_resumed_finished_run_trains_nothing(synth_root, tmp_path):
    cfg = tiny(synth_root, epochs=1)
    first = run_variant(cfg, LocalReporter(tmp_path / "ck"))
    rep = LocalReporter(tmp_path / "ck")
    again = run_variant(cfg, rep)
    assert rep.history == [] and again.metrics["pckh"] == first.metrics["pckh"]
    assert [(e, m["pckh"]) for e, m in rep.restored_history] == [(1, first.metrics["pckh"])]


def test_checkpoint_of_another_config_is_refused(synth_root, tmp_path):
    run_variant(tiny(synth_root, epochs=1), LocalReporter(tmp_path / "ck"))
    with pytest.raises(TrainingError, match="different configuration"):
        run_variant(tiny(synth_root, epochs=2, seed=5), LocalReporter(tmp_path / "ck"))


def test_nan_loss_fails_with_a_reason_and_no_result(synth_root, tmp_path):
    cfg = tiny(synth_root, optim=OptimConfig(name="sgd", lr=1e30), model=ModelConfig(width=16, depth=2).real())
    with pytest.raises(TrainingError) as err:
        run_variant(cfg, LocalReporter(tmp_path / "ck"))
    assert err.value.reason == "nan_loss" and "epoch 1" in str(err.value)
    assert not (tmp_path / "ck" / "best.pt").exists()


def test_reverse_order_initialization_stage2_starts_from_stage1(synth_root, tmp_path):
    stage1_model = ModelConfig(width=16, depth=2, binarize=BinarizeConfig(weights=False))
    stage1 = run_variant(tiny(synth_root, epochs=1, model=stage1_model), LocalReporter(tmp_path / "s1"))
    state1 = load_checkpoint(stage1.last_checkpoint)["model"]
    cfg2 = tiny(synth_root, epochs=1, init_from=stage1.last_checkpoint,
                model=ModelConfig(width=16, depth=2, binarize=BinarizeConfig(alpha="learned")), optim=OptimConfig(lr=1e-12))
    stage2 = run_variant(cfg2, LocalReporter(tmp_path / "s2"))
    state2 = load_checkpoint(stage2.last_checkpoint)["model"]
    latent = [k for k in state1 if k.endswith("weight_source.weight")]
    assert latent and all(torch.allclose(state1[k], state2[k], atol=1e-6) for k in latent)
    assert any(k.endswith("alpha.value") for k in state2)
    assert stage2.accounting["binary_params"] > 0 and stage1.accounting["binary_params"] == 0


def test_distillation_uses_the_teacher(synth_root, tmp_path):
    teacher = run_variant(tiny(synth_root, epochs=1, model=ModelConfig(width=16, depth=2).real(), loss="bce"),
                          LocalReporter(tmp_path / "teacher"))
    base = tiny(synth_root, epochs=1)
    plain = run_variant(base, LocalReporter(tmp_path / "plain"))
    zero = run_variant(dataclasses.replace(base, distill=DistillConfig(teacher=teacher.best_checkpoint, weight=0.0)),
                       LocalReporter(tmp_path / "zero"))
    half = run_variant(dataclasses.replace(base, distill=DistillConfig(teacher=teacher.best_checkpoint, weight=0.5,
                                                                        feature_weight=1.0)),
                       LocalReporter(tmp_path / "half"))
    assert zero.metrics["train_loss"] == plain.metrics["train_loss"]  # weight 0 = no distillation
    assert half.metrics["train_loss"] != plain.metrics["train_loss"]
    with pytest.raises(TrainingError, match="checkpoint not found"):
        run_variant(dataclasses.replace(base, distill=DistillConfig(teacher=str(tmp_path / "nope.pt"))),
                    LocalReporter(tmp_path / "x"))


def test_classification_on_the_embedded_digits(tmp_path):
    cfg = TrainConfig(model=ModelConfig(arch="resnet18", width=8),
                      data=DataConfig(dataset="digits", root=str(tmp_path / "digits"), input_size=32,
                                      train_limit=600, val_limit=200),
                      optim=OptimConfig(name="adam", lr=3e-3), epochs=3, batch_size=32, loss="ce", threads=1)
    rep = LocalReporter(tmp_path / "ck")
    result = run_variant(cfg, rep)
    assert result.metric == "top1" and result.metrics["top5"] >= result.metrics["top1"]
    assert result.metrics["top1"] > 25.0  # chance is 10%
    assert rep.history[-1][1]["train_loss"] < rep.history[0][1]["train_loss"]


def test_config_mismatches_are_config_errors():
    with pytest.raises(ConfigError, match="is a pose dataset but model 'resnet18'"):
        TrainConfig(model=ModelConfig(arch="resnet18"))
    with pytest.raises(ConfigError, match="use one of ce"):
        TrainConfig(model=ModelConfig(arch="resnet18"), data=DataConfig(dataset="digits"), loss="bce")
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"optim": {"lr": -1}})
    assert err.value.path == "optim.lr"


def test_a_result_round_trips_through_plain_data(synth_root, tmp_path):
    import json

    from bnnctl.workers.train import TrainResult

    result = run_variant(tiny(synth_root, epochs=1), LocalReporter(tmp_path / "ck"))
    data = json.loads(json.dumps(result.to_dict()))  # as the store and MLflow keep it
    assert TrainResult.from_dict(data) == result
    old = {k: v for k, v in data.items() if k not in ("best_metrics", "best_epochs", "environment")}
    assert TrainResult.from_dict(old).best_metrics == {}  # a result stored before those fields existed


def test_a_finished_run_measures_its_deployed_latency_unless_switched_off(synth_root, tmp_path):
    """Binary and float latency of the deployed model (batch 1, one thread) on this machine; the
    switch is not part of the run's identity (a resumed run with it off trains nothing)."""
    result = run_variant(tiny(synth_root, epochs=1, latency=True), LocalReporter(tmp_path / "a"))
    lat = result.latency
    # the speed-up is the ratio of the measured times, rounded to 0.01; the times are shown rounded to
    # 0.001 ms, so their ratio may differ from it by the rounding (6.309 / 2.997 = 2.105 next to 2.10)
    assert lat["binary_ms"] > 0 and lat["float_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["float_ms"] / lat["binary_ms"], abs=0.006)
    assert lat["speedup"] == round(lat["speedup"], 2)
    assert lat["threads"] == 1 and lat["batch"] == 1 and lat["input"] == 32 and "(" in lat["machine"]
    rep = LocalReporter(tmp_path / "a")
    again = run_variant(tiny(synth_root, epochs=1, latency=False), rep)
    assert rep.history == [] and again.latency == {}  # the same run, finished: nothing retrained
    from bnnctl.orchestrator.plan import identity

    assert identity(tiny(synth_root, latency=True), ()) == identity(tiny(synth_root, latency=False), ())


def test_a_real_valued_network_reports_its_latency_without_a_speed_up(synth_root, tmp_path):
    result = run_variant(tiny(synth_root, epochs=1, latency=True, model=ModelConfig(width=16, depth=2).real()),
                         LocalReporter(tmp_path / "r"))
    assert result.latency["binary_ms"] > 0 and result.latency["float_ms"] is None and result.latency["speedup"] is None
    assert result.latency["binary_layers"] is False


def test_a_failed_latency_measurement_keeps_the_trained_result(synth_root, tmp_path, monkeypatch):
    from bnnctl.workers.train import loop

    def broken(*args, **kwargs):
        raise ArithmeticError("the binary model's outputs differ from the float model's")

    monkeypatch.setattr(loop, "measure_latency", broken)
    result = run_variant(tiny(synth_root, epochs=1, latency=True), LocalReporter(tmp_path / "f"))
    assert result.status == "completed" and result.metrics["pckh"] >= 0
    assert result.latency == {"error": "ArithmeticError: the binary model's outputs differ from the float model's"}


def test_measuring_the_latency_leaves_the_random_state_alone():
    from bnnctl.workers.latency import measure
    from bnnctl.workers.models import build_model

    cfg = ModelConfig(width=8, depth=2)
    model = build_model(cfg)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    measure(model, cfg, 32, repeats=1, rounds=1)
    assert torch.equal(torch.get_rng_state(), before)


def _progressive(root, **kw):
    model = ModelConfig(width=16, depth=2, binarize=BinarizeConfig(quantizer="tanh", weight_quantizer="tanh"))
    return tiny(root, model=model, lambda_schedule=LambdaSchedule("exponential", 1.0, 20.0), **kw)


@pytest.mark.slow
def test_progressive_weights_end_binary_and_the_diagnostics_say_so(synth_root, tmp_path):
    """At the end of the lambda schedule the trained network is the binary one: >= 99% of the binary
    weights have |lambda W / mean|W|| >= 3 (|tanh| > 0.995); every epoch reports how far the smooth
    network still is from sign (weights, activations) and the gap between its metric and sign's."""
    from bnnctl.workers.diagnostics import soft_weight_fraction
    from bnnctl.workers.train.checkpoint import model_from_checkpoint

    rep = LocalReporter(tmp_path / "ck")
    result = run_variant(_progressive(synth_root, epochs=8, batch_size=4), rep)
    for _, m in rep.history:
        assert {"soft_weights", "soft_activations", "smooth_gap", "pckh_approx"} <= set(m)
        assert m["smooth_gap"] == pytest.approx(m["pckh_approx"] - m["pckh"])
        assert 0 <= m["soft_weights"] <= 1 and 0 <= m["soft_activations"] <= 1
    soft = [m["soft_weights"] for _, m in rep.history]
    assert soft[0] > 0.3 and soft[-1] < 0.01  # lambda 1 -> 20 on the scale-free argument
    model, _, _ = model_from_checkpoint(result.last_checkpoint)
    assert float(model.stem[3].conv1.weight_quantizer.lam) == 20.0
    assert soft_weight_fraction(model, bound=3.0) <= 0.01
    # the same schedule on the raw latent weights (tanh(lambda W), |W| ~ 0.1) would leave most of them soft
    raw = [layer.latent_weight().detach() for _, layer in binary_layers(model) if layer.binary_weights]
    assert sum(int((20 * w).abs().lt(3).sum()) for w in raw) / sum(w.numel() for w in raw) > 0.5


def test_batchnorm_statistics_are_those_of_the_sign_forward(synth_root):
    """The re-estimated running statistics are the equal-weight average of the batch statistics of the
    exact (sign) forward over the calibration batches."""
    from bnnctl.workers.models import build_model
    from bnnctl.workers.train.bnstats import batchnorms, recalibrate_batchnorm

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=16, depth=2, binarize=BinarizeConfig(quantizer="tanh", weight_quantizer="tanh")))
    model.train()
    inputs = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    bn = model.stacks[0].hourglass.levels[1][2][0].conv2.bn  # deep in the network: after many sign layers
    seen = []
    hook = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().mean(dim=(0, 2, 3))))
    with torch.no_grad():  # reference: batch statistics everywhere, every quantizer exact
        for m in model.modules():
            if hasattr(m, "lam"):
                m.eval()
        for x in inputs:
            model(x)
    model.train()
    smooth_seen = len(seen)
    with torch.no_grad():
        model(inputs[0])  # the smooth forward sees other statistics
    smooth_mean = seen.pop()
    assert recalibrate_batchnorm(model, inputs) == 3
    hook.remove()
    expected = torch.stack(seen[:smooth_seen]).mean(0)
    assert torch.allclose(bn.running_mean, expected, atol=1e-5)
    assert not torch.allclose(bn.running_mean, smooth_mean, atol=1e-2)
    assert model.training and all(m.momentum == 0.1 for m in batchnorms(model))  # left as it was


def test_the_evaluated_network_is_the_deployed_one(synth_root, tmp_path):
    """After progressive training the checkpoint's network (BatchNorm statistics re-estimated with the
    sign forward) is what the export deploys: identical outputs, and the metric the run reported."""
    from bnnctl.workers.export import export_model, load_exported
    from bnnctl.workers.train.checkpoint import model_from_checkpoint
    from bnnctl.workers.train.tasks import make_task

    cfg = _progressive(synth_root, epochs=3)
    assert cfg.recalibrates and not dataclasses.replace(cfg, recalibrate_bn=False).recalibrates
    result = run_variant(cfg, LocalReporter(tmp_path / "ck"))
    trained, model_cfg, _ = model_from_checkpoint(result.last_checkpoint)
    export_model(model_from_checkpoint(result.last_checkpoint)[0], model_cfg, tmp_path / "m.bnn")
    task = make_task(cfg)
    for backend in ("float", "auto"):
        deployed = load_exported(tmp_path / "m.bnn", backend=backend)
        images = torch.stack([task.val_set[i]["image"] for i in range(8)])
        with torch.no_grad():
            assert torch.equal(deployed(images)[-1], trained(images)[-1]), backend
        from bnnctl.workers.train.loop import _loader

        metrics = task.evaluate(deployed, _loader(task.val_set, cfg, False), torch.device("cpu"))
        assert metrics["pckh"] == result.metrics["pckh"], backend
    # without the re-estimation the statistics are the smooth forward's: another network
    plain = run_variant(dataclasses.replace(cfg, recalibrate_bn=False), LocalReporter(tmp_path / "plain"))
    a = load_checkpoint(result.last_checkpoint)["model"]
    b = load_checkpoint(plain.last_checkpoint)["model"]
    means = [k for k in a if k.endswith("running_mean")]
    assert any(not torch.allclose(a[k], b[k]) for k in means)


def test_a_two_stage_row_follows_the_single_stage_learning_rate(synth_root, tmp_path):
    """IT §4.2's schedule over the whole budget: a 2 + 2 epoch reverse-order row drops the learning
    rate at epoch 3 of its budget, in its stage 2, like the 4-epoch one-stage row (from the
    per-epoch history the runs report)."""
    optim = OptimConfig(lr=2e-3, lr_steps=(1, 3))
    single_rep = LocalReporter(tmp_path / "single")
    run_variant(tiny(synth_root, epochs=4, optim=optim), single_rep)
    s1_rep, s2_rep = LocalReporter(tmp_path / "s1"), LocalReporter(tmp_path / "s2")
    stage1 = run_variant(tiny(synth_root, epochs=2, schedule_epochs=4, optim=optim,
                              model=ModelConfig(width=16, depth=2, binarize=BinarizeConfig(weights=False))), s1_rep)
    run_variant(tiny(synth_root, epochs=2, schedule_offset=2, schedule_epochs=4, optim=optim,
                     init_from=stage1.last_checkpoint), s2_rep)
    single = [m["lr"] for _, m in single_rep.history]
    assert single == pytest.approx([2e-3, 2e-4, 2e-4, 2e-5])
    assert [m["lr"] for _, m in s1_rep.history + s2_rep.history] == single


def test_lsp_in_mpii_layout_fine_tunes_an_mpii_network(synth_root, tmp_path):
    """SG's LSP protocol: a network trained on MPII's 16 joints (here the synthetic set) is fine-tuned
    on LSP read in MPII's layout, scored by PCK@0.2 on LSP's 14 joints."""
    from PIL import Image
    from scipy.io import savemat

    root = tmp_path / "lsp"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 1006  # 1,000 train + 6 test
    joints = np.concatenate([rng.uniform(8, 40, (2, 14, n)), np.zeros((1, 14, n))])
    savemat(root / "joints.mat", {"joints": joints})
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / "images" / f"im{i + 1:04d}.jpg")
    mpii = run_variant(tiny(synth_root, epochs=1), LocalReporter(tmp_path / "mpii"))
    cfg = tiny(str(root), epochs=1, data=DataConfig(dataset="lsp", root=str(root), pose_layout="mpii16", input_size=32),
               init_from=mpii.last_checkpoint, max_batches=2)
    rep = LocalReporter(tmp_path / "lsp-ck")
    result = run_variant(cfg, rep)
    assert result.metric == "pck" and 0 <= result.metrics["pck"] <= 100
    from bnnctl.workers.data.pose import LSP_JOINTS

    assert list(result.per_joint) == list(LSP_JOINTS)  # scored on LSP's own 14
    assert load_checkpoint(result.last_checkpoint)["model"]["stacks.0.head.weight"].shape[0] == 16
    with pytest.raises(ConfigError, match="mpii16"):
        DataConfig(dataset="mpii", pose_layout="mpii16")


def test_the_best_checkpoint_is_the_last_ones_file_until_a_later_epoch_replaces_it(tmp_path):
    """One copy on disk while the best epoch is the last one; the best survives the next epoch."""
    from bnnctl.workers.train.checkpoint import load_checkpoint, save_checkpoint, share_checkpoint

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint(last, {"model": {}, "epoch": 1})
    share_checkpoint(last, best, {"model": {}, "epoch": 1})
    assert last.stat().st_ino == best.stat().st_ino and best.stat().st_nlink == 2
    save_checkpoint(last, {"model": {}, "epoch": 2})  # no better: last.pt is replaced, best.pt keeps epoch 1
    assert (load_checkpoint(best)["epoch"], load_checkpoint(last)["epoch"]) == (1, 2)
    assert best.stat().st_nlink == 1 and last.stat().st_ino != best.stat().st_ino
    share_checkpoint(last, best, {"model": {}, "epoch": 2})  # better again
    assert load_checkpoint(best)["epoch"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
