"""Bytes an SDP worker hands to collectives per step, and FSDP2's derived traffic.

``collective_bytes``: bytes handed to collectives; ``ring_bytes``: what a ring moves per rank, ``2 (n-1)/n``
per element of an all-reduce over ``n`` holders, ``(n-1)/n`` per all-gather or reduce-scatter element, and
1 per element of a (pipelined) broadcast.
"""

from __future__ import annotations

from torch import nn

from subnetdp.buckets import build_buckets
from subnetdp.masking import broadcast_buckets, full_buckets, held_buckets
from subnetdp.planning import Plan


def backward_traffic(module: nn.Module, p: Plan, worker: int, bytes_per_element: int = 4) -> dict[str, float]:
    """Per-step traffic of ``worker`` under backward masking: held gradients' all-reduces plus the broadcasts.

    ``ring_bytes`` counts a ring all-reduce as ``2 (n-1)/n`` and a (pipelined) broadcast as 1 per element.
    """
    every = full_buckets(module, p)
    reduced = [b for b in held_buckets(every, worker).values() if len(b.holders) > 1]
    sent = sum(b.numel for b in broadcast_buckets(every, p.workers).values()) * bytes_per_element
    handed = sum(b.numel for b in reduced) * bytes_per_element
    ring = sum(2 * (len(b.holders) - 1) / len(b.holders) * b.numel * bytes_per_element for b in reduced)
    return {"collective_bytes": handed + sent, "ring_bytes": ring + sent, "broadcast_bytes": sent}


def bucket_traffic(module: nn.Module, p: Plan, worker: int, bytes_per_element: int = 4) -> dict[str, float]:
    """Per-step gradient traffic of ``worker`` from its buckets (the groups the engine all-reduces over).

    ``collective_bytes``: bytes handed to all-reduces (elements held by more than one worker);
    ``ring_bytes``: what a ring all-reduce over each bucket's ``n`` holders moves, ``2 (n-1)/n`` each.
    """
    buckets = [b for b in build_buckets(module, p, worker, "params") if len(b.holders) > 1]
    handed = sum(b.numel for b in buckets) * bytes_per_element
    ring = sum(2 * (len(b.holders) - 1) / len(b.holders) * b.numel * bytes_per_element for b in buckets)
    return {"collective_bytes": handed, "ring_bytes": ring}



def fsdp2_bytes(param_bytes: int, ranks: int) -> tuple[float, float]:
    """Derived FSDP2 traffic per rank per step: (bytes handed to collectives, ring traffic).

    Every parameter is all-gathered twice (forward, and again in backward after resharding) and its
    gradient reduce-scattered once: a rank hands ``2 P/n`` to all-gathers and ``P`` to the
    reduce-scatter; a ring moves ``(n-1)/n P`` per all-gather and per reduce-scatter.
    """
    handed = 2 * param_bytes / ranks + param_bytes
    ring = 3 * (ranks - 1) / ranks * param_bytes
    return handed, ring
