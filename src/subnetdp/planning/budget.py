"""A memory-budget planner: the largest coverage whose predicted per-worker peak fits a budget.

For each valid coverage ``j/K`` (largest first) and each level, a plan balanced on memory (as the main
job makes it) is predicted per worker: model state (parameters, gradients, optimizer state; from the
plan) plus predicted activations (from an :class:`~subnetdp.planning.profile.ActivationProfile` of the full
model, measured once on a small batch and scaled to the batch size) plus the backward's transient
(``predict_worker``'s ``peak_bytes``), and a plan's peak is the largest over its workers. The planner
returns the largest coverage at which some level fits; when both levels fit at that coverage it takes
block level, which the method's evidence favours (DESIGN.md section 1). Nothing fitting is an error
that names the smallest peak any plan reaches.

The prediction counts what autograd keeps and the model state; a real process also holds the
allocator's caches, temporary buffers inside kernels, and the framework's own memory, so leave a
margin (``measure_choice`` in ``measure/meters.py`` reports how close the prediction was for the chosen plan).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from subnetdp.metrics import format_bytes
from subnetdp.planning.data import LEVELS, Plan, valid_coverages
from subnetdp.planning.job import WorkloadLike, main_job_plan, profile_workload
from subnetdp.planning.memory import predict_worker
from subnetdp.planning.profile import ActivationProfile
from subnetdp.planning.shards import predict_sharded_worker
from subnetdp.options import SHARDINGS

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"6GiB"`` -> 6442450944; ``"512MiB"``, ``"1.5GB"`` (decimal), ``"4096"`` (bytes) work too."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"budget {text!r}: expected a number of bytes with an optional unit such as "
                         f"'6GiB', '512MiB', '1.5GB' or '4096'")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"budget {text!r} must be positive")
    return int(value)


@dataclass
class BudgetChoice:
    """The chosen plan, its predicted worst worker, and every candidate's predicted peak."""

    plan: Plan
    sharding: str  # "none", or "holders": train it with --sharding holders
    budget: int
    peak: int  # predicted bytes of the worst worker
    worker: int  # that worker
    optimizer: str
    batch_size: int
    profile: ActivationProfile
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        shard = (" sharding=holders (train with --sharding holders)" if self.sharding == "holders" else "")
        lines = [f"budget {format_bytes(self.budget)} per worker: level={self.plan.level} "
                 f"coverage C={self.plan.coverage:g} (r={self.plan.holders_per_unit} of K={self.plan.workers}){shard}, "
                 f"predicted peak {format_bytes(self.peak)} on worker {self.worker} "
                 f"({self.optimizer}, batch {self.batch_size})", "",
                 "| coverage | level | sharding | predicted peak (worst worker) | fits |", "|---|---|---|---|---|"]
        for c in self.candidates:
            lines.append(f"| {c['coverage']:g} | {c['level']} | {c['sharding']} | {format_bytes(c['peak'])} | "
                         f"{'yes' if c['peak'] <= self.budget else 'no'} |")
        return "\n".join(lines)


def predicted_peak(p: Plan, profile: ActivationProfile, optimizer: str, batch_size: int,
                   sharding: str = "none") -> tuple[int, int]:
    """``(bytes, worker)``: the largest predicted peak (model state + activations + transient) over ``p``'s workers."""
    predict = predict_sharded_worker if sharding == "holders" else predict_worker
    totals = [predict(p, k, optimizer, profile, batch_size)["peak_bytes"] for k in range(p.workers)]
    worker = max(range(p.workers), key=totals.__getitem__)
    return totals[worker], worker


def plan_for_budget(workload: WorkloadLike, workers: int, budget: str | int, *, optimizer: str = "adamw",
                    batch_size: int, levels: tuple[str, ...] = LEVELS, seed: int = 0,
                    profile: ActivationProfile | None = None, profile_batch: int = 2,
                    device: torch.device | str = "cpu", transitions: str = "keep",
                    shardings: tuple[str, ...] = ("none",)) -> BudgetChoice:
    """Pick the largest coverage ``j/K`` (and level) whose predicted per-worker peak fits ``budget``.

    ``budget`` is bytes or a string such as ``"6GiB"``. The full model's activations are profiled
    once on ``profile_batch`` samples on ``device`` (or give ``profile``) and scaled to ``batch_size``.
    ``transitions`` is passed to the block-level plans. ``shardings`` (``"none"``, ``"holders"``) are the
    storages considered; a sharded plan is taken only where it fits a larger coverage (module docstring).
    Raises ``ValueError`` naming the smallest achievable peak when no plan fits.
    """
    limit = parse_bytes(budget)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels {levels!r}: choose among {LEVELS}")
    if not shardings or any(sh not in SHARDINGS for sh in shardings):
        raise ValueError(f"shardings {shardings!r}: choose among {SHARDINGS}")
    if profile is None:
        profile = profile_workload(workload, seed=seed, profile_batch=profile_batch, device=device)
    candidates = []
    for c in sorted(valid_coverages(workers), reverse=True):
        for level in levels:
            for sharding in shardings if level == "block" else [sh for sh in shardings if sh == "none"]:
                try:  # the plan the main job makes for this storage
                    p, _ = main_job_plan(workload.factory, workers, c, level, seed, balance="memory",
                                         transitions=transitions, optimizer=optimizer, batch_size=batch_size,
                                         profile=profile, sharding=sharding)
                except ValueError:  # e.g. a model without inner widths at neuron level
                    continue
                peak, worker = predicted_peak(p, profile, optimizer, batch_size, sharding)
                candidates.append({"coverage": c, "level": level, "sharding": sharding, "peak": peak,
                                   "worker": worker, "plan": p})
    if not candidates:
        raise ValueError(f"{workload.name} has no maskable units at levels {levels}")
    fitting = [c for c in candidates if c["peak"] <= limit]
    if not fitting:
        best = min(candidates, key=lambda c: c["peak"])
        raise ValueError(
            f"no SDP plan of {workload.name} with K={workers} fits {format_bytes(limit)} per worker "
            f"({optimizer}, batch {batch_size}): the smallest predicted peak is {format_bytes(best['peak'])} "
            f"(level={best['level']}, coverage C={best['coverage']:g}, sharding={best['sharding']}); raise the "
            f"budget, lower the batch size or use more workers")
    top = max(c["coverage"] for c in fitting)
    at_top = [c for c in fitting if c["coverage"] == top]
    # unsharded first (fewer bytes to collectives), then block level (the method's evidence)
    chosen = min(at_top, key=lambda c: (c["sharding"] != "none", c["level"] != "block"))
    return BudgetChoice(plan=chosen["plan"], sharding=chosen["sharding"], budget=limit, peak=chosen["peak"],
                        worker=chosen["worker"], optimizer=optimizer, batch_size=batch_size, profile=profile,
                        candidates=[{k: v for k, v in c.items() if k != "plan"} for c in candidates])
