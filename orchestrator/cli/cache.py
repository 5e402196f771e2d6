"""``bnnctl cache``: this machine's copies of run-storage files, and workers' leftover scratch folders."""
from __future__ import annotations

import typer

from ._common import user_errors

app = typer.Typer(help="This machine's storage cache and workers' scratch folders.", no_args_is_help=True)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


@app.command("show")
@user_errors
def show() -> None:
    """Where the cache is, its bounds, and what it holds per run storage."""
    from bnnctl.orchestrator.backends import scratch_root
    from bnnctl.orchestrator.runstorage import StorageCache

    cache = StorageCache()
    roots = cache.roots()
    typer.echo(f"storage cache {cache.folder} (bounds: {_size(cache.max_bytes)}, files unused for "
               f"{cache.max_age_s / 86400:g} days go; $BNNCTL_CACHE_MAX_MB, $BNNCTL_CACHE_MAX_DAYS)")
    for name, files, nbytes in roots:
        typer.echo(f"  {name}: {files} files, {_size(nbytes)}")
    if not roots:
        typer.echo("  (empty)")
    folders = sorted(p.name for p in scratch_root().glob("*")) if scratch_root().is_dir() else []
    typer.echo(f"scratch folders of this machine's workers ({scratch_root()}): {len(folders)}")


@app.command("clean")
@user_errors
def clean() -> None:
    """Empty the storage cache (copies come back from storage when needed) and remove the scratch
    folders no live worker of this machine uses (the storage holds their checkpoints)."""
    from bnnctl.orchestrator.backends import scratch_root, sweep_scratch
    from bnnctl.orchestrator.runstorage import StorageCache

    cache = StorageCache()
    files, nbytes = cache.clean()
    folders, scratch = sweep_scratch(grace_s=0.0)
    typer.echo(f"removed {files} cached files ({_size(nbytes)}) from {cache.folder} and {folders} unused scratch "
               f"folders ({_size(scratch)}) from {scratch_root()}")
