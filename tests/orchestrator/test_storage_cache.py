"""The driver's storage cache (keyed by storage root and variant, bounded, cleaned by `bnnctl cache
clean`) and the sweep of workers' leftover scratch folders, on fsspec's in-memory storage."""
import os
import subprocess
import sys
import time

from typer.testing import CliRunner

from bnnctl.orchestrator.backends import scratch_root, sweep_scratch
from bnnctl.orchestrator.cli import app
from bnnctl.orchestrator.runstorage import RunStorage, StorageCache


def _put(storage, rel, data: bytes, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    storage.upload(src, rel)


def test_copies_are_keyed_by_storage_root_and_variant(tmp_path):
    a, b = RunStorage("memory://lab-a/runs"), RunStorage("memory://lab-b/runs")
    _put(a, "k1/best.pt", b"from a", tmp_path)
    _put(b, "k1/best.pt", b"from b", tmp_path)  # the same variant key in another storage
    cache = StorageCache(tmp_path / "cache")
    pa, pb = cache.copy(a, "k1/best.pt"), cache.copy(b, "k1/best.pt")
    assert (pa.read_bytes(), pb.read_bytes()) == (b"from a", b"from b")
    assert pa.parent.parent != pb.parent.parent and pa.relative_to(cache.folder).parts[1:] == ("k1", "best.pt")
    assert sorted(cache.roots()) == [("memory://lab-a/runs", 1, 6), ("memory://lab-b/runs", 1, 6)]
    assert cache.copy(a, "k2/best.pt") is None  # not in storage


def test_the_cache_keeps_to_its_size_and_age_and_clean_empties_it(tmp_path, monkeypatch):
    s = RunStorage("memory://lab-c/runs")
    for i in range(4):
        _put(s, f"k{i}/best.pt", bytes(1000), tmp_path)
    cache = StorageCache(tmp_path / "cache", max_bytes=2500, max_age_s=3600)
    paths = []
    for i in range(3):
        paths.append(cache.copy(s, f"k{i}/best.pt"))
        os.utime(paths[-1], (time.time() - 100 + i, time.time() - 100 + i))  # used in this order
    assert [p.exists() for p in paths] == [False, True, True]  # 3000 bytes > 2500: the least recently used went
    cache.copy(s, "k0/best.pt")  # used again: back, and k1 (now the oldest) goes
    assert [p.exists() for p in paths] == [True, False, True]
    os.utime(paths[2], (time.time() - 7200, time.time() - 7200))  # unused for 2 hours > max age
    newest = cache.copy(s, "k3/best.pt")
    assert newest.exists() and not paths[2].exists() and paths[0].exists()
    # the CLI: the environment's bounds and folder, then everything removed
    monkeypatch.setenv("BNNCTL_CACHE", str(cache.folder))
    shown = CliRunner().invoke(app, ["cache", "show"])
    assert shown.exit_code == 0 and "memory://lab-c/runs: 2 files, 0.0 MiB" in shown.stdout, shown.stdout
    out = CliRunner().invoke(app, ["cache", "clean"])
    assert out.exit_code == 0 and out.stdout.startswith(f"removed 2 cached files (0.0 MiB) from {cache.folder}")
    assert not cache.folder.exists()


def test_sweep_removes_scratch_folders_no_live_worker_uses(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = scratch_root()
    assert root == tmp_path / "bnnctl-scratch"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("killed", dead.pid), ("running", os.getpid())):
        (root / name / "rank-1").mkdir(parents=True)
        (root / name / "last.pt").write_bytes(bytes(100))
        (root / name / "rank-1" / "worker-rank1.pid").write_text(str(pid))
    (root / "starting").mkdir()  # a task that has not written its pid yet: within the grace period
    assert sweep_scratch(grace_s=60) == (0, 0)  # every folder changed within the last minute
    # the killed task's folder (its checkpoint and pid file), and the pid-less one
    assert sweep_scratch(grace_s=0) == (2, 100 + len(str(dead.pid)))
    assert sorted(p.name for p in root.iterdir()) == ["running"]
