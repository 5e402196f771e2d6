"""The ``bnnctl`` command line: one small Typer app per command group, composed here.

Heavy libraries (torch, ray, mlflow) are imported inside the commands, so ``bnnctl --help`` is fast.
"""
from __future__ import annotations

import typer

from . import cache, dashboard, data, export, models, study, train, tune

app = typer.Typer(
    name="bnnctl",
    help="Distributed ablation studies of binary neural networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
app.add_typer(study.app, name="study")
app.add_typer(tune.app, name="tune")
app.add_typer(models.app, name="models")
app.add_typer(data.app, name="data")
app.add_typer(train.app, name="train")
app.add_typer(cache.app, name="cache")
app.command("export")(export.export)
app.command("dashboard")(dashboard.dashboard)


def main() -> None:
    app()
