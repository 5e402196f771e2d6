"""Benchmark (not a test): reads and planning at 1,000 / 10,000 / 50,000 variants, and the driver's
per-variant overhead of a tiny study on the local cluster.

Planning: a study spec with a grid ablation of N combinations and one seed is loaded and planned
(timed: ``plan grid``). Store sizes: a study spec with a grid ablation of N/10 combinations x 10
seeds (N variants) is loaded and planned (timed: ``plan study``), and written into a fresh sqlite state database the way a run
writes it up front (``Store.upsert_study``, ``Store.ensure_variants``, ``Store.set_members``;
timed: ``write``). Each variant then gets the history of a finished run (one attempt, a result,
5 epochs x 2 metrics), bulk-inserted with the store's own ORM rows, so that a 50,000-variant store
fills in about a minute. A second, small study beside it stands for the rest of a lab's database.
Then, timed on the big study (each the best of 3 calls, in this process, warm imports):

- ``status``: ``bnnctl study status NAME`` (CliRunner; a row summary above the size shown in full),
- ``status --all``: every variant,
- ``list``: ``bnnctl study list``,
- ``show``: ``bnnctl study show NAME --format csv`` (the tables with their statistics),
- ``results``: ``bnnctl.results(NAME)`` (a DataFrame of every variant),
- ``page``: the dashboard's study page (``GET /study/NAME``), first request (``page cold``) and a
  repeated one (``page``: served from the cache keyed by the study's last-change stamp),
- ``index``: the dashboard's index page.

The tiny study (``--tiny N``, default 1000; 0 skips it): N one-epoch variants of a 1-stack network
on 32 synthetic images, 2 Ray workers on this machine, with MLflow tracking and without, and the
same with N/2 variants; reported per variant, as the difference of the two over N/2 (a driver's
start-up left out): wall time, the driver process's CPU time (its loop: the serial ceiling of how
many variants a driver can run per second), and the CPU time of the MLflow writer process beside it
(MLflow's own client: the ceiling of how many variants one tracking store takes per second).

    .venv/bin/python tests/benchmarks/bench_scale.py [--sizes 1000 10000 50000] [--tiny 1000]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

GRID = """
name: {name}
base:
  model: {{width: 8, depth: 1}}
  data: {{root: {root}, synthetic: {{train: 32, valid: 16}}, input_size: 32}}
  epochs: 5
  batch_size: 16
  loss: mse
  threads: 1
