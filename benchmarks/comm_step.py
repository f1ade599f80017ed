"""Communication and step time: PyTorch DDP against SubnetDataParallel, side by side, under torchrun.

Run (CPU, gloo)::

    torchrun --standalone --nproc-per-node 4 benchmarks/comm_step.py --width 16 --out comm_step.json

For a CIFAR ResNet-18 (``subnetdp.models.resnet18(width=W)``, synthetic 32x32 inputs) at K = world
size, it measures, per rank and per training step (forward + backward + SGD step):

* the bytes handed to collectives. DDP: the gradient bytes (sum of parameter numel * 4), counted by a
  DDP communication hook over the buckets it all-reduces. SDP: ``sdp.stats.per_step_bytes``, compared
  with ``sdp.predicted_bytes_per_sync()``;
* the implied ring all-reduce traffic per rank, ``2 (n - 1) / n * bytes`` summed over collectives,
  with ``n`` the size of each collective's group (SDP's groups are holder sets of different sizes);
* the step time (median and min-max over the timed steps of all rounds; each step's time is the
  slowest rank's), the time waited on communication in SDP's sync at the end of backward
  (``sdp.stats.wait_s``), samples/s per rank, and parameters per rank.

All configurations are built once, then run in interleaved rounds (each round: every configuration,
warm-up steps then timed steps), so that machine noise hits them all alike. Rank 0 prints a markdown
table and writes JSON (``--out``).

DDP runs without its per-forward buffer broadcast by default (``forward_sync_buffers=False``, or
``broadcast_buffers=False`` on torch versions before that name) so that, like SDP (which averages BatchNorm
statistics only before evaluation and checkpoints), it communicates gradients only; pass
``--ddp-broadcast-buffers`` for DDP's default (a broadcast of every buffer before each forward).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

import subnetdp
from subnetdp.models import resnet18


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64 is the standard model)")
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--coverages", default="1,0.75,0.5", help="comma-separated SDP coverages C")
    p.add_argument("--levels", default="block,neuron", help="comma-separated SDP levels")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration per round")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all configurations")
    p.add_argument("--sdp-bucket-elements", type=int, default=None,
                   help="SDP bucket cap in elements (default: the engine's, 25 MiB of fp32 as DDP's bucket_cap_mb)")
    p.add_argument("--seed", type=int, default=0, help="plan and initialisation seed")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--ddp-broadcast-buffers", action="store_true",
                   help="DDP's default buffer broadcast before every forward (off: gradients only, like SDP)")
    p.add_argument("--pg-timeout", type=float, default=300.0, help="process-group timeout in seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    return p.parse_args(argv)


# ---- per-configuration setup -------------------------------------------------------------------------
class Runner:
    """One configuration on this rank: the wrapped model, its optimizer and its counters."""

    def __init__(self, name: str, strategy: str, model: torch.nn.Module, lr: float,
                 level: str | None = None, coverage: float | None = None) -> None:
        self.name, self.strategy, self.level, self.coverage = name, strategy, level, coverage
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.step_s: list[float] = []
        self.wait_s: list[float] = []
        self.bytes: list[int] = []
        self.calls: list[int] = []
        self.round_of_step: list[int] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()

    # counters read before and after a step; subclasses say what they are
    def counters(self) -> tuple[int, int, float, int]:  # bytes, calls, wait_s, syncs
        raise NotImplementedError

    def static(self) -> dict:
        raise NotImplementedError


class DDPRunner(Runner):
    def __init__(self, factory, seed: int, lr: float, broadcast_buffers: bool) -> None:
        module = subnetdp.materialize(factory, seed)
        sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel.__init__).parameters else "broadcast_buffers")  # renamed in newer torch
        ddp = DistributedDataParallel(module, **{sync_kw: broadcast_buffers})
        # Count what DDP actually all-reduces: every bucket passes through the hook once per backward.
        self.hook_state = {"bytes": 0, "calls": 0}

        # no annotations: DDP checks them by identity and this module has ``from __future__ import annotations``
        def counting_allreduce(state, bucket):
            buf = bucket.buffer()
            state["bytes"] += buf.numel() * buf.element_size()
            state["calls"] += 1
            return allreduce_hook(None, bucket)  # the default behaviour: average over the world

        ddp.register_comm_hook(self.hook_state, counting_allreduce)
        super().__init__("DDP", "ddp", ddp, lr)
        self.broadcast_buffers = broadcast_buffers
        self._syncs = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().step(x, y)
        self._syncs += 1

    def counters(self) -> tuple[int, int, float, int]:
        return self.hook_state["bytes"], self.hook_state["calls"], 0.0, self._syncs

    def static(self) -> dict:
        module = self.model.module
        numel = sum(p.numel() for p in module.parameters())
        grad_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        world = dist.get_world_size()
        return {
            "params": numel,
            "predicted_bytes": grad_bytes,  # DDP all-reduces every gradient element once per step
            "ring_bytes": 2 * (world - 1) / world * grad_bytes,  # all buckets are world collectives
            "group_sizes": {str(world): grad_bytes},
            "buffer_bytes": sum(b.numel() * b.element_size() for b in module.buffers()),
        }


class SDPRunner(Runner):
    def __init__(self, factory, seed: int, lr: float, level: str, coverage: float,
                 bucket_elements: int | None = None) -> None:
        world = dist.get_world_size()
        plan = subnetdp.plan(factory, world, coverage, level, seed=seed)
        kw = {} if bucket_elements is None else {"bucket_elements": bucket_elements}
        sdp = subnetdp.SubnetDataParallel(factory, plan, seed=seed, **kw)
        super().__init__(f"SDP {level} C={coverage:g}", "sdp", sdp, lr, level, coverage)
        self.plan = plan

    def counters(self) -> tuple[int, int, float, int]:
        s = self.model.stats
        return s.bytes, s.calls, s.wait_s, s.syncs

    def static(self) -> dict:
        sdp = self.model
        # NOTE: reads the private ``sdp._chunks`` (the holder-set buckets cut into collectives), which
        # is acceptable in a benchmark: it is the only place that says how big each collective's group
        # is. Each chunk is one all_reduce over the process group of ``bucket.holders``.
        ring = 0.0
        by_size: dict[str, int] = {}
        for c in sdp._chunks:
            n, b = len(c.bucket.holders), c.bucket.numel * 4
            ring += 2 * (n - 1) / n * b
            by_size[str(n)] = by_size.get(str(n), 0) + b
        return {
            "params": sum(p.numel() for p in sdp.module.parameters()),
            "predicted_bytes": sdp.predicted_bytes_per_sync(),
            "ring_bytes": ring,
            "group_sizes": by_size,
            "chunks": len(sdp._chunks),
            "holder_sets": len(self.plan.holder_sets()),
            "plan_param_count": self.plan.param_count(dist.get_rank()),
        }


# ---- the measurement ---------------------------------------------------------------------------------
def run_round(r: Runner, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int, round_index: int) -> None:
    for _ in range(warmup):
        r.step(x, y)
    for _ in range(steps):
        dist.barrier()  # every rank starts the step together, for every strategy alike
        b0, c0, w0, s0 = r.counters()
        t0 = time.perf_counter()
        r.step(x, y)
        dt = time.perf_counter() - t0
        b1, c1, w1, s1 = r.counters()
        if s1 - s0 != 1:
            raise RuntimeError(f"{r.name}: expected one gradient sync per step, saw {s1 - s0}")
        r.step_s.append(dt)
        r.wait_s.append(w1 - w0)
        r.bytes.append(b1 - b0)
        r.calls.append(c1 - c0)
        r.round_of_step.append(round_index)


def summarise(per_rank: list[dict], batch: int, world: int, total_params: int) -> list[dict]:
    """Combine the ranks' raw records into one row per configuration."""
    rows = []
    names = [c["name"] for c in per_rank[0]["configs"]]
    for i, name in enumerate(names):
        recs = [pr["configs"][i] for pr in per_rank]
        assert all(rec["name"] == name for rec in recs)
        steps = len(recs[0]["step_s"])
        # a step takes as long as its slowest rank; the communication wait is averaged over ranks
        step_max = [max(rec["step_s"][j] for rec in recs) for j in range(steps)]
        wait_mean = [statistics.fmean(rec["wait_s"][j] for rec in recs) for j in range(steps)]
        bytes_rank = [sorted(set(rec["bytes"])) for rec in recs]
        static = [rec["static"] for rec in recs]
        predicted = [s["predicted_bytes"] for s in static]
        measured = [b[0] if len(b) == 1 else None for b in bytes_rank]  # None: varied between steps
        rounds = sorted(set(recs[0]["round"]))
        row = {
            "name": name,
            "strategy": recs[0]["strategy"],
            "level": recs[0]["level"],
            "coverage": recs[0]["coverage"],
            "params_per_rank": [s["params"] for s in static],
            "param_fraction_per_rank": [s["params"] / total_params for s in static],
            "bytes_per_step_per_rank": measured,
            "bytes_seen_per_rank": bytes_rank,
            "predicted_bytes_per_rank": predicted,
            "bytes_match_prediction": measured == predicted,
            "bytes_per_step_mean": statistics.fmean(m for m in measured if m is not None) if all(
                m is not None for m in measured) else None,
            "ring_bytes_per_rank": [s["ring_bytes"] for s in static],
            "bytes_by_group_size_per_rank": [s["group_sizes"] for s in static],
            "collectives_per_step_per_rank": [sorted(set(rec["calls"])) for rec in recs],
            "step_s": {"median": statistics.median(step_max), "min": min(step_max), "max": max(step_max),
                       "per_round_median": [statistics.median(t for t, rd in zip(step_max, recs[0]["round"]) if rd == k)
                                            for k in rounds],
                       "per_step": step_max},
            "step_s_per_rank_median": [statistics.median(rec["step_s"]) for rec in recs],
            "wait_s": {"median": statistics.median(wait_mean), "min": min(wait_mean), "max": max(wait_mean),
                       "per_rank_median": [statistics.median(rec["wait_s"]) for rec in recs]},
        }
        row["samples_per_s_per_rank"] = batch / row["step_s"]["median"]
        row["samples_per_s_total"] = world * batch / row["step_s"]["median"]
        for key in ("buffer_bytes", "chunks", "holder_sets", "plan_param_count"):
            if key in static[0]:
                row[key + "_per_rank"] = [s[key] for s in static]
        rows.append(row)
    ddp = next((r for r in rows if r["strategy"] == "ddp"), None)
    for r in rows:
        if ddp is not None and ddp["bytes_per_step_mean"] and r["bytes_per_step_mean"] is not None:
            r["bytes_ratio_to_ddp"] = r["bytes_per_step_mean"] / ddp["bytes_per_step_mean"]
            r["ring_ratio_to_ddp"] = statistics.fmean(r["ring_bytes_per_rank"]) / statistics.fmean(
                ddp["ring_bytes_per_rank"])
            r["step_ratio_to_ddp"] = r["step_s"]["median"] / ddp["step_s"]["median"]
    return rows


