"""Measured CPU latency of a trained model as deployed: batch 1, one thread, float vs binary.

The model is materialized (re-parametrizations folded, as :func:`~bnnctl.workers.export.export_model`
does) and built twice from that state: with the float emulation ("float": what PyTorch does with
the same network in float32) and with the XNOR backend ("xnor": fused binary inference where the
kernel is available). Each is timed on one input of the task's size after a warm-up, in alternating
rounds; the figure is the median over rounds of each round's median, and every round's median is
kept (``binary_rounds``, ``float_rounds``: the spread a table shows). Outputs of the two are
compared first: a latency is only reported for a binary model that gives the float model's bits.

A study measures each trained model twice: at the end of its training (where other variants may
run beside it: ``quiet`` False), then at the end of the study on a quiet worker (``quiet`` True,
:func:`measure_checkpoint`, run by the orchestrator with a whole node held; see
``bnnctl.orchestrator.latency``).
"""
from __future__ import annotations

import copy
import dataclasses
import platform
import statistics
import time
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .fused import fuse
from .layers import binary_layers
from .models import ModelConfig, build_model
from .reparam import materialize

#: Timed calls per round and rounds (alternating float and binary), and the warm-up calls.
REPEATS, ROUNDS, WARMUP = 5, 7, 2


@lru_cache(maxsize=1)
def machine() -> str:
    """The CPU as a short name: model name and the instruction set PyTorch uses, e.g.
    "AMD EPYC (AVX512)"."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def _deployed(model: nn.Module, cfg: ModelConfig, backend: str) -> nn.Module:
    state = materialize(copy.deepcopy(model).cpu()).state_dict()
    deployed = materialize(build_model(dataclasses.replace(cfg, backend=backend)))
    deployed.load_state_dict(state)
    return fuse(deployed.eval(), inplace=True)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(model: nn.Module, cfg: ModelConfig, input_size: int, *, repeats: int = REPEATS,
            rounds: int = ROUNDS) -> dict[str, Any]:
    """{"binary_ms", "float_ms", "speedup", "machine", "threads", "batch", "input", ...} of
    ``model`` (a network without binary layers: its float32 latency as "binary_ms", no "float_ms"
    or "speedup"); ``model`` itself is not changed. Raises ArithmeticError if the binary model's
    outputs differ from the float one's."""
    from bnnctl import kernels

    binary = any(layer.binary_weights and layer.binary_inputs for _, layer in binary_layers(model))
    with torch.random.fork_rng(devices=[]):  # building the copies draws initial weights: not from the run's RNG
        models = {b: _deployed(model, cfg, b) for b in (("float", "xnor") if binary else ("float",))}
    x = torch.randn(1, cfg.in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = {b: m(x) for b, m in models.items()}
            first = {b: o[-1] if isinstance(o, list) else o for b, o in out.items()}
            if binary and not torch.equal(first["float"], first["xnor"]):
                raise ArithmeticError("the binary model's outputs differ from the float model's")
            for m in models.values():
                for _ in range(WARMUP):
                    m(x)
            samples: dict[str, list[float]] = {b: [] for b in models}
            for _ in range(rounds):
                for b, m in models.items():
                    samples[b].append(_median_ms(lambda m=m: m(x), repeats))
    finally:
        torch.set_num_threads(threads)
    where = machine() if kernels.available("cpu") else f"{machine()}, no XNOR kernel (no C compiler)"
    f = statistics.median(samples["float"])
    medians = {k: [round(x, 3) for x in v] for k, v in samples.items()}  # each round's median, in order
    common = {"machine": where, "threads": 1, "batch": 1, "input": input_size, "kernel": kernels.available("cpu"),
              "rounds": rounds, "quiet": False}
    if not binary:  # a real-valued network: its latency, no binary counterpart to compare
        return {"binary_ms": round(f, 3), "float_ms": None, "speedup": None, "binary_layers": False,
                "binary_rounds": medians["float"], "float_rounds": None, **common}
    b = statistics.median(samples["xnor"])
    return {"binary_ms": round(b, 3), "float_ms": round(f, 3), "speedup": round(f / b, 2), "binary_layers": True,
            "binary_rounds": medians["xnor"], "float_rounds": medians["float"], **common}


def measure_checkpoint(path) -> dict[str, Any]:
    """:func:`measure` of the model a training checkpoint holds (its deployed form), on the input
    size it trained at; for the quiet measurement at the end of a study (the caller sets ``quiet``)."""
    from .train.checkpoint import model_from_checkpoint

    model, cfg, data = model_from_checkpoint(path)
    size = ((data.get("config") or {}).get("data") or {}).get("input_size") or cfg.input_size
    return measure(model, cfg, int(size))
