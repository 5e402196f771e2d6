"""The shipped studies against the papers' tables (../shared/papers/TECHNIQUES.md, transcribed here):
every row, in order, with the paper's value, on the base configuration the paper uses."""
from pathlib import Path

import pytest

from bnnctl.orchestrator.plan import build_plan
from bnnctl.orchestrator.spec import load_spec

STUDIES = Path(__file__).resolve().parents[2] / "studies"

# (file, ablation) -> [(row, the paper's value or None where the paper gives none)]
PAPERS = {
    ("mpii.yaml", "IT Table 1"): [
        ("HB baseline", 76.6), ("HB with ReLU", 76.3), ("+ LeakyReLU", 78.1), ("+ PReLU (instead)", 79.1),
        ("+ reverse-order init", 79.9), ("+ progressive binarization", 80.3), ("+ distillation (real teacher)", 80.9)],
    ("mpii.yaml", "reference"): [("HB real-valued", 85.6)],
    ("mpii.yaml", "IT §3.6 teachers"): [  # IT §3.6 reports no value for these
        ("no distillation", None), ("real teacher", None), ("binary teacher", None),
        ("binary teacher, feature matching", None)],
    ("mpii.yaml", "IT Table 3"): [
        ("HB baseline", 76.6), ("reverse-order init alone", 78.5), ("progressive binarization alone", 78.0),
        ("distillation alone", 77.6)],
    ("mpii.yaml", "IT Table 2"): [
        ("1 stack HB", 76.6), ("2 stacks HB", 79.9), ("3 stacks HB", 81.3),
        ("1 stack ours w/o distil.", 80.3), ("2 stacks ours w/o distil.", 81.8), ("3 stacks ours w/o distil.", 82.2),
        ("1 stack ours w/ distil.", 80.9), ("2 stacks ours w/ distil.", 82.3), ("3 stacks ours w/ distil.", 82.7)],
    ("imagenet.yaml", "IT Table 4 ResNet-18"): [
        ("ResNet-18 BNN", 42.2), ("ResNet-18 XNOR-Net", 51.2), ("ResNet-18 IT", 53.7), ("ResNet-18 real-valued", 69.3)],
    ("imagenet.yaml", "IT Table 4 AlexNet"): [
        ("AlexNet BNN", 41.8), ("AlexNet XNOR-Net", 44.2), ("AlexNet IT", 48.6), ("AlexNet real-valued", 56.6)],
    ("mpii_decomposition.yaml", "MT Table 1"): [
        ("none/analytic", 78.4), ("none/learned", 79.3), ("svd/analytic", 78.7), ("svd/learned", 79.0),
        ("tucker/analytic", 79.3), ("tucker/learned", 79.9), ("holistic tucker/analytic", 82.0),
        ("holistic tucker/learned", 82.5)],
    ("imagenet_mt.yaml", "MT Table 2"): [  # 7 values for 8 rows: the one without a value is the choice
        ("none/analytic", 52.3), ("none/learned", 53.0), ("svd/analytic", 52.5), ("svd/learned", None),
        ("tucker/analytic", 54.0), ("tucker/learned", 54.7), ("holistic tucker/analytic", 55.2),
        ("holistic tucker/learned", 55.6)],
    ("mpii_decomposition.yaml", "MT Table 3"): [("HB", 78.1), ("MT", 82.5), ("real-valued", 85.8)],
    ("mpii_soft_gates.yaml", "SG skip connections"): [
        ("identity skip", 87.0), ("scalar gate (fixed)", 87.4), ("channel-wise gate (fixed)", 87.5),
        ("scalar gate (learned)", 87.6), ("learned channel-wise gate", 88.0)],
    ("mpii_soft_gates.yaml", "SG connection type"): [
        ("sum (HG baseline)", 87.5), ("concatenate", 88.0), ("concatenate grouped", 87.8)],
    ("lsp.yaml", "SG on LSP"): [("from scratch", None), ("fine-tuned from MPII", 94.8)],
}
# the papers' top-5 values, beside the top-1 of the same tables (IT Table 4, MT Table 2)
TOP5 = {
    ("imagenet.yaml", "IT Table 4 ResNet-18"): [69.2, 73.2, 76.8, 89.2],
    ("imagenet.yaml", "IT Table 4 AlexNet"): [67.1, 69.2, 72.8, 80.2],
    ("imagenet_mt.yaml", "MT Table 2"): [74.1, 74.7, 74.2, None, 76.9, 77.4, 78.2, 78.5],
}
STUDY_FILES = ("mpii.yaml", "imagenet.yaml", "imagenet_mt.yaml", "mpii_decomposition.yaml", "mpii_soft_gates.yaml",
               "lsp.yaml", "quickstart.yaml", "replication.yaml", "digits_quickstart.yaml")

