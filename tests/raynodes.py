"""Real Ray nodes for the tests, started with ``ray start --block`` in their own process groups and
stopped by process group (never ``ray stop``, which would kill every Ray process on the machine).

Token authentication is on, as Ray 2.60 does by default: every node and driver gets
``RAY_AUTH_MODE=token`` and the token file this helper writes.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
RECORD = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` records "the machine's cluster"
CLI = [sys.executable, "-c", "from bnnctl.orchestrator.cli import main; main()"]


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket stays bound until all are chosen (one at a time, the
    kernel may hand the same port out twice, and Ray refuses a node whose components share one)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; Ray's workers leave their parent's process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class RayNodes:
    """The nodes one test starts; ``close()`` stops them all (their process groups) and puts the
    machine's current-cluster record back as it was."""

    def __init__(self, folder: Path, extra_env: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.extra_env = dict(extra_env or {})
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token = self.folder / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.procs: list[subprocess.Popen] = []
        self._record = RECORD.read_text() if RECORD.exists() else None

    @property
    def env(self) -> dict[str, str]:
        """The environment of a driver or node of these clusters (the GPUs a node has are what its
        ``--num-gpus`` says, never a ``CUDA_VISIBLE_DEVICES`` the test process happens to carry)."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "CUDA_VISIBLE_DEVICES")}
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token), "PYTHONUNBUFFERED": "1",
                **self.extra_env}

    def _start(self, args: list[str], log: str, prefix: list[str] | None = None, env: dict | None = None) -> subprocess.Popen:
        out = open(self.folder / log, "w")
        proc = subprocess.Popen((prefix or []) + [RAY, "start", "--block", *args], env=env or self.env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def head(self, cpus: int = 1, dashboard_port: int | None = None, gpus: int = 0, port: int | None = None,
             extra: list[str] | None = None, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
        """Start a head node; returns (process, its GCS address). With ``dashboard_port``, its
        dashboard (and job server) listens there; ``gpus``: GPUs it declares (Ray then hands them to
        tasks through ``CUDA_VISIBLE_DEVICES``, GPU or not); ``extra``: more ``ray start`` options,
        ``env``: more environment (e.g. an autoscaler's config)."""
        ports = [p for p in free_ports(8) if p != port]
        port = port or ports.pop()
        args = ["--head", f"--port={port}", f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--node-ip-address=127.0.0.1",
                "--object-store-memory=100000000", *self._ports(ports), *(extra or [])]
        if dashboard_port:
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
        else:
            args += ["--include-dashboard=false"]
        proc = self._start(args, f"head-{port}.log", env={**self.env, **(env or {})})
        address = f"127.0.0.1:{port}"
        wait_for(lambda: self._up(proc, address), 90, f"the Ray head at {address}")
        return proc, address

    @staticmethod
    def _ports(ports: list[int] | None = None) -> list[str]:
        """Free ports for a node's own servers: two nodes on one machine must not share them."""
        names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
        ports = list(ports or free_ports(len(names)))
        return [f"--{n}={ports.pop()}" for n in names]

    def worker(self, address: str, cpus: int = 1, hide: list[Path] | None = None, resources: str | None = None,
               name: str = "worker", env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a node that joins ``address``. ``hide``: folders this node must not see; it runs in its
        own mount namespace with an empty tmpfs over each (as another machine would), starting in the
        first. ``env``: this node's environment instead of ``self.env`` (e.g. without credentials)."""
        prefix = None
        if hide:
            mounts = " && ".join(f"mkdir -p {h} && mount -t tmpfs tmpfs {h}" for h in hide)
            prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                      f'{mounts} && cd {hide[0]} && exec "$@"', "sh"]
        args = [f"--address={address}", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
                "--object-store-memory=100000000", *self._ports()]
        if resources:
            args.append(f"--resources={resources}")
        return self._start(args, f"{name}.log", prefix, env)

    def _up(self, proc: subprocess.Popen, address: str) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"ray start exited with {proc.returncode}: "
                                 + "".join(p.read_text()[-3000:] for p in self.folder.glob("head-*.log")))
        host, port = address.split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return True
        except OSError:
            return False

    def node_ids(self, address: str, expect: int = 1, resource: str | None = None) -> list[str]:
        """The alive node ids of the cluster at ``address`` (asked by a separate driver), once it has
        ``expect`` of them; with ``resource``, only the nodes that have that custom resource."""
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "print(' '.join(n['NodeID'] + ',' + ('1' if sys.argv[2] in n['Resources'] else '0') "
                "for n in ray.nodes() if n['Alive']))")

        def ask():
            out = subprocess.run([sys.executable, "-c", code, address, resource or "-"], env=self.env,
                                 capture_output=True, text=True, timeout=120)
            nodes = [item.split(",") for item in out.stdout.split()]
            if len(nodes) < expect:
                return None
            return [n for n, has in nodes if resource is None or has == "1"]

        return wait_for(ask, 120, f"{expect} alive nodes at {address}", every=1)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a node's process group and every process it started (Ray's workers run in process
        groups of their own): everything of the node goes at once, as with a crashed machine."""
        family = descendants(proc.pid)
        for pid in [proc.pid, *family]:
            try:
                os.kill(pid, signal.SIGSTOP)  # freeze first: nothing of the node acts between the kills
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def close(self) -> None:
        # SIGKILL at once: `ray start --block` ignored SIGTERM for the whole 20 s grace period it used
        # to get (21 s of every cluster test's teardown), and a test cluster keeps nothing worth a
        # graceful stop
        for proc in reversed(self.procs):
            if proc.poll() is None:
                self.kill(proc)
        time.sleep(1)  # raylets take their workers along
        if self._record is None:
            RECORD.unlink(missing_ok=True)
        else:
            RECORD.write_text(self._record)


def run_cli(args: list[str], env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
