"""Benchmark (not a test): forward + backward time of the 1-stack binary hourglass (HPM blocks,
paper width 256) against the same network real-valued, on the CPU.

Target (issue 2): binary <= 1.5x real at 64x64 input, batch 8.

    .venv/bin/python tests/benchmarks/bench_binary_vs_real.py [--threads 2] [--repeats 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnnctl.workers.models import ModelConfig, build_model
from bnnctl.workers.reparam import DecompositionConfig


def step_time(model: torch.nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        loss = sum(o.square().mean() for o in model(x))
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    base = ModelConfig(width=args.width)
    variants = {
        "real": base.real(),
        "binary": base,
        "binary + holistic tucker": ModelConfig(width=args.width, decomposition=DecompositionConfig("holistic_tucker")),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, input {args.batch}x3x{args.size}x{args.size}, "
          f"1-stack hourglass, HPM blocks, width {args.width}; fwd+bwd, median of {args.repeats}")
    medians = {}
    for name, cfg in variants.items():
        model = build_model(cfg).train()
        t = step_time(model, x, args.repeats, args.warmup)
        medians[name] = statistics.median(t)
        print(f"  {name:26s} {medians[name] * 1e3:8.1f} ms  (min {min(t) * 1e3:.1f}, max {max(t) * 1e3:.1f})")
    for name in variants:
        if name != "real":
            target = " (target <= 1.5x)" if name == "binary" else ""
            print(f"  ratio {name} / real: {medians[name] / medians['real']:.2f}x{target}")


if __name__ == "__main__":
    main()
