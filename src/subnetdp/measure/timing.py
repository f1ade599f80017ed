"""``subnetdp bench``'s timing part: communication and time per step of every configuration under torchrun.

**Communication and time per step under torchrun** (``--time-ranks N`` processes, gloo on CPU):
   all configurations built once, then run in interleaved rounds (order reversed every other round)
   so that machine noise hits them alike; each timed step starts at a barrier and its time is the
   slowest rank's. DDP runs with ``broadcast_buffers=False`` so that, like SDP, it communicates
   gradients only. Per configuration: bytes handed to collectives per step (DDP: counted by a comm hook;
   SDP: the engine's counters; FSDP2 and SDP sharded over holders, with or without checkpointing: FSDP2's
   collective calls counted, :func:`subnetdp.measure.meters.counted_fsdp2_collectives`, beside what
   :func:`fsdp2_traffic` derives from FSDP2's groups as built), the peak of live tensor bytes of a training step per rank
   (:func:`subnetdp.measure.meters.allocator_peak`; the median of :data:`PEAK_STEPS` more steps),
   the implied ring traffic
   ``2 (n - 1) / n x bytes`` per all-reduce over a group of ``n``, the step time, the *compute* time
   (the same step with communication off: ``no_sync()`` for DDP and SDP; FSDP2 has no such switch and
   is given DDP's local step, or DDP+ckpt's when checkpointed) and exposed communication = step -
   compute, samples/s.

:func:`time_part` launches ``torchrun -m subnetdp.measure.timing SPEC`` (this module is the worker:
:func:`run_worker` on every rank) and returns the JSON that rank 0 writes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
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

from subnetdp.baselines import wrap_baseline
from subnetdp.init import materialize
from subnetdp.measure.meters import allocator_peak, counted_fsdp2_collectives, state_bytes
from subnetdp.measure.tables import DEFAULT_TRANSITIONS, sdp_name
from subnetdp.measure.workloads import workload_from_spec
from subnetdp.optimizers import make_optimizer
from subnetdp.planning import profile_workload, sdp_plan
from subnetdp.sharded import fsdp_groups, fsdp_traffic
from subnetdp.supervise import PARENT_ENV, TORCHRUN, die_with_parent
from subnetdp.sync import step_traffic


_STATE_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "buffer_bytes")
# steps measured for each configuration's peak, the median kept: on the CPU the same step's peak varies by up to
# ~20% between repeats (measured: FSDP2+ckpt, ResNet-18 width 32, 4 ranks, 40.4-50.5 MiB over 12 steps, with or
# without Python's garbage collector), as the profiler's allocation events of the collectives' threads interleave
PEAK_STEPS = 3


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
        return self.hook["bytes"], 0.0  # DDP's comm hook, or FSDP2's counted collectives (run_worker)


def run_worker(spec_path: str) -> None:
    """The torchrun worker: build every configuration, run interleaved rounds, gather to rank 0."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from subnetdp.engine import SubnetDataParallel

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    w = workload_from_spec(spec["workload"])
    seed, opt_name, batch_size = spec["seed"], spec["workload"]["optimizer"], spec["workload"]["batch"]
    batch = w.make_batch(batch_size, torch.device("cpu"), 1000 + rank)

    def ddp(module: nn.Module, name: str, strategy: str) -> _Config:
        model = wrap_baseline(module, strategy, broadcast_buffers=False)
        cfg = _Config(name, strategy, model, make_optimizer(opt_name, model.parameters()),
                      checkpointing=strategy == "ddp-ckpt")

        def counting_allreduce(state, bucket):  # no annotations: DDP checks them
            state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(None, bucket)

        model.register_comm_hook(cfg.hook, counting_allreduce)
        return cfg

    stack = contextlib.ExitStack()
    fsdp2_handed = stack.enter_context(counted_fsdp2_collectives())  # FSDP2 and SDP-sharded rows: counted calls
    configs = [ddp(materialize(w.factory, seed), "DDP", "ddp"),
               ddp(materialize(w.factory, seed), "DDP+ckpt", "ddp-ckpt")]
    for suffix, ckpt in (("", False), ("+ckpt", True)):
        fsdp_model = wrap_baseline(materialize(w.factory, seed), "fsdp", checkpointing=ckpt)
        configs.append(_Config(f"FSDP2{suffix} (K={world})", "fsdp", fsdp_model,
                               make_optimizer(opt_name, fsdp_model.parameters()), checkpointing=ckpt))
        configs[-1].hook = fsdp2_handed
    profile = None
    if spec.get("balance", "params") == "memory":  # the memory part's profile: same batch, same plans
        profile = profile_workload(w, seed=seed, profile_batch=batch_size)
    for sharding in spec.get("sharding", ["none"]):
        for ckpt_mode in spec["checkpointing"]:
            for level in spec["levels"] if sharding == "none" else [lv for lv in spec["levels"] if lv == "block"]:
                for c in spec["coverages"]:
                    p = sdp_plan(w, world, c, level, seed, profile, opt_name, batch_size, spec.get("transitions", "keep"),
                                 spec.get("balance", "params"), ckpt_mode == "blocks", sharding=sharding)
                    sdp = SubnetDataParallel(w.factory, p, seed=seed, checkpointing=ckpt_mode, sharding=sharding)
                    name = sdp_name(ckpt_mode == "blocks").replace("SDP", "SDP-sharded" if sharding == "holders" else "SDP")
                    configs.append(_Config(f"{name} {level} C={c:g}", "sdp" if sharding == "none" else "sdp-sharded",
                                           sdp, make_optimizer(opt_name, sdp.parameters()), level, c, ckpt_mode == "blocks"))
                    if sharding == "holders":
                        configs[-1].hook = fsdp2_handed

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
            if cfg.strategy not in ("fsdp", "sdp-sharded"):  # FSDP2 cannot switch its all-gathers off
                for _ in range(spec["steps"]):
                    cfg.compute_s.append(timed(cfg, False))
    elapsed = time.perf_counter() - start
    batch_bytes = sum(t.numel() * t.element_size() for t in batch)
    peaks, statics = {}, {}
    gc.collect()
    _trim_heap()
    for cfg in configs:  # one more step each, under the allocator's record (after the timed ones: no profiler cost there)
        live = sum(v for k, v in state_bytes(cfg.model, cfg.opt).items() if k in _STATE_KEYS) + batch_bytes
        samples = []
        for _ in range(PEAK_STEPS):  # the CPU peak varies from step to step (see PEAK_STEPS): the median of a few
            dist.barrier()
            samples.append(allocator_peak(lambda cfg=cfg: step(cfg), live))
        median = sorted(samples, key=lambda s: s["peak_bytes"])[len(samples) // 2]
        peaks[cfg.name] = {**median, "samples": [s["peak_bytes"] for s in samples],
                           "basis": f"median of {PEAK_STEPS} steps: {median['basis']}"}
        statics[cfg.name] = _static(cfg, rank, world)
        cfg.model = cfg.opt = None  # measured: its memory goes back before the next one's (8 ranks share the host)
        gc.collect()
        _trim_heap()

    mine = []
    for cfg in configs:
        static = statics[cfg.name]
        mine.append({"name": cfg.name, "strategy": cfg.strategy, "level": cfg.level, "coverage": cfg.coverage,
                     "checkpointing": cfg.checkpointing, "step_s": cfg.step_s, "compute_s": cfg.compute_s, "bytes": cfg.bytes, "wait_s": cfg.wait_s,
                     "static": static, "peak": peaks[cfg.name]})
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        rows = _summarise_time(gathered, batch_size, world)
        Path(spec["out"]).write_text(json.dumps({"rows": rows, "elapsed_s": elapsed, "ranks": world}, indent=1))
    stack.close()
    dist.barrier()
    dist.destroy_process_group()


def _static(cfg: _Config, rank: int, world: int) -> dict[str, Any]:
    """What a configuration's traffic and size are, derived from it as built (before it is dropped)."""
    static: dict[str, Any] = {}
    if cfg.strategy == "sdp-sharded":
        handed, ring = fsdp2_traffic(cfg.model.module)
        assert handed == cfg.model.predicted_bytes_per_sync()  # the engine's own derivation, tested against FSDP2's calls
        static = {"predicted_bytes": handed, "ring_bytes": ring,
                  "params": sum(p.numel() for p in cfg.model.parameters()),
                  "local_state": state_bytes(cfg.model, cfg.opt)}
    elif cfg.strategy == "sdp":
        ring = step_traffic(cfg.model.module, cfg.model.plan, rank)["ring_bytes"]
        static = {"predicted_bytes": cfg.model.predicted_bytes_per_sync(), "ring_bytes": ring,
                  "params": sum(p.numel() for p in cfg.model.parameters())}
    else:
        pbytes = sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in cfg.model.parameters())
        full_bytes = sum(p.numel() * p.element_size() for p in cfg.model.parameters())  # DTensor numel: the full size
        if cfg.strategy == "fsdp":
            handed, ring = fsdp2_traffic(cfg.model)
            static = {"predicted_bytes": handed, "ring_bytes": ring, "params": full_bytes // 4,
                      "local_state": state_bytes(cfg.model, cfg.opt), "local_param_bytes": pbytes}
        else:
            static = {"predicted_bytes": full_bytes, "ring_bytes": 2 * (world - 1) / world * full_bytes,
                      "params": full_bytes // 4}
    return static


def _trim_heap() -> None:
    """Give freed heap back to the system (glibc's malloc_trim), so the next configuration's peak fits beside the others."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fsdp2_traffic(model: nn.Module) -> tuple[int, float]:
    """Derived bytes one rank hands to FSDP2's collectives per step, and the ring traffic
    (:func:`subnetdp.sharded.fsdp_traffic`), for a model that FSDP2 sharded (the baseline over the world, or
    SDP's holder-sharded subnetwork over each unit's holders), its groups read from the FSDP2 modules found."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)][::-1]  # innermost first, the root last
    return fsdp_traffic(fsdp_groups([(m, _mesh_size(m)) for m in modules]))


def _mesh_size(module: nn.Module) -> int:
    own = next((p for p in module.parameters() if hasattr(p, "device_mesh")), None)
    return own.device_mesh.size() if own is not None else 1


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
                   params_per_rank=[r["static"]["params"] for r in per_rank],
                   peak_bytes_per_rank=[r["peak"]["peak_bytes"] for r in per_rank], peak_basis=c0["peak"]["basis"],
                   peak_samples_per_rank=[r["peak"].get("samples") for r in per_rank])
        if row["strategy"] in ("sdp-sharded", "fsdp"):  # predicted_bytes: fsdp2_traffic, derived from the groups
            row["bytes_basis"] = "measured (FSDP2's all_gather_single and reduce_scatter_single calls counted)"
            row["local_state_per_rank"] = [r["static"]["local_state"] for r in per_rank]
        else:
            row["bytes_basis"] = "measured (comm hook)" if row["strategy"] != "sdp" else "measured (engine counters)"
        if row["strategy"] == "fsdp":
            row["compute_basis"] = (f"{'DDP+ckpt' if row['checkpointing'] else 'DDP'}'s local step "
                                    "(FSDP2 cannot switch its collectives off)")
            row["compute_s"] = None
        rows.append(row)
    ddp = next(r for r in rows if r["strategy"] == "ddp")
    ddp_ckpt = next(r for r in rows if r["strategy"] == "ddp-ckpt")
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if r["strategy"] == "sdp-sharded":  # the same subnetwork's local step, measured on the replicated engine
            twin = by_name.get(r["name"].replace("SDP-sharded", "SDP"))
            r["compute_basis"] = (f"{twin['name']}'s local step (FSDP2 cannot switch its all-gathers off)" if twin
                                  else "none measured (no replicated row of the same plan)")
            r["compute_s"] = twin["compute_s"] if twin else None
        compute = r["compute_s"] or (ddp_ckpt if r["checkpointing"] else ddp)["compute_s"]
        r["exposed_comm_s"] = r["step_s"]["median"] - compute["median"]
        r["samples_per_s_per_rank"] = batch / r["step_s"]["median"]
        r["step_ratio_to_ddp"] = r["step_s"]["median"] / ddp["step_s"]["median"]
        r["step_ratio_to_ddp_ckpt"] = r["step_s"]["median"] / ddp_ckpt["step_s"]["median"]
    return rows


