"""A memory-budget planner: the largest coverage whose predicted per-worker peak fits a budget.

For each valid coverage ``j/K`` (largest first) and each level, a plan balanced on memory (as the main
job makes it) is predicted per worker: model state (parameters, gradients, optimizer state; from the
plan) plus predicted activations (from an :class:`~subnetdp.measure.prediction.ActivationProfile` of the full
model, measured once on a small batch and scaled to the batch size) plus the backward's transient
(``predict_worker``'s ``peak_bytes``), and a plan's peak is the largest over its workers. The planner
returns the largest coverage at which some level fits; when both levels fit at that coverage it takes
block level, which the method's evidence favours (DESIGN.md section 1). Nothing fitting is an error
that names the smallest peak any plan reaches.

The prediction counts what autograd keeps and the model state; a real process also holds the
allocator's caches, temporary buffers inside kernels, and the framework's own memory, so leave a
margin (``measure_choice`` reports how close the prediction was for the chosen plan).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from subnetdp.config import TrainConfig
from subnetdp.masking import MASKINGS
from subnetdp.measure.meters import measure_step
from subnetdp.measure.prediction import (
    ActivationProfile,
    memory_balanced_plan,
    memory_plan,
    predict_backward_worker,
    predict_worker,
    profile_activations,
    profile_weight_grads,
)
from subnetdp.measure.workloads import Workload
from subnetdp.metrics import format_bytes
from subnetdp.optimizers import make_optimizer
from subnetdp.planning import JOB_BALANCES, LEVELS, Plan, plan, valid_coverages
from subnetdp.subnet import build_subnetwork

DEFAULT_TRANSITIONS = TrainConfig.transitions  # the main job's default, measured as "SDP" by the benchmark

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
    budget: int
    peak: int  # predicted bytes of the worst worker
    worker: int  # that worker
    optimizer: str
    batch_size: int
    profile: ActivationProfile
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"budget {format_bytes(self.budget)} per worker: level={self.plan.level} "
                 f"coverage C={self.plan.coverage:g} (r={self.plan.holders_per_unit} of K={self.plan.workers}), "
                 f"predicted peak {format_bytes(self.peak)} on worker {self.worker} "
                 f"({self.optimizer}, batch {self.batch_size})", "",
                 "| coverage | level | predicted peak (worst worker) | fits |", "|---|---|---|---|"]
        for c in self.candidates:
            lines.append(f"| {c['coverage']:g} | {c['level']} | {format_bytes(c['peak'])} | "
                         f"{'yes' if c['peak'] <= self.budget else 'no'} |")
        return "\n".join(lines)


def predicted_peak(p: Plan, profile: ActivationProfile, optimizer: str, batch_size: int) -> tuple[int, int]:
    """``(bytes, worker)``: the largest predicted peak (model state + activations + transient) over ``p``'s workers."""
    totals = [predict_worker(p, k, optimizer, profile, batch_size)["peak_bytes"] for k in range(p.workers)]
    worker = max(range(p.workers), key=totals.__getitem__)
    return totals[worker], worker


def plan_for_budget(workload: Workload, workers: int, budget: str | int, *, optimizer: str = "adamw",
                    batch_size: int, levels: tuple[str, ...] = LEVELS, seed: int = 0,
                    profile: ActivationProfile | None = None, profile_batch: int = 2,
                    device: torch.device | str = "cpu", transitions: str = "keep") -> BudgetChoice:
    """Pick the largest coverage ``j/K`` (and level) whose predicted per-worker peak fits ``budget``.

    ``budget`` is bytes or a string such as ``"6GiB"``. The full model's activations are profiled
    once on ``profile_batch`` samples on ``device`` (or give ``profile``) and scaled to ``batch_size``.
    ``transitions`` is passed to the block-level plans.
    Raises ``ValueError`` naming the smallest achievable peak when no plan fits.
    """
    limit = parse_bytes(budget)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels {levels!r}: choose among {LEVELS}")
    if profile is None:
        profile = profile_workload(workload, seed=seed, profile_batch=profile_batch, device=device)
    candidates = []
    for c in sorted(valid_coverages(workers), reverse=True):
        for level in levels:
            try:  # balanced on memory, as the main job plans by default
                p = memory_plan(workload.factory, workers, c, level, seed, profile=profile, optimizer=optimizer,
                                batch_size=batch_size, transitions=transitions)
            except ValueError:  # e.g. a model without inner widths at neuron level
                continue
            peak, worker = predicted_peak(p, profile, optimizer, batch_size)
            candidates.append({"coverage": c, "level": level, "peak": peak, "worker": worker, "plan": p})
    if not candidates:
        raise ValueError(f"{workload.name} has no maskable units at levels {levels}")
    fitting = [c for c in candidates if c["peak"] <= limit]
    if not fitting:
        best = min(candidates, key=lambda c: c["peak"])
        raise ValueError(
            f"no SDP plan of {workload.name} with K={workers} fits {format_bytes(limit)} per worker "
            f"({optimizer}, batch {batch_size}): the smallest predicted peak is {format_bytes(best['peak'])} "
            f"(level={best['level']}, coverage C={best['coverage']:g}); raise the budget, lower the batch size "
            f"or use more workers")
    top = max(c["coverage"] for c in fitting)
    at_top = [c for c in fitting if c["coverage"] == top]
    chosen = next((c for c in at_top if c["level"] == "block"), at_top[0])
    return BudgetChoice(plan=chosen["plan"], budget=limit, peak=chosen["peak"], worker=chosen["worker"],
                        optimizer=optimizer, batch_size=batch_size, profile=profile,
                        candidates=[{k: v for k, v in c.items() if k != "plan"} for c in candidates])


