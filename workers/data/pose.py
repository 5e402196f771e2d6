"""Pose datasets: the MPII layout (HRNet JSON), LSP / LSP-extended (``joints.mat``), and the
crop-and-augment pipeline that turns a record into an input image and heatmap targets.

MPII layout (what ``bnnctl data synth`` writes too)::

    ROOT/annot/train.json   ROOT/annot/valid.json   ROOT/images/<image>

Each JSON file is a list of records ``{"image", "center": [x, y], "scale", "joints": 16 x [x, y],
"joints_vis": 16 x 0/1}`` with MATLAB 1-based coordinates (as the released MPII annotations); a
joint that is not labeled has ``joints_vis`` 0. Validation records carry ``"head_box": [x1, y1, x2,
y2]`` for PCKh; without them, ``annot/gt_valid.mat`` (``headboxes_src``) is used when present.
Coordinates become 0-based exactly once, in :func:`read_mpii`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config import require
from ..errors import DataError
from ..metrics import MPII_JOINTS  # noqa: F401  (the joints' names, defined once beside their groups)
from .geometry import apply_affine, crop_matrix, flip_points, warp
from .heatmaps import HeatmapCodec

MPII_FLIP_PAIRS = ((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13))
LSP_JOINTS = ("r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "r_wrist", "r_elbow",
              "r_shoulder", "l_shoulder", "l_elbow", "l_wrist", "neck", "head_top")
LSP_FLIP_PAIRS = ((0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9))
#: Where each LSP joint sits among MPII's 16 (LSP's neck is MPII's upper neck).
LSP_IN_MPII = (0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 8, 9)
#: MPII's two joints that LSP lacks, each interpolated between two LSP joints (as indices in MPII's
#: order): the pelvis between the hips, the thorax between the shoulders.
MPII_FROM_LSP = {6: (2, 3), 7: (12, 13)}

#: HRNet's MPII crop convention: the annotated centre sits on the torso, so the crop centre moves
#: down by 15 px per scale unit and the box grows by 25%.
MPII_CENTER_SHIFT = 15.0
MPII_SCALE_MARGIN = 1.25
#: LSP has no person box: the crop is the joints' bounding box enlarged by this margin.
LSP_SCALE_MARGIN = 1.25
#: LSP (original) has 2,000 images: the first 1,000 train, the last 1,000 test.
LSP_TRAIN_COUNT = 1000

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MPII_LAYOUT_HELP = (
    "expected the MPII layout: {root}/annot/train.json, {root}/annot/valid.json and {root}/images/ "
    "(the HRNet JSON annotation format). Write the embedded synthetic set in this layout with "
    "`bnnctl data synth {root}`, or place the MPII Human Pose images (from the MPII Human Pose "
    "dataset site) in images/ and their annotations converted to that JSON in annot/."
)


@dataclass(frozen=True)
class PoseRecord:
    """One annotated person. Coordinates are 0-based pixel centres; ``center``/``scale`` define the
    crop box (``scale * 200`` px square). ``visible[j]`` is 1 when joint j is labeled."""

    image: str
    center: tuple[float, float]
    scale: float
    joints: np.ndarray  # (J, 2) float64
    visible: np.ndarray  # (J,) float32, 1 = labeled
    head_box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (IT §4.2): flip with left/right swap, scale jitter, rotation.

    Attributes:
        flip: mirror half of the samples; ``None`` = the dataset's default (on for MPII and LSP, off
            for the synthetic set, whose left/right colour code a mirror image would contradict).
        scale: the crop scale is multiplied by U(1 - scale, 1 + scale) (0.25 = 0.75-1.25).
        rotation: rotation by U(-rotation, rotation) degrees ...
        rotation_prob: ... applied to this fraction of the samples.
    """

    flip: bool | None = None
    scale: float = 0.25
    rotation: float = 30.0
    rotation_prob: float = 1.0

    def __post_init__(self) -> None:
        require(0.0 <= self.scale < 1.0, "scale", f"must be in [0, 1), got {self.scale}")
        require(0.0 <= self.rotation <= 180.0, "rotation", f"must be in [0, 180] degrees, got {self.rotation}")
        require(0.0 <= self.rotation_prob <= 1.0, "rotation_prob", f"must be in [0, 1], got {self.rotation_prob}")


def _bad(path: Path, index: int, message: str) -> DataError:
    return DataError(f"{path}: record {index}: {message}")