seeds: {seeds}
ablations:
  - name: grid
    mode: grid
    axes:
{axes}
"""
AXES = [("lr", "optim.lr", lambda i: round(1e-4 * (i + 1), 6)),
        ("wd", "optim.weight_decay", lambda i: round(1e-5 * i, 7)),
        ("bs", "batch_size", lambda i: 8 + i),
        ("gamma", "optim.lr_gamma", lambda i: round(0.05 * (i + 1), 3)),
        ("mom", "optim.momentum", lambda i: round(0.09 * i, 2))]  # 5 axes: a grid of up to 100,000


def grid_spec(name: str, combos: int, seeds: int, root: Path) -> str:
    """A grid of ``combos`` combinations (axes of 10 levels, the last one shorter)."""
    sizes, left = [], combos
    while left > 1:
        sizes.append(min(10, left))
        left //= 10
    lines = []
    for (axis, path, value), size in zip(AXES, sizes):
        lines.append(f"      {axis}:")
        lines += [f"        {axis}{i}: {{{path}: {value(i)}}}" for i in range(size)]
    return GRID.format(name=name, root=root, seeds=list(range(seeds)), axes="\n".join(lines))


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fill_history(store, keys: list[str], epochs: int = 5) -> None:
    """One finished attempt, a result and ``epochs`` x 2 metrics per variant, bulk-inserted."""
    from sqlalchemy import insert, update

    from bnnctl.orchestrator.records import AttemptRow, MetricRow, VariantRow, utcnow

    rng = random.Random(0)
    now = utcnow()
    with store.session() as s:
        for i in range(0, len(keys), 2000):
            chunk = keys[i:i + 2000]
            s.execute(insert(AttemptRow), [{"variant_key": k, "number": 1, "status": "completed", "node": "bench",
                                            "started_at": now, "ended_at": now} for k in chunk])
            rows = []
            for k in chunk:
                for e in range(1, epochs + 1):
                    rows += [{"variant_key": k, "epoch": e, "name": "pckh", "value": rng.uniform(20, 60)},
                             {"variant_key": k, "epoch": e, "name": "loss", "value": rng.uniform(0.1, 1)}]
            s.execute(insert(MetricRow), rows)
            for k in chunk:
                value = rng.uniform(20, 60)
                s.execute(update(VariantRow).where(VariantRow.key == k).values(status="completed", result={
                    "metric": "pckh", "metrics": {"pckh": value, "loss": 0.5}, "best_metrics": {"pckh": value + 1},
                    "best_metric": value + 1, "best_epoch": epochs, "epochs_done": epochs,
                    "accounting": {"params": 3300, "binary_ops": 1.0e6}, "timings": {"total_s": 1.0}}))


def build_store(work: Path, n: int) -> tuple[str, dict]:
    """A state database holding a study of ``n`` variants (and a small one beside it); returns its
    URL and the plan/write times."""
    from bnnctl.orchestrator.plan import build_plan
    from bnnctl.orchestrator.spec import load_spec
    from bnnctl.orchestrator.store import Store
    from bnnctl.orchestrator.study import record_plan, table_layout

    grid = work / f"grid-{n}.yaml"  # a grid of n combinations, one seed: n rows to validate
    grid.write_text(grid_spec(f"grid-{n}", n, 1, work / "syn"))
    t0 = time.perf_counter()
    build_plan(load_spec(grid))
    grid_s = time.perf_counter() - t0
    url = f"sqlite:///{work / f'state-{n}.db'}"
    store = Store(url)
    times = {}
    for name, size in ((f"big-{n}", n), ("small", 40)):
        spec_file = work / f"{name}.yaml"
        text = grid_spec(name, size // 10, 10, work / "syn")  # the small study: other variants (4 epochs)
        spec_file.write_text(text if name.startswith("big") else text.replace("epochs: 5", "epochs: 4"))
        t0 = time.perf_counter()
        spec = load_spec(spec_file)
        plan = build_plan(spec)
        plan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        study = store.upsert_study(spec.name, str(spec_file), spec.spec_hash, table_layout(spec))
        record_plan(store, study.id, plan, list(plan.order()))
        write_s = time.perf_counter() - t0
        fill_history(store, list(plan.variants))
        if name.startswith("big"):
            times = {"plan study": plan_s, "write": write_s}
        store.set_study_status(study.id, "completed")
    store.engine.dispose()
    return url, {"plan grid": grid_s, **times}


def read_times(url: str, name: str, work: Path) -> dict[str, float]:
    import sys
    import urllib.request

    from typer.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dashserver import Server  # the tests' server: the app on uvicorn in a thread
    from bnnctl.orchestrator.cli import app as cli
    from bnnctl.orchestrator.results import results

    runner = CliRunner()

    def cli_call(*args: str) -> None:
        r = runner.invoke(cli, [*args, "--db", url])
        assert r.exit_code == 0, r.output

    out = {"status": timed(lambda: cli_call("study", "status", name)),
           "status --all": timed(lambda: cli_call("study", "status", name, "--all"), repeat=1),
           "list": timed(lambda: cli_call("study", "list")),
           "show": timed(lambda: cli_call("study", "show", name, "--format", "csv"), repeat=1),
           "results": timed(lambda: results(name, url))}
    server = Server(url, work / "runs")  # uvicorn on a loopback port, requests over HTTP

    def get(path: str) -> None:
        with urllib.request.urlopen(server.url + path, timeout=600) as r:
            assert r.status == 200 and r.read()

    try:
        out["page cold"] = timed(lambda: get(f"/study/{name}"), repeat=1)
        out["page"] = timed(lambda: get(f"/study/{name}"))
        out["index"] = timed(lambda: get("/"))
    finally:
        server.stop()
    return out


def tiny_study(work: Path, n: int, track: bool) -> dict[str, float]:
    """Driver costs of a tiny study of ``n`` one-epoch variants: wall, driver process CPU, MLflow
    writer process CPU."""
    import resource

    from bnnctl.orchestrator import mlwriter
    from bnnctl.orchestrator.study import run_study

    folder = work / f"tiny-{n}-{'track' if track else 'notrack'}"
    folder.mkdir()
    os.chdir(folder)
    spec = folder / "tiny.yaml"
    text = grid_spec("tiny", n, 1, work / "syn").replace("epochs: 5", "epochs: 1")
    spec.write_text(text + "execution: {max_parallel: 2}\nresources: {cpus: 1}\n")
    writer_cpu = []
    close = mlwriter.Writer.close

    def closing(self) -> None:  # the writer process's CPU time, read as the session ends
        close(self)
        writer_cpu.append(self.cpu_s)

    mlwriter.Writer.close = closing
    try:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        outcome = run_study(spec, cpus=2, track=track)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        mlwriter.Writer.close = close
    assert outcome.status == "completed", outcome
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"wall": wall, "cpu": cpu, "mlflow": sum(writer_cpu)}


def tiny_overheads(work: Path, n: int) -> None:
    """Per-variant driver costs, marginal: the difference between a study of n and one of n/2
    variants, per variant (what a driver's start costs once is left out)."""
    for track in (False, True):
        small, big = tiny_study(work, n // 2, track), tiny_study(work, n, track)
        per = {k: (big[k] - small[k]) / (n - n // 2) for k in big}
        print(f"tiny study, {n // 2} and {n} variants, tracking {'on' if track else 'off'}: per variant "
              f"wall {per['wall'] * 1000:.1f} ms, driver process CPU {per['cpu'] * 1000:.1f} ms, MLflow writer "
              f"process CPU {per['mlflow'] * 1000:.1f} ms; all of the {n}-variant run: {big['wall']:.0f} s wall, "
              f"{big['cpu']:.1f} s driver CPU", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 50000])  # none: the tiny study only
    parser.add_argument("--tiny", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bnnctl-bench-scale-"))
    from bnnctl.workers.data.synthetic import SyntheticConfig, write_synthetic_mpii

    write_synthetic_mpii(work / "syn", SyntheticConfig(train=32, valid=16))
    table: dict[int, dict[str, float]] = {}
    for n in args.sizes:
        url, times = build_store(work, n)
        times.update(read_times(url, f"big-{n}", work))
        table[n] = times
        print(f"{n:>6} variants: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()), flush=True)
    if len(args.sizes) > 1:
        lo, hi = min(args.sizes), max(args.sizes)
        print(f"growth {lo} -> {hi} variants ({hi / lo:.0f}x the size): "
              + ", ".join(f"{k} {table[hi][k] / max(table[lo][k], 1e-9):.1f}x" for k in table[lo]))
    if args.tiny:
        tiny_overheads(work, args.tiny)
    print(f"(work folder {work}, removed; where repeated, the best of 3 calls)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
