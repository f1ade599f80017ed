"""``subnetdp bench``: memory, communication and step time of SDP against DDP, FSDP2 and DDP with
activation checkpointing, each of SDP and FSDP2 also with checkpointing, all in one invocation.

Two parts, each labelled in the output with what is measured and what is derived:

1. **Memory per worker, in this process.** A worker's memory is that of its own model's training
   step, so each SDP worker is measured by building its subnetwork (:func:`subnetdp.build_subnetwork`)
   and running steps on it here, all ``K`` workers one after the other. Per worker: parameters,
   gradients, optimizer state, activations (saved for backward; :mod:`subnetdp.memory`), the device
   peak, with the plan's prediction next to each and the ratio measured / predicted.

   - DDP: the full model's step (measured). DDP also allocates gradient buckets, one more
     gradient-sized buffer (``gradient_as_bucket_view=False``, the default): added as *derived*.
   - DDP + activation checkpointing: the full model with every block checkpointed
     (:func:`subnetdp.checkpoint_blocks`, as the ``ddp-ckpt`` strategy builds it; measured; the saved
     bytes are the checkpointed blocks' inputs plus what runs outside the blocks. Backward recomputes
     one block at a time on top).
   - FSDP2 (``fully_shard`` on every block and the root): *derived* here: parameters, gradients and
     optimizer state sharded ``1/K`` (the full model's measured state / K), activations those of the
     full model (FSDP does not shrink them; measured DDP activations), plus the unsharded
     parameters of the largest block in flight. The torchrun part measures the local shard sizes.
   - FSDP2 + checkpointing: derived the same way, with DDP+ckpt's measured activations.
   - SDP + checkpointing (``SDP+ckpt``): each worker's subnetwork with every block it has
     checkpointed (``build_subnetwork(..., checkpointing="blocks")``), measured like SDP.
   - SDP with backward masking (``--masking backward`` or ``both``; docs/masking.md): each worker's
     full model, trainable where it holds, measured the same way; predicted by
     :func:`subnetdp.memory.predict_backward_worker`; its traffic adds the broadcasts of new values.

2. **Communication and time per step under torchrun** (``--time-ranks N`` processes, gloo on CPU):
   all configurations built once, then run in interleaved rounds (order reversed every other round)
   so that machine noise hits them alike; each timed step starts at a barrier and its time is the
   slowest rank's. DDP runs with ``broadcast_buffers=False`` so that, like SDP, it communicates
   gradients only. Per configuration: bytes handed to collectives per step (DDP: counted by a comm hook;
   SDP: the engine's counters; FSDP2 with or without checkpointing: derived, see :func:`fsdp2_bytes`),
   the implied ring traffic
   ``2 (n - 1) / n x bytes`` per all-reduce over a group of ``n``, the step time, the *compute* time
   (the same step with communication off: ``no_sync()`` for DDP and SDP; FSDP2 has no such switch and
   is given DDP's local step, or DDP+ckpt's when checkpointed) and exposed communication = step -
   compute, samples/s.

Outputs (``--out``): ``bench.json``, ``bench.md`` (the tables), and PNG plots.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subnetdp.buckets import build_buckets
from subnetdp.checkpointing import checkpoint_blocks
from subnetdp.config import TrainConfig
from subnetdp.init import build_meta, materialize
from subnetdp.memory import (
    ActivationProfile,
    memory_plan,
    Workload,
    image_workload,
    make_optimizer,
    measure_step,
    predict_backward_worker,
    predict_worker,
    profile_activations,
    profile_weight_grads,
    text_workload,
)
from subnetdp.masking import broadcast_buckets, build_backward_worker, full_buckets, held_buckets
from subnetdp.planning import Plan, plan
from subnetdp.subnet import build_subnetwork
from subnetdp.units import find_blocks

MEMORY_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes")


# ---- workloads ---------------------------------------------------------------------------------------
def workload_from_spec(spec: dict[str, Any]) -> Workload:
    if spec["kind"] == "image":
        return image_workload(spec["model"], width=spec["width"])
    return text_workload(spec["model"], seq_len=spec["seq_len"], **spec.get("overrides", {}))


def workload_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "resnet18":
            specs.append({"kind": "image", "model": "resnet18", "width": args.width, "batch": args.batch,
                          "optimizer": args.resnet_optimizer})
        elif name == "llama":
            specs.append({"kind": "text", "model": args.llama_model, "seq_len": args.seq_len,
                          "batch": args.llama_batch, "optimizer": args.llama_optimizer})
        else:
            raise ValueError(f"--models: {name!r} unknown; choose among resnet18, llama")
    return specs


DEFAULT_TRANSITIONS = TrainConfig.transitions  # the main job's default, measured as "SDP"


def sdp_plan(w: Workload, workers: int, coverage: float, level: str, seed: int, profile: ActivationProfile | None,
             optimizer: str, batch_size: int, transitions: str, balance: str,
             activation_checkpointing: bool = False) -> Plan:
    """The plan the main job would make (both parts of the benchmark measure the same plans)."""
    if balance == "memory":
        if profile is None:
            profile = profile_activations(w.factory, w.make_batch(batch_size, torch.device("cpu"), seed), w.loss_fn,
                                          batch_size, seed=seed)
        return memory_plan(w.factory, workers, coverage, level, seed, profile=profile, optimizer=optimizer,
                           batch_size=batch_size, transitions=transitions,
                           activation_checkpointing=activation_checkpointing)
    return plan(w.factory, workers, coverage, level, seed, transitions=transitions)


# ---- part 1: memory per worker, in this process ------------------------------------------------------
def _measure(model: nn.Module, optimizer_name: str, batch: Any, w: Workload, repeats: int,
             device: torch.device) -> dict[str, Any]:
    opt = make_optimizer(optimizer_name, model.parameters())
    runs = [measure_step(model, opt, batch, w.loss_fn, device) for _ in range(repeats)]
    last = dict(runs[-1])
    # timed apart, without the saved-tensor hooks, after the first step has allocated the optimizer state
    steps = [measure_step(model, opt, batch, w.loss_fn, device, count_saved=False)["step_s"]
             for _ in range(max(repeats - 1, 1))]
    last["step_s"] = {"median": statistics.median(steps), "min": min(steps), "max": max(steps), "all": steps}
    last["repeatable"] = all(r[k] == last[k] for r in runs[1:] for k in MEMORY_KEYS)
    for key in ("step_rss_growth_bytes", "peak_allocated_bytes"):
        if key in runs[0]:
            values = [r[key] for r in runs]
            last[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return last


def _release(device: torch.device) -> None:
    """Free a measured model before the next one is built. A checkpointed block's forward refers back to
    its module (a reference cycle), so only the garbage collector frees it; left alone, the previous
    workers' tensors stayed allocated and inflated the next worker's measured allocator peak (seen on
    an H200: up to 1.8 GiB held before an SDP+ckpt step)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratios(measured: dict[str, Any], predicted: dict[str, int]) -> dict[str, float]:
    out = {}
    for key in ("state_bytes", "activation_bytes", "total_bytes"):
        if predicted.get(key):
            out[key] = measured[key] / predicted[key]
    return out


