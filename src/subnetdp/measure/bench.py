"""``subnetdp bench``: memory, communication and step time of SDP against DDP, FSDP2 and DDP with
activation checkpointing, each of SDP and FSDP2 also with checkpointing, all in one invocation.

Two parts, each labelled in the output with what is measured and what is derived:

1. **Memory per worker, in this process.** A worker's memory is that of its own model's training
   step, so each SDP worker is measured by building its subnetwork (:func:`subnetdp.build_subnetwork`)
   and running steps on it here, all ``K`` workers one after the other. Per worker: parameters,
   gradients, optimizer state, activations (saved for backward; :mod:`subnetdp.measure.meters`), the device
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
     :func:`subnetdp.planning.memory.predict_backward_worker`; its traffic adds the broadcasts of new values.

2. **Communication and time per step under torchrun** (``--time-ranks N`` processes, gloo on CPU):
   :mod:`subnetdp.measure.timing`.

Outputs (``--out``): ``bench.json``, ``bench.md`` and PNG plots (:mod:`subnetdp.measure.tables`). The
flags are the CLI's (``subnetdp bench``, :mod:`subnetdp.cli`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subnetdp.baselines import fsdp2_bytes
from subnetdp.recompute import checkpoint_blocks
from subnetdp.init import build_meta, materialize
from subnetdp.masking import MASKINGS, build_backward_worker
from subnetdp.measure.meters import measure_step
from subnetdp.measure.tables import DEFAULT_TRANSITIONS, MEMORY_KEYS, memory_table, plot, sdp_name, time_table
from subnetdp.measure.timing import time_part
from subnetdp.measure.workloads import Workload, workload_from_spec
from subnetdp.metrics import pyplot
from subnetdp.optimizers import make_optimizer
from subnetdp.planning import (
    ActivationProfile,
    plan,
    predict_backward_worker,
    predict_worker,
    profile_activations,
    profile_weight_grads,
    sdp_plan,
)
from subnetdp.subnet import build_subnetwork
from subnetdp.sync import step_traffic


def workload_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One spec per ``--models`` entry, with its batch and optimizer flags."""
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
    its module (a reference cycle), so only the garbage collector frees it; otherwise the previous
    workers' tensors inflate the next worker's measured allocator peak (docs/benchmarks.md)."""
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
            per_worker: list[dict[str, Any]], basis: str, ckpt: bool = False, old_default: bool = False) -> None:
        rows.append({"name": name, "strategy": strategy, "level": level, "coverage": coverage,
                     "checkpointing": ckpt, "old_default": old_default, "basis": basis, "workers": per_worker})
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
                                       "comm": step_traffic(sub, p, k)})
                    del sub
                    _release(device)
                add(f"{sdp_name(ckpt)} {level} C={c:g}{label}", "sdp", level, c, per_worker,
                    "measured (each worker's subnetwork step" + (", every block it has checkpointed" if ckpt else "")
                    + f"); plan: balance={bal}" + (f", transitions={trans}" if level == "block" else ""), ckpt=ckpt,
                    old_default=bool(label))
    if "backward" in maskings:
        rows += backward_rows(w, batch, batch_size, opt_name, profile, workers, coverages, levels, repeats, device,
                              seed, log, transitions=transitions, balance=balance)
    return {"workload": w.name, "spec": spec, "profile": _profile_json(profile), "rows": rows}




def backward_rows(w: Workload, batch: Any, batch_size: int, opt_name: str, profile: ActivationProfile, workers: int,
                  coverages: Sequence[float], levels: Sequence[str], repeats: int, device: torch.device, seed: int,
                  log=print, transitions: str = DEFAULT_TRANSITIONS, balance: str = "memory") -> list[dict[str, Any]]:
    """Backward masking: each worker's full model, trainable where it holds, measured like the others,
    on the plans the main job makes for it (``sdp_plan(masking="backward")``)."""
    rows = []
    for level in levels:
        units = plan(w.factory, workers, 1.0, level, seed, transitions=transitions)  # units do not depend on C
        weight_grads = profile_weight_grads(w.factory, batch, w.loss_fn, units, seed=seed, device=device)
        for c in coverages:
            p = sdp_plan(w, workers, c, level, seed, profile, opt_name, batch_size, transitions, balance,
                         masking="backward", weight_grads=weight_grads)
            per_worker = []
            for k in range(workers):
                model = build_backward_worker(w.factory, p, k, seed=seed, device=device)
                m = _measure(model, opt_name, batch, w, repeats, device)
                pr = predict_backward_worker(p, k, opt_name, profile, weight_grads, batch_size)
                per_worker.append({"worker": k, "measured": m, "predicted": pr, "ratio": _ratios(m, pr),
                                   "param_fraction": p.param_count(k) / p.total_params,
                                   "comm": step_traffic(model, p, k, masking="backward")})
                del model
                _release(device)
            name = f"SDP backward {level} C={c:g}"
            rows.append({"name": name, "strategy": "sdp-backward", "level": level, "coverage": c,
                         "basis": f"measured (each worker's full model, trainable where it holds); plan: balance={balance}"
                                  + (f", transitions={transitions}" if level == "block" else ""),
                         "workers": per_worker})
            worst = max(per_worker, key=lambda r: r["measured"]["total_bytes"])
            log(f"  {name:<24} worst worker total {worst['measured']['total_bytes'] / 2**20:8.2f} MiB "
                f"(activations {worst['measured']['activation_bytes'] / 2**20:.2f} MiB)")
    return rows



def _profile_json(p: ActivationProfile) -> dict[str, Any]:
    return {"batch_size": p.batch_size, "total": p.total, "block_bytes": p.block_bytes,
            "group_bytes": p.group_bytes, "group_bytes_scaled": p.group_bytes_scaled}



def run_bench(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """Run the benchmark (both parts, every workload) and write its outputs; returns the JSON.

    ``args`` are ``subnetdp bench``'s flags, already checked (:func:`subnetdp.config.validate_bench`).
    """
    pyplot()  # matplotlib is an optional extra: say so before the measurements, not after them
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
        maskings = MASKINGS if args.masking == "both" else (args.masking,)
        part = memory_part(spec, args.workers, coverages, levels, args.repeats, device, args.seed, log, ckpt_modes,
                           transitions=args.transitions, balance=args.balance, maskings=maskings)
        timing = None
        if args.time_ranks:
            log(f"  timing under torchrun, {args.time_ranks} ranks ...")
            timing = time_part(spec, args.time_ranks, coverages, levels, args.time_steps, args.time_warmup,
                               args.rounds, args.seed, args.time_limit, ckpt_modes,
                               transitions=args.transitions, balance=args.balance,
                               sharding=("none", "holders") if args.sharding == "both" else (args.sharding,))
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
