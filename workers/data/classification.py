"""Classification data: an ImageFolder reader (the ImageNet layout) with the standard transforms,
and the embedded real set (scikit-learn's handwritten digits, shipped inside the package) written
in the same layout so the same reader runs on it.

Layout::  ROOT/train/<class>/<image>   ROOT/val/<class>/<image>
The class index is the position of the class folder in sorted order.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..config import require
from ..errors import DataError
from .publish import publish, read_manifest
from .pose import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
#: Evaluation resizes the shorter side to size * 256 / 224, then centre-crops (the ImageNet protocol).
EVAL_RESIZE_RATIO = 256 / 224
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)

IMAGENET_LAYOUT_HELP = (
    "expected the ImageFolder layout {root}/train/<class>/<image> and {root}/val/<class>/<image> "
    "(ImageNet's ILSVRC-2012 train and val images sorted into one folder per class). Get ImageNet "
    "from its official site; `bnnctl data digits {root}` writes the small embedded digits set in this layout."
)


@dataclass(frozen=True)
class ClassAugmentConfig:
    """Training augmentation: a random crop and a horizontal flip.

    Attributes:
        crop: "random_resized": a random area fraction in [min_area, 1] and aspect ratio in [3/4, 4/3],
            resized to the input size (Inception-style, torchvision's RandomResizedCrop);
            "resize_random": the shorter side resized to ``resize`` px, then a random input-size
            crop (IT §5: "resizing the images to have 256px over the smallest dimension and then
            randomly cropping them"; MT §5.2 likewise).
        min_area: the smallest area fraction of "random_resized".
        resize: the shorter side of "resize_random", in pixels (at least the input size).
        flip: mirror half of the images.
    """

    crop: Literal["random_resized", "resize_random"] = "random_resized"
    min_area: float = 0.08
    resize: int = 256
    flip: bool = True

    def __post_init__(self) -> None:
        require(0.0 < self.min_area <= 1.0, "min_area", f"must be in (0, 1], got {self.min_area}")
        require(1 <= self.resize <= 16384, "resize", f"must be in [1, 16384] pixels, got {self.resize}")


def scan_image_folder(root: str | Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, class index)]) of ``root/split``, both in sorted order."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"image folder not found at {folder}: " + IMAGENET_LAYOUT_HELP.format(root=root))
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders: " + IMAGENET_LAYOUT_HELP.format(root=root))
    samples = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).iterdir())
               if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise DataError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def _normalize(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(array).permute(2, 0, 1)
    return (t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator, min_area: float) -> Image.Image:
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(min_area, 1.0)
        log_ratio = rng.uniform(math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1]))
        ratio = math.exp(log_ratio)
        cw = int(round(math.sqrt(area * ratio)))
        ch = int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x = int(rng.integers(0, w - cw + 1))
            y = int(rng.integers(0, h - ch + 1))
            return image.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
    return center_crop(image, size, 1.0)  # fallback: the whole image


def resize_random_crop(image: Image.Image, size: int, rng: np.random.Generator, resize: int) -> Image.Image:
    """The shorter side resized to ``resize`` px (aspect kept), then a random ``size`` x ``size`` crop."""
    w, h = image.size
    scale = max(resize, size) / min(w, h)
    nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    x = int(rng.integers(0, nw - size + 1))
    y = int(rng.integers(0, nh - size + 1))
    return image.crop((x, y, x + size, y + size))


def center_crop(image: Image.Image, size: int, resize_ratio: float = EVAL_RESIZE_RATIO) -> Image.Image:
    w, h = image.size
    short = max(1, int(round(size * resize_ratio)))
    scale = short / min(w, h)
    nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    x, y = (nw - size) // 2, (nh - size) // 2
    return image.crop((x, y, x + size, y + size))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Items are dicts ``image`` (3, S, S), ``label``, ``index``. Training augmentation draws from a
    generator seeded by (seed, epoch, index) (see :meth:`set_epoch`)."""

    def __init__(self, root: str | Path, split: str, size: int, augment: ClassAugmentConfig | None = None,
                 seed: int = 0, limit: int | None = None) -> None:
        self.classes, samples = scan_image_folder(root, split)
        if limit is not None and limit < len(samples):
            # an evenly spaced subset keeps every class represented
            idx = np.linspace(0, len(samples) - 1, limit).round().astype(int)
            samples = [samples[i] for i in idx]
        self.samples = samples
        self.size, self.augment, self.seed, self.epoch = size, augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err}") from None
        if self.augment is None:
            image = center_crop(image, self.size)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if self.augment.crop == "resize_random":
                image = resize_random_crop(image, self.size, rng, self.augment.resize)
            else:
                image = random_resized_crop(image, self.size, rng, self.augment.min_area)
            if self.augment.flip and rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"image": _normalize(image), "label": label, "index": index}


DIGITS_MANIFEST = "digits.json"
#: Every fifth image (by index) goes to val: a deterministic, class-balanced 80/20 split.
DIGITS_VAL_EVERY = 5
DIGITS_IMAGE_SIZE = 32


def write_digits_imagefolder(root: str | Path) -> Path:
    """Write scikit-learn's 1,797 handwritten digits (8x8, shipped with the package; no download) as
    32x32 PNGs in the ImageFolder layout at ``root`` (written atomically; a no-op if present)."""
    from sklearn.datasets import load_digits

    root = Path(root)
    manifest = {"generator": "bnnctl.digits", "version": 1, "size": DIGITS_IMAGE_SIZE}
    if root.exists():
        try:
            if json.loads((root / DIGITS_MANIFEST).read_text()) == manifest:
                return root
        except (OSError, json.JSONDecodeError):
            pass
        raise DataError(f"{root} exists and is not the bnnctl digits set; choose another folder")
    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            split = "val" if i % DIGITS_VAL_EVERY == 0 else "train"
            folder = tmp / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            array = (pixels / 16.0 * 255.0).astype(np.uint8)
            Image.fromarray(array, "L").resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.Resampling.BICUBIC) \
                .save(folder / f"{i:04d}.png")
        (tmp / DIGITS_MANIFEST).write_text(json.dumps(manifest))
        publish(tmp, root, lambda: read_manifest(root / DIGITS_MANIFEST) == manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