def memory_part(spec: dict[str, Any], workers: int, coverages: Sequence[float], levels: Sequence[str],
                repeats: int, device: torch.device, seed: int = 0, log=print,
                checkpointing: Sequence[str] = ("none", "blocks"), *,
                transitions: str = DEFAULT_TRANSITIONS, balance: str = "memory", old_default: bool = True,
                maskings: Sequence[str] = ("forward",)) -> dict[str, Any]:
    """Memory per worker of every strategy for one workload (see the module docstring).

    SDP plans are made as the main job makes them (``balance``, ``transitions``); with ``old_default``
    block level is measured once more with the former defaults (transitions kept, parameter balance).
    ``checkpointing`` says which SDP variants to measure: without (``"none"``) and with activation
    checkpointing of every block a worker has (``"blocks"``, rows ``SDP+ckpt ...``). ``maskings``
    adds backward-masking rows (``"backward"``) beside forward masking's (``"forward"``).
    """
    w = workload_from_spec(spec)
    batch_size, opt_name = spec["batch"], spec["optimizer"]
    batch = w.make_batch(batch_size, device, seed)
    profile = profile_activations(w.factory, batch, w.loss_fn, batch_size, seed=seed, device=device)
    full_plan = plan(w.factory, workers, 1.0, "block", seed)
    rows: list[dict[str, Any]] = []

    def add(name: str, strategy: str, level: str | None, coverage: float | None,
            per_worker: list[dict[str, Any]], basis: str, ckpt: bool = False) -> None:
        rows.append({"name": name, "strategy": strategy, "level": level, "coverage": coverage,
                     "checkpointing": ckpt, "basis": basis, "workers": per_worker})
        worst = max(per_worker, key=lambda r: r["measured"]["total_bytes"])
        log(f"  {name:<24} worst worker total {worst['measured']['total_bytes'] / 2**20:8.2f} MiB "
            f"(activations {worst['measured']['activation_bytes'] / 2**20:.2f} MiB)")

    log(f"{w.name}: batch {batch_size}, {opt_name}, K={workers}")
    full = materialize(w.factory, seed, device)
    measured = _measure(full, opt_name, batch, w, repeats, device)
    predicted = predict_worker(full_plan, 0, opt_name, profile, batch_size)
    ddp_extra = {"ddp_bucket_bytes": measured["grad_bytes"]}
    full_bytes = measured["param_bytes"]
    ddp_comm = {"collective_bytes": full_bytes, "ring_bytes": 2 * (workers - 1) / workers * full_bytes}
    add("DDP", "ddp", None, 1.0, [{"worker": 0, "measured": measured, "predicted": predicted,
                                   "ratio": _ratios(measured, predicted), "derived": ddp_extra, "comm": ddp_comm}],
        "measured (full-model step); DDP's gradient buckets derived")
    del full
    _release(device)

    ckpt = checkpoint_blocks(materialize(w.factory, seed, device))
    m_ckpt = _measure(ckpt, opt_name, batch, w, repeats, device)
    largest = max(profile.block_bytes.values(), default=0)
    p_ckpt = predict_worker(full_plan, 0, opt_name, profile, batch_size, activation_checkpointing=True)
    add("DDP+ckpt", "ddp-ckpt", None, 1.0, [{"worker": 0, "measured": m_ckpt, "predicted": p_ckpt,
                                             "ratio": _ratios(m_ckpt, p_ckpt),
                                             "derived": {**ddp_extra, "recompute_peak_bytes": largest},
                                             "comm": ddp_comm}],
        "measured (full model, every block checkpointed); recompute of one block derived", ckpt=True)
    del ckpt
    _release(device)

    meta = build_meta(w.factory)
    largest_block = max((sum(p.numel() for p in meta.get_submodule(b.name).parameters()) for b in full_plan.blocks),
                        default=0)
    in_flight = largest_block * 4  # the all-gathered parameters of the block running now
    handed, ring = fsdp2_bytes(full_bytes, workers)
    for suffix, acts, ckpt_on in (("", measured, False), ("+ckpt", m_ckpt, True)):
        fsdp = {k: measured[k] / workers for k in ("param_bytes", "grad_bytes", "optimizer_bytes")}
        fsdp["activation_bytes"] = acts["activation_bytes"]
        fsdp["state_bytes"] = fsdp["param_bytes"] + fsdp["grad_bytes"] + fsdp["optimizer_bytes"]
        fsdp["total_bytes"] = fsdp["state_bytes"] + fsdp["activation_bytes"] + in_flight
        add(f"FSDP2{suffix} (K={workers})", "fsdp", None, 1.0,
            [{"worker": 0, "measured": fsdp, "predicted": {}, "ratio": {},
              "derived": {"unsharded_block_bytes": in_flight}, "comm": {"collective_bytes": handed, "ring_bytes": ring}}],
            f"derived: full-model state / K + {'DDP+ckpt' if ckpt_on else 'full-model'} activations (measured) "
            "+ the largest block unsharded", ckpt=ckpt_on)

    variants = [(level, transitions, balance, "") for level in levels]
    if old_default and "block" in levels and (transitions, balance) != ("keep", "params"):
        variants.append(("block", "keep", "params", " (old default: keep, params)"))
    for ckpt_mode in checkpointing if "forward" in maskings else ():
        ckpt = ckpt_mode == "blocks"
        for level, trans, bal, label in variants:
            if ckpt and label:  # the old default is shown without checkpointing only
                continue
            for c in coverages:
                p = sdp_plan(w, workers, c, level, seed, profile, opt_name, batch_size, trans, bal, ckpt)
                per_worker = []
                for k in range(workers):
                    # memory and traffic do not depend on the values: never build the full model K times here
                    sub = build_subnetwork(w.factory, p, k, seed=seed, device=device, checkpointing=ckpt_mode,
                                           init="per-module")
                    m = _measure(sub, opt_name, batch, w, repeats, device)
                    pr = predict_worker(p, k, opt_name, profile, batch_size, activation_checkpointing=ckpt)
                    per_worker.append({"worker": k, "measured": m, "predicted": pr, "ratio": _ratios(m, pr),
                                       "param_fraction": p.param_count(k) / p.total_params,
                                       "comm": bucket_traffic(sub, p, k)})
                    del sub
                    _release(device)
                add(f"{sdp_name(ckpt)} {level} C={c:g}{label}", "sdp", level, c, per_worker,
                    "measured (each worker's subnetwork step" + (", every block it has checkpointed" if ckpt else "")
                    + f"); plan: balance={bal}" + (f", transitions={trans}" if level == "block" else ""), ckpt=ckpt)
    if "backward" in maskings:
        rows += backward_rows(w, batch, batch_size, opt_name, profile, workers, coverages, levels, repeats, device,
                              seed, log)
    return {"workload": w.name, "spec": spec, "profile": _profile_json(profile), "rows": rows}


