"""What differs between pose estimation and classification: datasets, loss and evaluation."""
from __future__ import annotations

import math

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.classification import ImageFolderDataset, write_digits_imagefolder
from ..data.geometry import apply_affine, invert_affine
from ..data.heatmaps import HeatmapCodec, flip_heatmaps
from ..data.pose import (LSP_FLIP_PAIRS, LSP_IN_MPII, LSP_JOINTS, MPII_FLIP_PAIRS, MPII_JOINTS, PoseDataset,
                         lsp_as_mpii, read_lsp, read_mpii)
from ..data.synthetic import write_synthetic_mpii
from ..metrics import PCKH_STRICT_THRESHOLD, pck_lsp, pckh, topk_accuracy
from .config import TrainConfig

EMBEDDED_ROOT = Path(".bnnctl") / "data"


def dataset_root(cfg: TrainConfig) -> Path:
    if cfg.data.root is not None:
        return Path(cfg.data.root)
    if cfg.data.dataset == "synthetic":
        s = cfg.data.synthetic
        return EMBEDDED_ROOT / f"synthetic-{s.train}-{s.valid}-{s.image_size}-seed{s.seed}"
    if cfg.data.dataset == "digits":
        return EMBEDDED_ROOT / "digits"
    from ..errors import DataError

    raise DataError(f"data.root is required for the {cfg.data.dataset!r} dataset (the folder that holds it)")


def prepare_root(cfg: TrainConfig) -> Path:
    """The dataset folder, with the embedded sets (synthetic, digits) written there on first use."""
    root = dataset_root(cfg)
    if cfg.data.dataset == "synthetic":
        write_synthetic_mpii(root, cfg.data.synthetic)
    elif cfg.data.dataset == "digits":
        write_digits_imagefolder(root)
    return root


