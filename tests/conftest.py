import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """An empty working folder (the default .bnnctl/ goes there); Ray is shut down afterwards."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import ray

    if ray.is_initialized():
        ray.shutdown()


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
