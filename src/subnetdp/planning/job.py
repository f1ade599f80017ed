"""The plan the main job makes, in one place: ``train``, ``plan --json``, ``plan --budget`` and ``bench``
all make their plans through :func:`main_job_plan`, so they cannot drift apart.

The measurements name a workload (``Workload`` in ``measure/workloads.py``); the planning side
needs only what :class:`WorkloadLike` says of it, so it reads no measurement code.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from subnetdp.init import ModelFactory
from subnetdp.masking import MASKINGS
from subnetdp.planning.assign import plan
from subnetdp.planning.counting import LossFn
from subnetdp.planning.data import JOB_BALANCES, Plan
from subnetdp.planning.memory import memory_balanced_plan, predict_backward_worker, predict_worker
from subnetdp.planning.profile import ActivationProfile, profile_activations, profile_sample, profile_weight_grads
from subnetdp.planning.shards import check_shardable, predict_sharded_worker


class WorkloadLike(Protocol):
    """What planning needs of a workload: its name, model factory, loss and synthetic batches."""

    name: str
    factory: ModelFactory
    loss_fn: LossFn

    def make_batch(self, batch_size: int, device: torch.device, seed: int) -> Any: ...


def main_job_plan(model: nn.Module | ModelFactory, workers: int, coverage: float, level: str, seed: int, *,
                  balance: str, transitions: str, optimizer: str, batch_size: int,
                  activation_checkpointing: bool = False, masking: str = "forward", sample: Any = None,
                  loss_fn: LossFn | None = None, profile: ActivationProfile | None = None,
                  weight_grads: dict[str, int] | None = None,
                  sharding: str = "none") -> tuple[Plan, ActivationProfile | None]:
    """The plan the main job makes, and the activation profile it was balanced on.

    ``balance="memory"`` (the default of ``train`` and ``plan``) is :func:`memory_balanced_plan` on
    ``sample`` with ``loss_fn``; the profile is measured on ``sample`` on the CPU unless given (with a
    profile, forward masking needs no sample; backward masking needs one for ``weight_grads`` unless given).
    ``balance="params"`` balances parameter counts and profiles nothing (the escape hatch for models
    too large to profile on the host): the profile returned is the one given, if any. ``sharding="holders"``
    balances the state a worker keeps with its units' state split over their holders (``--sharding holders``).
    """
    if balance not in JOB_BALANCES:
        raise ValueError(f"balance={balance!r}: choose {' or '.join(JOB_BALANCES)}")
    if balance == "params":
        return plan(model, workers, coverage, level, seed, transitions=transitions), profile
    if profile is None:
        profile = profile_sample(model, sample, loss_fn, seed)
    p = memory_balanced_plan(model, workers, coverage, level, seed, sample=sample, loss_fn=loss_fn,
                             batch_size=batch_size, optimizer=optimizer, transitions=transitions,
                             activation_checkpointing=activation_checkpointing, masking=masking,
                             profile=profile, weight_grads=weight_grads, sharding=sharding)
    return p, profile


def sdp_plan(w: WorkloadLike, workers: int, coverage: float, level: str, seed: int,
             profile: ActivationProfile | None, optimizer: str, batch_size: int, transitions: str, balance: str,
             activation_checkpointing: bool = False, masking: str = "forward",
             weight_grads: dict[str, int] | None = None, sharding: str = "none") -> Plan:
    """:func:`main_job_plan` for a workload: its sample is the workload's synthetic batch at the profile's
    size (``batch_size`` when no profile is given); ``weight_grads`` (backward masking, at the profile's
    batch) is measured when not given."""
    sample = None
    if balance == "memory":
        sample = w.make_batch(profile.batch_size if profile is not None else batch_size, torch.device("cpu"), seed)
    p, _ = main_job_plan(w.factory, workers, coverage, level, seed, balance=balance, transitions=transitions,
                         optimizer=optimizer, batch_size=batch_size, activation_checkpointing=activation_checkpointing,
                         masking=masking, sample=sample, loss_fn=w.loss_fn, profile=profile, weight_grads=weight_grads,
                         sharding=sharding)
    return p


def profile_workload(workload: WorkloadLike, *, seed: int = 0, profile_batch: int = 2,
                     device: torch.device | str = "cpu") -> ActivationProfile:
    """The full model's activation profile on ``profile_batch`` synthetic samples (scaled where used)."""
    batch = workload.make_batch(profile_batch, torch.device(device), seed)
    return profile_activations(workload.factory, batch, workload.loss_fn, profile_batch, seed=seed, device=device)


