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

The counting (:class:`SavedTensorMeter`, :func:`state_bytes`) lives in :mod:`subnetdp.planning.counting`,
which the planner's activation profile and the training loop use too; the first-principles prediction
is :mod:`subnetdp.planning.memory`, and :func:`measure_choice` holds a budget plan's worst worker to it.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Any

import torch
from torch import nn

from subnetdp.optimizers import make_optimizer
from subnetdp.planning.budget import BudgetChoice
from subnetdp.planning.counting import LossFn, SavedTensorMeter, local_tensor, loss_of, state_bytes, storage_key
from subnetdp.planning.job import WorkloadLike
from subnetdp.subnet import build_subnetwork

__all__ = ["LossFn", "SavedTensorMeter", "local_tensor", "loss_of", "max_rss_bytes", "measure_choice", "measure_step", "proc_status",
           "reset_rss_peak", "state_bytes", "storage_key"]

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


def measure_choice(choice: BudgetChoice, workload: WorkloadLike, *, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measure the chosen plan's worst worker (one step of its subnetwork) against the prediction.

    Returns measured and predicted bytes and ``ratio`` = measured (state + saved activations) /
    predicted peak; on CUDA also ``peak_ratio`` = ``torch.cuda.max_memory_allocated`` / predicted.
    """
    device = torch.device(device)
    # memory does not depend on the values: per-module init never builds the full model in host memory
    sub = build_subnetwork(workload.factory, choice.plan, choice.worker, seed=seed, device=device, init="per-module")
    opt = make_optimizer(choice.optimizer, sub.parameters())
    batch = workload.make_batch(choice.batch_size, device, seed)
    measure_step(sub, opt, batch, workload.loss_fn, device)  # the first step creates the optimizer state
    m = measure_step(sub, opt, batch, workload.loss_fn, device)
    out = {"worker": choice.worker, "measured_bytes": m["total_bytes"], "predicted_bytes": choice.peak,
           "ratio": m["total_bytes"] / choice.peak, "measured": m}
    if "peak_allocated_bytes" in m:
        out["peak_ratio"] = m["peak_allocated_bytes"] / choice.peak
    return out


def allocator_peak(step: Any, live_before: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The peak of live tensor bytes while ``step()`` runs once, from the allocator's own record.

    On CUDA it is the caching allocator's peak of allocated bytes (``torch.cuda.max_memory_allocated``,
    reset first). On the CPU, which keeps no such statistic, it is ``live_before`` (the bytes of the
    tensors alive when the step starts: count them, e.g. :func:`state_bytes` of the model and optimizer
    plus the batch) plus the highest running sum of the allocations and frees that ``torch.profiler``
    records during the step (its ``profile_memory`` events, every thread of this process: autograd's and
    the collectives' buffers included). Returns ``{"peak_bytes", "step_delta_bytes", "basis"}``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak), "step_delta_bytes": None, "basis": "CUDA allocator peak (max_memory_allocated)"}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = highest = 0
    for _, nbytes in events:
        running += nbytes
        highest = max(highest, running)
    return {"peak_bytes": int(live_before + highest), "step_delta_bytes": int(highest),
            "basis": "live tensors at the step's start + the highest running sum of torch.profiler's allocation events"}


# FSDP2's collectives in torch 2.14 (``_fsdp_collectives``), with the argument that holds the buffer handed over
FSDP2_COLLECTIVES = (("all_gather_single", "input_tensor"), ("reduce_scatter_single", "input"))


@contextlib.contextmanager
def counted_fsdp2_collectives() -> Any:
    """Count the bytes this process hands to FSDP2's collectives while inside: yields ``{"bytes": n}``, updated
    on every call. FSDP2 reaches them through ``torch.distributed``'s module attributes, which are wrapped
    for the duration (this process only) and restored after. Counted as the buffer handed over (the padded
    shard to an all-gather, the padded full gradient to a reduce-scatter), as DDP's comm hook counts its buckets.
    """
    import torch.distributed as dist

    counter = {"bytes": 0}
    originals = {name: getattr(dist, name) for name, _ in FSDP2_COLLECTIVES}

    def counting(real: Any, arg: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = kwargs[arg] if arg in kwargs else args[1]
            counter["bytes"] += t.numel() * t.element_size()
            return real(*args, **kwargs)
        return wrapper

    for name, arg in FSDP2_COLLECTIVES:
        setattr(dist, name, counting(originals[name], arg))
    try:
        yield counter
    finally:
        for name, real in originals.items():
            setattr(dist, name, real)
