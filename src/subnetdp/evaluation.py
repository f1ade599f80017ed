"""Evaluation conventions for the assembled full model.

At test time every unit is present, while in training each worker saw only its part. Three
conventions reconcile the two (compared on real data in docs/evaluation.md):

- block level, ``scale_residual_branches``: a block held by ``r`` of ``K`` workers was present in a
  fraction ``r/K`` of the training subnetworks, so its residual branch is scaled by ``r/K`` at test
  time, as stochastic depth does: ``skip(x) + (r/K) * (block(x) - skip(x))``, where ``skip(x)`` is what
  a worker that does not hold the block computes: ``x`` for a block with unchanged shapes, the
  shortcut path (then the block's post-add ReLU, as :class:`~subnetdp.subnet.ShortcutOnly` runs it)
  for a transition block of a ``transitions="shortcut"`` plan. The shortcut path itself is unscaled;
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
    """Scale each unit block's residual branch by its holder fraction. Returns removable hooks.

    A transition block (``transitions="shortcut"``) keeps its shortcut path unscaled: the hook reuses
    the shortcut output the block computed in its own forward (no second call, so BatchNorm statistics
    are not updated twice during recalibration).
    """
    if plan.level != "block":
        raise ValueError(f"residual-branch scaling applies to block-level plans, not {plan.level!r}")
    scale = plan.holders_per_unit / plan.workers
    infos = {b.name: b for b in plan.blocks}
    handles: list[RemovableHandle] = []

    def identity_hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return x + scale * (out - x)

    for u in plan.units:
        block = model.get_submodule(u.name)
        info = infos.get(u.name)
        if info is None or not info.transition:
            handles.append(block.register_forward_hook(identity_hook))
            continue
        if info.shortcut is None:
            raise ValueError(f"block {u.name!r} changes shapes but has no shortcut module; it can not be a unit")
        shortcut = block.get_submodule(info.shortcut)
        relu = getattr(block, "relu", None)
        stash: dict[str, torch.Tensor] = {}

        def keep(_m: nn.Module, _args: tuple, out: torch.Tensor, stash: dict = stash) -> None:
            stash["shortcut"] = out

        def transition_hook(_m: nn.Module, _args: tuple, out: torch.Tensor, stash: dict = stash,
                            relu: nn.Module | None = relu) -> torch.Tensor:
            skip = stash.pop("shortcut")
            if isinstance(relu, nn.Module):  # the block's in-place ReLU on a fresh tensor: out is untouched
                skip = relu(skip.clone())
            return skip + scale * (out - skip)

        handles.append(shortcut.register_forward_hook(keep))
        handles.append(block.register_forward_hook(transition_hook))
    return handles


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
