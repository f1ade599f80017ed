"""Measured memory of a training step: saved-for-backward bytes, model state, and the device peak.

For one module and its optimizer (DESIGN.md section 5):

* model state: parameters, gradients, optimizer state (every tensor in ``optimizer.state``), buffers;
* activations: the bytes autograd saves for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (:class:`SavedTensorMeter`). Each storage is counted
  once, however many times and through however many views it is saved. Saved tensors that are the
  model's parameters or buffers (a linear layer saves its weight, batch norm its running statistics)
  are model state, not activations: they are reported apart;
* the device peak: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the process's resident-set
  high-water mark, which is process-wide (everything the process ever allocated counts, including
  the allocator's caches), so it is a coarse check only.

The first-principles prediction of the same quantities is :mod:`subnetdp.measure.prediction`.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], Any]  # returns the loss, or (loss, metrics)


# ---- counting ----------------------------------------------------------------------------------------
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


# ---- process peak (CPU) -----------------------------------------------------------------------------
def proc_status(field_name: str) -> int | None:
    """A byte count from ``/proc/self/status`` (``VmRSS``, ``VmHWM``); None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Reset Linux's resident-set high-water mark (VmHWM) to the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    """The process's resident-set high-water mark in bytes (``getrusage``), since it started."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def loss_of(out: Any) -> torch.Tensor:
    """The loss of a loss function's result: the loss itself, or the first of ``(loss, metrics)``."""
    return out[0] if isinstance(out, tuple) else out


def measure_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, loss_fn: LossFn,
                 device: torch.device | str | None = None, count_saved: bool = True) -> dict[str, float]:
    """Run one training step (forward, backward, optimizer step) and measure its memory.

    Returns the :func:`state_bytes` breakdown after the step, ``activation_bytes`` (saved for
    backward, parameters and buffers excluded; those are ``saved_param_bytes``/``saved_buffer_bytes``),
    ``step_s``, and the device peak: ``peak_allocated_bytes`` on CUDA (reset before the step), or on a
    CPU ``peak_rss_bytes`` (process-wide, since the process started) and, where Linux allows resetting
    the high-water mark, ``step_rss_growth_bytes`` (peak during the step minus the RSS before it).
    ``count_saved=False`` runs without the saved-tensor hooks (their Python calls would enter the step
    time) and leaves ``activation_bytes`` and ``total_bytes`` out.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.train()
    optimizer.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    out: dict[str, float] = {}
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        reset = reset_rss_peak()
        before = proc_status("VmRSS")
    start = time.perf_counter()
    meter = SavedTensorMeter(model) if count_saved else None
    with meter if meter is not None else contextlib.nullcontext():
        loss = loss_of(loss_fn(model, batch))
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize(device)
    out["step_s"] = time.perf_counter() - start
    if cuda:
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["allocated_before_bytes"] = before
    else:
        out["peak_rss_bytes"] = max_rss_bytes()
        hwm = proc_status("VmHWM")
        if reset and hwm is not None and before is not None:
            out["step_rss_growth_bytes"] = hwm - before
    out.update(state_bytes(model, optimizer))
    out["state_bytes"] = out["param_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    if meter is not None:
        out.update(activation_bytes=meter.activation_bytes, saved_param_bytes=meter.param_bytes,
                   saved_buffer_bytes=meter.buffer_bytes)
        out["total_bytes"] = out["state_bytes"] + out["activation_bytes"]
    return out