def _mib(b: float) -> str:
    return f"{b / 2**20:.3f}"


def _range(values: list[float], fmt) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(statistics.fmean(values))} [{fmt(lo)}-{fmt(hi)}]"


def markdown(rows: list[dict]) -> str:
    head = ("| configuration | params/rank (fraction) | bytes/rank/step MiB | ratio to DDP | ring traffic/rank MiB (ratio to DDP) "
            "| step ms median [min-max] | exposed comm wait ms | samples/s/rank |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        params = _range(r["params_per_rank"], lambda v: f"{v / 1e6:.3f}M")
        frac = _range(r["param_fraction_per_rank"], lambda v: f"{v:.2f}")
        measured = [m for m in r["bytes_per_step_per_rank"] if m is not None]
        byt = _range(measured, _mib) if len(measured) == len(r["bytes_per_step_per_rank"]) else "varied"
        if not r["bytes_match_prediction"]:
            byt += " (!= prediction)"
        ratio = f"{r.get('bytes_ratio_to_ddp', float('nan')):.3f}"
        ring = _range(r["ring_bytes_per_rank"], _mib) + f" ({r.get('ring_ratio_to_ddp', float('nan')):.3f})"
        s = r["step_s"]
        step = f"{s['median'] * 1e3:.0f} [{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}]"
        wait = "n/a" if r["strategy"] == "ddp" else f"{r['wait_s']['median'] * 1e3:.1f}"
        lines.append(f"| {r['name']} | {params} ({frac}) | {byt} | {ratio} | {ring} | {step} | {wait} "
                     f"| {r['samples_per_s_per_rank']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.pg_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    factory = functools.partial(resnet18, width=args.width)
    coverages = [float(c) for c in args.coverages.split(",") if c.strip()]
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]

    # every rank builds every configuration in the same order (process groups are created in it)
    runners: list[Runner] = [DDPRunner(factory, args.seed, args.lr, args.ddp_broadcast_buffers)]
    for level in levels:
        for c in coverages:
            runners.append(SDPRunner(factory, args.seed, args.lr, level, c, args.sdp_bucket_elements))
    total_params = runners[0].static()["params"]

    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    start = time.perf_counter()
    for k in range(args.rounds):
        order = runners if k % 2 == 0 else runners[::-1]  # alternate the order: no fixed position bias
        for r in order:
            run_round(r, x, y, args.warmup, args.steps, k)
    elapsed = time.perf_counter() - start

    mine = {"rank": rank, "configs": [
        {"name": r.name, "strategy": r.strategy, "level": r.level, "coverage": r.coverage,
         "step_s": r.step_s, "wait_s": r.wait_s, "bytes": r.bytes, "calls": r.calls,
         "round": r.round_of_step, "static": r.static()} for r in runners]}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    result = None
    if rank == 0:
        rows = summarise(gathered, args.batch, world, total_params)
        meta = {
            "command": "torchrun --standalone --nproc-per-node %d benchmarks/comm_step.py %s" % (
                world, " ".join(sys.argv[1:] if argv is None else argv)),
            "world_size": world, "backend": dist.get_backend(), "model": f"resnet18(width={args.width})",
            "total_params": total_params, "batch_per_rank": args.batch, "warmup": args.warmup,
            "steps_per_round": args.steps, "rounds": args.rounds, "optimizer": f"SGD(lr={args.lr}, momentum=0.9)",
            "threads_per_rank": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "ddp_broadcast_buffers": args.ddp_broadcast_buffers,
            "sdp_bucket_elements": args.sdp_bucket_elements,
            "measured_wall_s": elapsed,
            "step_time_definition": "forward+backward+SGD step, slowest rank of each barrier-aligned step",
        }
        table = markdown(rows)
        print(f"\n{meta['model']}, {world} ranks ({dist.get_backend()}), batch {args.batch}/rank, "
              f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up each), "
              f"{os.cpu_count()} CPUs, {elapsed:.0f} s\n")
        print(table, flush=True)
        result = {"meta": meta, "rows": rows, "table": table}
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
