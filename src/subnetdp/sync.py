"""Sync: the arithmetic of averaging over holder sets, shared by both engines.

:mod:`subnetdp.buckets` lays a worker's tensors out in holder-set buckets (which elements, in which
order); this module holds what SDP computes over them, each in one place:

- the division by the holder count (:func:`divide_by_holders_`): every average over holders, in
  :class:`subnetdp.SubnetDataParallel` (after an all-reduce ``SUM``) and in
  :class:`subnetdp.Simulation` (after an in-process sum), goes through it. Never the world size,
  never ``ReduceOp.AVG``;
- the holder-weighted squared gradient norm for clipping (:func:`holder_weighted_sq_norm`) and the
  clip itself (:func:`clip_gradients_`);
- the communication traffic per worker per step (:func:`bucket_bytes`, :func:`traffic`,
  :func:`step_traffic`), with the element size taken from the tensors.

:mod:`subnetdp.engine` keeps what is distributed (process groups, chunks, hooks) and calls these.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from subnetdp.buckets import Bucket, Holders, build_buckets
from subnetdp.masking import regime
from subnetdp.planning import Plan


def divide_by_holders_(summed: torch.Tensor, holders: Holders) -> torch.Tensor:
    """``summed / len(holders)`` in place: a sum over a holder set becomes its holders' average.

    The one place SDP divides by the holder count (DESIGN.md invariant 7). Dividing by the world size
    instead would shrink the learning rate of partly held elements by ``r / K``.
    """
    return summed.div_(len(holders))


@torch.no_grad()
def average_over_holders(buckets: Sequence[dict[Holders, Bucket]], grads: bool) -> None:
    """In one process, ``buckets[k]`` being worker ``k``'s: for every holder set ``H``, each holder's
    elements <- sum over ``H`` / ``len(H)`` (gradients, or values when ``grads`` is False), in place."""
    for h in sorted({h for per_worker in buckets for h in per_worker}):
        mean = divide_by_holders_(torch.stack([buckets[k][h].gather(grads) for k in h]).sum(0), h)
        for k in h:
            buckets[k][h].scatter(mean, grads)


@torch.no_grad()
def holder_weighted_sq_norm(buckets: Iterable[Bucket], device: torch.device | str = "cpu") -> torch.Tensor:
    """A worker's share of the full model's squared (averaged) gradient norm, as a float32 scalar."""
    return holder_weighted_norm_part(buckets, 2.0, device)


@torch.no_grad()
def holder_weighted_norm_part(buckets: Iterable[Bucket], norm_type: float, device: torch.device | str = "cpu",
                              only: set[int] | None = None) -> torch.Tensor:
    """A worker's share of the full model's ``norm_type``-norm of the (averaged) gradient, as a float32 scalar.

    Finite ``p``: the sum of ``|g|**p``, each element weighted by ``1 / holder count``: after sync all
    holders have the same value, so the workers' shares add up (all-reduce ``SUM``) to every element
    counted once. ``inf``: the largest ``|g|``; the workers' shares combine by all-reduce ``MAX``.
    ``only``: ids of the parameters to count (the others' entries are skipped), as torch's
    ``clip_grad_norm_`` counts the parameters it is given.
    """
    parts = []
    for b in buckets:
        kept = [e for e in b.entries if only is None or id(e.tensor) in only]
        if not kept:
            continue
        g = Bucket(b.holders, kept).gather(grads=True).float().abs()
        if math.isinf(norm_type):
            parts.append(g.max() if g.numel() else torch.zeros((), device=g.device))
        else:
            parts.append(divide_by_holders_(g.pow(norm_type).sum(), b.holders))
    if not parts:
        return torch.zeros((), device=device)
    stacked = torch.stack(parts)
    return stacked.max() if math.isinf(norm_type) else stacked.sum()


@torch.no_grad()
def clip_gradients_(parameters: Iterable[nn.Parameter], norm: float, max_norm: float) -> None:
    """Scale gradients by ``max_norm / norm`` when that is below 1 (as ``clip_grad_norm_`` does).

    Every holder gets the same ``norm``, so holders of an element scale it alike and stay identical.
    """
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(scale)


def _element_size(bucket: Bucket) -> int:
    """Bytes per element of the flat buffer :meth:`Bucket.gather` makes: the tensors' promoted dtype,
    as ``torch.cat`` produces."""
    return functools.reduce(torch.promote_types, (e.tensor.dtype for e in bucket.entries)).itemsize


def bucket_bytes(bucket: Bucket) -> int:
    """Bytes one collective over ``bucket`` hands over: its elements times their element size."""
    return bucket.numel * _element_size(bucket)


def traffic(reduced: Iterable[Bucket], broadcast: Iterable[Bucket] = ()) -> dict[str, float]:
    """Per-step traffic of one worker: all-reduces of ``reduced`` (within each holder set) and
    broadcasts of ``broadcast`` (backward masking's new values, over the world).

    ``collective_bytes``: bytes handed to collectives; ``ring_bytes``: what a ring moves, ``2 (n-1)/n``
    per all-reduced byte in a group of ``n`` and 1 per (pipelined) broadcast byte; ``broadcast_bytes``:
    the broadcasts' share. Buckets held by one worker alone are skipped: nothing to average.
    """
    shared = [b for b in reduced if b.shared]
    sent = sum(bucket_bytes(b) for b in broadcast)
    handed = sum(bucket_bytes(b) for b in shared)
    ring = sum(2 * (len(b.holders) - 1) / len(b.holders) * bucket_bytes(b) for b in shared)
    return {"collective_bytes": handed + sent, "ring_bytes": ring + sent, "broadcast_bytes": sent}


def step_traffic(module: nn.Module, plan: Plan, worker: int, masking: str = "forward") -> dict[str, float]:
    """Per-step traffic of ``worker`` whose model is ``module`` (its subnetwork under forward masking,
    its full model under backward masking; meta tensors are fine), as :func:`traffic` counts it.

    Equals what :class:`subnetdp.SubnetDataParallel` hands to collectives per gradient sync
    (``predicted_bytes_per_sync``). ``broadcast_bytes`` appears when the regime sends values after a step.
    """
    chosen = regime(masking)
    layout = chosen.layout(module, plan, worker)
    out = traffic(layout.reduce, layout.broadcast.values())
    if not chosen.sends_values:
        return {"collective_bytes": out["collective_bytes"], "ring_bytes": out["ring_bytes"]}
    return out
