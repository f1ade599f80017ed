"""Activation checkpointing of residual blocks: one definition for SDP, DDP+ckpt and FSDP2+ckpt.

Each block runs under non-reentrant ``torch.utils.checkpoint``: its forward saves only the block's
inputs, and backward recomputes the block. The block's ``forward`` is replaced on the instance
rather than wrapped in another module, so parameter names and state-dict keys stay those of the
plain model (``checkpoint_wrapper`` would add ``_checkpoint_wrapped_module.``): checkpoints and the
assembled model are the same with and without checkpointing.

The recomputation runs with BatchNorm's running statistics frozen: it normalises with the batch's
statistics as the first forward did (same output), but does not update the running mean, variance
and batch count a second time (plain ``checkpoint`` does), so buffers equal those of a run without
checkpointing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINTING = ("none", "blocks")


def check_checkpointing(value: str | None) -> str:
    """``value`` as one of :data:`CHECKPOINTING` (``None`` is ``"none"``), or a ValueError naming it."""
    value = "none" if value is None else value
    if value not in CHECKPOINTING:
        raise ValueError(f"checkpointing={value!r}: choose one of {CHECKPOINTING} (or None)")
    return value


@contextlib.contextmanager
def _frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise as before (batch statistics) but leave their running buffers as they are.

    Momentum 0 keeps the running mean and variance (``(1 - 0) x + 0 y``) while the layer still
    takes them as inputs (so the recomputation saves the same tensors as the forward, as
    ``checkpoint`` checks); the batch counter is put back afterwards.
    """
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    kept = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in kept:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


class _CheckpointedForward:
    """The instance ``forward`` of a checkpointed block: its class's forward under ``checkpoint``.

    An object rather than a closure so that ``copy.deepcopy`` and pickling carry it to the copy's
    own module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _frozen_running_stats(self.module)

    def __call__(self, *args: object, **kwargs: object) -> object:
        forward = type(self.module).forward
        if not torch.is_grad_enabled():  # nothing is saved for backward: nothing to recompute
            return forward(self.module, *args, **kwargs)
        return checkpoint(forward, self.module, *args, use_reentrant=False, context_fn=self._contexts, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _CheckpointedForward)


def checkpoint_blocks(model: nn.Module, blocks: Iterable[str] | None = None) -> nn.Module:
    """Run each block of ``model`` under activation checkpointing (in place; returns ``model``).

    ``blocks`` are module paths; by default the residual blocks :func:`subnetdp.units.find_blocks`
    discovers (those a plan of this model would use). Names and state-dict keys do not change.
    """
    if blocks is None:
        from subnetdp.units import find_blocks

        blocks = [b.name for b in find_blocks(model)]
    names = list(blocks)
    if not names:
        raise ValueError(f"{type(model).__name__} has no blocks to checkpoint; name them (module paths)")
    for name in names:
        module = model.get_submodule(name)
        if not is_checkpointed(module):
            module.forward = _CheckpointedForward(module)
    return model
