"""Gradient alignment: how well each worker's subnetwork gradient points where the full model's does.

The method's explanation of why block level beats neuron level is that subnetworks that keep skip
connections have gradients better aligned with the full model's. This measures it: on one batch,
the gradient of worker ``k``'s subnetwork (its own forward and backward, before any sync) against
the gradient of the full model assembled from the same state, by cosine similarity

- ``held``: over the elements the worker holds (does its step point the right way where it acts?),
- ``full``: over all elements, the worker's gradient counted as zero where it holds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from subnetdp.init import materialize
from subnetdp.simulate import Simulation

LossFn = Callable[[nn.Module, object], torch.Tensor]


def _full_coordinates(sim: Simulation, k: int, grads: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Worker ``k``'s gradients scattered into full shapes, with masks of the held elements."""
    tmap = sim.plan.tensor_map(k)
    values, masks = {}, {}
    for name, g in grads.items():
        shape = sim.plan.shapes[name]
        full, mask = torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
        where = tmap[name]
        if where is None:
            full.copy_(g)
            mask.fill_(True)
        else:
            idx = torch.tensor(where[1], dtype=torch.long)
            full.index_copy_(where[0], idx, g)
            mask.index_fill_(where[0], idx, True)
        values[name], masks[name] = full, mask
    return values, masks


def gradient_alignment(sim: Simulation, batches: Sequence[object], loss_fn: LossFn) -> list[dict[str, float]]:
    """Per worker: cosine similarity of its subnetwork gradient with the full model's, on its batch.

    Does not change the simulation's parameters; gradients are left cleared. BatchNorm layers run
    in training mode in both models (batch statistics), as in a training step.
    """
    state = sim.full_state_dict()
    device = next(sim.workers[0].parameters()).device
    full = materialize(sim.structure, device=device)  # structure only; values loaded next
    full.load_state_dict(state)
    full.train()
    out = []
    for k, (worker, batch) in enumerate(zip(sim.workers, batches)):
        worker.zero_grad(set_to_none=True)
        loss_fn(worker, batch).backward()
        sub = {n: p.grad.detach().cpu() for n, p in worker.named_parameters() if p.grad is not None}
        worker.zero_grad(set_to_none=True)
        full.zero_grad(set_to_none=True)
        loss_fn(full, batch).backward()
        ref = {n: p.grad.detach().cpu() for n, p in full.named_parameters() if p.grad is not None}
        values, masks = _full_coordinates(sim, k, sub)
        names = [n for n in ref if n in values]
        a = torch.cat([values[n].reshape(-1) for n in names])
        m = torch.cat([masks[n].reshape(-1) for n in names])
        b_held = torch.cat([ref[n].reshape(-1) for n in names])
        b_all = torch.cat([g.reshape(-1) for g in ref.values()])
        a_all = torch.cat([values[n].reshape(-1) if n in values else torch.zeros(ref[n].numel()) for n in ref])
        out.append({
            "worker": k,
            "held": float(nn.functional.cosine_similarity(a[m], b_held[m], dim=0)),
            "full": float(nn.functional.cosine_similarity(a_all, b_all, dim=0)),
            "held_fraction": float(m.sum()) / b_all.numel(),
        })
    full.zero_grad(set_to_none=True)
    return out
