"""The frozen, typed configuration of one training run: everything needed to reproduce it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import require
from ..data.classification import ClassAugmentConfig
from ..data.pose import AugmentConfig
from ..data.synthetic import SyntheticConfig
from ..binarize import QUANTIZERS
from ..models import ModelConfig
from ..schedules import LambdaSchedule

DatasetKind = Literal["synthetic", "mpii", "lsp", "imagenet", "digits"]
POSE_DATASETS = ("synthetic", "mpii", "lsp")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how samples are prepared.

    Attributes:
        dataset: "synthetic" (embedded, written on first use), "mpii", "lsp", "imagenet",
            "digits" (embedded real set, written on first use).
        root: dataset folder. For the embedded sets, ``None`` means ``.bnnctl/data/<name>`` under
            the working directory.
        synthetic: size and difficulty of the synthetic set.
        input_size: side of the network input in pixels.
        heatmap_size: side of the heatmaps (pose); ``None`` = input_size / 4 (the hourglass stride).
        sigma: Gaussian heatmap sigma in heatmap pixels.
        augment / class_augment: pose / classification training augmentation; ``None`` = none.
        flip_test: average predictions with the mirrored image's at evaluation; ``None`` = on for
            MPII and LSP, off for the synthetic set (see ``AugmentConfig.flip``).
        pose_layout: "native" (the dataset's own joints) or "mpii16": LSP in MPII's 16-joint layout
            (pelvis and thorax interpolated, see ``data.pose.lsp_as_mpii``), so that a network
            pre-trained on MPII is fine-tuned on LSP without a new head (SG); PCK scores LSP's 14.
        train_limit, val_limit: use only the first N samples (quick runs).
        workers: DataLoader worker processes (0 = load in the training process).
    """

    dataset: DatasetKind = "synthetic"
    root: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    input_size: int = 64
    heatmap_size: int | None = None
    sigma: float = 1.0
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    class_augment: ClassAugmentConfig | None = field(default_factory=ClassAugmentConfig)
    flip_test: bool | None = None
    pose_layout: Literal["native", "mpii16"] = "native"
    train_limit: int | None = None
    val_limit: int | None = None
    workers: int = 0

    def __post_init__(self) -> None:
        require(16 <= self.input_size <= 4096, "input_size", f"must be in [16, 4096], got {self.input_size}")
        require(self.heatmap_size is None or self.heatmap_size >= 4, "heatmap_size", "must be >= 4")
        require(self.sigma > 0, "sigma", f"must be positive, got {self.sigma}")
        for name in ("train_limit", "val_limit"):
            v = getattr(self, name)
            require(v is None or v >= 1, name, f"must be a positive integer, got {v}")
        require(0 <= self.workers <= 256, "workers", f"must be in [0, 256], got {self.workers}")
        require(self.pose_layout == "native" or self.dataset == "lsp", "pose_layout",
                f"'mpii16' maps LSP's joints to MPII's; {self.dataset!r} has its own layout (use native)")
        a = self.class_augment
        require(a is None or a.crop != "resize_random" or a.resize >= self.input_size, "class_augment.resize",
                f"resizes the shorter side to {a.resize if a else 0} px, smaller than the {self.input_size} px crop "
                "(input_size)")

    @property
    def task(self) -> str:
        return "pose" if self.dataset in POSE_DATASETS else "classification"

    @property
    def mirror_consistent(self) -> bool:
        """Whether a mirrored sample with swapped left/right labels is still a valid sample."""
        return self.dataset != "synthetic"

    @property
    def resolved_augment(self) -> AugmentConfig | None:
        if self.augment is None or self.augment.flip is not None:
            return self.augment
        return dataclasses.replace(self.augment, flip=self.mirror_consistent)

    @property
    def resolved_flip_test(self) -> bool:
        return self.mirror_consistent if self.flip_test is None else self.flip_test

    @property
    def resolved_heatmap_size(self) -> int:
        return self.heatmap_size or self.input_size // 4


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
        name: "rmsprop" (IT, MT, SG pose), "adam" (IT ImageNet), "sgd".
        lr: initial learning rate (IT's value was lost in extraction; 2.5e-4 assumed).
        lr_steps: epochs at which the rate is multiplied by ``lr_gamma`` (IT pose: 40, 80).
        weight_decay: L2 on conv / linear weights and re-parametrization factors only.
        decay_all: also decay BatchNorm, alpha, PReLU, gates and biases (off by default).
    """

    name: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    lr: float = 2.5e-4
    lr_steps: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    decay_all: bool = False

    def __post_init__(self) -> None:
        require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a positive number, got {self.lr}")
        require(0 < self.lr_gamma <= 1, "lr_gamma", f"must be in (0, 1], got {self.lr_gamma}")
        require(all(s >= 1 for s in self.lr_steps) and list(self.lr_steps) == sorted(self.lr_steps), "lr_steps",
                f"must be increasing positive epochs, got {list(self.lr_steps)}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")

    def lr_at(self, epoch: int) -> float:
        """The learning rate during ``epoch`` (0-based): a pure function, so nothing to checkpoint."""
        return self.lr * self.lr_gamma ** sum(1 for s in self.lr_steps if epoch >= s)


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a trained teacher (IT §3.6).

    Attributes:
        teacher: checkpoint of the teacher (written by a previous run); ``None`` = no distillation.
        weight: pose: the loss is (1 - weight) BCE(ground truth) + weight BCE(teacher heatmaps);
            classification: (1 - weight) CE + weight T^2 KL. The paper's value was lost (0.5 assumed).
        feature_weight: feature matching (attention maps of each stack's features, see
            ``tasks.feature_matching``), for binary teachers (IT §3.6).
        temperature: classification softening temperature.
    """

    teacher: str | None = None
    weight: float = 0.5
    feature_weight: float = 0.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        require(0.0 <= self.weight <= 1.0, "weight", f"must be in [0, 1], got {self.weight}")
        require(self.feature_weight >= 0, "feature_weight", f"must be >= 0, got {self.feature_weight}")
        require(self.temperature > 0, "temperature", f"must be positive, got {self.temperature}")


MAX_EPOCHS = 10_000  # the papers train 100-200 epochs
MAX_BATCH = 65_536


@dataclass(frozen=True)
class TrainConfig:
    """One variant's training run.

    Attributes:
        model, data, optim, distill: see their classes.
        epochs, batch_size: training length and batch.
        loss: "bce" on heatmap logits (IT), "mse" on heatmaps (SG), "ce" (classification).
        lambda_schedule: sharpness schedule of sign approximations (progressive binarization);
            its ``total`` defaults to the run's epochs (or steps).
        lambda_groups: per-layer-group schedules, each naming its ``group`` (``stem``,
            ``stacks.0``, ``layers.2``...: see ``bnnctl models summary``); a group listed here follows
            its own schedule, the others ``lambda_schedule``. Tunable by index:
            ``lambda_groups[0].lambda_end``.
        init_from: a checkpoint whose model weights initialize this run (reverse-order
            initialization: stage 2 starts from stage 1).
        seed: everything random derives from it (initialization, data order, augmentation).
        max_batches: stop each epoch after this many batches (quick runs and tests).
        threads: torch CPU threads (``None`` = the task's CPUs when run by the orchestrator).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        schedule_offset, schedule_epochs: this run is epochs ``[offset, offset + epochs)`` of a
            training budget of ``schedule_epochs`` (``None``: offset + epochs) over which every
            schedule runs: stage 2 of a two-stage row continues stage 1's lambda schedule (the last
            epoch of the budget runs at ``lambda_end``) and its learning-rate schedule (``lr_steps``
            count epochs of the budget), so a two-stage row follows the same learning-rate
            trajectory as a one-stage row of the same budget.
        recalibrate_bn: before each evaluation, re-estimate the BatchNorm running statistics with
            the exact sign forward on training batches, so that the network evaluated (and saved,
            and exported) is the binary one (see ``bnstats.py``). ``None``: on when the training
            forward is smooth (progressive binarization), off otherwise.
        recalibrate_batches: training batches the re-estimation averages over (at most one epoch's).
        deterministic: ask torch for deterministic algorithms (GPU training repeats exactly, where
            torch allows it; some operations are slower or refused).
        latency: after training, time the deployed model on the CPU (batch 1, one thread, float vs
            binary; seconds per variant) for the tables' latency column. Not part of the variant's
            identity: switching it off does not retrain anything.
        ranks: data-parallel workers training this run together (set by the orchestrator from the
            spec's ``resources.workers``; see ``parallel.py``). ``batch_size`` stays the global batch.
        sync_batchnorm: with several ranks, BatchNorm normalises over the global batch (the math of
            one worker); off, over each rank's share. Part of the identity only when it changes the
            math: ``ranks > 1`` with ``sync_batchnorm: false`` (see :func:`comparable`).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    epochs: int = 120
    batch_size: int = 16
    loss: Literal["bce", "mse", "ce"] = "bce"
    lambda_schedule: LambdaSchedule = field(default_factory=LambdaSchedule)
    lambda_groups: tuple[LambdaSchedule, ...] = ()
    init_from: str | None = None
    seed: int = 0
    max_batches: int | None = None
    threads: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    schedule_offset: int = 0
    schedule_epochs: int | None = None
    deterministic: bool = False
    recalibrate_bn: bool | None = None
    recalibrate_batches: int = 100
    latency: bool = True
    ranks: int = 1
    sync_batchnorm: bool = True

    def __post_init__(self) -> None:
        require(1 <= self.epochs <= MAX_EPOCHS, "epochs", f"must be in [1, {MAX_EPOCHS}], got {self.epochs}")
        require(1 <= self.batch_size <= MAX_BATCH, "batch_size", f"must be in [1, {MAX_BATCH}], got {self.batch_size}")
        require(self.max_batches is None or self.max_batches >= 1, "max_batches", "must be >= 1")
        require(self.threads is None or 1 <= self.threads <= 1024, "threads", f"must be in [1, 1024], got {self.threads}")
        require(0 <= self.seed <= 2**32 - 1, "seed", f"must be in [0, {2**32 - 1}], got {self.seed}")
        require(0 <= self.schedule_offset <= MAX_EPOCHS, "schedule_offset", f"must be in [0, {MAX_EPOCHS}]")
        require(self.schedule_epochs is None or self.schedule_offset + self.epochs <= self.schedule_epochs <= 2 * MAX_EPOCHS,
                "schedule_epochs", f"must cover this run (>= schedule_offset + epochs = "
                f"{self.schedule_offset + self.epochs}), got {self.schedule_epochs}")
        require(1 <= self.ranks <= 1024, "ranks", f"must be in [1, 1024], got {self.ranks}")
        require(1 <= self.recalibrate_batches <= 1_000_000, "recalibrate_batches",
                f"must be in [1, 1000000], got {self.recalibrate_batches}")
        groups = [g.group for g in self.lambda_groups]
        require(all(groups), "lambda_groups", "every per-group schedule needs its `group` (e.g. stem, stacks.0)")
        require(len(set(groups)) == len(groups), "lambda_groups", f"a group is listed twice: {groups}")
        task = self.model.architecture.task
        require(task == self.data.task, "data.dataset",
                f"{self.data.dataset!r} is a {self.data.task} dataset but model {self.model.arch!r} is a {task} model")
        allowed = ("bce", "mse") if task == "pose" else ("ce",)
        require(self.loss in allowed, "loss", f"{self.loss!r} does not fit a {task} model; use one of {', '.join(allowed)}")

    @property
    def task(self) -> str:
        return self.data.task

    @property
    def smooth(self) -> bool:
        """Whether the training forward uses a smooth approximation of sign anywhere (progressive
        binarization of the binarized activations or weights)."""
        b = self.model.binarize
        return ((b.activations and not QUANTIZERS.get(b.quantizer).exact)
                or (b.weights and not QUANTIZERS.get(b.weight_quantizer).exact))

    @property
    def recalibrates(self) -> bool:
        """Whether BatchNorm statistics are re-estimated with the exact forward before evaluation."""
        return self.smooth if self.recalibrate_bn is None else self.recalibrate_bn


#: Fields added after bnnctl 0.1 (dotted paths for fields of nested objects), left out of a config's
#: comparable form while they hold their default, so that variant identities and checkpoints written
#: before they existed stay valid.
LATER_FIELDS = {"lambda_groups": [], "schedule_offset": 0, "schedule_epochs": None, "deterministic": False,
                "recalibrate_bn": None, "recalibrate_batches": 100, "model.gate.init_range": None,
                "data.class_augment.crop": "random_resized", "data.class_augment.resize": 256,
                "data.pose_layout": "native"}
#: Fields that change what a run measures besides training, never what it trains.
RUN_ONLY_FIELDS = {"latency"}


def _without_default(data: Any, path: list[str], default: Any) -> Any:
    if not isinstance(data, dict) or path[0] not in data:
        return data
    head, rest = path[0], path[1:]
    if not rest:
        return {k: v for k, v in data.items() if k != head} if data[head] == default else data
    return {**data, head: _without_default(data[head], rest, default)}


def comparable(config_data: dict) -> dict:
    """The plain-data config without later-added fields at their defaults and without run-only
    fields (identity, resume checks)."""
    out = {k: v for k, v in config_data.items() if k not in RUN_ONLY_FIELDS}
    if out.get("ranks", 1) == 1 or out.get("sync_batchnorm", True):
        # one worker, or several with BatchNorm over the global batch: the math of one worker (the
        # gradients are the global batch's either way), so the same identity and the same checkpoint
        out.pop("ranks", None)
        out.pop("sync_batchnorm", None)
    for path, default in LATER_FIELDS.items():
        out = _without_default(out, path.split("."), default)
    return out
