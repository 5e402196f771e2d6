"""The embedded synthetic pose dataset: procedural articulated figures with the 16 MPII joints,
written in the MPII layout (images + HRNet JSON annotations with head boxes), so that the real
loader and the real PCKh scorer run on it unchanged. No download is needed.

What makes it a pose problem rather than a toy:
- bone lengths in human proportions (with per-person variation), joint angles in anatomical ranges
  (elbows and knees bend one way), torso lean and head tilt, front and back views (which decide
  on which side of the image the person's left limbs appear);
- left limbs drawn in warm colours and right limbs in cool ones, so left/right labels can be
  learned (a horizontal flip would swap the labels but not the colours: train the synthetic set
  without flip augmentation);
- textured, noisy backgrounds with limb-like distractor strokes in the same colour families;
- occluders over the figure (occluded joints stay labeled, as in MPII) and truncation at the image
  border (joints outside the image are not labeled: ``joints_vis`` 0, coordinates -1).

Every image is a pure function of (seed, split, index); the set is written atomically.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..config import require
from ..errors import DataError
from .publish import publish, read_manifest

#: Version of the generator: bump when images would change for the same config.
GENERATOR_VERSION = 1
#: Drawing happens at this multiple of the image size, then is downsampled (anti-aliasing).
SUPERSAMPLE = 2

# Segment lengths as fractions of the body height (head top to feet, standing), after
# anthropometric tables (Drillis & Contini): torso 0.30, neck 0.05, head 0.13, upper arm 0.17,
# forearm 0.15 (to the wrist), thigh 0.245, shin 0.245.
TORSO, NECK, HEAD = 0.30, 0.05, 0.13
UPPER_ARM, FOREARM, THIGH, SHIN = 0.17, 0.15, 0.245, 0.245
SHOULDER_HALF_WIDTH, HIP_HALF_WIDTH = 0.105, 0.07
WIDTHS = {"upper_arm": 0.055, "forearm": 0.045, "thigh": 0.075, "shin": 0.06}

SPLITS = {"train": 0, "valid": 1}


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and difficulty of the synthetic set.

    Attributes:
        train, valid: number of images (one person each) per split.
        image_size: side of the square images in pixels.
        seed: the set is a pure function of this seed.
        occluder_prob: probability that an image gets 1-2 occluders over the figure.
        truncation_prob: probability that the figure is cut by the image border.
        distractors: maximum number of limb-like distractor strokes in the background.
        view_profile_prob: probability of a narrow (side) view, where left and right overlap more.
    """

    train: int = 2000
    valid: int = 300
    image_size: int = 128
    seed: int = 0
    occluder_prob: float = 0.3
    truncation_prob: float = 0.1
    distractors: int = 3
    view_profile_prob: float = 0.2

    def __post_init__(self) -> None:
        require(1 <= self.train <= 1_000_000, "train", f"must be in [1, 1000000], got {self.train}")
        require(1 <= self.valid <= 1_000_000, "valid", f"must be in [1, 1000000], got {self.valid}")
        require(32 <= self.image_size <= 1024, "image_size", f"must be in [32, 1024], got {self.image_size}")
        for name in ("occluder_prob", "truncation_prob", "view_profile_prob"):
            v = getattr(self, name)
            require(0.0 <= v <= 1.0, name, f"must be in [0, 1], got {v}")
        require(0 <= self.distractors <= 20, "distractors", f"must be in [0, 20], got {self.distractors}")


def _unit(angle: float) -> np.ndarray:
    """Unit vector at ``angle`` radians, measured from image-down (+y) towards image-right (+x)."""
    return np.array([math.sin(angle), math.cos(angle)])


def _colour(rng: np.random.Generator, hue_range: tuple[float, float], value: tuple[float, float] = (0.55, 1.0)) -> tuple[int, int, int]:
    h = (rng.uniform(*hue_range) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(*value))
    return int(r * 255), int(g * 255), int(b * 255)


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v * f))) for v in c)  # type: ignore[return-value]


