"""The dashboard app served on a free loopback port, for tests that open its pages."""
import socket
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The dashboard app on uvicorn in a thread, on a free loopback port."""

    def __init__(self, db: str, runs_dir: Path, mlflow_url: str | None = None, **security) -> None:
        import uvicorn

        from bnnctl.dashboard.app import create_app

        self.port = free_port()
        app = create_app(db, runs_dir, mlflow_url, refresh_s=1.0, **security)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
