"""Benchmark (not a test): the XNOR-popcount convolution against float convolution on the papers'
layer shapes, after a correctness check on each shape.

- CPU: compiled kernel (input packing and the Python call included, weights packed once) vs F.conv2d
  float32, one thread by default (--threads 1 2 for several; the kernel uses OpenMP where it was
  built with it). Target (issue 7): >= 8x. Each operation is timed in its own loop (median of --repeats
  calls), in --rounds rounds that alternate float and XNOR after a warm-up; the speed-up reported is
  the median over rounds, so a slow spell of a shared machine does not decide it. Then whole
  networks in evaluation, backend "float" vs "xnor" (fused binary inference), outputs compared.
  Goals (issue 19): kernel geometric mean >= 20x; hourglass >= 6x, ResNet-18 >= 10x.
- GPU (when CUDA and CuPy are present): the CuPy kernels -- CUDA-core popcount and, on sm_80+, 1-bit
  tensor cores -- vs cuDNN FP16 and BF16 at batch 1 and 32, timed with CUDA events after a
  correctness check. Target: >= 1x at batch 1.

    .venv/bin/python tests/benchmarks/bench_xnor_conv.py [--batch 1] [--threads 1 2] [--repeats 20] [--rounds 5] [--gpu-only]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bnnctl import kernels
from bnnctl.kernels import cpu

# (name, channels, spatial size): hourglass 3x3 convs and ResNet-18 3x3 layers
SHAPES = [("hourglass", 128, 64), ("hourglass", 128, 32), ("hourglass", 128, 16),
          ("hourglass", 256, 64), ("hourglass", 256, 32), ("hourglass", 256, 16),
          ("resnet18", 64, 56), ("resnet18", 128, 28), ("resnet18", 256, 14), ("resnet18", 512, 7)]


def sign(t):
    return torch.where(t >= 0, 1.0, -1.0).to(t.dtype)


def cpu_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def warm_up(seconds: float = 1.0) -> None:
    x, w = torch.randn(1, 64, 32, 32), torch.randn(64, 64, 3, 3)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        F.conv2d(x, w, padding=1)


def run_cpu(batch: int, threads: int, repeats: int, rounds: int) -> None:
    torch.set_num_threads(threads)
    print(f"CPU, {threads} thread(s), torch {torch.__version__}, batch {batch}; compiled kernel with AVX-512 popcount: "
          f"{cpu.vector_popcount()}, OpenMP: {cpu.multithreaded()}; median of {repeats} calls, median of {rounds} rounds")
    print(f"  {'layer':10s} {'C':>4s} {'HxW':>6s} {'float32 ms':>11s} {'xnor ms':>8s} {'speed-up':>8s}")
    warm_up()
    ratios = []
    for name, c, size in SHAPES:
        x = torch.randn(batch, c, size, size)
        w = torch.randn(c, c, 3, 3)
        xs, ws = sign(x), sign(w)
        packed = cpu.pack_weight(w)
        assert torch.equal(cpu.xnor_conv2d(x, packed, None, 1, 1), F.conv2d(xs, ws, padding=1)), "mismatch"
        t_f, t_x = [], []
        for _ in range(rounds):
            t_f.append(cpu_time(lambda: F.conv2d(xs, ws, padding=1), repeats))
            t_x.append(cpu_time(lambda: cpu.xnor_conv2d(x, packed, None, 1, 1), repeats))
        ratio = statistics.median(f / x_ for f, x_ in zip(t_f, t_x))
        ratios.append(ratio)
        print(f"  {name:10s} {c:4d} {size:3d}x{size:<3d}{statistics.median(t_f) * 1e3:11.2f} "
              f"{statistics.median(t_x) * 1e3:8.3f} {ratio:7.1f}x")
    print(f"  geometric mean speed-up: {statistics.geometric_mean(ratios):.1f}x, lowest {min(ratios):.1f}x "
          f"(target >= 8x)")


NETWORKS = (("hourglass width 128, 1 stack, 256x256", dict(width=128, num_outputs=16), 256),
            ("ResNet-18, 224x224", dict(arch="resnet18", num_outputs=1000), 224),
            ("AlexNet, 224x224", dict(arch="alexnet", num_outputs=1000), 224))


def run_networks(threads: int, repeats: int, rounds: int) -> None:
    """Whole networks in evaluation (torch.no_grad, batch 1), backend "float" (PyTorch float32, the
    baseline) vs "xnor" (fused binary inference: workers/fused.py), everything included (the real
    first and last layers, pooling, upsampling); outputs compared first. Also "xnor" with PyTorch's
    own pooling/upsampling (``fused convs only``), to show what the faster exact forms add, and the
    real-valued network of the same architecture (float weights: no binarization done per call, as
    the float emulation of a binary network does). Rounds alternate them; each figure is the median
    over rounds of each round's median."""
    from bnnctl.workers import fused
    from bnnctl.workers.models import ModelConfig, build_model

    torch.set_num_threads(threads)
    print(f"Whole networks, eval, batch 1, {threads} thread(s), median of {repeats} calls, median of {rounds} rounds:")
    for label, kw, size in NETWORKS:
        x = torch.randn(1, 3, size, size)
        models = {}
        for backend in ("float", "xnor"):
            torch.manual_seed(0)
            models[backend] = fused.fuse(build_model(ModelConfig(backend=backend, **kw)).eval())
        torch.manual_seed(0)
        models["convs only"] = fused.fuse(build_model(ModelConfig(backend="xnor", **kw)).eval(), glue=False)
        models["convs only"].load_state_dict(models["xnor"].state_dict())
        models["real"] = build_model(ModelConfig(**kw).real()).eval()
        calls = {k: (lambda m=m: m(x)) for k, m in models.items()}
        with torch.no_grad():
            outs = {k: fn() for k, fn in calls.items()}
            last = {k: o[-1] if isinstance(o, list) else o for k, o in outs.items()}
            assert torch.equal(last["float"], last["xnor"]) and torch.equal(last["float"], last["convs only"]), "mismatch"
            samples: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(rounds):
                for k, fn in calls.items():
                    samples[k].append(cpu_time(fn, repeats))
        t = {k: statistics.median(v) for k, v in samples.items()}
        ratio = statistics.median(f / b for f, b in zip(samples["float"], samples["xnor"]))
        print(f"  {label:38s} float {t['float'] * 1e3:7.1f} ms  xnor {t['xnor'] * 1e3:6.1f} ms  {ratio:5.2f}x  "
              f"(fused convs only: {t['convs only'] * 1e3:6.1f} ms, {t['float'] / t['convs only']:.2f}x; outputs identical; "
              f"the real-valued network: {t['real'] * 1e3:.1f} ms, {t['real'] / t['xnor']:.2f}x)")


