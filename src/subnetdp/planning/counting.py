"""Bytes counted: what autograd saves for backward, and the model state that exists now; what an
activation profile, the training loop's memory report and the meters all measure with.

Autograd's saved tensors are seen through ``torch.autograd.graph.saved_tensors_hooks``; each storage
counts once, however many times and through however many views it is saved, and storages of the
model's parameters and buffers are model state, reported apart from activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], Any]  # returns the loss, or (loss, metrics)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def storage_key(t: torch.Tensor) -> tuple[Hashable, int]:
    """``(key, bytes)`` of the storage behind ``t``: views of one storage share the key."""
    t = local_tensor(t)
    try:
        s = t.untyped_storage()
        return ("storage", t.device.type, s.data_ptr(), s.nbytes()), s.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage
        return ("object", id(t)), t.numel() * t.element_size()


def _storage_ptrs(tensors: Iterator[torch.Tensor]) -> set[Hashable]:
    return {storage_key(t)[0] for t in tensors}


class SavedTensorMeter:
    """Count the bytes autograd saves for backward while the context is open.

    >>> with SavedTensorMeter(model) as meter:
    ...     loss = loss_fn(model(x), y)
    >>> meter.activation_bytes, meter.param_bytes

    Every storage is counted once (keyed by its data pointer and size), by whichever save reaches it
    first. Storages of ``model``'s parameters go to ``param_bytes`` and of its buffers to
    ``buffer_bytes``; everything else is ``activation_bytes``. ``owner()``, when given, is called at
    each first save and the bytes are also added to ``by_owner[owner()]`` (module attribution).
    Only the forward should run inside the context; the saved tensors are returned unchanged, so
    nothing is copied and backward works as usual after the context closes.
    """

    def __init__(self, model: nn.Module | None = None, owner: Callable[[], Hashable] | None = None) -> None:
        self._params = _storage_ptrs(model.parameters()) if model is not None else set()
        self._buffers = _storage_ptrs(model.buffers()) if model is not None else set()
        self._owner = owner
        self._seen: set[Hashable] = set()
        self._hooks: contextlib.AbstractContextManager | None = None
        self.activation_bytes = 0
        self.param_bytes = 0
        self.buffer_bytes = 0
        self.saves = 0  # pack calls, duplicates included
        self.by_owner: dict[Hashable, int] = {}
        self.owner_of: dict[Hashable, tuple[Hashable, int]] = {}  # activation storage -> (owner, bytes)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.saves += 1
        key, nbytes = storage_key(t)
        if key in self._seen:
            return t.detach()
        self._seen.add(key)
        if key in self._params:
            self.param_bytes += nbytes
        elif key in self._buffers:
            self.buffer_bytes += nbytes
        else:
            self.activation_bytes += nbytes
            if self._owner is not None:
                o = self._owner()
                self.by_owner[o] = self.by_owner.get(o, 0) + nbytes
                self.owner_of[key] = (o, nbytes)
        # Detached: the same storage, without the grad_fn. Returning ``t`` itself would make a saved
        # output reference its own grad_fn, a cycle that no garbage collector frees when the graph is
        # dropped without a backward (as profiling does): its activations would stay allocated.
        return t.detach()

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and buffers that exist now (local shards only).

    Optimizer state counts every tensor in ``optimizer.state`` (AdamW's scalar ``step`` counters too).
    """
    params = list(model.parameters())
    out = {
        "param_bytes": sum(local_tensor(p).numel() * p.element_size() for p in params),
        "grad_bytes": sum(local_tensor(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer_bytes": 0,
        "buffer_bytes": sum(local_tensor(b).numel() * b.element_size() for b in model.buffers()),
    }
    if optimizer is not None:
        out["optimizer_bytes"] = sum(local_tensor(t).numel() * t.element_size() for st in optimizer.state.values()
                                     for t in st.values() if isinstance(t, torch.Tensor))
    return out


def loss_of(out: Any) -> torch.Tensor:
    """The loss of a loss function's result: the loss itself, or the first of ``(loss, metrics)``."""
    return out[0] if isinstance(out, tuple) else out