_specs: dict = {}


def spec(name: str):
    if name not in _specs:
        _specs[name] = load_spec(STUDIES / name)
    return _specs[name]


def rows(name: str, ablation: str) -> dict:
    ab = next(a for a in spec(name).ablations if a.name == ablation)
    return {r.name: r for r in ab.rows}


def params(model_cfg) -> int:
    """Deployed parameters (what the papers count: a decomposition's factors are not deployed)."""
    import dataclasses

    from bnnctl.workers.accounting import account
    from bnnctl.workers.models import build_model

    # the count does not depend on how well Tucker factors are initialized: one HOOI iteration
    model_cfg = dataclasses.replace(model_cfg, decomposition=dataclasses.replace(model_cfg.decomposition, n_iter=1))
    return account(build_model(model_cfg), 64).params


@pytest.mark.parametrize("key", list(PAPERS), ids=[f"{f}:{a}" for f, a in PAPERS])
def test_every_row_of_the_papers_tables_is_there_with_its_value(key):
    name, ablation = key
    got = [(r.name, r.reference) for r in rows(name, ablation).values()]
    assert got == PAPERS[key]


@pytest.mark.parametrize("key", list(TOP5), ids=[f"{f}:{a}" for f, a in TOP5])
def test_top5_references_stand_beside_the_top1(key):
    name, ablation = key
    assert spec(name).table_metric == "top1"
    assert [dict(r.also).get("top5") for r in rows(name, ablation).values()] == TOP5[key]


def test_every_table_of_the_papers_is_shipped():
    tables = {(f, a.name) for f in {f for f, _ in PAPERS} for a in spec(f).ablations}
    assert tables == set(PAPERS)


def test_it_rows_stand_on_the_bases_the_paper_uses():
    t1, t3, t2 = rows("mpii.yaml", "IT Table 1"), rows("mpii.yaml", "IT Table 3"), rows("mpii.yaml", "IT Table 2")
    # the HB baseline: the HPM block without a non-linearity, HB's real-valued joins
    hb = t1["HB baseline"].config.model
    assert (hb.block, hb.activation.kind, hb.join_binary, hb.binarize.weights) == ("hpm", "none", False, True)
    assert [r.config.model.activation.kind for r in t1.values()] == ["none", "relu", "leaky_relu", "prelu", "prelu",
                                                                      "prelu", "prelu"]
    # Table 3: each technique alone on the HB baseline, not on PReLU
    assert {r.config.model.activation.kind for r in t3.values()} == {"none"}
    assert (t3["reverse-order init alone"].stages, t3["distillation alone"].teacher) == ("reverse_order", "real")
    assert t3["progressive binarization alone"].config.model.binarize.quantizer == "tanh"
    # Table 2: HB's joins are real, IT binarizes them; ours with and without distillation
    for n in (1, 2, 3):
        stacks = "1 stack" if n == 1 else f"{n} stacks"
        assert t2[f"{stacks} HB"].config.model.join_binary is False and t2[f"{stacks} HB"].config.model.stacks == n
        for kind in ("w/o", "w/"):
            ours = t2[f"{stacks} ours {kind} distil."]
            assert ours.config.model.join_binary is True and ours.config.model.stacks == n
            assert ours.stages == "reverse_order" and ours.config.model.binarize.weight_quantizer == "tanh"
            assert (ours.teacher is not None) == (kind == "w/")
    # the teachers are real-valued networks of the student's size (and IT §3.6's binary one)
    for name, t in spec("mpii.yaml").teachers.items():
        if name == "binary":
            continue
        m = t.config.model
        assert not m.binarize.activations and not m.binarize.weights and m.activation.kind == "relu"
    assert spec("mpii.yaml").teachers["real 3 stacks"].config.model.stacks == 3


