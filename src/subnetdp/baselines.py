"""The baselines SDP is measured against: DDP, DDP with activation checkpointing, FSDP2 (+ checkpointing).

One wrapping, shared by the main job (:class:`subnetdp.strategies.Distributed`) and the benchmark's
timing worker (:mod:`subnetdp.measure.timing`), so that both measure the same thing. Checkpointing is
applied before sharding (torchtitan's order); FSDP2 shards every residual block and then the root.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from subnetdp.recompute import checkpoint_blocks
from subnetdp.units import find_blocks

BASELINES = ("ddp", "ddp-ckpt", "fsdp")


def shard_fsdp2(module: nn.Module) -> nn.Module:
    """``fully_shard`` on every residual block of ``module``, then on ``module`` itself (in place)."""
    from torch.distributed.fsdp import fully_shard

    for b in find_blocks(module):
        fully_shard(module.get_submodule(b.name))
    return fully_shard(module)


def wrap_baseline(module: nn.Module, strategy: str, *, checkpointing: bool = False,
                  device: torch.device | None = None, **ddp_options: Any) -> nn.Module:
    """``module`` (the full model, built on every rank) wrapped as ``strategy`` for this process group.

    ``ddp-ckpt`` is ``ddp`` with ``checkpointing``; with ``checkpointing`` every block is recomputed in
    backward (:func:`subnetdp.checkpoint_blocks`). ``ddp_options`` go to ``DistributedDataParallel``
    (``device_ids`` is set from a CUDA ``device``).
    """
    if strategy not in BASELINES:
        raise ValueError(f"baseline {strategy!r} unknown; choose one of {BASELINES}")
    if checkpointing or strategy == "ddp-ckpt":
        checkpoint_blocks(module)
    if strategy == "fsdp":
        if ddp_options:
            raise ValueError(f"options {sorted(ddp_options)} are DDP's; FSDP2 takes none here")
        return shard_fsdp2(module)
    ids = [device.index] if device is not None and device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, **ddp_options)


def fsdp2_bytes(param_bytes: int, ranks: int) -> tuple[float, float]:
    """Derived FSDP2 traffic per rank per step: (bytes handed to collectives, ring traffic).

    Every parameter is all-gathered twice (forward, and again in backward after resharding) and its
    gradient reduce-scattered once: a rank hands ``2 P/n`` to all-gathers and ``P`` to the
    reduce-scatter; a ring moves ``(n-1)/n P`` per all-gather and per reduce-scatter.
    """
    handed = 2 * param_bytes / ranks + param_bytes
    ring = 3 * (ranks - 1) / ranks * param_bytes
    return handed, ring