def sdp_name(checkpointing: bool) -> str:
    return "SDP+ckpt" if checkpointing else "SDP"


def backward_rows(w: Workload, batch: Any, batch_size: int, opt_name: str, profile: ActivationProfile, workers: int,
                  coverages: Sequence[float], levels: Sequence[str], repeats: int, device: torch.device, seed: int,
                  log=print) -> list[dict[str, Any]]:
    """Backward masking: each worker's full model, trainable where it holds, measured like the others."""
    rows = []
    for level in levels:
        weight_grads = None
        for c in coverages:
            p = plan(w.factory, workers, c, level, seed)
            if weight_grads is None:  # units do not depend on the coverage
                weight_grads = profile_weight_grads(w.factory, batch, w.loss_fn, p, seed=seed, device=device)
            per_worker = []
            for k in range(workers):
                model = build_backward_worker(w.factory, p, k, seed=seed, device=device)
                m = _measure(model, opt_name, batch, w, repeats, device)
                pr = predict_backward_worker(p, k, opt_name, profile, weight_grads, batch_size)
                per_worker.append({"worker": k, "measured": m, "predicted": pr, "ratio": _ratios(m, pr),
                                   "param_fraction": p.param_count(k) / p.total_params,
                                   "comm": backward_traffic(model, p, k)})
                del model
                _release(device)
            name = f"SDP backward {level} C={c:g}"
            rows.append({"name": name, "strategy": "sdp-backward", "level": level, "coverage": c,
                         "basis": "measured (each worker's full model, trainable where it holds)",
                         "workers": per_worker})
            worst = max(per_worker, key=lambda r: r["measured"]["total_bytes"])
            log(f"  {name:<24} worst worker total {worst['measured']['total_bytes'] / 2**20:8.2f} MiB "
                f"(activations {worst['measured']['activation_bytes'] / 2**20:.2f} MiB)")
    return rows


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