#: Warm hues for the person's left limbs, cool hues for the right ones.
LEFT_HUES = (-20.0, 45.0)
RIGHT_HUES = (185.0, 250.0)


def skeleton(rng: np.random.Generator, size: int, truncation_prob: float, profile_prob: float) -> tuple[np.ndarray, dict]:
    """Sample the 16 MPII joints (0-based pixel coordinates) of one figure and its drawing facts."""
    h = rng.uniform(0.55, 0.8) * size
    var = lambda: rng.uniform(0.92, 1.08)  # noqa: E731 - per-segment proportion variation
    lean = math.radians(float(np.clip(rng.normal(0, 12), -35, 35)))
    up = -_unit(lean)  # torso axis, pelvis -> thorax
    down = -up
    front = rng.random() < 0.5  # front view: the person's left appears on the image right
    profile = rng.random() < profile_prob
    width = 0.3 if profile else 1.0
    left_side = np.array([up[1], -up[0]]) * (1 if front else -1)  # perpendicular, towards person's left

    pelvis = np.array([size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + 0.12 * h + rng.uniform(-0.06, 0.06) * size])
    if rng.random() < truncation_prob:
        shift = _unit(rng.uniform(0, 2 * math.pi)) * rng.uniform(0.25, 0.45) * size
        pelvis = pelvis + shift
    thorax = pelvis + up * TORSO * h * var()
    neck = thorax + up * NECK * h * var()
    tilt = math.radians(rng.uniform(-20, 20))
    head_top = neck + (-_unit(lean + tilt)) * HEAD * h * var()

    j = np.zeros((16, 2))
    j[6], j[7], j[8], j[9] = pelvis, thorax, neck, head_top
    base = math.atan2(down[0], down[1])  # angle of the torso's down direction
    for side, (sho, elb, wri, hip, kne, ank) in ((+1, (13, 14, 15, 3, 4, 5)), (-1, (12, 11, 10, 2, 1, 0))):
        outward = left_side * side  # towards this side of the body
        out_sign = 1.0 if (outward[0] * math.cos(base) - outward[1] * math.sin(base)) > 0 else -1.0
        j[sho] = thorax - up * 0.02 * h + outward * SHOULDER_HALF_WIDTH * h * width * var()
        j[hip] = pelvis + outward * HIP_HALF_WIDTH * h * width * var()
        # arms: abduction from hanging (0) to raised overhead (~170 deg), elbow flexion 0-145 deg
        a_upper = base + out_sign * math.radians(rng.uniform(-30, 170))
        j[elb] = j[sho] + _unit(a_upper) * UPPER_ARM * h * var()
        a_fore = a_upper + (1 if rng.random() < 0.5 else -1) * math.radians(rng.uniform(0, 145))
        j[wri] = j[elb] + _unit(a_fore) * FOREARM * h * var()
        # legs: abduction/flexion -25..70 deg, knee flexion 0-120 deg (mostly one way)
        a_thigh = base + out_sign * math.radians(rng.uniform(-25, 70))
        j[kne] = j[hip] + _unit(a_thigh) * THIGH * h * var()
        bend = -out_sign if rng.random() < 0.8 else out_sign
        a_shin = a_thigh + bend * math.radians(rng.uniform(0, 120))
        j[ank] = j[kne] + _unit(a_shin) * SHIN * h * var()
    return j, {"height": h, "front": front}


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    cells = int(rng.integers(2, 7))
    # muted colour fields (mixed with grey) so the figure is not lost in pure noise
    grey = rng.uniform(60, 200)
    field = (0.55 * rng.uniform(0, 255, (cells, cells, 3)) + 0.45 * grey).astype(np.uint8)
    img = Image.fromarray(field, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, rng.uniform(4, 25), arr.shape)
    if rng.random() < 0.5:  # stripes / texture
        period = rng.uniform(6, 30) * SUPERSAMPLE
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        arr += wave[..., None] * rng.uniform(5, 40)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _limb(draw: ImageDraw.ImageDraw, a: np.ndarray, b: np.ndarray, width: float, colour) -> None:
    w = max(1, int(round(width)))
    draw.line([tuple(a), tuple(b)], fill=colour, width=w)
    r = w / 2
    for p in (a, b):
        draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=colour)


