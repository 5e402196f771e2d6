"""Data parallelism inside one variant: the same math as one worker, split over ranks.

Whoever runs the variant (the orchestrator through Ray Train's ``TorchTrainer``, or a test with
``torch.distributed`` directly) sets up the default process group (gloo on CPUs, NCCL on GPUs);
the trainer only reads it. With one process (no group) every function here is the identity.

What each rank does, and why the result equals a one-worker run of the same global batch:

- **Data**: every rank draws the *global* batches of the one-worker loader (same seeded order) and
  keeps its share of each: items ``rank, rank + N, ...`` of the batch. A global batch of ``B`` that
  ``N`` does not divide gives ranks ``ceil(B/N)`` or ``floor(B/N)`` items; a final batch smaller
  than ``N`` leaves some ranks with none (they still take part in every collective). Augmentation is
  seeded per (seed, epoch, item), so an item looks the same on any rank.
- **Gradients**: each rank's loss is its share's mean weighted by ``n_rank / B``; the weighted
  gradients are summed over ranks (one all-reduce of a flat buffer per step). That is the gradient
  of the global batch's mean loss, whatever the split. (This is DistributedDataParallel's
  all-reduce; we do it ourselves rather than wrap the model, because the quantizers' lambda and the
  learned alphas are read and written outside ``forward`` and the checkpoint keeps the plain keys.)
- **BatchNorm** (``sync_batchnorm: true``, the default): in training mode each BatchNorm computes the
  mean and variance of the global batch from all-reduced sums (differentiable, so the backward pass
  is the global batch's too), and updates its running statistics with them, so every rank keeps the
  same statistics. Off, each rank normalises with its own share's statistics (the math then depends
  on the number of workers, and so does the variant's identity).
- Checkpoints and metrics: rank 0 evaluates, writes ``last.pt``/``best.pt`` and reports; every rank
  resumes from the same ``last.pt``; the driver's stop verdict reaches every rank by a broadcast.

Equal up to floating-point summation order: the measured difference to a one-worker run is in
``tests/workers/test_parallel.py``.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn


def world() -> tuple[int, int]:
    """(rank, number of ranks) of this process; (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(indices: list[int], rank: int, size: int) -> list[int]:
    """This rank's items of a global batch: every ``size``-th, starting at ``rank``."""
    return indices[rank::size]


class ShardedBatches(torch.utils.data.Sampler):
    """The global batches of ``batches`` (a batch sampler), each cut to this rank's share."""

    def __init__(self, batches, rank: int, size: int) -> None:
        self.batches, self.rank, self.size = batches, rank, size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield shard(list(batch), self.rank, self.size)

    def __len__(self) -> int:
        return len(self.batches)


def all_reduce_gradients(model: nn.Module, value: float = 0.0) -> float:
    """Sum every parameter's gradient over the ranks, and ``value`` with them (one collective on a
    flat buffer); returns the summed ``value``. Parameters without a gradient on this rank count as
    zeros, so every rank takes part with the same buffer."""
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    flat = torch.cat([*parts, torch.tensor([value], dtype=parts[0].dtype if parts else torch.float32,
                                           device=parts[0].device if parts else "cpu")])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    return float(flat[-1])


def broadcast_flag(value: bool) -> bool:
    """Rank 0's ``value`` on every rank (the driver's stop verdict)."""
    import torch.distributed as dist

    t = torch.tensor([1 if value else 0], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def global_count(n: int) -> int:
    """The sum over ranks of ``n``."""
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


class _Sum(torch.autograd.Function):
    """All-reduce (sum) with the backward a sum over ranks needs: the gradient of a quantity every
    rank uses is the sum of what each rank's loss contributes to it."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        out = grad.clone()
        dist.all_reduce(out)
        return out


def _sync_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """A BatchNorm's forward over the global batch: the original forward outside training or with
    one rank; in training, mean and (biased) variance of all ranks' items (two all-reduces), the
    running statistics updated as ``nn.BatchNorm`` updates them (unbiased variance, momentum or the
    cumulative average when ``momentum`` is None)."""
    rank, size = world()
    if not self.training or size == 1:
        return type(self).forward(self, x)
    dims = [d for d in range(x.dim()) if d != 1]
    count = x.numel() // max(x.shape[1], 1)
    head = _Sum.apply(torch.cat([x.sum(dims), x.new_tensor([float(count)])]))
    n = head[-1]
    mean = head[:-1] / n.clamp(min=1)
    shape = [1, -1] + [1] * (x.dim() - 2)
    centred = x - mean.view(shape)
    var = _Sum.apply((centred * centred).sum(dims)) / n.clamp(min=1)
    y = centred * torch.rsqrt(var.view(shape) + self.eps)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            total = float(n)
            unbiased = var.detach() * (total / max(total - 1.0, 1.0))
            self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
    return y


def sync_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm of ``model`` normalise over the global batch in training (see
    :func:`_sync_forward`); modules keep their class, parameters and state-dict keys. Returns how many."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.forward = _sync_forward.__get__(m)
            count += 1
    return count
