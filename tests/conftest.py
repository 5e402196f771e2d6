import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


#: CPUs of the tests' shared local Ray cluster: the most any in-process driver asks for (4 trials at once).
SHARED_RAY_CPUS = 4


@pytest.fixture(scope="session")
def _shared_ray():
    """Shut down, at the end of the session, the private local Ray cluster that ``workdir`` keeps."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture()
def workdir(tmp_path, monkeypatch, _shared_ray):
    """An empty working folder (the default .bnnctl/ goes there), with a private local Ray cluster
    of this process running (started by the product's own ``connect``, as a driver would).

    Drivers the tests run in this process find Ray running and use it, as a driver inside a Ray job
    does: one cluster for the session instead of one per driver (each start and its workers'
    torch imports cost ~10 s of the 2 CPUs). Drivers run as subprocesses (the CLI) start their own
    private clusters, as users' do; a test that shuts Ray down gets a fresh one in the next test."""
    from bnnctl.orchestrator.backends.ray_cluster import connect

    connect(None, SHARED_RAY_CPUS)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(scope="session")
def pg_server():
    """A private PostgreSQL server for the whole session (skips without one; fails under CI)."""
    import os

    from pgserver import PostgresServer, available

    why = available()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL tests: {why}")
        pytest.skip(why)
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty state database URL of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("pg_server").database()


BUCKET = "bnnctl-test"


@pytest.fixture()
def s3(tmp_path):
    """moto's S3 server on a free loopback port; yields the environment a client or node needs."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from raynodes import free_port, wait_for

    port = free_port()
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=open(tmp_path / "moto.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        import s3fs

        def up():
            try:
                fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
                fs.mkdir(BUCKET)
                return fs
            except Exception:  # noqa: BLE001 - not listening yet
                return None

        fs = wait_for(up, 60, "moto's S3 server", every=0.5)
        yield env, fs
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
