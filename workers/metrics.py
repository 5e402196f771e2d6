"""Evaluation metrics as pure functions with named constants.

PCKh follows the standard MPII evaluation (as in the MPII toolkit and HRNet's port of it): a joint
is correct when its distance to the ground truth is at most ``threshold`` x head size, with head
size = 0.6 x the diagonal of the head box; unlabeled joints are excluded, occluded but labeled
joints count. The summary groups joints as Head (head top), Shoulder, Elbow, Wrist, Hip, Knee,
Ankle; Mean is over every joint except pelvis and thorax, weighted by each joint's labeled count.

A group is the plain mean of its joints' PCKh, left and right weighted equally, as the toolkit's
table (``genTablePCK``: ``(pck(rsho) + pck(lsho)) / 2``) and HRNet (``0.5 * (PCKh[lsho] + PCKh[rsho])``)
compute it. A joint never labeled in the evaluated set has no PCKh (the toolkit's ``mean([])`` and
HRNet's 0/0 are NaN), so a group with such a joint is undefined: NaN here, never reported, shown as
"—" — not the labeled side alone, not a zero for the missing side. On MPII's validation set every
joint is labeled; it happens on small subsets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The validation metrics the trainer reports that a table or a tuning objective may use, by task
#: (pose: PCKh@0.5 on MPII-format sets, its strict @0.1 variant, PCK@0.2 on LSP; classification:
#: top-1 and top-5 accuracy). Every other module takes the names from here.
TABLE_METRICS = {"pose": ("pckh", "pckh@0.1", "pck"), "classification": ("top1", "top5")}
ALL_TABLE_METRICS = tuple(m for names in TABLE_METRICS.values() for m in names)
#: the metric a display shows for a run, the first of these it reports
HEADLINE_METRICS = ("pckh", "pck", "top1")
#: losses a tuning may minimize
LOSSES = ("val_loss", "train_loss")
#: per-epoch values a variant's curves show (besides per-group lambdas, ``lambda/<group>``)
CURVES = ("train_loss", "val_loss", "pckh", "pck", "top1", "top5", "pckh_approx", "pck_approx", "top1_approx",
          "lambda", "lr", "flip_ratio", "clip_fraction", "soft_weights", "soft_activations", "smooth_gap")
#: per-epoch values `bnnctl train` prints
PRINTED = ("pckh", "pck", "top1", "top5", "train_loss", "val_loss", "lambda", "epoch_time")

#: Head size = HEAD_SIZE_FACTOR x head-box diagonal (MPII's SC_BIAS).
HEAD_SIZE_FACTOR = 0.6
PCKH_THRESHOLD = 0.5
PCKH_STRICT_THRESHOLD = 0.1
#: MPII's 16 joints, in the order of its annotations.
MPII_JOINTS = ("r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
               "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist")
#: MPII joint indices of the summary groups (see ``MPII_JOINTS``).
MPII_GROUPS = {
    "Head": (9,),
    "Shoulder": (12, 13),
    "Elbow": (11, 14),
    "Wrist": (10, 15),
    "Hip": (2, 3),
    "Knee": (1, 4),
    "Ankle": (0, 5),
}
#: Pelvis and thorax are left out of the Mean.
MPII_MEAN_EXCLUDED = (6, 7)
#: LSP PCK: normalized by the torso size, the distance from the left shoulder to the right hip.
LSP_PCK_THRESHOLD = 0.2
LSP_TORSO = (9, 2)


@dataclass(frozen=True)
class PCKResult:
    per_joint: np.ndarray  # (J,) percentage, NaN where a joint is never labeled
    counts: np.ndarray  # (J,) labeled joints
    groups: dict[str, float]  # summary groups and "Mean"


def _pck(pred: np.ndarray, gt: np.ndarray, labeled: np.ndarray, norm: np.ndarray, threshold: float):
    """(per-joint percentage, per-joint hits, per-joint labeled counts)."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    labeled = np.asarray(labeled).astype(bool)
    dist = np.linalg.norm(pred - gt, axis=-1) / np.asarray(norm, dtype=np.float64)[:, None]
    hits = ((dist <= threshold) & labeled).sum(axis=0)
    counts = labeled.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_joint = 100.0 * hits / counts
    return per_joint, hits, counts


def head_sizes(head_boxes: np.ndarray) -> np.ndarray:
    """(N, 4) boxes [x1, y1, x2, y2] -> (N,) MPII head sizes."""
    boxes = np.asarray(head_boxes, dtype=np.float64)
    return HEAD_SIZE_FACTOR * np.linalg.norm(boxes[:, 2:4] - boxes[:, 0:2], axis=1)


def pckh(pred: np.ndarray, gt: np.ndarray, labeled: np.ndarray, head_boxes: np.ndarray,
         threshold: float = PCKH_THRESHOLD) -> PCKResult:
    """PCKh of (N, 16, 2) predictions against ground truth, in percent.

    Args:
        labeled: (N, 16) 1 where the joint is annotated (MPII's ``1 - jnt_missing``).
        head_boxes: (N, 4) head boxes [x1, y1, x2, y2] in the same coordinates.
    """
    per_joint, hits, counts = _pck(pred, gt, labeled, head_sizes(head_boxes), threshold)
    groups = joint_groups(per_joint)
    keep = np.ones(len(per_joint), dtype=bool)
    keep[list(MPII_MEAN_EXCLUDED)] = False
    # the count-weighted mean of per-joint PCKh is the pooled hit rate over the kept joints
    total = counts[keep].sum()
    groups["Mean"] = float(100.0 * hits[keep].sum() / total) if total else float("nan")
    return PCKResult(per_joint, counts, groups)


def joint_groups(per_joint: np.ndarray) -> dict[str, float]:
    """MPII's summary groups from the 16 per-joint PCKh values (NaN for a joint never labeled): the
    mean of each group's joints, NaN when one of them is NaN (see the module docstring)."""
    per_joint = np.asarray(per_joint, dtype=np.float64)
    return {name: float(np.mean(per_joint[list(idx)])) for name, idx in MPII_GROUPS.items()}


def named_joint_groups(per_joint: dict[str, float | None]) -> dict[str, float]:
    """The groups of a stored per-joint table (joint name -> PCKh, None or NaN for never labeled);
    empty when the table is not MPII's 16 joints."""
    if set(per_joint) != set(MPII_JOINTS):
        return {}
    values = [per_joint[j] if per_joint[j] is not None else float("nan") for j in MPII_JOINTS]
    return joint_groups(np.array(values, dtype=np.float64))


def pck_lsp(pred: np.ndarray, gt: np.ndarray, labeled: np.ndarray, threshold: float = LSP_PCK_THRESHOLD) -> PCKResult:
    """LSP PCK@0.2 of (N, 14, 2) predictions, normalized by torso size (left shoulder - right hip)."""
    gt = np.asarray(gt, dtype=np.float64)
    torso = np.linalg.norm(gt[:, LSP_TORSO[0]] - gt[:, LSP_TORSO[1]], axis=1)
    per_joint, _, counts = _pck(pred, gt, labeled, np.maximum(torso, 1e-6), threshold)
    return PCKResult(per_joint, counts, {"Mean": float(np.nanmean(per_joint))})


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for (N, C) scores and (N,) integer labels (k capped at C)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    out = {}
    for k in ks:
        top = order[:, : min(k, logits.shape[1])]
        out[k] = float(100.0 * np.mean(np.any(top == labels[:, None], axis=1)))
    return out