def _profile_json(p: ActivationProfile) -> dict[str, Any]:
    return {"batch_size": p.batch_size, "total": p.total, "block_bytes": p.block_bytes,
            "group_bytes": p.group_bytes, "group_bytes_scaled": p.group_bytes_scaled}


# ---- part 2: communication and time under torchrun ---------------------------------------------------
def fsdp2_bytes(param_bytes: int, ranks: int) -> tuple[float, float]:
    """Derived FSDP2 traffic per rank per step: (bytes handed to collectives, ring traffic).

    Every parameter is all-gathered twice (forward, and again in backward after resharding) and its
    gradient reduce-scattered once: a rank hands ``2 P/n`` to all-gathers and ``P`` to the
    reduce-scatter; a ring moves ``(n-1)/n P`` per all-gather and per reduce-scatter.
    """
    handed = 2 * param_bytes / ranks + param_bytes
    ring = 3 * (ranks - 1) / ranks * param_bytes
    return handed, ring


class _Config:
    def __init__(self, name: str, strategy: str, model: nn.Module, opt: torch.optim.Optimizer,
                 level: str | None = None, coverage: float | None = None, checkpointing: bool = False) -> None:
        self.name, self.strategy, self.model, self.opt = name, strategy, model, opt
        self.level, self.coverage, self.checkpointing = level, coverage, checkpointing
        self.step_s: list[float] = []
        self.compute_s: list[float] = []
        self.bytes: list[int] = []
        self.wait_s: list[float] = []
        self.hook = {"bytes": 0}

    def no_comm(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def counters(self) -> tuple[int, float]:
        if self.strategy == "sdp":
            return self.model.stats.bytes, self.model.stats.wait_s
        return self.hook["bytes"], 0.0


def _dist_time(spec_path: str) -> None:
    """The torchrun worker: build every configuration, run interleaved rounds, gather to rank 0."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.fsdp import fully_shard

    from subnetdp.engine import SubnetDataParallel
    from subnetdp.memory import state_bytes

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    w = workload_from_spec(spec["workload"])
    seed, opt_name, batch_size = spec["seed"], spec["workload"]["optimizer"], spec["workload"]["batch"]
    batch = w.make_batch(batch_size, torch.device("cpu"), 1000 + rank)

    def ddp(module: nn.Module, name: str, strategy: str) -> _Config:
        model = nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)
        cfg = _Config(name, strategy, model, make_optimizer(opt_name, model.parameters()),
                      checkpointing=strategy == "ddp-ckpt")

        def counting_allreduce(state, bucket):  # no annotations: DDP checks them
            state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(None, bucket)

        model.register_comm_hook(cfg.hook, counting_allreduce)
        return cfg

    configs = [ddp(materialize(w.factory, seed), "DDP", "ddp"),
               ddp(checkpoint_blocks(materialize(w.factory, seed)), "DDP+ckpt", "ddp-ckpt")]
    for suffix, ckpt in (("", False), ("+ckpt", True)):
        base = materialize(w.factory, seed)
        if ckpt:  # checkpointing first, then sharding (torchtitan's order)
            checkpoint_blocks(base)
        for b in find_blocks(base):
            fully_shard(base.get_submodule(b.name))
        fsdp_model = fully_shard(base)
        configs.append(_Config(f"FSDP2{suffix} (K={world})", "fsdp", fsdp_model,
                               make_optimizer(opt_name, fsdp_model.parameters()), checkpointing=ckpt))
    profile = None
    if spec.get("balance", "params") == "memory":  # the memory part's profile: same batch, same plans
        profile = profile_activations(w.factory, w.make_batch(batch_size, torch.device("cpu"), seed), w.loss_fn,
                                      batch_size, seed=seed)
    for ckpt_mode in spec["checkpointing"]:
        for level in spec["levels"]:
            for c in spec["coverages"]:
                p = sdp_plan(w, world, c, level, seed, profile, opt_name, batch_size, spec.get("transitions", "keep"),
                             spec.get("balance", "params"), ckpt_mode == "blocks")
                sdp = SubnetDataParallel(w.factory, p, seed=seed, checkpointing=ckpt_mode)
                configs.append(_Config(f"{sdp_name(ckpt_mode == 'blocks')} {level} C={c:g}", "sdp", sdp,
                                       make_optimizer(opt_name, sdp.parameters()), level, c, ckpt_mode == "blocks"))

    def step(cfg: _Config) -> None:
        cfg.opt.zero_grad(set_to_none=True)
        loss = w.loss_fn(cfg.model, batch)
        loss.backward()
        cfg.opt.step()

    def timed(cfg: _Config, comm: bool) -> float:
        dist.barrier()  # every rank starts together
        t0 = time.perf_counter()
        if comm:
            step(cfg)
        else:
            with cfg.no_comm():
                step(cfg)
        return time.perf_counter() - t0

    start = time.perf_counter()
    for r in range(spec["rounds"]):
        for cfg in configs if r % 2 == 0 else configs[::-1]:
            for _ in range(spec["warmup"]):
                step(cfg)
            for _ in range(spec["steps"]):
                b0, w0 = cfg.counters()
                cfg.step_s.append(timed(cfg, True))
                b1, w1 = cfg.counters()
                cfg.bytes.append(b1 - b0)
                cfg.wait_s.append(w1 - w0)
            if cfg.strategy != "fsdp":  # FSDP2 cannot switch its all-gathers off: it gets DDP's local step
                for _ in range(spec["steps"]):
                    cfg.compute_s.append(timed(cfg, False))
    elapsed = time.perf_counter() - start

    mine = []
    for cfg in configs:
        static: dict[str, Any] = {}
        if cfg.strategy == "sdp":
            ring = bucket_traffic(cfg.model.module, cfg.model.plan, rank)["ring_bytes"]
            static = {"predicted_bytes": cfg.model.predicted_bytes_per_sync(), "ring_bytes": ring,
                      "params": sum(p.numel() for p in cfg.model.parameters())}
        else:
            pbytes = sum(getattr(p, "_local_tensor", p).numel() * 4 for p in cfg.model.parameters())
            full_bytes = sum(p.numel() * 4 for p in cfg.model.parameters())  # DTensor numel: the full size
            if cfg.strategy == "fsdp":
                handed, ring = fsdp2_bytes(full_bytes, world)
                static = {"predicted_bytes": handed, "ring_bytes": ring, "params": full_bytes // 4,
                          "local_state": state_bytes(cfg.model, cfg.opt), "local_param_bytes": pbytes}
            else:
                static = {"predicted_bytes": full_bytes, "ring_bytes": 2 * (world - 1) / world * full_bytes,
                          "params": full_bytes // 4}
        mine.append({"name": cfg.name, "strategy": cfg.strategy, "level": cfg.level, "coverage": cfg.coverage,
                     "checkpointing": cfg.checkpointing, "step_s": cfg.step_s, "compute_s": cfg.compute_s, "bytes": cfg.bytes, "wait_s": cfg.wait_s,
                     "static": static})
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        rows = _summarise_time(gathered, batch_size, world)
        Path(spec["out"]).write_text(json.dumps({"rows": rows, "elapsed_s": elapsed, "ranks": world}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else {}


def _summarise_time(gathered: list[list[dict]], batch: int, world: int) -> list[dict[str, Any]]:
    rows = []
    for i, c0 in enumerate(gathered[0]):
        per_rank = [g[i] for g in gathered]
        step = [max(r["step_s"][j] for r in per_rank) for j in range(len(c0["step_s"]))]  # slowest rank
        compute = [max(r["compute_s"][j] for r in per_rank) for j in range(len(c0["compute_s"]))]
        row = {k: c0[k] for k in ("name", "strategy", "level", "coverage", "checkpointing")}
        row.update(step_s=_stats(step), compute_s=_stats(compute),
                   wait_s=_stats([statistics.fmean(r["wait_s"][j] for r in per_rank) for j in range(len(step))]),
                   bytes_per_rank=[statistics.median(r["bytes"]) if r["bytes"] else None for r in per_rank],
                   predicted_bytes_per_rank=[r["static"]["predicted_bytes"] for r in per_rank],
                   ring_bytes_per_rank=[r["static"]["ring_bytes"] for r in per_rank],
                   params_per_rank=[r["static"]["params"] for r in per_rank])
        if row["strategy"] == "fsdp":
            row["bytes_basis"] = "derived (fsdp2_bytes)"
            row["local_state_per_rank"] = [r["static"]["local_state"] for r in per_rank]
            row["compute_basis"] = (f"{'DDP+ckpt' if row['checkpointing'] else 'DDP'}'s local step "
                                    "(FSDP2 cannot switch its collectives off)")
            row["compute_s"] = None
        else:
            row["bytes_basis"] = "measured (comm hook)" if row["strategy"] != "sdp" else "measured (engine counters)"
        rows.append(row)
    ddp = next(r for r in rows if r["strategy"] == "ddp")
    ddp_ckpt = next(r for r in rows if r["strategy"] == "ddp-ckpt")
    for r in rows:
        compute = r["compute_s"] or (ddp_ckpt if r["checkpointing"] else ddp)["compute_s"]
        r["exposed_comm_s"] = r["step_s"]["median"] - compute["median"]
        r["samples_per_s_per_rank"] = batch / r["step_s"]["median"]
        r["step_ratio_to_ddp"] = r["step_s"]["median"] / ddp["step_s"]["median"]
        r["step_ratio_to_ddp_ckpt"] = r["step_s"]["median"] / ddp_ckpt["step_s"]["median"]
    return rows


def time_part(spec: dict[str, Any], ranks: int, coverages: Sequence[float], levels: Sequence[str], steps: int,
              warmup: int, rounds: int, seed: int = 0, timeout: float = 900,
              checkpointing: Sequence[str] = ("none", "blocks"), *,
              transitions: str = DEFAULT_TRANSITIONS, balance: str = "memory") -> dict[str, Any]:
    """Run :func:`_dist_time` under ``torchrun --nproc-per-node ranks`` and return its JSON (SDP plans as
    :func:`sdp_plan` makes them)."""
    valid = [c for c in coverages if abs(c * ranks - round(c * ranks)) < 1e-9 and c < 1]
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "time.json"
        spec_path.write_text(json.dumps({"workload": spec, "levels": list(levels), "coverages": valid,
                                         "checkpointing": list(checkpointing),
                                         "steps": steps, "warmup": warmup, "rounds": rounds, "seed": seed,
                                         "transitions": transitions, "balance": balance, "out": str(out)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "subnetdp.bench", "--dist-time", str(spec_path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"timing under torchrun failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        result = json.loads(out.read_text())
    result["coverages"] = valid
    result["command"] = " ".join(["torchrun", "--standalone", f"--nproc-per-node {ranks}", "-m subnetdp.bench",
                                  "--dist-time SPEC"])
    return result


# ---- tables and plots --------------------------------------------------------------------------------
def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def _span(values: list[float], fmt) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(statistics.median(values))} [{fmt(lo)}-{fmt(hi)}]"


def worst_worker(row: dict[str, Any]) -> dict[str, Any]:
    return max(row["workers"], key=lambda r: r["measured"]["total_bytes"])


def memory_table(part: dict[str, Any]) -> str:
    head = ("| configuration | basis | params | grads | optimizer | activations | total (worst worker) "
            "| predicted total | measured / predicted: state; activations (all workers) | compute ms/step in-process "
            "| RSS growth in step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in part["rows"]:
        wk = worst_worker(row)
        m = wk["measured"]
        basis = "derived" if row["strategy"] == "fsdp" else "measured"
        cells = [_mib(m[k]) for k in MEMORY_KEYS]
        if len(row["workers"]) > 1:  # worst worker, then [min-max over workers]
            cells = [f"{c} [{_mib(min(r['measured'][k] for r in row['workers']))}-"
                     f"{_mib(max(r['measured'][k] for r in row['workers']))}]" for c, k in zip(cells, MEMORY_KEYS)]
        pred = _mib(wk["predicted"]["total_bytes"]) if wk["predicted"].get("total_bytes") else "n/a"
        ratios = "n/a"
        if wk["ratio"]:
            st = [r["ratio"]["state_bytes"] for r in row["workers"]]
            ac = [r["ratio"]["activation_bytes"] for r in row["workers"]]
            ratios = f"{_span(st, lambda v: f'{v:.3f}')}; {_span(ac, lambda v: f'{v:.3f}')}"
        step = "n/a"
        if isinstance(m.get("step_s"), dict):
            step = _span([r["measured"]["step_s"]["median"] for r in row["workers"]], lambda v: f"{v * 1e3:.0f}")
        rss = m.get("step_rss_growth_bytes", {}).get("median") if isinstance(m.get("step_rss_growth_bytes"), dict) else None
        total = _mib(m["total_bytes"])
        if row["strategy"] in ("ddp", "ddp-ckpt"):
            total += f" (+{_mib(wk['derived']['ddp_bucket_bytes'])} buckets)"
        elif row["strategy"] == "fsdp":
            total += f" (incl. {_mib(wk['derived']['unsharded_block_bytes'])} unsharded block)"
        lines.append(f"| {row['name']} | {basis} | {' | '.join(cells)} | {total} | {pred} | {ratios} | {step} | "
                     f"{_mib(rss) if rss is not None else 'n/a'} |")
    return "\n".join(lines)


def time_table(part: dict[str, Any]) -> str:
    head = ("| configuration | bytes/rank/step MiB | ring traffic/rank MiB | step ms median [min-max] "
            "| compute ms (no comm) | exposed comm ms | SDP sync wait ms | samples/s/rank | step / DDP | step / DDP+ckpt |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in part["rows"]:
        measured = [b for b in r["bytes_per_rank"] if b is not None]
        byt = _span(r["predicted_bytes_per_rank"], _mib) + " (derived)" if r["strategy"] == "fsdp" else _span(measured, _mib)
        s = r["step_s"]
        compute = (f"{r['compute_s']['median'] * 1e3:.0f}" if r["compute_s"]
                   else f"= {'DDP+ckpt' if r['checkpointing'] else 'DDP'}'s")
        wait = f"{r['wait_s']['median'] * 1e3:.1f}" if r["strategy"] == "sdp" else "n/a"
        lines.append(f"| {r['name']} | {byt} | {_span(r['ring_bytes_per_rank'], _mib)} | {s['median'] * 1e3:.0f} "
                     f"[{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}] | {compute} | {r['exposed_comm_s'] * 1e3:.0f} | "
                     f"{wait} | {r['samples_per_s_per_rank']:.1f} | {r['step_ratio_to_ddp']:.2f} | "
                     f"{r['step_ratio_to_ddp_ckpt']:.2f} |")
    return "\n".join(lines)


def plot(part: dict[str, Any], timing: dict[str, Any] | None, out: Path, stem: str) -> list[Path]:
    """Memory breakdown bars per strategy (worst worker), and memory and step time versus coverage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = part["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 3.6), dpi=90)
    bottom = [0.0] * len(rows)
    for key, color in zip(MEMORY_KEYS, ("#4c72b0", "#dd8452", "#55a868", "#c44e52")):
        vals = [worst_worker(r)["measured"][key] / 2**20 for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=key.replace("_bytes", ""), color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rows)), [r["name"].replace("SDP ", "") for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MiB (worst worker)")
    ax.set_title(f"{part['workload']}: memory per worker", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / f"{stem}_memory.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2 if timing else 1, figsize=(9 if timing else 5, 3.4), dpi=90, squeeze=False)
    ax = axes[0][0]
    sdp_lines = sorted({(r["strategy"], r["level"], r.get("checkpointing", False), "old default" in r["name"])
                        for r in rows if r["level"]})
    for strategy, level, ckpt, old in sdp_lines:
        mine = [r for r in rows if (r["strategy"], r["level"], r.get("checkpointing", False),
                                    "old default" in r["name"]) == (strategy, level, ckpt, old)]
        pts = sorted((r["coverage"], worst_worker(r)["measured"]["total_bytes"] / 2**20,
                      worst_worker(r)["predicted"].get("total_bytes", 0) / 2**20) for r in mine)
        name = ("SDP backward" if strategy == "sdp-backward" else sdp_name(ckpt)) + f" {level}" + (" (old default)" if old else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "s-" if (ckpt or strategy != "sdp") else ("^-" if old else "o-"),
                label=f"{name} (measured)")
        if all(p[2] for p in pts):
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=ax.lines[-1].get_color(), alpha=0.6,
                    label=f"{name} (predicted)")
    for r in rows:
        if r["strategy"] not in ("sdp", "sdp-backward"):
            ax.axhline(worst_worker(r)["measured"]["total_bytes"] / 2**20, color="k" if not r.get("checkpointing") else "C7",
                       lw=1, linestyle={"ddp": "-", "ddp-ckpt": ":", "fsdp": "-."}[r["strategy"]],
                       label=r["name"] + (" (derived)" if r["strategy"] == "fsdp" else ""))
    ax.set_xlabel("coverage C")
    ax.set_ylabel("MiB, worst worker")
    ax.legend(fontsize=6)
    ax.set_title("memory vs coverage", fontsize=9)
    if timing:
        ax = axes[0][1]
        trows = timing["rows"]
        for level, ckpt in sorted({(r["level"], r.get("checkpointing", False)) for r in trows if r["level"]}):
            pts = sorted((r["coverage"], r["step_s"]["median"] * 1e3) for r in trows
                         if r["level"] == level and r.get("checkpointing", False) == ckpt)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if not ckpt else "s-", label=f"{sdp_name(ckpt)} {level}")
        for r in trows:
            if r["strategy"] != "sdp":
                ax.axhline(r["step_s"]["median"] * 1e3, color="k" if not r.get("checkpointing") else "C7", lw=1,
                           linestyle={"ddp": "-", "ddp-ckpt": ":", "fsdp": "-."}[r["strategy"]], label=r["name"])
        ax.set_xlabel("coverage C")
        ax.set_ylabel(f"step ms (median, {timing['ranks']} ranks)")
        ax.legend(fontsize=6)
        ax.set_title("step time vs coverage", fontsize=9)
    fig.tight_layout()
    paths.append(out / f"{stem}_vs_coverage.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


# ---- the command ------------------------------------------------------------------------------------
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="resnet18,llama", help="comma-separated: resnet18, llama")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64: the standard model)")
    p.add_argument("--batch", type=int, default=32, help="ResNet samples per worker per step")
    p.add_argument("--llama-model", default="llama_char_small", help="LLaMA preset of subnetdp.models")
    p.add_argument("--llama-batch", type=int, default=8, help="LLaMA sequences per worker per step")
    p.add_argument("--seq-len", type=int, default=128, help="LLaMA tokens per sequence")
    p.add_argument("--resnet-optimizer", default="sgd-momentum", choices=("sgd", "sgd-momentum", "adamw"),
                   help="optimizer whose state the ResNet measurements count")
    p.add_argument("--llama-optimizer", default="adamw", choices=("sgd", "sgd-momentum", "adamw"),
                   help="optimizer whose state the LLaMA measurements count")
    p.add_argument("--workers", type=int, default=8, help="K for the memory part (subnetworks measured in-process)")
    p.add_argument("--coverages", default="0.875,0.75,0.5,0.25", help="comma-separated SDP coverages")
    p.add_argument("--levels", default="block,neuron", help="comma-separated SDP levels")
    p.add_argument("--sdp-checkpointing", default="both", choices=("none", "blocks", "both"),
                   help="SDP rows without activation checkpointing, with it (SDP+ckpt), or both")
    p.add_argument("--masking", default="forward", choices=("forward", "backward", "both"),
                   help="SDP regime(s) of the memory part; backward adds its rows (docs/masking.md)")
    p.add_argument("--repeats", type=int, default=3, help="measured steps per worker in the memory part")
    p.add_argument("--transitions", choices=("keep", "shortcut"), default=DEFAULT_TRANSITIONS,
                   help="SDP block plans of the memory part (the old default, keep with params balance, is "
                        "measured as an extra row)")
    p.add_argument("--balance", choices=("memory", "params"), default="memory",
                   help="what SDP plans of the memory part balance (as subnetdp train --balance)")
    p.add_argument("--time-ranks", type=int, default=4, help="torchrun processes for the timing part (0: skip it)")
    p.add_argument("--time-steps", type=int, default=5, help="timed steps per configuration per round")
    p.add_argument("--time-warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    p.add_argument("--time-limit", type=float, default=3600, help="seconds the torchrun part may take before it is stopped")
    p.add_argument("--full", action="store_true", help="full size: ResNet-18 width 64, batch 128")
    p.add_argument("--device", default="cpu", help="device of the memory part")
    p.add_argument("--seed", type=int, default=0, help="seed for init, plans and batches")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the memory part (1: steadier timings)")
    p.add_argument("--out", default="bench", help="folder for bench.json, bench.md and the plots")


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``subnetdp``'s subparsers."""
    p = subparsers.add_parser("bench", help="measure memory per worker, communication and step time of SDP "
                                            "against DDP, FSDP2 and DDP, SDP and FSDP2 with activation checkpointing",
                              description=__doc__.split("\n\n")[0])
    add_bench_arguments(p)
    return p


def check_bench_args(args: argparse.Namespace) -> None:
    """Reject bad ``subnetdp bench`` values before any work, naming the flag and what it accepts."""
    for flag in ("width", "batch", "llama_batch", "seq_len", "workers", "repeats", "time_steps", "rounds"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive whole number")
    for flag in ("time_ranks", "time_warmup", "threads"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be 0 or more")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in ("resnet18", "llama") for m in models):
        raise ValueError(f"--models {args.models!r}: give a comma-separated list of resnet18, llama")
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    if not levels or any(lv not in ("block", "neuron") for lv in levels):
        raise ValueError(f"--levels {args.levels!r}: give a comma-separated list of block, neuron")
    try:
        coverages = [float(c) for c in args.coverages.split(",") if c.strip()]
    except ValueError:
        coverages = []
    if not coverages or any(not 0 < c <= 1 for c in coverages):
        raise ValueError(f"--coverages {args.coverages!r}: give comma-separated numbers in (0, 1], e.g. 0.75,0.5")
    try:
        torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r}: not a device ({e}); use cpu or cuda") from e


def run_bench(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Run the benchmark (both parts, every workload) and write its outputs; returns the JSON."""
    check_bench_args(args)
    if args.full:
        args.width, args.batch = 64, 128
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    coverages = [float(c) for c in args.coverages.split(",") if c.strip()]
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    ckpt_modes = ("none", "blocks") if args.sdp_checkpointing == "both" else (args.sdp_checkpointing,)
    start = time.perf_counter()
    result: dict[str, Any] = {"meta": {
        "command": "subnetdp bench " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                 if k not in ("command", "func")),
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU" if device.type == "cpu" else
        torch.cuda.get_device_name(device),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()},
        "workloads": []}
    md = [f"Machine: {result['meta']['machine']}, torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"in the memory part."]
    for spec in workload_specs(args):
        maskings = ("forward", "backward") if args.masking == "both" else (args.masking,)
        part = memory_part(spec, args.workers, coverages, levels, args.repeats, device, args.seed, log, ckpt_modes,
                           transitions=args.transitions, balance=args.balance, maskings=maskings)
        timing = None
        if args.time_ranks:
            log(f"  timing under torchrun, {args.time_ranks} ranks ...")
            timing = time_part(spec, args.time_ranks, coverages, levels, args.time_steps, args.time_warmup,
                               args.rounds, args.seed, args.time_limit, ckpt_modes,
                               transitions=args.transitions, balance=args.balance)
        stem = spec["model"] + (f"_w{spec['width']}" if spec["kind"] == "image" else "")
        plots = plot(part, timing, out, stem)
        part["timing"], part["plots"] = timing, [p.name for p in plots]
        result["workloads"].append(part)
        md += [f"\n### {part['workload']}, batch {spec['batch']} per worker, {spec['optimizer']}, K = {args.workers}"
               f"\n\nMemory per worker (in-process; MiB):\n", memory_table(part)]
        if timing:
            md += [f"\nCommunication and time per step under torchrun ({timing['ranks']} ranks, gloo, 1 thread each; "
                   f"coverages {', '.join(f'{c:g}' for c in timing['coverages'])}):\n", time_table(timing)]
        md += ["\nPlots: " + ", ".join(f"`{p.name}`" for p in plots)]
        log(memory_table(part))
        if timing:
            log(time_table(timing))
    result["meta"]["wall_s"] = time.perf_counter() - start
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "bench.md").write_text("\n".join(md) + "\n")
    log(f"written: {out / 'bench.json'}, {out / 'bench.md'} and plots ({result['meta']['wall_s']:.0f} s)")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--dist-time"]:
        _dist_time(argv[1])
        return 0
    parser = argparse.ArgumentParser(prog="python -m subnetdp.bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    run_bench(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