def render(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """One image with its (16, 2) joints (0-based) and (16,) labeled flags."""
    size = cfg.image_size
    big = size * SUPERSAMPLE
    joints, info = skeleton(rng, size, cfg.truncation_prob, cfg.view_profile_prob)
    h = info["height"] * SUPERSAMPLE
    pts = (joints + 0.5) * SUPERSAMPLE - 0.5  # 0-based centres at the drawing resolution
    img = _background(rng, big)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, cfg.distractors + 1))):
        a = rng.uniform(0, big, 2)
        b = a + _unit(rng.uniform(0, 2 * math.pi)) * rng.uniform(0.1, 0.3) * h
        hues = LEFT_HUES if rng.random() < 0.5 else RIGHT_HUES
        _limb(draw, a, b, rng.uniform(0.04, 0.07) * h, _colour(rng, hues))

    left = {"upper": _colour(rng, LEFT_HUES), "lower": None}
    right = {"upper": _colour(rng, RIGHT_HUES), "lower": None}
    left["lower"] = _shade(left["upper"], rng.uniform(0.55, 0.75))
    right["lower"] = _shade(right["upper"], rng.uniform(0.55, 0.75))
    torso_colour = _colour(rng, (60.0, 170.0), (0.3, 0.9))  # greens: neither warm nor cool
    skin = _colour(rng, (20.0, 35.0), (0.5, 0.95))

    limbs = {
        "left_arm": [(13, 14, "upper_arm", left["upper"]), (14, 15, "forearm", left["lower"])],
        "right_arm": [(12, 11, "upper_arm", right["upper"]), (11, 10, "forearm", right["lower"])],
        "left_leg": [(3, 4, "thigh", left["upper"]), (4, 5, "shin", left["lower"])],
        "right_leg": [(2, 1, "thigh", right["upper"]), (1, 0, "shin", right["lower"])],
    }
    # the limbs on the far side of the body are drawn first (behind the torso)
    far = ["right_arm", "right_leg"] if info["front"] else ["left_arm", "left_leg"]
    near = [k for k in limbs if k not in far]
    for name in far:
        for a, b, kind, colour in limbs[name]:
            _limb(draw, pts[a], pts[b], WIDTHS[kind] * h, colour)
    draw.polygon([tuple(pts[12]), tuple(pts[13]), tuple(pts[3]), tuple(pts[2])], fill=torso_colour)
    _limb(draw, pts[7], pts[6], 0.07 * h, torso_colour)
    _limb(draw, pts[8], pts[7], 0.04 * h, skin)
    centre = (pts[8] + pts[9]) / 2
    r = np.linalg.norm(pts[9] - pts[8]) / 2
    draw.ellipse([centre[0] - r * 0.8, centre[1] - r, centre[0] + r * 0.8, centre[1] + r], fill=skin)
    for name in near:
        for a, b, kind, colour in limbs[name]:
            _limb(draw, pts[a], pts[b], WIDTHS[kind] * h, colour)
    for idx, colour in ((15, left["lower"]), (5, left["lower"]), (10, right["lower"]), (0, right["lower"])):
        r = 0.03 * h
        draw.ellipse([pts[idx][0] - r, pts[idx][1] - r, pts[idx][0] + r, pts[idx][1] + r], fill=_shade(colour, 0.7))

    if rng.random() < cfg.occluder_prob:
        for _ in range(int(rng.integers(1, 3))):
            target = pts[int(rng.integers(0, 16))]
            w, hh = rng.uniform(0.12, 0.3, 2) * h
            box = [target[0] - w / 2 + rng.uniform(-0.5, 0.5) * w, target[1] - hh / 2 + rng.uniform(-0.5, 0.5) * hh]
            draw.rectangle([box[0], box[1], box[0] + w, box[1] + hh], fill=_colour(rng, (0, 360), (0.2, 0.9)))

    img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 0.8) * SUPERSAMPLE))
    img = img.resize((size, size), Image.Resampling.BOX)
    labeled = np.all((joints >= 0) & (joints <= size - 1), axis=1).astype(np.float32)
    return img, joints, labeled


