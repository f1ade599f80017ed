"""Backward masking: every worker runs the full forward, but trains only the units it holds.

The two regimes (docs/masking.md):

- ``"forward"`` (the default): units a worker does not hold are absent from its model (forward
  and backward); see :mod:`subnetdp.subnet`.
- ``"backward"``: every worker holds every parameter and runs the full model's forward. Only the
  parameters of its held units require gradients, so autograd computes no weight gradient (and
  saves no input that only a weight gradient would need) for the rest, and the optimizer, which
  skips parameters without a gradient, keeps no state for them. Held gradients are averaged over
  their holders (sum / holder count), exactly as in forward masking. After the optimizer step,
  the new values of each holder set's elements go from its lowest-numbered holder to every worker
  (one broadcast per holder set over the world), so all workers again hold identical full models.

A tensor that is only partly held (neuron level: a layer whose rows are split among units) must
require a gradient as a whole; a gradient hook zeroes its non-held slices, so they are neither
averaged nor trusted (their values are overwritten by the broadcast). Its gradient and optimizer
state are full-size: the memory saving of backward masking is per whole tensor.

This module holds what both engines share: the worker's model and the holder-set buckets laid out
over full-model positions, identical on every worker.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from subnetdp.checkpointing import check_checkpointing, checkpoint_blocks
from subnetdp.buckets import Bucket, Entry, Holders, layout_buckets, sync_tensors
from subnetdp.init import ModelFactory, materialize_, structure_of
from subnetdp.planning import Plan
from subnetdp.subnet import check_architecture

MASKINGS = ("forward", "backward")


def check_masking(masking: str, sync: str) -> None:
    """Fail fast on an unknown regime, or one combined with parameter averaging (undefined for it)."""
    if masking not in MASKINGS:
        raise ValueError(f"masking={masking!r}: choose one of {MASKINGS}")
    if masking == "backward" and sync != "grads":
        raise ValueError(f"masking='backward' with sync={sync!r}: backward masking averages gradients every "
                         "step and sends the holders' new values to the others; use sync='grads'")


def _mask_hook(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask

    return hook


def build_backward_worker(
    model: nn.Module | ModelFactory,
    plan: Plan,
    worker: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    checkpointing: str | None = None,
) -> nn.Module:
    """``worker``'s model under backward masking: the full model, trainable only where ``worker`` holds.

    Values equal :func:`subnetdp.materialize` with the same ``seed`` (or ``model``'s own values).
    ``checkpointing="blocks"`` runs every block of the full forward under activation checkpointing.
    """
    checkpointing = check_checkpointing(checkpointing)
    plan.check_worker(worker)
    structure, source = structure_of(model)
    check_architecture(structure, plan)
    materialize_(structure, seed, source=source, device=device)
    tmap = plan.tensor_map(worker)
    for name, p in structure.named_parameters():
        if not p.requires_grad:
            continue  # frozen by the user: stays frozen
        if name not in tmap:
            p.requires_grad_(False)  # a unit this worker does not hold: no gradient, no optimizer state
            continue
        where = tmap[name]
        if where is None:
            continue
        dim, idx = where
        if not idx:
            p.requires_grad_(False)
        elif len(idx) < p.shape[dim]:
            shape = [1] * p.dim()
            shape[dim] = p.shape[dim]
            mask = torch.zeros(p.shape[dim], dtype=p.dtype, device=p.device)
            mask[torch.tensor(idx, dtype=torch.long, device=p.device)] = 1
            p.register_hook(_mask_hook(mask.view(shape)))
    if checkpointing == "blocks":
        checkpoint_blocks(structure, [b.name for b in plan.blocks])
    return structure


def full_buckets(module: nn.Module, plan: Plan) -> dict[Holders, Bucket]:
    """One bucket per holder set of the plan over ``module``'s full-size parameters (trainable or not).

    Laid out as :func:`subnetdp.buckets.build_buckets` does, with indices that are full-model
    positions, so every worker builds the same buckets.
    """
    return layout_buckets(dict(module.named_parameters()), plan, lambda _name, size: range(size))


def held_buckets(buckets: dict[Holders, Bucket], worker: int) -> dict[Holders, Bucket]:
    """The buckets whose elements ``worker`` holds: what it averages gradients of."""
    return {h: b for h, b in buckets.items() if worker in h}


def broadcast_buckets(buckets: dict[Holders, Bucket], workers: int) -> dict[Holders, Bucket]:
    """The buckets some worker does not hold: their new values go from ``h[0]`` to everyone after a step."""
    return {h: b for h, b in buckets.items() if len(h) < workers}


def buffer_bucket(module: nn.Module, workers: int) -> Bucket | None:
    """Every float buffer, held by all workers: each computes them all in its full forward."""
    world = tuple(range(workers))
    entries = [Entry(n, b) for n, b in sync_tensors(module, "buffers").items()]
    return Bucket(world, entries) if entries else None
