"""``run_variant(config, reporter) -> TrainResult``: train and evaluate one variant end to end.

A readable, linear loop (after nanoGPT): build the task and the model, restore the last checkpoint
if there is one, then per epoch: train, evaluate with the exact sign (during progressive
binarization with the approximation too, and with BatchNorm statistics re-estimated for the sign
forward), checkpoint, report. Everything random derives from the
seed, and every per-epoch quantity (learning rate, lambda, data order, augmentation) is a pure
function of the epoch, so a run resumed from its last checkpoint ends exactly as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..accounting import account
from ..binarize import Quantizer
from ..config import to_dict
from ..diagnostics import FlipTracker, clip_fractions, soft_activation_tally, soft_weight_fraction
from ..errors import ConfigError, TrainingError
from ..fused import fuse
from ..latency import measure as measure_latency
from ..models import build_model
from ..schedules import LambdaScheduler
from .bnstats import recalibrate_batchnorm
from .checkpoint import init_from_checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint, share_checkpoint
from .config import TrainConfig, comparable
from .parallel import ShardedBatches, all_reduce_gradients, broadcast_flag, sync_batchnorm, world
from .reporter import Reporter
from .tasks import make_task

LAST, BEST = "last.pt", "best.pt"
#: Parameters whose names contain these are not weight-decayed unless ``optim.decay_all``.
NO_DECAY = ("bn", "bias", "alpha", "gate", "act.weight", "head.bias")


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run produced. Only finished runs are results of a study."""

    status: str  # "completed" or "stopped" (the reporter asked to stop)
    epochs_done: int
    metric: str  # the model-selection metric: "pckh", "pck" or "top1"
    metrics: dict[str, float]  # validation metrics of the last epoch
    per_joint: dict[str, float]
    best_metric: float
    best_epoch: int
    accounting: dict[str, Any]
    last_checkpoint: str
    best_checkpoint: str
    timings: dict[str, float]
    predictions_image: str | None = None  # pose: predicted joints drawn on validation crops
    #: where it trained: versions, device, CPU instruction set in use, threads (tables compare these)
    environment: dict[str, Any] = field(default_factory=dict)
    #: every reported value's best over the epochs (lowest for losses and times, highest otherwise)
    #: and the epoch it came from: what a study reports with ``report: best``
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_epochs: dict[str, int] = field(default_factory=dict)
    #: the deployed model's measured CPU latency (see workers/latency.py); empty when switched off
    latency: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe): what the state store and MLflow keep."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        """Back from :meth:`to_dict`; results stored before a field existed get its default."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def environment(device: torch.device, deterministic: bool) -> dict[str, Any]:
    """The facts that can change a result for the same config and seed."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        bnnctl = version("bnnctl")
    except PackageNotFoundError:
        bnnctl = "unknown"
    env: dict[str, Any] = {"bnnctl": bnnctl, "torch": torch.__version__.split("+")[0], "python": platform.python_version(),
                           "device": device.type, "threads": torch.get_num_threads(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "deterministic": deterministic,
                           # the GPUs this process may see ("": none, as a task that holds no GPU)
                           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def lower_is_better(name: str) -> bool:
    """Whether a reported value improves downwards (losses, times)."""
    return name.endswith("loss") or name.endswith("_time") or name.endswith("_s")


def best_over_epochs(history: list[tuple[int, dict[str, float]]]) -> tuple[dict[str, float], dict[str, int]]:
    """Each value's best over ``history`` and its epoch (the first epoch on a tie)."""
    best: dict[str, float] = {}
    when: dict[str, int] = {}
    for epoch, values in history:
        for name, value in values.items():
            if not math.isfinite(value):
                continue
            if name not in best or (value < best[name] if lower_is_better(name) else value > best[name]):
                best[name], when[name] = value, epoch
    return best, when


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda was requested but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (not o.decay_all and any(k in name for k in NO_DECAY)) else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=o.lr, momentum=o.momentum)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


