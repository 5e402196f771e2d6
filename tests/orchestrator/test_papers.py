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
}

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
    # the teachers are real-valued networks of the student's size
    for name, t in spec("mpii.yaml").teachers.items():
        m = t.config.model
        assert not m.binarize.activations and not m.binarize.weights and m.activation.kind == "relu"
    assert spec("mpii.yaml").teachers["real 3 stacks"].config.model.stacks == 3


def test_every_row_of_a_study_trains_the_same_budget():
    from types import SimpleNamespace as NS

    from bnnctl.orchestrator.report import budget
    from bnnctl.workers.config import to_dict

    for name in ("mpii.yaml", "imagenet.yaml", "imagenet_mt.yaml", "mpii_decomposition.yaml",
                 "mpii_soft_gates.yaml", "quickstart.yaml", "replication.yaml"):
        plan = build_plan(spec(name))
        stored = {k: NS(config=to_dict(v.config), deps=list(v.deps), kind=v.kind) for k, v in plan.variants.items()}
        budgets = {budget(key, stored) for key in plan.rows.values()}
        assert len(budgets) == 1, (name, budgets)


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


def test_equal_parameter_budgets_where_the_papers_compare_at_one():
    sg = rows("mpii_soft_gates.yaml", "SG connection type")
    counts = {n: params(r.config.model) for n, r in sg.items()}
    assert all(abs(c - 3.4e6) / 3.4e6 < 0.05 for c in counts.values()), counts  # "approx. 3.4M, 2 stacks"
    mt3 = rows("mpii_decomposition.yaml", "MT Table 3")
    assert abs(params(mt3["HB"].config.model) - 6.2e6) / 6.2e6 < 0.02
    assert abs(params(mt3["MT"].config.model) - 6.0e6) / 6.0e6 < 0.02
    assert mt3["MT"].config.model.decomposition.kind == "holistic_tucker"
