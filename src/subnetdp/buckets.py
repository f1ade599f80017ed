"""Holder-set buckets: a worker's tensors grouped by the set of workers that hold each element.

Every element of a worker's subnetwork has a holder set (DESIGN.md section 4). The elements that
share a holder set ``H`` are laid out in one flat buffer, in full-model order (tensor order, then
increasing full index), so every worker in ``H`` lays out exactly the same elements in the same
order. Averaging over ``H`` is then a sum of those buffers divided by ``len(H)``: in one process
(:class:`subnetdp.Simulation`) or as one ``all_reduce`` in ``H``'s process group. This module is the
layout only; the arithmetic over buckets (the division, clip norm, traffic) is :mod:`subnetdp.sync`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from subnetdp.planning import Plan

Holders = tuple[int, ...]


@dataclass
class Entry:
    """The part of one subnetwork tensor whose elements have the bucket's holder set."""

    name: str  # full-model name
    tensor: torch.Tensor
    dim: int | None = None  # None: the whole tensor
    index: torch.Tensor | None = None  # local positions along ``dim``

    @property
    def numel(self) -> int:
        if self.dim is None:
            return self.tensor.numel()
        return self.tensor.numel() // self.tensor.shape[self.dim] * len(self.index)


@dataclass
class Bucket:
    holders: Holders
    entries: list[Entry] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def shared(self) -> bool:
        """Held by more than one worker: something to average (a worker's own elements need no sync)."""
        return len(self.holders) > 1

    def gather(self, grads: bool) -> torch.Tensor:
        """One flat buffer of the bucket's elements (gradients, or values when ``grads`` is False)."""
        parts = []
        for e in self.entries:
            t = e.tensor.grad if grads else e.tensor.data
            if t is None:
                t = torch.zeros_like(e.tensor)
            parts.append((t if e.dim is None else t.index_select(e.dim, e.index)).reshape(-1))
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def scatter(self, flat: torch.Tensor, grads: bool) -> None:
        """Write ``flat`` (laid out as :meth:`gather` does) back into the tensors."""
        offset = 0
        for e in self.entries:
            n = e.numel
            if grads and e.tensor.grad is None:
                e.tensor.grad = torch.zeros_like(e.tensor)
            dst = e.tensor.grad if grads else e.tensor.data
            if e.dim is None:
                dst.copy_(flat[offset:offset + n].view_as(dst))
            else:
                shape = list(dst.shape)
                shape[e.dim] = len(e.index)
                dst.index_copy_(e.dim, e.index, flat[offset:offset + n].view(shape))
            offset += n


def rebind(bucket: Bucket, tensors: dict[str, torch.Tensor]) -> Bucket:
    """The same bucket laid over other tensors (by full-model name), e.g. copies to average without
    touching the originals."""
    return Bucket(bucket.holders, [Entry(e.name, tensors[e.name], e.dim, e.index) for e in bucket.entries])


def sync_tensors(module: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The tensors to average: ``"params"`` (trainable ones) or ``"buffers"`` (persistent float ones)."""
    if kind == "params":
        return {n: p for n, p in module.named_parameters() if p.requires_grad}
    persistent = set(module.state_dict(keep_vars=True))
    return {n: b for n, b in module.named_buffers() if n in persistent and b.is_floating_point()}


def build_buckets(module: nn.Module, plan: Plan, worker: int, kind: str = "params") -> list[Bucket]:
    """``worker``'s buckets, one per holder set it belongs to, in one global order (sorted holder sets)."""
    tmap = plan.tensor_map(worker)
    return list(layout_buckets(sync_tensors(module, kind), plan, lambda name, _size: tmap[name][1]).values())


ElementHolders = Callable[[str], "tuple[int | None, list[Holders]]"]


def layout_buckets(tensors: dict[str, torch.Tensor], plan: Plan, full_positions: Callable[[str, int], Sequence[int]],
                   element_holders: ElementHolders | None = None) -> dict[Holders, Bucket]:
    """Buckets over ``tensors`` (full-model names), one per holder set, sorted by holder set.

    Tensor order is the plan's, then increasing local index; ``full_positions(name, size)`` gives, for
    each local index along a sliced tensor's dim (``size`` long in the full model), its position in the
    full model (a subnetwork's narrowed tensor: the plan's tensor map; a full-size tensor: ``range(size)``).
    ``element_holders(name)`` says who holds each element (default: :meth:`subnetdp.Plan.element_holders`;
    a regime's layout may say more, e.g. backward masking's values are everyone's).
    """
    element_holders = element_holders or plan.element_holders
    buckets: dict[Holders, Bucket] = {}
    for name, _ in plan.tensors:
        if name not in tensors:
            continue
        t = tensors[name]
        dim, holders = element_holders(name)
        if dim is None:
            buckets.setdefault(holders[0], Bucket(holders[0])).entries.append(Entry(name, t))
            continue
        by_set: dict[Holders, list[int]] = {}
        for local, full in enumerate(full_positions(name, len(holders))):
            by_set.setdefault(holders[full], []).append(local)
        for hs, locals_ in by_set.items():
            idx = torch.tensor(locals_, dtype=torch.long, device=t.device)
            buckets.setdefault(hs, Bucket(hs)).entries.append(Entry(name, t, dim, idx))
    return {h: buckets[h] for h in sorted(buckets)}