def backward_weight_grads(w: WorkloadLike, workers: int, level: str, seed: int, profile: ActivationProfile,
                          transitions: str = "keep") -> dict[str, int]:
    """Saved bytes only each unit's weight gradients need (:func:`profile_weight_grads`), at the profile's batch."""
    units = plan(w.factory, workers, 1.0, level, seed, transitions=transitions)  # units do not depend on coverage
    sample = w.make_batch(profile.batch_size, torch.device("cpu"), seed)
    return profile_weight_grads(w.factory, sample, w.loss_fn, units, seed=seed)


def plan_prediction(workload: WorkloadLike, workers: int, coverage: float, level: str = "block", *, optimizer: str,
                    batch_size: int, seed: int = 0, transitions: str = "keep", balance: str = "memory",
                    activation_checkpointing: bool = False, profile: ActivationProfile | None = None,
                    masking: str = "forward", sharding: str = "none") -> tuple[Plan, dict[str, Any]]:
    """A plan as the main job makes it, and its predicted bytes per worker beside DDP's and FSDP2's
    (``plan --json``).

    The DDP figure is the full model under the same optimizer, batch and checkpointing choice; FSDP2's is
    the full model sharded over all K, each block a group (:func:`~subnetdp.planning.shards.predict_sharded_worker`
    at coverage 1). ``sharding="holders"`` predicts each unit's state sharded over its holders (block level,
    forward masking).
    ``masking="backward"`` predicts backward masking (:func:`~subnetdp.planning.memory.predict_backward_worker`:
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
    check_shardable(sharding, level, masking)
    if profile is None:
        profile = profile_workload(workload, seed=seed)
    weight_grads = (backward_weight_grads(workload, workers, level, seed, profile, transitions)
                    if masking == "backward" else None)
    p = sdp_plan(workload, workers, coverage, level, seed, profile, optimizer, batch_size, transitions, balance,
                 activation_checkpointing, masking, weight_grads, sharding=sharding)
    full = plan(workload.factory, workers, 1.0, "block", seed)
    ddp = predict_worker(full, 0, optimizer, profile, batch_size, activation_checkpointing=activation_checkpointing)
    fsdp2 = max(predict_sharded_worker(full, k, optimizer, profile, batch_size, activation_checkpointing)["peak_bytes"]
                for k in range(workers))
    if masking == "backward":
        per = [predict_backward_worker(p, k, optimizer, profile, weight_grads, batch_size) for k in range(workers)]
        for w in per:  # the full forward on every worker: the full model's transient
            w["transient_bytes"] = ddp["transient_bytes"]
            w["peak_bytes"] = w["total_bytes"] + w["transient_bytes"]
    elif sharding == "holders":
        per = [predict_sharded_worker(p, k, optimizer, profile, batch_size, activation_checkpointing)
               for k in range(workers)]
    else:
        per = [predict_worker(p, k, optimizer, profile, batch_size, activation_checkpointing=activation_checkpointing)
               for k in range(workers)]
    return p, {
        "model": workload.name, "workers": workers, "coverage": coverage, "level": level, "optimizer": optimizer,
        "batch_size": batch_size, "activation_checkpointing": activation_checkpointing,
        "transitions": transitions, "balance": balance, "masking": masking, "sharding": sharding, "seed": seed,
        "peak_bytes": [w["peak_bytes"] for w in per], "ddp_peak_bytes": ddp["peak_bytes"], "fsdp2_peak_bytes": fsdp2,
        "state_bytes": [w["state_bytes"] for w in per], "activation_bytes": [w["activation_bytes"] for w in per],
        "transient_bytes": [w["transient_bytes"] for w in per],
        "param_counts": p.param_counts(), "plan_digest": p.digest(),
    }
