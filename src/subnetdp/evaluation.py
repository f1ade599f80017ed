"""Evaluation conventions for the assembled full model.

At test time every unit is present, while in training each worker saw only its part. Three
conventions reconcile the two (compared on real data in docs/evaluation.md):

- block level, ``scale_residual_branches``: a block held by ``r`` of ``K`` workers was present in a
  fraction ``r/K`` of the training subnetworks, so its residual branch is scaled by ``r/K`` at test
  time, as stochastic depth does: ``x + (r/K) * (block(x) - x)``;
- neuron level, inverted scaling during training (``build_subnetwork(neuron_scaling="inverted")``):
  the assembled model then needs no rescaling;
- ``recalibrate_batchnorm``: re-estimate BatchNorm statistics of the full model on training batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from subnetdp.plan import Plan


def scale_residual_branches(model: nn.Module, plan: Plan) -> list[RemovableHandle]:
    """Scale each unit block's residual branch by its holder fraction. Returns removable hooks."""
    if plan.level != "block":
        raise ValueError(f"residual-branch scaling applies to block-level plans, not {plan.level!r}")
    scale = plan.holders_per_unit / plan.workers

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return x + scale * (out - x)

    return [model.get_submodule(u.name).register_forward_hook(hook) for u in plan.units]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics as a plain average over ``batches``.

    Returns the number of batches used. The model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    n = 0
    for x in batches:
        model(x)
        n += 1
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.eval()
    return n
