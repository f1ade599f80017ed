"""The main job: train with one strategy, log, checkpoint, assemble and evaluate the full model.

Runs as one worker per process under ``torchrun``, as K workers in one process (``--simulate K``),
or starts K local processes itself through torchrun's launcher (``--workers K``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from subnetdp.backends import Distributed, SimulatedSDP, autocast_for
from subnetdp.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from subnetdp.config import TrainConfig, validate, world_size_of
from subnetdp.evaluation import recalibrate_batchnorm, scale_residual_branches
from subnetdp.init import materialize
from subnetdp.metrics import MetricsLog, format_bytes
from subnetdp.plan import Plan, plan as make_plan
from subnetdp.tasks import make_task


def launch_local(cfg: TrainConfig, argv: list[str]) -> int:
    """``--workers K``: start K processes on this machine with torchrun's own launcher."""
    from torch.distributed.run import main as torchrun_main

    rest = _drop_flag(argv, "--workers")
    args = ["--standalone", f"--nproc-per-node={cfg.workers}", "--max-restarts=0", "-m", "subnetdp", "train", *rest]
    if "--out" not in " ".join(rest):  # every process must agree on the run directory
        args += ["--out", str(cfg.run_dir())]
    torchrun_main(args)
    return 0


def _drop_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def _device(cfg: TrainConfig) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _peak_memory(device: torch.device) -> dict[str, int]:
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def run(cfg: TrainConfig, argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the main job; returns the summary on the process that writes it (else None)."""
    validate(cfg)
    if cfg.workers and "WORLD_SIZE" not in os.environ:
        launch_local(cfg, argv if argv is not None else sys.argv[2:])
        summary = Path(cfg.run_dir()) / "summary.json"
        return json.loads(summary.read_text()) if summary.exists() else None
    distributed = "WORLD_SIZE" in os.environ and not cfg.simulate
    device = _device(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    try:
        result = _train(cfg, device, distributed)
        if distributed:
            dist.barrier()  # every rank leaves together: gloo can abort when a peer tears down early
        return result
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device, distributed: bool) -> dict[str, Any] | None:
    rank = dist.get_rank() if distributed else 0
    world = world_size_of(cfg)
    if distributed and world != dist.get_world_size():
        raise SystemExit(f"WORLD_SIZE says {world} but the process group has {dist.get_world_size()} ranks")
    lead = rank == 0
    out = cfg.run_dir()
    problem = None
    if lead:
        if not cfg.resume and (out / "summary.json").exists():
            problem = f"{out} already holds a finished run; choose another --out, or --resume to continue it"
        else:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / "config.json")
    if distributed:  # every rank stops together, or none does
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise SystemExit(problem)
    torch.manual_seed(cfg.seed)
    task = make_task(cfg, device)
    factory = task.model_factory()
    steps_per_epoch = task.steps_per_epoch(world)
    epochs = cfg.epochs / cfg.coverage if (cfg.flop_matched and cfg.strategy == "sdp") else cfg.epochs
    total = cfg.steps or max(1, math.ceil(epochs * steps_per_epoch))
    n_epochs = math.ceil(total / steps_per_epoch)
    plan: Plan | None = None
    if cfg.strategy == "sdp":
        plan = make_plan(factory, world, cfg.coverage, cfg.level, cfg.seed)
        if lead:
            (out / "plan.json").write_text(plan.to_json())
            (out / "plan.txt").write_text(plan.summary(_opt_name(cfg)) + "\n")
    backend = SimulatedSDP(cfg, factory, plan, device, total) if cfg.simulate else Distributed(
        cfg, factory, plan, device, total)
    ranks_here = list(range(world)) if cfg.simulate else [rank]
    loaders = [task.loader(k, world) for k in ranks_here]
    autocast = autocast_for(cfg, device)

    step = 0
    ckpt_dir = out / "checkpoints"
    if cfg.resume and latest_checkpoint(ckpt_dir) is not None:
        target = _ckpt_module(backend)
        payload = load_checkpoint(ckpt_dir, target, backend.optimizers[0] if not cfg.simulate else None, plan)
        backend.load_state(payload["extra"]["backend"])
        step = payload["step"]
        if lead:
            print(f"resumed from {latest_checkpoint(ckpt_dir)} at step {step}")
    elif cfg.resume and lead:
        print(f"--resume: no checkpoint under {ckpt_dir}; starting from step 0")

    log = MetricsLog(out, enabled=lead, resume_from_step=step)
    if lead:
        _print_header(cfg, world, device, plan, total, n_epochs)
    start_time = time.perf_counter()
    samples = 0
    last_eval: dict[str, float] = {}
    state: dict[str, torch.Tensor] | None = None
    evaluated_final = False
    try:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            streams = [task.epoch_batches(ld, epoch, offset) for ld in loaders]
            n_in_epoch = min(steps_per_epoch - offset, total - step)
            bar = tqdm(total=n_in_epoch, desc=f"epoch {epoch + 1}/{n_epochs}", disable=not (cfg.progress and lead),
                       dynamic_ncols=True, leave=True, file=sys.stdout)
            sums = {"loss": 0.0, "correct": 0.0, "count": 0.0, "n": 0}
            t_epoch = time.perf_counter()
            for _ in range(n_in_epoch):
                batches = [next(s) for s in streams]
                t0 = time.perf_counter()
                metrics = backend.train_step(batches, task.loss, autocast)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                step += 1
                n = sum(m["count"] for m in metrics) if task.kind == "image" else sum(len(b[0]) for b in batches)
                samples += n
                loss = sum(m["loss"] for m in metrics) / len(metrics)
                sums["loss"] += loss
                sums["n"] += 1
                if task.kind == "image":
                    sums["correct"] += sum(m["correct"] for m in metrics)
                    sums["count"] += sum(m["count"] for m in metrics)
                record = {"step": step, "epoch": epoch + 1, "loss": loss, "lr": backend.lr,
                          "samples_per_s": n / dt, "step_time_s": dt}
                if task.kind == "image":
                    record["acc"] = sums["correct"] / max(sums["count"], 1)
                if step % cfg.log_every == 0 or step == total:
                    log.step(record)
                mem = _peak_memory(device)
                bar.set_postfix(loss=f"{loss:.3f}", **({"acc": f"{record['acc']:.3f}"} if "acc" in record else {}),
                                sps=f"{n / dt:.0f}", mem=format_bytes(mem.get("peak_device_bytes", mem["peak_rss_bytes"])))
                bar.update(1)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                    _checkpoint(ckpt_dir, step, backend, plan)
            bar.close()
            epoch_done = step % steps_per_epoch == 0 or step == total
            if epoch_done:
                ep = math.ceil(step / steps_per_epoch)
                row: dict[str, Any] = {"epoch": ep, "step": step, "train_loss": sums["loss"] / max(sums["n"], 1),
                                       "time_s": time.perf_counter() - t_epoch, **_peak_memory(device)}
                if task.kind == "image":
                    row["train_acc"] = sums["correct"] / max(sums["count"], 1)
                if (cfg.eval_every and ep % cfg.eval_every == 0) or step == total:
                    state = backend.full_state_dict()  # collective
                    last_eval = _evaluate(cfg, task, state, factory, plan, device, autocast) or last_eval
                    evaluated_final = step == total
                    row.update(last_eval)
                log.epoch(row)
                if lead:
                    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
                             if k in ("train_loss", "train_acc", "test_acc", "test_loss", "val_loss", "val_ppl")}
                    print(f"epoch {ep}: {shown}")
                if step < total and not cfg.checkpoint_every:
                    _checkpoint(ckpt_dir, step, backend, plan)
    except KeyboardInterrupt:
        if lead:
            print(f"interrupted at step {step}; saving a checkpoint so --resume can continue")
        _checkpoint(ckpt_dir, step, backend, plan)
        raise
    wall = time.perf_counter() - start_time
    _checkpoint(ckpt_dir, step, backend, plan)
    if not evaluated_final:  # e.g. resuming a run that had already reached its last step (same on every rank)
        state = backend.full_state_dict()
        last_eval = _evaluate(cfg, task, state, factory, plan, device, autocast) or last_eval
    summary = _summary(cfg, backend, plan, world, wall, samples, step, device, last_eval, distributed)
    if lead:
        _save_full_model(state, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.close()
        print(_summary_text(summary, out))
        return summary
    log.close()
    return None


def _opt_name(cfg: TrainConfig) -> str:
    return "sgd-momentum" if cfg.optimizer == "sgd" and cfg.momentum > 0 else cfg.optimizer


def _ckpt_module(backend: SimulatedSDP | Distributed) -> torch.nn.Module:
    if isinstance(backend, SimulatedSDP):
        return torch.nn.ModuleList(backend.models)
    return backend.model


def _checkpoint(directory: Path, step: int, backend: SimulatedSDP | Distributed, plan: Plan | None) -> None:
    opt = None if isinstance(backend, SimulatedSDP) else backend.opt
    save_checkpoint(directory, step, _ckpt_module(backend), opt, plan, extra={"backend": backend.state()})


def _evaluate(cfg: TrainConfig, task: Any, state: dict[str, torch.Tensor] | None, factory: Any, plan: Plan | None,
              device: torch.device, autocast: Any) -> dict[str, float] | None:
    """Evaluate the assembled full model (``state``; None on processes other than the lead)."""
    if state is None:
        return None
    model = materialize(factory, seed=cfg.seed, device=device, init=cfg.init)
    model.load_state_dict(state)
    handles = []
    partial = plan is not None and plan.holders_per_unit < plan.workers
    if partial and cfg.residual_scaling and plan.level == "block":
        handles = scale_residual_branches(model, plan)
    if partial and cfg.bn_recalibrate:
        recalibrate_batchnorm(model, task.calibration_batches(cfg.bn_recalibrate))
    result = task.evaluate(model, autocast)
    for h in handles:
        h.remove()
    return result


def _summary(cfg: TrainConfig, backend: SimulatedSDP | Distributed, plan: Plan | None, world: int, wall: float,
             samples: int, steps: int, device: torch.device, last_eval: dict[str, float],
             distributed: bool) -> dict[str, Any]:
    memory = backend.memory()
    comm = backend.comm_bytes_per_step()
    peak = _peak_memory(device)
    if distributed:  # gather every rank's figures on rank 0
        mine = {"memory": memory[0], "comm": comm[0], "peak": peak}
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        memory = [e["memory"] for e in everyone]
        comm = [e["comm"] for e in everyone]
        peaks = [e["peak"] for e in everyone]
    else:
        peaks = [peak]
    total_params = plan.total_params if plan is not None else None
    return {
        "strategy": cfg.strategy, "level": cfg.level if cfg.strategy == "sdp" else None,
        "coverage": cfg.coverage if cfg.strategy == "sdp" else 1.0, "model": cfg.model, "width": cfg.width,
        "dataset": "CIFAR-10 (JPEG)" if cfg.dataset == "cifar10-jpeg" else cfg.dataset,
        "workers": world, "simulated": bool(cfg.simulate), "device": str(device),
        "steps": steps, "wall_s": wall, "samples_per_s": samples / wall if wall > 0 else None,
        "final": last_eval,
        # how "final" was evaluated; model.safetensors holds the assembled state itself (see docs/evaluation.md)
        "evaluation": {"residual_scaling": bool(cfg.residual_scaling and plan is not None and plan.level == "block"
                                                and plan.holders_per_unit < plan.workers),
                       "bn_recalibrate": cfg.bn_recalibrate if plan is not None and plan.holders_per_unit < plan.workers
                       else 0},
        "params_per_worker": plan.param_counts() if plan is not None else None,
        "full_params": total_params,
        "model_state_bytes_per_worker": [sum(m.values()) for m in memory],
        "memory_per_worker": memory,
        "comm_bytes_per_step_per_worker": comm,
        "peak_memory_per_process": peaks,
    }


def _save_full_model(state: dict[str, torch.Tensor] | None, out: Path) -> None:
    """The assembled full model as safetensors (tied weights stored as separate copies)."""
    if state is None:
        return
    from safetensors.torch import save_file

    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(tmp))
    os.replace(tmp, out / "model.safetensors")


def _print_header(cfg: TrainConfig, world: int, device: torch.device, plan: Plan | None, total: int,
                  epochs: int) -> None:
    mode = f"simulated in one process ({world} workers)" if cfg.simulate else f"{world} process(es)"
    what = f"SDP level={cfg.level} C={cfg.coverage:g}" if cfg.strategy == "sdp" else cfg.strategy.upper()
    print(f"subnetdp train: {what} | {cfg.model} on {cfg.dataset} | {mode} on {device} | "
          f"{total} steps in {epochs} epoch(s), batch {cfg.batch_size}/worker | run dir {cfg.run_dir()}")
    if plan is not None:
        fr = plan.param_fractions()
        print(f"plan: {len(plan.units)} units, r={plan.holders_per_unit}, params per worker "
              f"{min(fr):.3f}-{max(fr):.3f} of {plan.total_params:,} (spread {plan.spread():.3f})")


def _summary_text(s: dict[str, Any], out: Path) -> str:
    lines = ["", "=" * 72, f"summary: {s['strategy']}" + (f" level={s['level']} C={s['coverage']:g}" if s["level"] else "")
             + f", {s['workers']} workers, {s['model']} on {s['dataset']}"]
    for k, v in s["final"].items():
        lines.append(f"  {k:<28} {v:.4f}")
    if s["params_per_worker"]:
        lines.append(f"  {'params per worker':<28} {min(s['params_per_worker']):,} - {max(s['params_per_worker']):,}"
                     f" of {s['full_params']:,}")
    st = s["model_state_bytes_per_worker"]
    lines.append(f"  {'model state per worker':<28} {format_bytes(min(st))} - {format_bytes(max(st))}"
                 " (params + grads + optimizer)")
    peaks = s["peak_memory_per_process"]
    key = "peak_device_bytes" if "peak_device_bytes" in peaks[0] else "peak_rss_bytes"
    lines.append(f"  {'peak memory per process':<28} {format_bytes(max(p[key] for p in peaks))} ({key.replace('_bytes', '')})")
    comm = [c for c in s["comm_bytes_per_step_per_worker"] if c is not None]
    if comm:
        lines.append(f"  {'communication per step':<28} {format_bytes(min(comm))} - {format_bytes(max(comm))} per worker")
    lines.append(f"  {'wall time':<28} {s['wall_s']:.1f} s ({s['steps']} steps, {s['samples_per_s']:.0f} samples/s)")
    lines.append(f"  outputs: {out}/ (metrics.jsonl, summary.json, model.safetensors, checkpoints/)")
    lines.append("=" * 72)
    return "\n".join(lines)
