"""``bnnctl dashboard``: the web page of ablation tables, curves and tuning results (read-only)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ._common import fail, user_errors


@user_errors
def dashboard(
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    db: Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL of the state database (default: sqlite "
                                              "under .bnnctl/, or $BNNCTL_DB).")] = None,
    runs_dir: Annotated[Optional[str], typer.Option("--storage", "--runs-dir", help="The run storage whose images "
                                                    "it serves: a folder or an fsspec URL such as s3://bucket/runs "
                                                    "(default: $BNNCTL_STORAGE or .bnnctl/runs).")] = None,
    mlflow_url: Annotated[Optional[str], typer.Option(help="URL of a running MLflow UI, for links to each run "
                                                      "(e.g. http://127.0.0.1:5000).")] = None,
) -> None:
    """Serve the dashboard over the state database (read-only) and print its URL."""
    import socket

    from bnnctl.dashboard.app import create_app

    app = create_app(db, runs_dir, mlflow_url)
    try:
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        probe.close()
    except OSError as err:
        raise fail(f"--port: cannot listen on {host}:{port} ({err.strerror}); choose another with --port") from None
    import uvicorn

    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"bnnctl dashboard: http://{shown}:{port}/  (read-only; Ctrl+C stops it)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