def time_part(spec: dict[str, Any], ranks: int, coverages: Sequence[float], levels: Sequence[str], steps: int,
              warmup: int, rounds: int, seed: int = 0, timeout: float = 900,
              checkpointing: Sequence[str] = ("none", "blocks"), *,
              transitions: str = DEFAULT_TRANSITIONS, balance: str = "memory",
              sharding: Sequence[str] = ("none",)) -> dict[str, Any]:
    """Run :func:`run_worker` under ``torchrun --nproc-per-node ranks`` and return its JSON (SDP plans as
    :func:`sdp_plan` makes them; ``sharding`` ``"holders"`` adds SDP-sharded rows at block level)."""
    valid = [c for c in coverages if abs(c * ranks - round(c * ranks)) < 1e-9 and c < 1]
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "time.json"
        spec_path.write_text(json.dumps({"workload": spec, "levels": list(levels), "coverages": valid,
                                         "checkpointing": list(checkpointing),
                                         "steps": steps, "warmup": warmup, "rounds": rounds, "seed": seed,
                                         "transitions": transitions, "balance": balance, "out": str(out),
                                         "sharding": list(sharding)}))
        cmd = [sys.executable, "-c", TORCHRUN, "--standalone", "--nproc-per-node", str(ranks),
               "-m", "subnetdp.measure.timing", str(spec_path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", PARENT_ENV: str(os.getpid())}
        try:  # torchrun dies when killed at the limit, and its ranks with it (supervise.die_with_parent)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"--time-limit {timeout:g}: the timing part under torchrun did not finish in "
                               f"{timeout:g} s and was stopped; raise --time-limit, or lower --rounds, "
                               "--time-steps or --time-ranks (0 skips it)") from None
        if proc.returncode != 0:
            raise RuntimeError(f"timing under torchrun failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")
        result = json.loads(out.read_text())
    result["coverages"] = valid
    result["command"] = " ".join(["torchrun", "--standalone", f"--nproc-per-node {ranks}",
                                  "-m subnetdp.measure.timing", "SPEC"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m subnetdp.measure.timing SPEC``: one rank of :func:`time_part`'s torchrun job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: torchrun ... -m subnetdp.measure.timing SPEC.json (started by subnetdp bench; "
              "run subnetdp bench instead)", file=sys.stderr)
        return 2
    if os.environ.get(PARENT_ENV):  # started by time_part: end with its torchrun
        die_with_parent()
    run_worker(argv[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
