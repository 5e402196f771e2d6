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
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a --host other than loopback (the "
                                               "network can then reach it; every request needs the token).")] = False,
    token: Annotated[Optional[str], typer.Option(help="Access token required on every request (default with "
                                                 "--allow-remote: a new random one, printed in the URL).",
                                                 envvar="BNNCTL_DASHBOARD_TOKEN")] = None,
    allowed_host: Annotated[list[str], typer.Option("--allowed-host", help="Another name the server answers to "
                                                    "in the Host header (a DNS name of this machine, a proxy's); "
                                                    "repeatable.")] = [],
) -> None:
    """Serve the dashboard over the state database (read-only) and print its URL."""
    import secrets
    import socket

    from bnnctl.dashboard.app import allowed_hosts, create_app, is_loopback

    remote = not is_loopback(host)
    if remote and not allow_remote:
        raise fail(f"--host {host}: this would serve every study to the network. Add --allow-remote to mean it "
                   "(every request then needs an access token), or keep the default 127.0.0.1 and reach it "
                   "through an SSH tunnel (ssh -L 8765:127.0.0.1:8765 HOST)")
    generated = remote and not token
    if generated:
        token = secrets.token_urlsafe(24)
    hosts = allowed_hosts(host, allowed_host)
    app = create_app(db, runs_dir, mlflow_url, token=token, hosts=hosts)
    try:
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        probe.close()
    except OSError as err:
        raise fail(f"--port: cannot listen on {host}:{port} ({err.strerror}); choose another with --port") from None
    import uvicorn

    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = socket.gethostname()
    if remote:
        typer.echo(f"WARNING: the dashboard listens on {host}:{port}, reachable from the network. Every request "
                   "needs the token below; it answers to the hosts " + ", ".join(sorted(hosts)) + ".", err=True)
    suffix = f"?token={token}" if generated else ""  # a token the user gave is not echoed
    note = "; the token you gave is required" if token and not generated else ""
    typer.echo(f"bnnctl dashboard: http://{shown}:{port}/{suffix}  (read-only{note}; Ctrl+C stops it)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
