"""BatchNorm statistics for the network that is evaluated and deployed.

A network trained with a smooth approximation of sign (progressive binarization, IT §3.4) keeps
BatchNorm running statistics of the *smooth* forward; the network that is evaluated and exported
computes the exact sign, whose activations have other means and variances. Re-estimating the running
statistics with the exact forward (as ``torch.optim.swa_utils.update_bn`` does for averaged weights)
makes the evaluated network the deployed one: the statistics are saved in the checkpoint and the
export keeps them.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: Iterable[Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean and variance from ``inputs`` with the network's
    exact forward (every quantizer in evaluation mode: sign), as an equal-weight average over the
    batches. Parameters, quantizers and the model's train/eval mode are left as they were; returns the
    number of batches used (0: nothing changed)."""
    norms = batchnorms(model)
    if not norms:
        return 0
    was_training = model.training
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    model.eval()  # quantizers (and anything else) as evaluated: exact sign
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()  # batch statistics in the forward, accumulated into the running ones
    used = 0
    try:
        for x in inputs:
            model(x)
            used += 1
    finally:
        for m, (momentum, mean, var, tracked) in zip(norms, saved):
            m.momentum = momentum
            if not used:  # nothing seen: keep the statistics it had
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    return used