def run_gpu(repeats: int) -> None:
    if not kernels.available("cuda"):
        print("GPU: no CUDA device with CuPy here: the GPU kernels were NOT run or timed.")
        return
    from bnnctl.kernels import gpu

    methods = ["popc"] + (["mma"] if gpu.tensor_cores() else [])
    print(f"GPU {torch.cuda.get_device_name()}: CUDA events, median of {repeats}; xnor methods: {', '.join(methods)} "
          f"(popc: CUDA cores, mma: 1-bit tensor cores); input packing included, weights packed once")
    for batch in (1, 32):
        for name, c, size in SHAPES:
            x = torch.randn(batch, c, size, size, device="cuda")
            w = torch.randn(c, c, 3, 3, device="cuda")
            ref = F.conv2d(sign(x), sign(w), padding=1)
            xh, wh, xb, wb = sign(x).half(), sign(w).half(), sign(x).bfloat16(), sign(w).bfloat16()
            fns = {"fp16": lambda: F.conv2d(xh, wh, padding=1), "bf16": lambda: F.conv2d(xb, wb, padding=1)}
            for method in methods:
                packed = gpu.pack_weight(w, method)
                assert torch.equal(gpu.xnor_conv2d(x, w, None, 1, 1, packed), ref), f"{method} mismatch"
                fns[method] = (lambda p: lambda: gpu.xnor_conv2d(x, w, None, 1, 1, p))(packed)
            times = {}
            for label, fn in fns.items():
                fn()
                samples = []
                for _ in range(repeats):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    torch.cuda.synchronize()
                    samples.append(start.elapsed_time(end))
                times[label] = statistics.median(samples)
            macs = batch * c * c * 9 * size * size
            print(f"  batch {batch:2d} {name:10s} {c:4d} {size:3d}  "
                  + "  ".join(f"{k} {v:.3f} ms" for k, v in times.items())
                  + "  " + "  ".join(f"{m} vs fp16 {times['fp16'] / times[m]:.2f}x ({macs / times[m] / 1e9:.1f} T binary MAC/s)"
                                     for m in methods))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="one or more thread counts")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU part (the device check: `make gpu-check`)")
    args = parser.parse_args()
    if args.gpu_only:
        run_gpu(args.repeats)
        return
    for threads in args.threads:
        run_cpu(args.batch, threads, args.repeats, args.rounds)
        run_networks(threads, max(args.repeats // 4, 3), args.rounds)
    run_gpu(args.repeats)


if __name__ == "__main__":
    main()