def _limit(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


def _attention(f: Tensor) -> Tensor:
    """Spatial attention map of features (mean of squares over channels, L2-normalized per sample)."""
    a = f.pow(2).mean(dim=1).flatten(1)
    return F.normalize(a, dim=1)


def feature_matching(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis): per stack, the squared distance between the
    student's and the teacher's unit-norm attention maps, summed over positions (so in [0, 2] at any
    resolution) and averaged over the batch; summed over stacks."""
    return sum((_attention(s) - _attention(t)).pow(2).sum(dim=1).mean() for s, t in zip(student, teacher))


class PoseTask:
    metric = "pckh"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        root = prepare_root(cfg)
        d = cfg.data
        #: where the scored joints sit among the network's outputs (LSP in MPII's layout: 14 of 16)
        self.scored: tuple[int, ...] | None = None
        if d.dataset == "lsp":
            train, val = read_lsp(root, "train"), read_lsp(root, "test")
            self.joints, self.pairs, self.metric = LSP_JOINTS, LSP_FLIP_PAIRS, "pck"
            if d.pose_layout == "mpii16":  # the network predicts MPII's joints; PCK scores LSP's
                train, val = lsp_as_mpii(train), lsp_as_mpii(val)
                self.pairs, self.scored = MPII_FLIP_PAIRS, LSP_IN_MPII
        else:
            train, val = read_mpii(root, "train"), read_mpii(root, "valid")
            self.joints, self.pairs = MPII_JOINTS, MPII_FLIP_PAIRS
        self.codec = HeatmapCodec(d.input_size, d.resolved_heatmap_size, d.sigma)
        images = root / "images"
        self.train_set = PoseDataset(_limit(train, d.train_limit), images, self.codec, self.pairs, d.resolved_augment, cfg.seed)
        self.val_set = PoseDataset(_limit(val, d.val_limit), images, self.codec, self.pairs, None, cfg.seed)
        #: the joint each network output predicts (``joints``: those scored and tabled)
        self.output_joints = MPII_JOINTS if self.scored else self.joints
        self.num_outputs = len(self.output_joints)

    # -- loss -------------------------------------------------------------------------------------
    def heatmaps(self, logits: Tensor) -> Tensor:
        """Network output -> heatmaps in [0, 1] (sigmoid for BCE-trained networks)."""
        return torch.sigmoid(logits) if self.cfg.loss == "bce" else logits

    def _one(self, out: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        w = weight[:, :, None, None]
        if self.cfg.loss == "bce":
            per = F.binary_cross_entropy_with_logits(out, target, reduction="none")
        else:
            per = (out - target).pow(2)
        return (per * w).mean()

    def loss(self, outputs: list[Tensor], batch: dict, teacher: dict | None = None) -> Tensor:
        """Supervision on every stack. With a teacher: the ground truth and the teacher's heatmaps
        (soft labels, for every joint) mixed by ``distill.weight`` in the same loss (IT §3.6)."""
        target, weight = batch["target"], batch["weight"]
        dw = self.cfg.distill.weight if teacher is not None else 0.0
        total = outputs[0].new_zeros(())
        for out in outputs:
            total = total + (1 - dw) * self._one(out, target, weight)
            if teacher is not None:
                total = total + dw * self._one(out, teacher["soft"], torch.ones_like(weight))
        if teacher is not None and self.cfg.distill.feature_weight > 0:
            fm = feature_matching(teacher["student_features"], teacher["features"])
            total = total + self.cfg.distill.feature_weight * fm
        return total

    def teacher_targets(self, teacher: nn.Module, teacher_loss: str, images: Tensor, features: bool) -> dict:
        with torch.no_grad():
            out, feats = teacher(images, return_features=True)
            last = out[-1]
            soft = torch.sigmoid(last) if teacher_loss == "bce" else last.clamp(0, 1)
        return {"soft": soft, "features": feats if features else None}

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, Any]:
        preds, losses = [], []
        for batch in loader:
            images = batch["image"].to(device)
            outputs = model(images)
            losses.append(float(self.loss(outputs, {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)})))
            hm = self.heatmaps(outputs[-1])
            if self.cfg.data.resolved_flip_test:
                flipped = self.heatmaps(model(images.flip(-1))[-1])
                hm = 0.5 * (hm + flip_heatmaps(flipped, self.pairs))
            coords, _ = self.codec.decode(hm.float().cpu())
            for c, crop in zip(coords.numpy(), batch["crop"].numpy()):
                preds.append(apply_affine(c, invert_affine(crop)))
        records = self.val_set.records
        pred = np.stack(preds)
        gt = np.stack([r.joints for r in records])
        labeled = np.stack([r.visible for r in records])
        metrics: dict[str, Any] = {"val_loss": float(np.mean(losses))}
        if self.metric == "pck":
            if self.scored:
                pred, gt, labeled = pred[:, self.scored], gt[:, self.scored], labeled[:, self.scored]
            res = pck_lsp(pred, gt, labeled)
            metrics["pck"] = res.groups["Mean"]
        else:
            boxes = np.stack([r.head_box for r in records])
            res = pckh(pred, gt, labeled, boxes)
            metrics["pckh"] = res.groups["Mean"]
            metrics["pckh@0.1"] = pckh(pred, gt, labeled, boxes, PCKH_STRICT_THRESHOLD).groups["Mean"]
            for name, value in res.groups.items():
                if name != "Mean" and math.isfinite(value):  # a group with a never-labeled joint: undefined
                    metrics[f"pckh_{name.lower()}"] = value
        # None (JSON null) for a joint never labeled in the validation set: it has no PCKh
        metrics["per_joint"] = {name: float(v) if math.isfinite(v) else None for name, v in zip(self.joints, res.per_joint)}
        return metrics


    @torch.no_grad()
    def render_predictions(self, model: nn.Module, path: Path, device: torch.device, count: int = 8) -> Path | None:
        """A PNG of the first validation crops: each predicted joint a dot (red: left, blue: right,
        yellow: centre), each labeled true joint a white ring joined to its prediction by a grey
        line (the error), and a legend under the crops. For the run's artifacts and the dashboard."""
        from PIL import Image, ImageDraw

        from ..data.pose import IMAGENET_MEAN, IMAGENET_STD

        items = [self.val_set[i] for i in range(min(count, len(self.val_set)))]
        if not items:
            return None
        images = torch.stack([it["image"] for it in items]).to(device)
        coords, _ = self.codec.decode(self.heatmaps(model(images)[-1]).float().cpu())
        size = self.codec.input_size
        scale = max(1, 128 // size)
        tile_px = size * scale
        legend = _legend(tile_px * len(items))
        sheet = Image.new("RGB", (tile_px * len(items), tile_px + legend.height), (255, 255, 255))
        sheet.paste(legend, (0, tile_px))
        mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        for k, (item, pred) in enumerate(zip(items, coords.numpy())):
            pixels = ((item["image"] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels).resize((tile_px, tile_px), Image.Resampling.NEAREST)
            draw = ImageDraw.Draw(tile)
            truth = apply_affine(self.val_set.records[item["index"]].joints, item["crop"].numpy())
            points = [((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in pred]
            labeled = [j for j in range(len(points)) if item["weight"][j] > 0]
            for j in labeled:  # errors first, under the markers
                tx, ty = (truth[j] + 0.5) * scale - 0.5
                draw.line([points[j], (tx, ty)], fill=ERROR_COLOUR)
            for j in labeled:
                tx, ty = (truth[j] + 0.5) * scale - 0.5
                draw.ellipse([tx - 3, ty - 3, tx + 3, ty + 3], outline=TRUTH_COLOUR)
            for j, (cx, cy) in enumerate(points):
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=side_colour(self.output_joints[j]))
            sheet.paste(tile, (k * tile_px, 0))
        sheet.save(path)
        return path


#: the colours of the predictions image (and of its legend)
LEFT_COLOUR, RIGHT_COLOUR, CENTRE_COLOUR = (255, 80, 60), (60, 140, 255), (255, 230, 0)
TRUTH_COLOUR, ERROR_COLOUR = (255, 255, 255), (170, 170, 170)


def side_colour(joint: str) -> tuple[int, int, int]:
    return LEFT_COLOUR if joint.startswith("l_") else RIGHT_COLOUR if joint.startswith("r_") else CENTRE_COLOUR


def _legend(width: int):
    """The legend strip of the predictions image: its entries left to right, wrapped to ``width``,
    on a dark background (the markers as drawn on the crops)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    entries = [("dot", LEFT_COLOUR, "predicted, left"), ("dot", RIGHT_COLOUR, "predicted, right"),
               ("dot", CENTRE_COLOUR, "predicted, centre"), ("ring", TRUTH_COLOUR, "ground truth (labeled joints)"),
               ("line", ERROR_COLOUR, "error (prediction to truth)")]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h, x, y, placed = 14, 6, 3, []
    for kind, colour, text in entries:
        w = 18 + int(measure.textlength(text, font=font)) + 14
        if x + w > width and x > 6:
            x, y = 6, y + line_h
        placed.append((x, y, kind, colour, text))
        x += w
    strip = Image.new("RGB", (width, y + line_h + 3), (40, 40, 40))
    draw = ImageDraw.Draw(strip)
    for x, y, kind, colour, text in placed:
        cy = y + line_h // 2
        if kind == "dot":
            draw.ellipse([x + 4, cy - 2, x + 8, cy + 2], fill=colour)
        elif kind == "ring":
            draw.ellipse([x + 3, cy - 3, x + 9, cy + 3], outline=colour)
        else:
            draw.line([(x, cy), (x + 12, cy)], fill=colour)
        draw.text((x + 18, y + 1), text, fill=(235, 235, 235), font=font)
    return strip


class ClassificationTask:
    metric = "top1"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        root = prepare_root(cfg)
        d = cfg.data
        self.train_set = ImageFolderDataset(root, "train", d.input_size, d.class_augment, cfg.seed, d.train_limit)
        self.val_set = ImageFolderDataset(root, "val", d.input_size, None, cfg.seed, d.val_limit)
        self.num_outputs = len(self.train_set.classes)

    def loss(self, outputs: Tensor, batch: dict, teacher: dict | None = None) -> Tensor:
        ce = F.cross_entropy(outputs, batch["label"])
        if teacher is None:
            return ce
        t = self.cfg.distill.temperature
        kl = F.kl_div(F.log_softmax(outputs / t, 1), F.log_softmax(teacher["soft"] / t, 1),
                      log_target=True, reduction="batchmean") * t * t
        w = self.cfg.distill.weight
        return (1 - w) * ce + w * kl

    def teacher_targets(self, teacher: nn.Module, teacher_loss: str, images: Tensor, features: bool) -> dict:
        with torch.no_grad():
            return {"soft": teacher(images), "features": None}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, Any]:
        logits, labels, losses = [], [], []
        for batch in loader:
            out = model(batch["image"].to(device))
            losses.append(float(F.cross_entropy(out, batch["label"].to(device))))
            logits.append(out.float().cpu().numpy())
            labels.append(batch["label"].numpy())
        acc = topk_accuracy(np.concatenate(logits), np.concatenate(labels), (1, 5))
        return {"val_loss": float(np.mean(losses)), "top1": acc[1], "top5": acc[5]}


def make_task(cfg: TrainConfig):
    return PoseTask(cfg) if cfg.task == "pose" else ClassificationTask(cfg)
