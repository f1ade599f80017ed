"""Holder agreement: every holder of an element holds the same value (DESIGN.md invariant 6).

DDP keeps its replicas equal by construction, and so does SDP's engine: holders start equal and apply
the same averaged gradients. A user's own loop can still break it without any error: calling
``torch.nn.utils.clip_grad_norm_`` on one rank's parameters scales each rank's gradients by its own
local norm, rank-dependent code changes one rank's values, and a checkpoint can load another rank's
values. Then the holders of a unit drift apart and the assembled model silently takes one of them.

This module is the arithmetic of the check, shared by every place that runs it (engine setup, the
cadence, ``state_dict()``, ``full_state_dict()``, checkpoint saves and loads): the *slots* are every
``(holder set, tensor)`` pair of the plan, in one order on every rank; each rank fills the slots it
holds with a checksum of its elements' bits (a wrapping integer sum: any single changed bit changes
it; about 2 ms per 10 million float32 elements on one CPU core); the engine gathers the rank x slot
table in one collective and every rank reads the same verdict from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from subnetdp.buckets import Entry, Holders, layout_buckets, sync_tensors
from subnetdp.masking import Layout
from subnetdp.planning import Plan

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True, eq=False)  # compared by identity: an Entry holds tensors, whose == is elementwise
class Slot:
    """One tensor's elements with one holder set: the ranks in ``holders`` must agree on them."""

    name: str
    holders: Holders
    entry: Entry | None  # this rank's elements; None where this rank is not a holder


def checksum(values: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64 checksum of ``values``' bits: their wrapping integer sum (any one changed bit changes it)."""
    bits = values.detach().contiguous().view(_BITS[values.element_size()])
    return bits.sum(dtype=bits.dtype).to(torch.int64)


def holder_slots(structure: nn.Module, layout: Layout, plan: Plan, rank: int, kind: str = "params") -> list[Slot]:
    """The slots of ``kind`` (``"params"`` or ``"buffers"``), the same list on every rank.

    ``structure`` is the full model (meta is fine), which every rank has, so the slot list does not
    depend on what this rank holds; ``layout.value_holders`` says who must hold equal values of each
    element (backward masking: every rank, of every tensor). Slots of one holder are left out:
    nothing to compare.
    """
    names = [n for n, _ in plan.tensors if n in sync_tensors(structure, kind)]
    # every parameter, trainable here or not: backward masking's non-held ones do not require gradients
    module = layout.module
    mine = dict(module.named_parameters()) if kind == "params" else sync_tensors(module, kind)
    tmap = layout.tensor_map
    local = {(b.holders, e.name): e
             for b in layout_buckets({n: mine[n] for n in names if n in mine}, plan,
                                     lambda name, size: range(size) if tmap[name] is None else tmap[name][1],
                                     layout.value_holders).values()
             for e in b.entries}
    slots = []
    for name in names:
        _, per_index = layout.value_holders(name)
        for holders in sorted(set(per_index)):
            if len(holders) > 1:
                slots.append(Slot(name, holders, local.get((holders, name))))
    return slots


def local_checksums(slots: list[Slot], device: torch.device | str) -> torch.Tensor:
    """This rank's row of the table: each slot's checksum, 0 where it is not a holder."""
    row = torch.zeros(len(slots), dtype=torch.int64, device=device)
    for i, s in enumerate(slots):
        if s.entry is not None:
            t = s.entry.tensor
            row[i] = checksum(t if s.entry.dim is None else t.index_select(s.entry.dim, s.entry.index))
    return row


def disagreements(table: torch.Tensor, slots: list[Slot]) -> list[tuple[Slot, list[list[int]]]]:
    """The slots whose holders differ, each with its holders grouped by equal value (table: rank x slot)."""
    table = table.cpu()
    found = []
    for i, s in enumerate(slots):
        groups: dict[int, list[int]] = {}
        for r in s.holders:
            groups.setdefault(int(table[r, i]), []).append(r)
        if len(groups) > 1:
            found.append((s, sorted(groups.values())))
    return found


class HolderDivergenceError(RuntimeError):
    """Holders of the same elements hold different values; ``summary`` names the tensors and ranks."""

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


def divergence_summary(found: list[tuple[Slot, list[list[int]]]]) -> str:
    """The tensors that disagree and the ranks grouped by value, first five named: ``conv1.weight (ranks [0] vs [1]); ...``."""
    names: dict[str, str] = {}
    for s, groups in found:
        names.setdefault(s.name, " vs ".join(str(g) for g in groups))
    shown = "; ".join(f"{n} (ranks {g})" for n, g in list(names.items())[:5])
    return shown + (f" and {len(names) - 5} more tensors" if len(names) > 5 else "")


def divergence_error(found: list[tuple[Slot, list[list[int]]]], where: str) -> HolderDivergenceError:
    """One error naming the tensors and ranks that disagree, the likely causes and the fixes."""
    summary = divergence_summary(found)
    return HolderDivergenceError(divergence_message(summary, where), summary)


def divergence_message(summary: str, where: str) -> str:
    return (f"SubnetDataParallel: holders of the same parameters hold different values ({where}): {summary}. "
            "Every holder must apply the same update. Likely causes: torch.nn.utils.clip_grad_norm_ on one rank's "
            "parameters (each rank clips by its own local norm; use subnetdp.clip_grad_norm_(sdp.parameters(), "
            "max_norm), the same call, holder-correct), code that changes values on some ranks only, or a "
            "checkpoint that loaded another rank's values (an optimizer.state_dict() saved through "
            "torch.distributed.checkpoint: its positional ids collide between ranks; save "
            "sdp.optimizer_state_dict(optimizer) instead). The run cannot continue from diverged holders: "
            "restore the last good checkpoint")