def measure_choice(choice: BudgetChoice, workload: Workload, *, seed: int = 0,
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


def profile_workload(workload: Workload, *, seed: int = 0, profile_batch: int = 2,
                     device: torch.device | str = "cpu") -> ActivationProfile:
    """The full model's activation profile on ``profile_batch`` synthetic samples (scaled where used)."""
    batch = workload.make_batch(profile_batch, torch.device(device), seed)
    return profile_activations(workload.factory, batch, workload.loss_fn, profile_batch, seed=seed, device=device)


def plan_prediction(workload: Workload, workers: int, coverage: float, level: str = "block", *, optimizer: str,
                    batch_size: int, seed: int = 0, transitions: str = "keep", balance: str = "memory",
                    activation_checkpointing: bool = False, profile: ActivationProfile | None = None,
                    masking: str = "forward") -> tuple[Plan, dict[str, Any]]:
    """A plan as the main job makes it, and its predicted bytes per worker beside DDP's (``plan --json``).

    The DDP figure is the full model under the same optimizer, batch and checkpointing choice.
    ``masking="backward"`` predicts backward masking (:func:`subnetdp.measure.prediction.predict_backward_worker`:
    full parameters, held gradients and optimizer state, the full forward's activations less what only
    the weight gradients of units not held would save); its transient is taken as the full model's.
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking={masking!r}: choose one of {MASKINGS}")
    if masking == "backward" and activation_checkpointing:
        raise ValueError("the prediction does not model backward masking with activation checkpointing; "
                         "predict one of them (drop --activation-checkpointing or --masking backward)")
    if balance not in JOB_BALANCES:
        raise ValueError(f"balance={balance!r}: choose {' or '.join(JOB_BALANCES)}")
    if profile is None:
        profile = profile_workload(workload, seed=seed)
    weight_grads = (backward_weight_grads(workload, workers, level, seed, profile, transitions)
                    if masking == "backward" else None)
    p = sdp_plan(workload, workers, coverage, level, seed, profile, optimizer, batch_size, transitions, balance,
                 activation_checkpointing, masking, weight_grads)
    ddp = predict_worker(plan(workload.factory, workers, 1.0, "block", seed), 0, optimizer, profile, batch_size,
                         activation_checkpointing=activation_checkpointing)
    if masking == "backward":
        per = [predict_backward_worker(p, k, optimizer, profile, weight_grads, batch_size) for k in range(workers)]
        for w in per:  # the full forward on every worker: the full model's transient
            w["transient_bytes"] = ddp["transient_bytes"]
            w["peak_bytes"] = w["total_bytes"] + w["transient_bytes"]
    else:
        per = [predict_worker(p, k, optimizer, profile, batch_size, activation_checkpointing=activation_checkpointing)
               for k in range(workers)]
    return p, {
        "model": workload.name, "workers": workers, "coverage": coverage, "level": level, "optimizer": optimizer,
        "batch_size": batch_size, "activation_checkpointing": activation_checkpointing,
        "transitions": transitions, "balance": balance, "masking": masking, "seed": seed,
        "peak_bytes": [w["peak_bytes"] for w in per], "ddp_peak_bytes": ddp["peak_bytes"],
        "state_bytes": [w["state_bytes"] for w in per], "activation_bytes": [w["activation_bytes"] for w in per],
        "transient_bytes": [w["transient_bytes"] for w in per],
        "param_counts": p.param_counts(), "plan_digest": p.digest(),
    }


def sdp_plan(w: Workload, workers: int, coverage: float, level: str, seed: int, profile: ActivationProfile | None,
             optimizer: str, batch_size: int, transitions: str, balance: str,
             activation_checkpointing: bool = False, masking: str = "forward",
             weight_grads: dict[str, int] | None = None) -> Plan:
    """The plan the main job would make for a workload (the benchmark, ``plan --json`` and ``train`` make it
    with :func:`~subnetdp.measure.prediction.memory_balanced_plan`, or :func:`subnetdp.plan` for ``balance="params"``).

    The sample is the workload's synthetic batch at the profile's size (``batch_size`` when ``profile`` is
    not given); ``weight_grads`` (backward masking, at the profile's batch) is measured when not given.
    """
    if balance == "memory":
        sample = w.make_batch(profile.batch_size if profile is not None else batch_size, torch.device("cpu"), seed)
        return memory_balanced_plan(w.factory, workers, coverage, level, seed, sample=sample, loss_fn=w.loss_fn,
                                    batch_size=batch_size, optimizer=optimizer, transitions=transitions,
                                    activation_checkpointing=activation_checkpointing, masking=masking,
                                    profile=profile, weight_grads=weight_grads)
    return plan(w.factory, workers, coverage, level, seed, transitions=transitions)


def backward_weight_grads(w: Workload, workers: int, level: str, seed: int, profile: ActivationProfile,
                          transitions: str = "keep") -> dict[str, int]:
    """Saved bytes only each unit's weight gradients need (:func:`profile_weight_grads`), at the profile's batch."""
    units = plan(w.factory, workers, 1.0, level, seed, transitions=transitions)  # units do not depend on coverage
    sample = w.make_batch(profile.batch_size, torch.device("cpu"), seed)
    return profile_weight_grads(w.factory, sample, w.loss_fn, units, seed=seed)
