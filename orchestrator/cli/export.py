"""``bnnctl export``: write a trained model with packed binary weights (1 bit each)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import user_errors


@user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint (best.pt or last.pt of a run).")],
    out: Annotated[Path, typer.Argument(help="The exported file to write.")],
) -> None:
    """Export a trained model for inference: binary weights packed 8 per byte, the rest in float32.
    The file loads back with bnnctl.workers.export.load_exported (binary convolutions on the XNOR
    kernel where it is faster) and gives the same eval outputs."""
    from bnnctl.workers.export import export_model
    from bnnctl.workers.train.checkpoint import model_from_checkpoint

    model, cfg, _ = model_from_checkpoint(checkpoint)
    report = export_model(model, cfg, out)
    typer.echo(f"wrote {out}: {report.file_bytes:,} bytes; {report.binary_layers} binary layers, "
               f"{report.binary_weight_bits:,} binary weights in {report.binary_packed_bytes:,} bytes "
               f"(with alphas) instead of {report.binary_fp32_bytes:,} in float32: {report.binary_ratio:.1f}x smaller")