def test_every_row_of_a_study_trains_the_same_budget():
    from types import SimpleNamespace as NS

    from bnnctl.orchestrator.report import budget
    from bnnctl.workers.config import to_dict

    for name in STUDY_FILES:
        plan = build_plan(spec(name))
        stored = {k: NS(config=to_dict(v.config), deps=list(v.deps), kind=v.kind) for k, v in plan.variants.items()}
        budgets = {budget(key, stored) for key in plan.rows.values()}
        assert len(budgets) == 1, (name, budgets)


def _stage_chain(plan, key):
    """A row's variants from its first stage to its last (a stage 2 after its stage 1)."""
    v = plan.variants[key]
    first = plan.variants.get(v.init_dep) if v.init_dep else None
    return ([first] if first is not None and first.kind == "stage1" else []) + [v]


def test_every_row_follows_the_same_learning_rate_and_lambda_over_its_budget():
    """IT §4.2: "trained for 120 epochs, using a learning rate [...] dropped every 40 epochs": a
    two-stage row (60 + 60) gets the drop at 40 and 80 like a one-stage row, not once per stage."""
    for name in STUDY_FILES:
        s = spec(name)
        plan = build_plan(s)
        for key in set(plan.rows.values()):
            chain = _stage_chain(plan, key)
            lrs = [c.config.optim.lr_at(c.config.schedule_offset + e) for c in chain for e in range(c.config.epochs)]
            single = chain[-1].config.optim
            assert lrs == [single.lr_at(e) for e in range(len(lrs))], (name, plan.variants[key].label)
            offsets = [c.config.schedule_offset for c in chain]
            assert offsets == [sum(c.config.epochs for c in chain[:i]) for i in range(len(chain))]
    # e.g. IT Table 1's reverse-order row on MPII: 60 + 60 epochs, drops at 40 and 80 of the budget
    plan = build_plan(spec("mpii.yaml"))
    s1, s2 = _stage_chain(plan, plan.rows[("IT Table 1", "+ reverse-order init", 0)])
    assert (s1.config.epochs, s2.config.schedule_offset, s2.config.optim.lr_steps) == (60, 60, (40, 80))
    assert [s2.config.optim.lr_at(s2.config.schedule_offset + e) for e in (0, 19, 20)] == pytest.approx([2.5e-5, 2.5e-5, 2.5e-6])


def test_mt_table_1_is_on_mts_six_million_parameter_network():
    """MT Table 3: "Ours 6.0M 82.5%" is the network of MT Table 1 (its last row's value)."""
    for row in rows("mpii_decomposition.yaml", "MT Table 1").values():
        m = row.config.model
        assert (m.block, m.width, m.depth, m.stacks) == ("basic", 148, 4, 1)
    base = spec("mpii_decomposition.yaml").base
    assert abs(params(base.model) - 6.0e6) / 6.0e6 < 0.02
    assert base.data.augment.scale == 0.3  # MT: "scale jittering (between 0.7 and 1.3)"


def test_the_two_fixed_gate_rows_of_sg_are_different_functions():
    """SG Table II's fixed scalar and fixed channel-wise gates: a channel gate filled with one
    constant would be the scalar gate again (identical outputs)."""
    import dataclasses

    import torch

    from bnnctl.workers.models import build_model

    sg = rows("mpii_soft_gates.yaml", "SG skip connections")
    outs, gates = [], []
    for name in ("scalar gate (fixed)", "channel-wise gate (fixed)"):
        cfg = dataclasses.replace(sg[name].config.model, width=32, depth=2)  # the same function, smaller
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        assert not any("gate" in n for n, _ in model.named_parameters())  # fixed: not trained
        gates.append(model.stem[3].gate.gate.flatten())
        with torch.no_grad():
            outs.append(model(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))[-1])
    assert gates[0].numel() == 1 and float(gates[0]) == 0.5
    assert gates[1].numel() == 16 and gates[1].unique().numel() == 16 and 0 <= gates[1].min() < gates[1].max() <= 1
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_imagenet_specs_resize_then_crop_as_the_papers_do():
    for name in ("imagenet.yaml", "imagenet_mt.yaml"):
        a = spec(name).base.data.class_augment
        assert (a.crop, a.resize, spec(name).base.data.input_size) == ("resize_random", 256, 224)


