import numpy as np
import pytest

from bnnctl.workers.metrics import HEAD_SIZE_FACTOR, MPII_GROUPS, pck_lsp, pckh, topk_accuracy

BOX = np.array([[0.0, 0.0, 5.0, 12.0]])  # diagonal 13 -> head size 0.6 * 13 = 7.8


def _gt(n=1):
    rng = np.random.default_rng(0)
    return rng.uniform(20, 200, (n, 16, 2))


def test_perfect_predictions_give_100_everywhere():
    gt = _gt(3)
    res = pckh(gt, gt, np.ones((3, 16)), np.repeat(BOX, 3, 0))
    assert all(v == 100.0 for v in res.groups.values())
    assert set(res.groups) == {*MPII_GROUPS, "Mean"}


def test_a_prediction_exactly_at_the_threshold_counts_and_just_beyond_does_not():
    gt = np.zeros((1, 16, 2))  # offsets from 0 are exact in floating point
    size = HEAD_SIZE_FACTOR * 13.0
    at = gt.copy()
    at[0, :, 0] += 0.5 * size
    beyond = gt.copy()
    beyond[0, :, 0] += 0.5 * size * (1 + 1e-9)
    assert pckh(at, gt, np.ones((1, 16)), BOX).groups["Mean"] == 100.0
    assert pckh(beyond, gt, np.ones((1, 16)), BOX).groups["Mean"] == 0.0
    # PCKh@0.1 with the same offset misses
    assert pckh(at, gt, np.ones((1, 16)), BOX, threshold=0.1).groups["Mean"] == 0.0


def test_unlabeled_joints_are_ignored():
    gt = _gt(2)
    pred = gt.copy()
    labeled = np.ones((2, 16))
    pred[0, 10] += 100  # wrong r_wrist, but not labeled in that image
    labeled[0, 10] = 0
    res = pckh(pred, gt, labeled, np.repeat(BOX, 2, 0))
    assert res.per_joint[10] == 100.0 and res.counts[10] == 1
    labeled[:, 15] = 0  # l_wrist never labeled: NaN for that joint, left out of the Mean ...
    res = pckh(pred, gt, labeled, np.repeat(BOX, 2, 0))
    assert np.isnan(res.per_joint[15]) and res.groups["Mean"] == 100.0
    # ... and the Wrist group is undefined, as in the MPII toolkit: never the labeled side alone
    assert np.isnan(res.groups["Wrist"]) and res.groups["Elbow"] == 100.0


def _hrnet_groups(pred, gt, labeled, boxes, threshold=0.5):
    """The groups as HRNet's MPII evaluation computes them (lib/dataset/mpii.py), written out
    independently: per-joint hit rate over labeled instances, then 0.5 * (left + right)."""
    size = 0.6 * np.linalg.norm(boxes[:, 2:] - boxes[:, :2], axis=1)
    dist = np.linalg.norm(pred - gt, axis=2) / size[:, None]
    hits = ((dist <= threshold) * labeled).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pck = 100.0 * hits / labeled.sum(axis=0)
    return {"Head": pck[9], "Shoulder": 0.5 * (pck[13] + pck[12]), "Elbow": 0.5 * (pck[14] + pck[11]),
            "Wrist": 0.5 * (pck[15] + pck[10]), "Hip": 0.5 * (pck[3] + pck[2]), "Knee": 0.5 * (pck[4] + pck[1]),
            "Ankle": 0.5 * (pck[5] + pck[0])}


def test_groups_are_the_standard_mpii_evaluations():
    rng = np.random.default_rng(3)
    gt = rng.uniform(20, 200, (40, 16, 2))
    pred = gt + rng.normal(0, 6, gt.shape)
    labeled = (rng.random((40, 16)) > 0.2).astype(float)
    labeled[:, 15] = 0  # l_wrist never labeled
    labeled[:, 0] = labeled[:, 5] = 0  # both ankles never labeled
    boxes = np.repeat(BOX, 40, 0)
    ours, theirs = pckh(pred, gt, labeled, boxes).groups, _hrnet_groups(pred, gt, labeled, boxes)
    for name, value in theirs.items():
        assert (np.isnan(ours[name]) and np.isnan(value)) or ours[name] == pytest.approx(value), name
    assert np.isnan(ours["Wrist"]) and np.isnan(ours["Ankle"]) and np.isfinite(ours["Elbow"])


def test_stored_per_joint_tables_give_the_same_groups():
    from bnnctl.workers.metrics import MPII_JOINTS, named_joint_groups

    gt = _gt(4)
    pred = gt + np.random.default_rng(1).normal(0, 5, gt.shape)
    labeled = np.ones((4, 16))
    labeled[:, 10] = 0
    res = pckh(pred, gt, labeled, np.repeat(BOX, 4, 0))
    stored = {j: (None if np.isnan(v) else float(v)) for j, v in zip(MPII_JOINTS, res.per_joint)}
    again = named_joint_groups(stored)
    assert again.keys() == MPII_GROUPS.keys()
    assert all((np.isnan(a) and np.isnan(res.groups[k])) or a == res.groups[k] for k, a in again.items())
    assert named_joint_groups({"neck": 1.0}) == {}  # not MPII's joints (LSP): no groups


def test_mean_excludes_pelvis_and_thorax_and_weights_by_labeled_count():
    gt = _gt(2)
    pred = gt.copy()
    pred[:, 6] += 100  # pelvis and thorax wrong: the Mean does not move
    pred[:, 7] += 100
    labeled = np.ones((2, 16))
    assert pckh(pred, gt, labeled, np.repeat(BOX, 2, 0)).groups["Mean"] == 100.0
    pred[0, 8] += 100  # upper neck wrong in 1 of 2 images: it is in the Mean
    res = pckh(pred, gt, labeled, np.repeat(BOX, 2, 0))
    assert res.per_joint[8] == 50.0
    assert res.groups["Mean"] == pytest.approx(100 * (27 / 28))  # 14 joints x 2 images, one miss
    labeled[1, 0] = 0  # r_ankle labeled once: weights follow the counts
    pred[0, 0] += 100
    res = pckh(pred, gt, labeled, np.repeat(BOX, 2, 0))
    assert res.groups["Mean"] == pytest.approx(100 * (25 / 27))
    assert res.groups["Ankle"] == pytest.approx((0.0 + 100.0) / 2)


def test_lsp_pck_uses_the_torso():
    gt = np.zeros((1, 14, 2))
    gt[0, 9] = [0, 0]    # left shoulder
    gt[0, 2] = [30, 40]  # right hip: torso 50 -> threshold 10 px
    pred = gt.copy()
    pred[0, :7, 0] += 10.0
    pred[0, 7:, 0] += 10.5
    res = pck_lsp(pred, gt, np.ones((1, 14)))
    assert res.groups["Mean"] == pytest.approx(50.0)


def test_topk():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.15], [0.3, 0.2, 0.5]])
    acc = topk_accuracy(logits, np.array([1, 2, 1]), (1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3) and acc[2] == pytest.approx(200 / 3) and acc[5] == 100.0
