"""Schedules of the sharpness lambda of the sign approximations (IT §3.4).

The paper grows lambda during training so that tanh(lambda x) tends to sign(x); its start and end
values were lost in the text, so the defaults here are assumptions meant to be tuned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .binarize import Quantizer
from .config import require

ScheduleKind = Literal["constant", "linear", "exponential", "step"]


@dataclass(frozen=True)
class LambdaSchedule:
    """lambda as a function of training progress t in [0, total].

    - constant: lambda_start throughout.
    - linear: lambda_start + (lambda_end - lambda_start) * t / total.
    - exponential: lambda_start * (lambda_end / lambda_start) ** (t / total) (geometric growth).
    - step: ``steps`` equal plateaus, geometrically spaced from lambda_start to lambda_end.

    Attributes:
        unit: whether t counts epochs or optimizer steps (the trainer chooses when to call).
        total: the t at which lambda_end is reached; later t stay at lambda_end. ``None`` means "the
            whole run" and is filled in by the trainer.
        group: apply only to quantizers of this layer group ("" = every quantizer).
    """

    kind: ScheduleKind = "constant"
    lambda_start: float = 1.0
    lambda_end: float = 1.0
    unit: Literal["epoch", "step"] = "epoch"
    total: int | None = None
    steps: int = 4
    group: str = ""

    def __post_init__(self) -> None:
        for name in ("lambda_start", "lambda_end"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, name, f"must be a positive number, got {value}")
        if self.kind != "constant":
            require(self.lambda_end >= self.lambda_start, "lambda_end",
                    f"must be >= lambda_start ({self.lambda_start}) so that the approximation "
                    f"sharpens towards sign, got {self.lambda_end}")
        require(self.total is None or self.total > 0, "total", f"must be a positive integer, got {self.total}")
        require(self.steps >= 2, "steps", f"must be at least 2, got {self.steps}")

    def value(self, t: float, total: int | None = None) -> float:
        """lambda at progress ``t`` (epochs or steps done)."""
        horizon = self.total if self.total is not None else total
        if self.kind == "constant":
            return self.lambda_start
        require(horizon is not None and horizon > 0, "total", "the schedule needs a positive total")
        frac = min(max(t / horizon, 0.0), 1.0)
        if self.kind == "linear":
            return self.lambda_start + (self.lambda_end - self.lambda_start) * frac
        ratio = self.lambda_end / self.lambda_start
        if self.kind == "exponential":
            return self.lambda_start * ratio**frac
        plateau = min(int(frac * self.steps), self.steps - 1)
        return self.lambda_start * ratio ** (plateau / (self.steps - 1))


def quantizers(model: nn.Module, group: str = "") -> list[Quantizer]:
    """The quantizers of ``model`` (those of layer ``group`` only, when given)."""
    return [m for m in model.modules() if isinstance(m, Quantizer) and (not group or m.group == group)]


def set_lambda(model: nn.Module, value: float, group: str = "") -> int:
    """Set lambda on every quantizer of ``model`` (or of one group); returns how many were set."""
    found = quantizers(model, group)
    for q in found:
        q.lam.fill_(float(value))
    return len(found)


def check_groups(model: nn.Module, groups: tuple[LambdaSchedule, ...]) -> None:
    """Every per-group schedule names a layer group that has quantizers (a typo would tune nothing).
    A real-valued model (a teacher built from the same base) has no quantizer and nothing to check."""
    known = sorted({q.group for q in quantizers(model)})
    if not known:
        return
    for i, g in enumerate(groups):
        if g.group not in known:
            require(False, f"lambda_groups[{i}].group", f"no quantizer in group {g.group!r}; groups of this "
                    f"model: {', '.join(known) or 'none'}")


def epoch_values(schedule: LambdaSchedule, epochs: int, steps_per_epoch: int = 1000) -> list[float]:
    """lambda at each epoch (1 to ``epochs``) of a run, as :class:`LambdaScheduler` steps it in the
    trainer: epoch k (1-based) trains at t = k - 1 and the last epoch at lambda_end (the horizon is
    ``epochs - 1``). A schedule counted in steps: its value at each epoch's first step, for
    ``steps_per_epoch`` steps an epoch (the trainer knows the real number; the curve's shape is the
    same). The dashboard draws schedules with this, never with a copy of the rule."""
    if schedule.unit == "step":
        last = max(epochs * steps_per_epoch - 1, 1)
        return [schedule.value(e * steps_per_epoch, last) for e in range(epochs)]
    last = max(epochs - 1, 1)
    return [schedule.value(e, last) for e in range(epochs)]


class LambdaScheduler:
    """Steps the lambda buffers of a model by a schedule: call ``step(t)`` at each epoch or step.

    ``groups`` are per-layer-group schedules applied after the main one, each to its own group; a
    group that matches no quantizer is an error (a typo would otherwise tune nothing).
    """

    def __init__(self, model: nn.Module, schedule: LambdaSchedule, total: int | None = None,
                 groups: tuple[LambdaSchedule, ...] = ()) -> None:
        self.model = model
        self.schedule = schedule
        self.groups = tuple(groups)
        self.total = total
        check_groups(model, self.groups)
        self.step(0)

    def step(self, t: float) -> float:
        self.current = self.schedule.value(t, self.total)
        set_lambda(self.model, self.current, self.schedule.group)
        self.per_group = {}
        for g in self.groups:
            self.per_group[g.group] = g.value(t, self.total)
            set_lambda(self.model, self.per_group[g.group], g.group)
        return self.current