def test_it_studies_use_bce_and_progressive_rows_binarize_weights_too():
    """IT §4.2: "Instead of using the MSE loss, we [...] used the BCE loss"."""
    for name in ("quickstart.yaml", "replication.yaml", "mpii.yaml", "mpii_decomposition.yaml"):
        assert spec(name).base.loss == "bce", name
    from bnnctl.orchestrator.tunespec import load_tune_spec as load_tuning

    for name in ("tune_lambda.yaml", "tune_distill.yaml"):
        t = load_tuning(STUDIES / name)
        assert t.base.loss == "bce", name
    b = load_tuning(STUDIES / "tune_lambda.yaml").base.model.binarize
    assert (b.quantizer, b.weight_quantizer) == ("tanh", "tanh")
    for name in STUDY_FILES:  # every progressive row binarizes both, but those that say otherwise
        for r in spec(name).rows:
            b = r.config.model.binarize
            if b.activations and b.quantizer != "sign" and not r.name.endswith("activations only"):
                assert b.weight_quantizer == b.quantizer, (name, r.name)
    halves = rows("replication.yaml", "techniques alone")
    w, a = (halves[f"progressive binarization, {k} only"].config.model.binarize for k in ("weights", "activations"))
    assert (w.quantizer, w.weight_quantizer, a.quantizer, a.weight_quantizer) == ("sign", "tanh", "tanh", "sign")


def test_binary_teacher_with_feature_matching_and_lsp_fine_tuning():
    t = rows("mpii.yaml", "IT §3.6 teachers")
    teacher = spec("mpii.yaml").teachers["binary"].config.model
    assert teacher.binarize.activations and teacher.binarize.weights and teacher.activation.kind == "prelu"
    fm = t["binary teacher, feature matching"]
    assert fm.teacher == "binary" and fm.config.distill.feature_weight > 0
    assert t["binary teacher"].config.distill.feature_weight == 0 and t["real teacher"].teacher == "real"
    lsp = spec("lsp.yaml")
    tuned = rows("lsp.yaml", "SG on LSP")["fine-tuned from MPII"]
    assert tuned.init == "mpii" and tuned.config.data.pose_layout == "mpii16" and tuned.config.optim.lr_steps == (25, 50, 75)
    pre = lsp.pretrained["mpii"].config
    assert (pre.data.dataset, pre.epochs, pre.optim.lr_steps) == ("mpii", 200, (75, 100, 150))
    assert pre.model == tuned.config.model  # the same network: fine-tuned as it is
    plan = build_plan(lsp)
    v = plan.variants[plan.rows[("SG on LSP", "fine-tuned from MPII", 0)]]
    assert plan.variants[v.init_dep].kind == "pretrain"
    assert abs(params(tuned.config.model) - 26e6) / 26e6 < 0.02  # SG's wide model: 26M


def test_imagenet_rows_and_mt_recipe():
    r18, alex = rows("imagenet.yaml", "IT Table 4 ResNet-18"), rows("imagenet.yaml", "IT Table 4 AlexNet")
    for t, arch in ((r18, "resnet18"), (alex, "alexnet")):
        bnn, xnor, it, real = t.values()
        assert {r.config.model.arch for r in t.values()} == {arch}
        assert bnn.config.model.binarize.alpha == "none" and xnor.config.model.binarize.alpha == "analytic"
        assert it.stages == "reverse_order" and it.teacher is not None and it.config.distill.weight > 0
        assert not real.config.model.binarize.weights and not real.config.model.binarize.activations
    mt = spec("imagenet_mt.yaml").base
    assert (mt.epochs, mt.optim.lr_steps, mt.model.arch) == (90, (30, 60), "resnet18") and mt.optim.weight_decay > 0


@pytest.mark.slow
def test_equal_parameter_budgets_where_the_papers_compare_at_one():
    sg = rows("mpii_soft_gates.yaml", "SG connection type")
    counts = {n: params(r.config.model) for n, r in sg.items()}
    assert all(abs(c - 3.4e6) / 3.4e6 < 0.05 for c in counts.values()), counts  # "approx. 3.4M, 2 stacks"
    mt3 = rows("mpii_decomposition.yaml", "MT Table 3")
    assert abs(params(mt3["HB"].config.model) - 6.2e6) / 6.2e6 < 0.02
    assert abs(params(mt3["MT"].config.model) - 6.0e6) / 6.0e6 < 0.02
    assert mt3["MT"].config.model.decomposition.kind == "holistic_tucker"