def _number_list(value: object, length: int) -> bool:
    return (isinstance(value, list) and len(value) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _read_json(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of person records, got {type(data).__name__}")
    return data


def parse_mpii_record(raw: object, path: Path, index: int, num_joints: int = 16) -> PoseRecord:
    """Validate one MPII JSON record and convert it to a 0-based :class:`PoseRecord` (crop box
    adjusted by HRNet's convention). Raises DataError naming the file and record index."""
    if not isinstance(raw, dict):
        raise _bad(path, index, f"expected an object, got {type(raw).__name__}")
    for key in ("image", "center", "scale", "joints", "joints_vis"):
        if key not in raw:
            raise _bad(path, index, f"missing key {key!r}")
    if not isinstance(raw["image"], str) or not raw["image"]:
        raise _bad(path, index, "'image' must be a file name")
    if not _number_list(raw["center"], 2):
        raise _bad(path, index, "'center' must be [x, y]")
    scale = raw["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise _bad(path, index, f"'scale' must be a positive number, got {scale!r}")
    joints = raw["joints"]
    if not isinstance(joints, list) or len(joints) != num_joints or not all(_number_list(j, 2) for j in joints):
        raise _bad(path, index, f"'joints' must be a list of {num_joints} [x, y] pairs")
    vis = raw["joints_vis"]
    if not _number_list(vis, num_joints) or any(v not in (0, 1) for v in vis):
        raise _bad(path, index, f"'joints_vis' must be a list of {num_joints} values 0 or 1")
    head_box = raw.get("head_box")
    if head_box is not None and not _number_list(head_box, 4):
        raise _bad(path, index, "'head_box' must be [x1, y1, x2, y2]")
    center = np.asarray(raw["center"], dtype=np.float64) - 1.0  # MATLAB 1-based -> 0-based
    center[1] += MPII_CENTER_SHIFT * scale
    return PoseRecord(
        image=raw["image"],
        center=(float(center[0]), float(center[1])),
        scale=float(scale) * MPII_SCALE_MARGIN,
        joints=np.asarray(joints, dtype=np.float64) - 1.0,
        visible=np.asarray(vis, dtype=np.float32),
        head_box=None if head_box is None else tuple(float(v) - 1.0 for v in head_box),
    )


def _gt_valid_head_boxes(path: Path, count: int) -> list[tuple[float, float, float, float]]:
    from scipy.io import loadmat

    try:
        boxes = loadmat(str(path))["headboxes_src"]  # (2, 2, N): [x, y] x [corner 1, corner 2]
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path}: cannot read 'headboxes_src' ({err})") from None
    if boxes.shape[:2] != (2, 2) or boxes.shape[2] != count:
        raise DataError(f"{path}: 'headboxes_src' has shape {boxes.shape}, expected (2, 2, {count})")
    return [(boxes[0, 0, i] - 1, boxes[1, 0, i] - 1, boxes[0, 1, i] - 1, boxes[1, 1, i] - 1) for i in range(count)]


def check_mpii_layout(root: Path) -> None:
    missing = [p for p in (root / "annot" / "train.json", root / "annot" / "valid.json", root / "images")
               if not p.exists()]
    if missing:
        raise DataError(f"MPII dataset not found at {root} (missing {missing[0]}): "
                        + MPII_LAYOUT_HELP.format(root=root))


def read_mpii(root: str | Path, split: str) -> list[PoseRecord]:
    """Read ``annot/{train,valid}.json`` of the MPII layout at ``root``.

    Raises:
        DataError: the layout is missing (the message says how to get it) or a record is malformed
            (the message names the file and the record index).
    """
    root = Path(root)
    check_mpii_layout(root)
    name = {"train": "train.json", "valid": "valid.json"}.get(split)
    if name is None:
        raise DataError(f"unknown MPII split {split!r}; valid: train, valid")
    path = root / "annot" / name
    records = [parse_mpii_record(r, path, i) for i, r in enumerate(_read_json(path))]
    if split == "valid" and records and any(r.head_box is None for r in records):
        mat = root / "annot" / "gt_valid.mat"
        if not mat.exists():
            raise DataError(f"{path}: validation records need 'head_box' for PCKh, or {mat} (headboxes_src)")
        boxes = _gt_valid_head_boxes(mat, len(records))
        records = [PoseRecord(r.image, r.center, r.scale, r.joints, r.visible, b) for r, b in zip(records, boxes)]
    return records


def lsp_as_mpii(records: list[PoseRecord]) -> list[PoseRecord]:
    """LSP records in MPII's 16-joint layout, so that a network trained on MPII is fine-tuned on
    LSP as it is (SG §III-C: "The two missing points from LSP were obtained by simply interpolating
    between the annotated ones"): the pelvis is the midpoint of the hips, the thorax that of the
    shoulders, labeled where both ends are."""
    out = []
    for r in records:
        joints = np.zeros((len(MPII_JOINTS), 2))
        visible = np.zeros(len(MPII_JOINTS), dtype=np.float32)
        joints[list(LSP_IN_MPII)] = r.joints
        visible[list(LSP_IN_MPII)] = r.visible
        for j, (a, b) in MPII_FROM_LSP.items():
            joints[j] = (joints[a] + joints[b]) / 2
            visible[j] = min(visible[a], visible[b])
        out.append(PoseRecord(r.image, r.center, r.scale, joints, visible, r.head_box))
    return out


def read_lsp(root: str | Path, split: str = "train") -> list[PoseRecord]:
    """Read LSP (``joints.mat`` 3 x 14 x 2000, third row = occluded flag; first 1,000 images train,
    last 1,000 test) or LSP-extended (14 x 3 x 10000, third column = visible; all train).

    LSP labels every joint, occluded ones included, so all joints count for PCK; the flag is kept in
    the record only as information. The crop box is the joints' bounding box with a 25% margin.
    """
    from scipy.io import loadmat

    root = Path(root)
    path = root / "joints.mat"
    if not path.exists() or not (root / "images").is_dir():
        raise DataError(f"LSP dataset not found at {root}: expected {path} and {root / 'images'}/ "
                        "(im0001.jpg ... as released by the Leeds Sports Pose dataset: unpack lsp_dataset.zip "
                        "from its site there). bnnctl embeds no LSP set; `bnnctl data synth` writes a "
                        "synthetic set in MPII's layout")
    try:
        joints = np.asarray(loadmat(str(path))["joints"], dtype=np.float64)
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path}: cannot read the 'joints' matrix ({err})") from None
    if joints.shape[:2] == (3, 14):
        extended = False
        coords = joints[:2].transpose(2, 1, 0)  # (N, 14, 2)
    elif joints.shape[:2] == (14, 3):
        extended = True
        coords = joints[:, :2].transpose(2, 0, 1)
    else:
        raise DataError(f"{path}: 'joints' has shape {joints.shape}; expected 3 x 14 x N (LSP) or 14 x 3 x N (LSP-extended)")
    n = coords.shape[0]
    indices = range(n) if extended else (range(LSP_TRAIN_COUNT) if split == "train" else range(LSP_TRAIN_COUNT, n))
    digits = 5 if extended else 4
    records = []
    for i in indices:
        pts = coords[i] - 1.0  # MATLAB 1-based -> 0-based
        if not np.isfinite(pts).all():
            raise DataError(f"{path}: person {i}: joint coordinates are not finite")
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        center = (lo + hi) / 2
        scale = max(float((hi - lo).max()), 1.0) * LSP_SCALE_MARGIN / 200.0
        records.append(PoseRecord(f"im{i + 1:0{digits}d}.jpg", (float(center[0]), float(center[1])), scale,
                                  pts, np.ones(14, dtype=np.float32)))
    return records


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


class PoseDataset(torch.utils.data.Dataset):
    """Crops each record to ``input_size`` and encodes heatmap targets.

    Augmentation draws from a generator seeded by (seed, epoch, index), so a sample is the same
    whatever the worker count and a resumed run sees the same data (call :meth:`set_epoch`).
    Items are dicts: ``image`` (3, S, S), ``target`` (J, H, H), ``weight`` (J,), ``index``, and
    ``crop`` (2 x 3, image -> crop) for mapping predictions back to the image.
    """

    def __init__(self, records: Sequence[PoseRecord], image_dir: str | Path, codec: HeatmapCodec,
                 flip_pairs: tuple[tuple[int, int], ...], augment: AugmentConfig | None = None, seed: int = 0) -> None:
        self.records = list(records)
        self.image_dir = Path(image_dir)
        self.codec = codec
        self.flip_pairs = flip_pairs
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, record: PoseRecord) -> Image.Image:
        path = self.image_dir / record.image
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err}") from None

    def sample_params(self, index: int) -> tuple[float, float, bool]:
        """(scale factor, rotation, flip) for sample ``index`` at the current epoch."""
        if self.augment is None:
            return 1.0, 0.0, False
        a = self.augment
        rng = np.random.default_rng([self.seed, self.epoch, index])
        s = 1.0 + rng.uniform(-a.scale, a.scale)
        r = rng.uniform(-a.rotation, a.rotation) if rng.random() < a.rotation_prob else 0.0
        f = a.flip and rng.random() < 0.5
        return float(s), float(r), bool(f)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = self.load_image(record)
        s, r, flip = self.sample_params(index)
        size = self.codec.input_size
        m = crop_matrix(np.asarray(record.center), record.scale * s, r, size)
        crop = warp(image, m, size)
        joints = apply_affine(record.joints, m)
        visible = record.visible
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            joints = flip_points(joints, size, self.flip_pairs)
            visible = np.array(visible, copy=True)
            for a, b in self.flip_pairs:
                visible[[a, b]] = visible[[b, a]]
            m = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([m, [0.0, 0.0, 1.0]])
        target, weight = self.codec.encode(joints, visible)
        return {
            "image": _to_tensor(crop),
            "target": torch.from_numpy(target),
            "weight": torch.from_numpy(weight),
            "index": index,
            "crop": torch.from_numpy(m.astype(np.float64)),
        }