def _loader(dataset, cfg: TrainConfig, shuffle: bool, epoch: int = 0, shard: tuple[int, int] = (0, 1)):
    """The epoch's batches (seeded order); with ``shard = (rank, ranks)``, this rank's share of each
    global batch (see parallel.py)."""
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch) if shuffle else None
    if shard[1] == 1:
        return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=shuffle, generator=generator,
                                           num_workers=cfg.data.workers, drop_last=False)
    order = (torch.utils.data.RandomSampler(dataset, generator=generator) if shuffle
             else torch.utils.data.SequentialSampler(dataset))
    batches = torch.utils.data.BatchSampler(order, cfg.batch_size, drop_last=False)
    # the loader draws its workers' base seed from the same generator first, as the one-worker loader does
    return torch.utils.data.DataLoader(dataset, batch_sampler=ShardedBatches(batches, *shard),
                                       num_workers=cfg.data.workers, generator=generator)


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _approximating(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer) and m.approximating]


def run_variant(config: TrainConfig, reporter: Reporter) -> TrainResult:
    """Train ``config`` to the end (or until the reporter says stop), resuming from
    ``reporter.checkpoint_dir / last.pt`` when it exists.

    Raises:
        TrainingError: the loss became NaN or infinite (reason "nan_loss"), or a checkpoint is
            unusable. No result is returned for a failed run.
        DataError, ConfigError: the data or the config is wrong.
    """
    run = _Run(config, reporter)
    run.restore()
    status = "completed"
    for epoch in range(run.start_epoch, config.epochs):
        losses, started = run.train_epoch(epoch)
        reported = run.evaluate(epoch, losses, started)
        if run.lead:  # data parallel: rank 0 keeps the files and speaks for the group
            run.checkpoint(epoch)
            reporter.report(epoch + 1, reported)
        else:
            run.epochs_done = epoch + 1
        if epoch + 1 < config.epochs and run.agree(run.lead and reporter.should_stop()):
            status = "stopped"
            break
    return run.result(status)


