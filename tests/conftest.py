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
