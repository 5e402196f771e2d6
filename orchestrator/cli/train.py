"""``bnnctl train``: run one variant locally, without a cluster or tracking (for debugging a config)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import console, parse_assignments, user_errors

app = typer.Typer(help="Train one variant locally (no Ray, no MLflow).", no_args_is_help=True)


def load_train_config(path: Optional[Path], overrides: list[str]):
    from bnnctl.orchestrator.yamlio import read_yaml
    from bnnctl.workers.config import from_dict, with_overrides
    from bnnctl.workers.errors import ConfigError
    from bnnctl.workers.train import TrainConfig

    data: dict = {}
    if path is not None:
        data = read_yaml(path, "training config")[0] or {}
        if not isinstance(data, dict):
            raise ConfigError(str(path), "must hold a mapping of training settings")
    cfg = from_dict(TrainConfig, data)
    if overrides:
        cfg = with_overrides(cfg, parse_assignments(overrides, "--set"))
    return cfg


class _ConsoleReporter:
    def __init__(self, checkpoint_dir: Path, out) -> None:
        self._dir = checkpoint_dir
        self.out = out

    @property
    def checkpoint_dir(self) -> Path:
        return self._dir

    def report(self, epoch: int, metrics) -> None:
        from bnnctl.workers.metrics import PRINTED

        keys = [k for k in PRINTED if k in metrics]
        self.out.print(f"epoch {epoch:4d}  " + "  ".join(f"{k} {metrics[k]:.4g}" for k in keys))

    def restored(self, history) -> None:
        if history:
            self.out.print(f"resuming after epoch {history[-1][0]} from {self._dir}")

    def should_stop(self) -> bool:
        return False

    def progress(self, done: int, total: int, message: str = "") -> None:
        pass


@app.command("run")
@user_errors
def run(
    config: Annotated[Optional[Path], typer.Argument(help="YAML file of TrainConfig settings (default: all defaults).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override any field: KEY=VALUE (dotted).")] = [],
    checkpoints: Annotated[Path, typer.Option(help="Checkpoint folder; an existing run there resumes.")] = Path(".bnnctl/runs/local"),
) -> None:
    """Train and evaluate one variant on this machine, resuming from CHECKPOINTS/last.pt if present."""
    from bnnctl.workers.train import run_variant

    cfg = load_train_config(config, set_)
    out = console()
    result = run_variant(cfg, _ConsoleReporter(checkpoints, out))
    out.print(f"{result.status}: {result.metric} {result.metrics[result.metric]:.2f} "
              f"(best {result.best_metric:.2f} at epoch {result.best_epoch}); checkpoints in {checkpoints}")
