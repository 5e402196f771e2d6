"""Benchmark (not a test): train a small real-valued and a small fully binary hourglass on the
embedded synthetic pose set, each for a fixed budget of wall-clock time on the CPU, and report
PCKh@0.5 per epoch and the time to reach 80%.

Target (issue 3): within 5 minutes on 2 CPU cores, the real network reaches >= 80% PCKh@0.5 and the
binary one is clearly learning.

    .venv/bin/python tests/benchmarks/bench_synthetic_training.py [--budget 300] [--threads 2]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bnnctl.workers.data.synthetic import SyntheticConfig
from bnnctl.workers.models import ModelConfig
from bnnctl.workers.train import DataConfig, LocalReporter, OptimConfig, TrainConfig, run_variant
from bnnctl.workers.train.tasks import prepare_root


class BudgetReporter(LocalReporter):
    """Stops the run when another epoch would exceed the time budget (train + evaluation)."""

    def __init__(self, checkpoint_dir: Path, budget: float, label: str) -> None:
        super().__init__(checkpoint_dir)
        self.budget, self.label, self.elapsed = budget, label, 0.0
        self.reached_80: float | None = None

    def report(self, epoch, metrics):
        super().report(epoch, metrics)
        self.elapsed += metrics["epoch_time"]
        if self.reached_80 is None and metrics["pckh"] >= 80.0:
            self.reached_80 = self.elapsed
        print(f"  {self.label:6s} epoch {epoch:3d}  {self.elapsed:6.1f} s  PCKh@0.5 {metrics['pckh']:5.1f}  "
              f"PCKh@0.1 {metrics['pckh@0.1']:5.1f}  train loss {metrics['train_loss']:.5f}", flush=True)

    def should_stop(self) -> bool:
        last = self.history[-1][1]["epoch_time"] if self.history else 0.0
        return self.elapsed + last > self.budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of training + evaluation per network")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--only", choices=["real", "binary"], default=None)
    args = parser.parse_args()
    model = ModelConfig(width=args.width, depth=args.depth)
    variants = {"real": model.real(), "binary": model}
    data = DataConfig(synthetic=SyntheticConfig())
    print(f"torch {torch.__version__}, {args.threads} threads; synthetic set {data.synthetic.train} train / "
          f"{data.synthetic.valid} val, input {data.input_size}; 1-stack hourglass width {args.width} depth {args.depth}, "
          f"HPM blocks, PReLU, MSE, RMSprop lr {args.lr}, batch 16; budget {args.budget:.0f} s each")
    t0 = time.perf_counter()
    root = prepare_root(TrainConfig(data=data))
    print(f"  synthetic set ready at {root} in {time.perf_counter() - t0:.1f} s")
    summary = {}
    for label, m in variants.items():
        if args.only and label != args.only:
            continue
        cfg = TrainConfig(model=m, data=data, optim=OptimConfig(lr=args.lr), epochs=1000, batch_size=16, loss="mse",
                          threads=args.threads)
        folder = Path(tempfile.mkdtemp(prefix=f"bnnctl-bench-{label}-"))
        rep = BudgetReporter(folder, args.budget, label)
        result = run_variant(cfg, rep)
        summary[label] = (result, rep)
        shutil.rmtree(folder, ignore_errors=True)
    print("summary:")
    for label, (result, rep) in summary.items():
        reached = f"{rep.reached_80:.0f} s" if rep.reached_80 is not None else "not reached"
        print(f"  {label:6s} final PCKh@0.5 {result.metrics['pckh']:.1f} (best {result.best_metric:.1f}) after "
              f"{result.epochs_done} epochs, {rep.elapsed:.0f} s; 80% reached: {reached}; "
              f"params {result.accounting['params']:,} ({result.accounting['binary_params']:,} binary)")


if __name__ == "__main__":
    main()
