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
