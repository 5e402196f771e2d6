"""Benchmark (not a test): orchestration cost of a study of 8 small variants on 2 Ray workers.

parallel efficiency = sum of per-variant run time (as measured inside each worker) / (2 x wall time)
overhead per variant = (2 x wall time - sum of per-variant run time) / 8
Wall time covers the whole `run_study` call: local Ray start, state store, MLflow, scheduling.
Targets (issue 4): efficiency >= 85%, overhead < 2 s per variant.

    .venv/bin/python tests/benchmarks/bench_orchestration.py [--epochs 4] [--no-track]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

SPEC = """
name: bench-orchestration
base:
  model: {{width: 16, depth: 2}}
  data: {{root: {root}, synthetic: {{train: 256, valid: 64}}, input_size: 32}}
  epochs: {epochs}
  batch_size: 16
  loss: mse
  threads: 1
seeds: [0, 1]
ablations:
  - name: activations
    mode: isolated
    rows:
      - {{name: relu, set: {{model.activation.kind: relu}}}}
      - {{name: leaky, set: {{model.activation.kind: leaky_relu}}}}
      - {{name: prelu, set: {{model.activation.kind: prelu}}}}
      - {{name: real, set: {{model.binarize.activations: false, model.binarize.weights: false}}}}
execution: {{max_parallel: 2}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--no-track", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bnnctl-bench-orch-"))
    os.chdir(work)
    from bnnctl.orchestrator.store import Store
    from bnnctl.orchestrator.study import run_study
    from bnnctl.workers.data.synthetic import SyntheticConfig, write_synthetic_mpii

    write_synthetic_mpii(work / "syn", SyntheticConfig(train=256, valid=64))  # data exists before timing
    spec = work / "bench.yaml"
    spec.write_text(SPEC.format(root=work / "syn", epochs=args.epochs))
    t0 = time.perf_counter()
    outcome = run_study(spec, cpus=2, track=not args.no_track)
    wall = time.perf_counter() - t0
    store = Store()
    study = store.study("bench-orchestration")
    variants = store.variants([m.variant_key for m in store.members(study.id)])
    work_s = sum(v.result["timings"]["total_s"] for v in variants.values())
    n = len(variants)
    print(f"{n} variants ({outcome.status}), 2 workers, {args.epochs} epochs each, MLflow {'off' if args.no_track else 'on'}")
    print(f"  wall time {wall:.1f} s; sum of per-variant run time {work_s:.1f} s (mean {work_s / n:.1f} s)")
    print(f"  parallel efficiency {work_s / (2 * wall):.1%} (target >= 85%)")
    print(f"  orchestration overhead per variant {(2 * wall - work_s) / n:.2f} s (target < 2 s)")


if __name__ == "__main__":
    main()
