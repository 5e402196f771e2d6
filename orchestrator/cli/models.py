"""``bnnctl models``: inspect the model library (architectures, accounting) without training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import console, parse_assignments, user_errors

app = typer.Typer(help="Inspect the binary-network model library.", no_args_is_help=True)


def _model_config(config: Optional[Path], arch: Optional[str], block: Optional[str], width: Optional[int],
                  stacks: Optional[int], real: bool, overrides: list[str]):
    from bnnctl.orchestrator.yamlio import read_yaml
    from bnnctl.workers.config import from_dict, with_overrides
    from bnnctl.workers.errors import ConfigError
    from bnnctl.workers.models import ModelConfig

    data: dict = {}
    if config is not None:
        data = read_yaml(config, "model config")[0] or {}
        if not isinstance(data, dict):
            raise ConfigError("--config", f"{config} must hold a mapping of model settings")
    cfg = from_dict(ModelConfig, data, "model")
    flags = {k: v for k, v in (("arch", arch), ("block", block), ("width", width), ("stacks", stacks)) if v is not None}
    if flags:
        cfg = with_overrides(cfg, flags, "model")
    if overrides:
        cfg = with_overrides(cfg, parse_assignments(overrides, "--set"), "model")
    if real:
        cfg = cfg.real()
    return cfg.resolved()


def _millions(n: float) -> str:
    return f"{n / 1e6:,.3f}M"


def _giga(n: float) -> str:
    return f"{n / 1e9:,.3f}G"


@app.command("summary")
@user_errors
def summary(
    arch: Annotated[Optional[str], typer.Option(help="Architecture (see `bnnctl models list`).")] = None,
    block: Annotated[Optional[str], typer.Option(help="Residual block: hpm, basic, bottleneck.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Channel width (default: the papers').")] = None,
    stacks: Annotated[Optional[int], typer.Option(help="Hourglass stacks.")] = None,
    real: Annotated[bool, typer.Option("--real", help="The same network fully real-valued.")] = False,
    set_: Annotated[list[str], typer.Option("--set", help="Override any model field: KEY=VALUE (dotted).")] = [],
    config: Annotated[Optional[Path], typer.Option(help="YAML file with model settings.")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Input side in pixels (default: the papers').")] = None,
    layers: Annotated[bool, typer.Option("--layers", help="Also print the per-layer table.")] = False,
    latency: Annotated[bool, typer.Option("--latency", help="Also time the model on this CPU (batch 1, one "
                                                            "thread): fused binary vs float32, a few seconds.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Build a model and print its parameters, BOPs, FLOPs and sizes (trained and deployed).

    The default is the papers' 1-stack binary hourglass with HPM blocks (IT Table 2: 6.2M params).
    """
    from bnnctl.workers.accounting import account
    from bnnctl.workers.models import build_model

    cfg = _model_config(config, arch, block, width, stacks, real, set_)
    size = input_size or cfg.input_size
    model = build_model(cfg)
    acc = account(model, size, cfg.in_channels)
    timed = None
    if latency:
        from bnnctl.workers.latency import measure

        timed = measure(model, cfg, size)
    if as_json:
        _summary_json(cfg, size, acc, layers, timed)
    else:
        _summary_tables(cfg, size, acc, layers, timed)


def _summary_json(cfg, size: int, acc, layers: bool, timed: dict | None) -> None:
    from bnnctl.workers.config import to_dict

    out = {
        "config": to_dict(cfg), "input_size": size,
        "binary_params": acc.binary_params, "real_params": acc.real_params, "params": acc.params,
        "trained_params": acc.trained_params, "bops": acc.bops, "flops": acc.flops, "ops": acc.ops,
        "trained_bytes": acc.trained_bytes, "deployed_bytes": acc.deployed_bytes,
    }
    if timed is not None:
        out["latency"] = timed
    if layers:
        out["layers"] = [to_dict(r) for r in acc.layers]
    typer.echo(json.dumps(out, indent=2))


def _summary_tables(cfg, size: int, acc, layers: bool, timed: dict | None) -> None:
    from rich.table import Table

    b = cfg.binarize
    what = ("fully binary" if b.activations and b.weights else
            "binary activations, real weights" if b.activations else
            "binary weights, real activations" if b.weights else "real-valued")
    title = f"{cfg.arch} · {what} · input {cfg.in_channels}x{size}x{size}"
    if cfg.uses_block:
        title += f" · block {cfg.block}"
    table = Table(title=title, show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("parameters (deployed)", _millions(acc.params), "binary weights + real parameters")
    table.add_row("  binary weights", _millions(acc.binary_params), "1 bit each when deployed")
    table.add_row("  real parameters", _millions(acc.real_params), "BN, alpha, PReLU, gates, first/last layers")
    table.add_row("parameters (as trained)", _millions(acc.trained_params),
                  f"decomposition: {cfg.decomposition.kind}")
    table.add_row("BOPs / image", _giga(acc.bops), "binary multiply-accumulates")
    table.add_row("FLOPs / image", _giga(acc.flops), "real multiply-accumulates")
    table.add_row("OPs / image", _giga(acc.ops), "FLOPs + BOPs/64")
    table.add_row("size as trained", f"{acc.trained_bytes / 2**20:,.2f} MiB", "fp32, BN statistics included")
    table.add_row("size deployed", f"{acc.deployed_bytes / 2**20:,.2f} MiB",
                  f"{acc.compression:,.1f}x smaller than trained")
    if timed is not None:
        from bnnctl.orchestrator.formats import format_latency

        table.add_row("latency (CPU)", format_latency(timed["binary_ms"], timed["float_ms"]),
                      f"batch 1, 1 thread, {timed['machine']}" + ("; in brackets: vs float32" if timed["float_ms"] else ""))
    out = console()
    out.print(table)
    if layers:
        lt = Table(title="layers", show_header=True)
        for col in ("layer", "kind", "weight", "output", "BOPs", "FLOPs"):
            lt.add_column(col, justify="right" if col in ("BOPs", "FLOPs") else "left")
        for r in acc.layers:
            lt.add_row(r.name, r.kind, "x".join(map(str, r.weight_shape)), "x".join(map(str, r.output_shape)),
                       f"{r.bops:,}", f"{r.flops:,}")
        out.print(lt)


@app.command("list")
def list_names() -> None:
    """List the valid names of every model-library choice."""
    from bnnctl.workers.binarize import ALPHAS, QUANTIZERS
    from bnnctl.workers.blocks import BLOCKS, GATES
    from bnnctl.workers.backends import CONV_BACKENDS
    from bnnctl.workers.layers import ACTIVATIONS
    from bnnctl.workers.models import MODELS
    from bnnctl.workers.reparam import DECOMPOSITIONS

    rows = {
        "model.arch": MODELS.names(),
        "model.block": BLOCKS.names(),
        "model.activation.kind": ACTIVATIONS.names(),
        "model.binarize.quantizer": QUANTIZERS.names(),
        "model.binarize.alpha": [n for n in ALPHAS.names() if ALPHAS.get(n).configurable],
        "model.gate.kind": GATES.names(),
        "model.decomposition.kind": DECOMPOSITIONS.names(),
        "model.backend": CONV_BACKENDS.names(),
    }
    for key, names in rows.items():
        typer.echo(f"{key:28s} {', '.join(names)}")
