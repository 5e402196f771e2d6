"""``bnnctl data``: write the embedded data sets (no download)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import user_errors

app = typer.Typer(help="Write the embedded data sets.", no_args_is_help=True)


@app.command("synth")
@user_errors
def synth(
    root: Annotated[Path, typer.Argument(help="Folder to write (MPII layout).")],
    train: Annotated[int, typer.Option(help="Training images.")] = 2000,
    valid: Annotated[int, typer.Option(help="Validation images.")] = 300,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="The set is a pure function of this seed.")] = 0,
) -> None:
    """Write the synthetic pose dataset in the MPII layout (annot/*.json, images/)."""
    from rich.progress import Progress

    from bnnctl.workers.config import from_dict
    from bnnctl.workers.data.synthetic import SyntheticConfig, write_synthetic_mpii

    cfg = from_dict(SyntheticConfig, {"train": train, "valid": valid, "image_size": image_size, "seed": seed}, "synthetic")
    with Progress(transient=True) as bar:
        task = bar.add_task("rendering", total=cfg.train + cfg.valid)
        write_synthetic_mpii(root, cfg, progress=lambda done, total: bar.update(task, completed=done))
    typer.echo(f"synthetic MPII set at {root}: {cfg.train} train + {cfg.valid} valid images")


@app.command("digits")
@user_errors
def digits(root: Annotated[Path, typer.Argument(help="Folder to write (ImageFolder layout).")]) -> None:
    """Write scikit-learn's handwritten digits as an ImageFolder set (train/, val/)."""
    from bnnctl.workers.data.classification import write_digits_imagefolder

    write_digits_imagefolder(root)
    typer.echo(f"digits set at {root} (train/ and val/, 10 classes)")