class _Run:
    """The state of one training run, in the steps ``run_variant`` takes: set up (device, data,
    model, teacher, optimizer), restore from the last checkpoint, train an epoch, evaluate it,
    checkpoint it, and the result."""

    def __init__(self, config: TrainConfig, reporter: Reporter) -> None:
        self.t_start = time.perf_counter()
        self.config, self.reporter = config, reporter
        if config.threads:
            torch.set_num_threads(config.threads)
        # per run, never left over from the previous task of a reused worker process
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(config.deterministic)
        torch.backends.cudnn.benchmark = False
        self.device = _device(config)
        self.rank, self.ranks = world()
        if self.ranks != config.ranks:
            raise ConfigError("ranks", f"the variant is planned for {config.ranks} data-parallel worker(s) but runs "
                              f"in a group of {self.ranks}")
        self.lead = self.rank == 0
        self.task = make_task(config)
        self.model_cfg = self._model_config()
        torch.manual_seed(config.seed)
        self.model = build_model(self.model_cfg)
        if config.init_from:
            init_from_checkpoint(self.model, config.init_from)
        if self.ranks > 1 and config.sync_batchnorm:
            sync_batchnorm(self.model)
        self.model.to(self.device)
        self.teacher, self.teacher_loss = self._teacher()
        self.optimizer = _optimizer(self.model, config)
        ckpt_dir = Path(reporter.checkpoint_dir)
        self.ckpt_dir, self.last_path, self.best_path = ckpt_dir, ckpt_dir / LAST, ckpt_dir / BEST
        self.config_data = to_dict(config)
        self.start_epoch, self.best, self.best_epoch = 0, -math.inf, 0
        self.history: list[tuple[int, dict[str, float]]] = []  # every finished epoch's reported metrics
        self.state: dict[str, Any] | None = None
        self.metrics: dict[str, Any] = {}
        self.train_s = self.eval_s = 0.0
        self.epochs_done = 0

    def _model_config(self):
        model_cfg, task = self.config.model, self.task
        if model_cfg.num_outputs is None:
            model_cfg = dataclasses.replace(model_cfg, num_outputs=task.num_outputs)
        elif model_cfg.num_outputs != task.num_outputs:
            raise ConfigError("model.num_outputs", f"is {model_cfg.num_outputs} but the dataset has {task.num_outputs}")
        model_cfg = model_cfg.resolved()
        if model_cfg.input_size != self.config.data.input_size:
            model_cfg = dataclasses.replace(model_cfg, input_size=self.config.data.input_size)
        return model_cfg

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.ranks

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (the whole group stops together)."""
        return broadcast_flag(flag) if self.ranks > 1 else flag

    def _teacher(self):
        if not self.config.distill.teacher:
            return None, None
        teacher, _, tdata = model_from_checkpoint(self.config.distill.teacher)
        teacher.to(self.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher, tdata["config"]["loss"]

    # -- restore ----------------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from ``last.pt`` when there is one (same config only), and set up the schedules."""
        if self.last_path.exists():
            state = load_checkpoint(self.last_path)
            if comparable(state["config"]) != comparable(self.config_data):
                raise TrainingError("checkpoint_mismatch", f"{self.last_path} was written by a different "
                                    "configuration; use another checkpoint folder or delete it to start over")
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            self.start_epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]
            # older checkpoints kept only the last epoch's metrics
            self.history = [(int(e), dict(m)) for e, m in state.get("history") or
                            [(state["epoch"], {k: v for k, v in state["metrics"].items() if k != "per_joint"})]]
            # the driver may have died before it recorded what this run had reported: say it again
            if self.lead:
                self.reporter.restored(self.history)
            self.state = state
        self.epochs_done = self.start_epoch
        config = self.config
        self.steps_per_epoch = len(_loader(self.task.train_set, config, True))
        if config.max_batches:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_batches)
        schedule = config.lambda_schedule
        # the schedules span the whole budget (both stages of a two-stage row); the last epoch (or
        # step) of the budget runs at lambda_end
        span = config.schedule_epochs or (config.schedule_offset + config.epochs)
        last = span - 1 if schedule.unit == "epoch" else span * self.steps_per_epoch - 1
        self.lam = LambdaScheduler(self.model, schedule, max(last, 1), config.lambda_groups)
        self.flips = FlipTracker(self.model)
        self.val_loader = _loader(self.task.val_set, config, False)

    # -- one epoch --------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[list[float], float]:
        """One epoch of training (lr and lambda of this epoch); its losses and when it started."""
        config, model, offset = self.config, self.model, self.config.schedule_offset
        t0 = time.perf_counter()
        for group in self.optimizer.param_groups:  # the budget's epoch: stage 2 continues stage 1's schedule
            group["lr"] = config.optim.lr_at(offset + epoch)
        self.task.train_set.set_epoch(epoch)
        per_step = config.lambda_schedule.unit == "step"
        if not per_step:
            self.lam.step(offset + epoch)
        model.train()
        losses = []
        size = len(self.task.train_set)
        for step, batch in enumerate(_loader(self.task.train_set, config, True, epoch, self.shard)):
            if step >= self.steps_per_epoch:
                break
            if per_step:
                self.lam.step((offset + epoch) * self.steps_per_epoch + step)
            self.optimizer.zero_grad(set_to_none=True)
            if self.ranks == 1:
                loss = self._loss(_move(batch, self.device))
                self._finite(float(loss.detach()), epoch, step)
                loss.backward()
                value = float(loss.detach())
            else:  # this rank's share, weighted so that the summed gradients are the global batch's
                value = self._shared_step(batch, min(config.batch_size, size - step * config.batch_size), epoch, step)
            self.optimizer.step()
            losses.append(value)
            if self.lead:
                self.reporter.progress(step + 1, self.steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}")
        self.train_s += time.perf_counter() - t0
        return losses, t0

    @staticmethod
    def _finite(value: float, epoch: int, step: int) -> None:
        if not math.isfinite(value):
            raise TrainingError("nan_loss", f"the training loss became {value} at epoch {epoch + 1}, "
                                f"batch {step + 1}; lower optim.lr or check the data")

    def _shared_step(self, batch: dict, global_items: int, epoch: int, step: int) -> float:
        """Forward and backward of this rank's share of a global batch of ``global_items``; the
        gradients (and the loss) summed over the ranks. Returns the global batch's loss. A rank
        whose share is empty (a last batch smaller than the group) still takes part in the
        collectives of BatchNorm and of the gradients, with zeros."""
        n = len(next(v for v in batch.values() if torch.is_tensor(v)))
        batch = _move(batch, self.device)
        if n:
            loss = self._loss(batch) * (n / global_items)
        else:
            outputs = self.model(batch["image"])
            loss = sum(t.sum() for t in (outputs if isinstance(outputs, (list, tuple)) else [outputs])) * 0.0
        loss.backward()
        value = all_reduce_gradients(self.model, float(loss.detach()))
        self._finite(value, epoch, step)  # every rank sees the same sum: the group stops together
        return value

    def _loss(self, batch: dict) -> torch.Tensor:
        """The batch's loss, against the ground truth and, with distillation, the teacher's outputs."""
        teacher_out = None
        if self.teacher is not None:
            fm = self.config.distill.feature_weight > 0
            teacher_out = self.task.teacher_targets(self.teacher, self.teacher_loss, batch["image"], fm)
            if fm:
                outputs, teacher_out["student_features"] = self.model(batch["image"], return_features=True)
            else:
                outputs = self.model(batch["image"])
        else:
            outputs = self.model(batch["image"])
        return self.task.loss(outputs, batch, teacher_out)

    def evaluate(self, epoch: int, losses: list[float], started: float) -> dict[str, float]:
        """Validation metrics of the binary network (exact sign; BatchNorm statistics re-estimated
        with it first when the training forward was smooth) and, during progressive binarization,
        of the network as trained (the smooth approximation, with the statistics of its training)
        with the gap between the two; plus the epoch's diagnostics. Returns what is reported
        (everything but the per-joint table)."""
        model, task, config = self.model, self.task, self.config
        t1 = time.perf_counter()
        if not self.lead:  # the group re-estimates BatchNorm together; rank 0 evaluates
            if config.recalibrates:
                recalibrate_batchnorm(model, self._calibration_inputs(epoch))
            self.eval_s += time.perf_counter() - t1
            return {}
        smooth = self._smooth_metrics() if _approximating(model) else {}
        if config.recalibrates:
            recalibrate_batchnorm(model, self._calibration_inputs(epoch))
        model.eval()
        metrics = task.evaluate(fuse(model), self.val_loader, self.device)  # fused where the backend fuses
        if smooth:
            smooth["smooth_gap"] = smooth[f"{task.metric}_approx"] - metrics[task.metric]
            metrics.update(smooth)
        t2 = time.perf_counter()
        self.eval_s += t2 - t1
        ratios = self.flips.update()
        clips = clip_fractions(model)
        metrics.update({
            "train_loss": sum(losses) / max(len(losses), 1),
            "lr": config.optim.lr_at(config.schedule_offset + epoch),
            "lambda": self.lam.current,
            **{f"lambda/{g}": v for g, v in self.lam.per_group.items()},
            "flip_ratio": sum(ratios.values()) / len(ratios) if ratios else 0.0,
            "clip_fraction": sum(clips.values()) / len(clips) if clips else 0.0,
            "epoch_time": t2 - started,
        })
        self.metrics = metrics
        # a value that could not be computed (NaN: e.g. a joint group never labeled) is not reported
        reported = {k: float(v) for k, v in metrics.items() if k != "per_joint" and math.isfinite(v)}
        self.history.append((epoch + 1, reported))
        return reported

    def _smooth_metrics(self) -> dict[str, float]:
        """The network as it trains (every approximating quantizer smooth, BatchNorm with the running
        statistics of that forward) on the validation set: its metric, the fraction of the
        activations it sees with |lambda x| < 1, and the fraction of binary weights with
        |lambda W / mean|W|| < 1 (see diagnostics.py)."""
        model, task = self.model, self.task
        approx = _approximating(model)
        model.eval()
        for q in approx:
            q.train()
        try:
            with soft_activation_tally(model) as tally:
                value = task.evaluate(model, self.val_loader, self.device)[task.metric]
        finally:
            for q in approx:
                q.eval()
        out = {f"{task.metric}_approx": value}
        if tally[1]:
            out["soft_activations"] = tally[0] / tally[1]
        weights = soft_weight_fraction(model)
        if weights is not None:
            out["soft_weights"] = weights
        return out

    def _calibration_inputs(self, epoch: int):
        """This epoch's first ``recalibrate_batches`` training inputs, in its training order
        (drawn from the loader's own generator: the run's random state is left as it is)."""
        loader = _loader(self.task.train_set, self.config, True, epoch, self.shard)
        for step, batch in enumerate(loader):
            if step >= min(self.config.recalibrate_batches, self.steps_per_epoch):
                break
            yield batch["image"].to(self.device)

    def checkpoint(self, epoch: int) -> None:
        """``last.pt`` after every epoch, ``best.pt`` when the validation metric improved."""
        value = self.metrics[self.task.metric]
        improved = value > self.best
        if improved:
            self.best, self.best_epoch = value, epoch + 1
        payload = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
            "epoch": epoch + 1, "best": self.best, "best_epoch": self.best_epoch, "config": self.config_data,
            "model_config": to_dict(self.model_cfg), "metrics": self.metrics, "history": self.history,
        }
        save_checkpoint(self.last_path, payload)
        if improved:  # the same state: one file under both names until the next epoch replaces last.pt
            share_checkpoint(self.last_path, self.best_path, payload)
        self.epochs_done = epoch + 1

    # -- the result -------------------------------------------------------------------------------
    def result(self, status: str) -> TrainResult:
        if not self.lead:  # rank 0's result is the variant's; the others only say how far they got
            return TrainResult(status, self.epochs_done, self.task.metric, {}, {}, float(self.best), self.best_epoch,
                               {}, str(self.last_path), str(self.best_path),
                               {"train_s": self.train_s, "eval_s": self.eval_s})
        metrics = self.metrics
        if not metrics:  # resumed a run that had already finished: its last metrics are in the checkpoint
            assert self.state is not None
            metrics = dict(self.state["metrics"])
        predictions = None
        if status == "completed" and self.lead and hasattr(self.task, "render_predictions"):
            self.model.eval()
            predictions = self.task.render_predictions(self.model, self.ckpt_dir / "predictions.png", self.device)
        acc = account(self.model, self.config.data.input_size, self.model_cfg.in_channels)
        best_metrics, best_epochs = best_over_epochs(self.history)
        latency: dict[str, Any] = {}
        if status == "completed" and self.config.latency and self.lead:  # measured once, by rank 0
            self.model.eval()
            try:
                latency = measure_latency(self.model, self.model_cfg, self.config.data.input_size)
            except Exception as err:  # noqa: BLE001 - a measurement, never a reason to lose the trained result
                latency = {"error": f"{type(err).__name__}: {err}"[:500]}
        return TrainResult(
            status=status,
            epochs_done=self.epochs_done,
            metric=self.task.metric,
            metrics={k: float(v) for k, v in metrics.items() if k != "per_joint" and math.isfinite(v)},
            per_joint=dict(metrics.get("per_joint", {})),
            best_metric=float(self.best),
            best_epoch=self.best_epoch,
            accounting={"params": acc.params, "binary_params": acc.binary_params, "real_params": acc.real_params,
                        "trained_params": acc.trained_params, "bops": acc.bops, "flops": acc.flops,
                        "deployed_bytes": acc.deployed_bytes, "trained_bytes": acc.trained_bytes},
            last_checkpoint=str(self.last_path),
            best_checkpoint=str(self.best_path),
            timings={"train_s": self.train_s, "eval_s": self.eval_s, "total_s": time.perf_counter() - self.t_start},
            predictions_image=str(predictions) if predictions else None,
            environment=environment(self.device, self.config.deterministic),
            best_metrics=best_metrics,
            best_epochs=best_epochs,
            latency=latency,
        )