def record_for(image: str, joints: np.ndarray, labeled: np.ndarray) -> dict:
    """The MPII JSON record (MATLAB 1-based coordinates) of one rendered figure."""
    height = float(np.linalg.norm(joints[9] - joints[8]) / HEAD * 1.0)  # body height from the head length
    torso_centre = (joints[6] + joints[7]) / 2
    head_centre = (joints[8] + joints[9]) / 2
    side = float(np.linalg.norm(joints[9] - joints[8]))
    out_joints = [[float(x) + 1.0, float(y) + 1.0] if v else [-1.0, -1.0] for (x, y), v in zip(joints, labeled)]
    return {
        "image": image,
        "center": [float(torso_centre[0]) + 1.0, float(torso_centre[1]) + 1.0],
        "scale": height / 200.0,
        "joints": out_joints,
        "joints_vis": [int(v) for v in labeled],
        "head_box": [float(head_centre[0] - side / 2) + 1.0, float(head_centre[1] - side / 2) + 1.0,
                     float(head_centre[0] + side / 2) + 1.0, float(head_centre[1] + side / 2) + 1.0],
    }


def generate(cfg: SyntheticConfig, split: str, index: int) -> tuple[Image.Image, dict]:
    """Image and MPII record number ``index`` of ``split`` (a pure function of the config)."""
    rng = np.random.default_rng([cfg.seed, SPLITS[split], index, GENERATOR_VERSION])
    img, joints, labeled = render(rng, cfg)
    return img, record_for(f"{split}_{index:06d}.jpg", joints, labeled)


MANIFEST = "synthetic.json"


def write_synthetic_mpii(root: str | Path, cfg: SyntheticConfig = SyntheticConfig(), progress=None) -> Path:
    """Write the synthetic set at ``root`` in the MPII layout; returns ``root``.

    If ``root`` already holds a set written with the same config and generator version, nothing is
    done. The set is built in a temporary folder beside ``root`` and moved into place at the end, so
    an interrupted run never leaves a half-written dataset.

    Raises:
        DataError: ``root`` exists and is not a synthetic set written by bnnctl (it is never
            overwritten), or it cannot be written.
    """
    root = Path(root)
    manifest = {"generator": "bnnctl.synthetic_mpii", "version": GENERATOR_VERSION, "config": asdict(cfg)}
    if root.exists():
        try:
            existing = json.loads((root / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing == manifest:
            return root
        if existing is None or existing.get("generator") != manifest["generator"]:
            raise DataError(f"{root} exists and is not a bnnctl synthetic dataset; choose another folder "
                            "(bnnctl never overwrites data it did not write)")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    except OSError as err:
        raise DataError(f"cannot write the synthetic dataset at {root}: {err.strerror}") from None
    try:
        (tmp / "images").mkdir()
        (tmp / "annot").mkdir()
        total = cfg.train + cfg.valid
        done = 0
        for split, count in (("train", cfg.train), ("valid", cfg.valid)):
            records = []
            for i in range(count):
                img, record = generate(cfg, split, i)
                img.save(tmp / "images" / record["image"], quality=92)
                records.append(record)
                done += 1
                if progress is not None:
                    progress(done, total)
            (tmp / "annot" / f"{split}.json").write_text(json.dumps(records))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if read_manifest(root / MANIFEST) == manifest:  # another process wrote the same set meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        elif root.exists():  # an older synthetic set: replace it
            old = root.with_name(f".{root.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            publish(tmp, root, lambda: read_manifest(root / MANIFEST) == manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root

