"""First-principles memory of an SDP worker, predicted from a plan and one activation profile, and the
memory costs that plans are balanced on.

Predicted, for a worker of a :class:`~subnetdp.planning.data.Plan`:

* model state = parameter elements x 4 bytes x (1 parameter + 1 gradient + optimizer states), the
  states from :mod:`subnetdp.optimizers` (0 for SGD without momentum, 1 for SGD with momentum, which is
  what ``sgd`` means, 2 for Adam(W); fp32 throughout);
* activations from an :class:`~subnetdp.planning.profile.ActivationProfile` of the *full* model
  (:mod:`subnetdp.planning.profile` says how its parts add up per worker);
* the peak = model state + activations + the transient of the backward (two logits-sized loss buffers or
  one gradient the size of the largest saved tensor, whichever is larger; with checkpointing, one
  block's recompute), or the optimizer step's peak if larger (Adam(W)'s foreach step forms one
  parameter-sized temporary). On a GPU the allocator also holds memory outside the step (CUDA library
  workspaces), which is not predicted.

:func:`memory_plan` balances plans on these predictions (``balance="memory"``); :func:`memory_balanced_plan`
profiles a model on a sample batch first.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from subnetdp.init import ModelFactory
from subnetdp.masking import MASKINGS
from subnetdp.optimizers import optimizer_kind
from subnetdp.planning import assign
from subnetdp.planning.counting import LossFn
from subnetdp.planning.data import Plan
from subnetdp.planning.profile import ActivationProfile, profile_sample, profile_weight_grads

BYTES_PER_ELEMENT = 4  # predictions are for fp32 parameters, gradients, optimizer state and activations


def model_state_bytes(plan: Plan, worker: int, optimizer: str, bytes_per_element: int = BYTES_PER_ELEMENT) -> int:
    """Predicted bytes of parameters + gradients + optimizer state on ``worker``."""
    return plan.param_count(worker) * bytes_per_element * (2 + optimizer_kind(optimizer).state_tensors)


def plan_summary(plan: Plan, optimizer: str) -> str:
    """:meth:`Plan.summary` with each worker's predicted model state for ``optimizer``."""
    return plan.summary([model_state_bytes(plan, k, optimizer) for k in range(plan.workers)], optimizer)


def predict_worker(plan: Plan, worker: int, optimizer: str, profile: ActivationProfile | None = None,
                   batch_size: int | None = None, neuron_scaling: str = "inverted",
                   activation_checkpointing: bool = False) -> dict[str, int]:
    """First-principles bytes of ``worker``: parameters, gradients, optimizer state, activations, peak.

    ``total_bytes`` = model state + saved activations (what the meters account); ``peak_bytes`` adds
    the transient (:meth:`ActivationProfile.transient`), or is the optimizer step's peak (state plus
    its temporaries) when that is larger. ``activation_checkpointing=True`` predicts a worker whose
    every block runs under ``torch.utils.checkpoint`` (non-reentrant), as ``subnetdp bench``'s SDP+ckpt rows run it.
    """
    kind = optimizer_kind(optimizer)
    n = plan.param_count(worker) * BYTES_PER_ELEMENT
    out = {"param_bytes": n, "grad_bytes": n, "optimizer_bytes": n * kind.state_tensors}
    out["state_bytes"] = model_state_bytes(plan, worker, optimizer)
    assert out["state_bytes"] == sum(out[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes"))
    if profile is not None:
        out["activation_bytes"] = profile.predict(plan, worker, batch_size, neuron_scaling, activation_checkpointing)
        out["total_bytes"] = out["state_bytes"] + out["activation_bytes"]
        out["transient_bytes"] = profile.transient(plan, worker, batch_size, activation_checkpointing)
        out["peak_bytes"] = max(out["total_bytes"] + out["transient_bytes"],
                                out["state_bytes"] + n * kind.step_temporaries)
    return out


def memory_cost(plan: Plan, profile: ActivationProfile, optimizer: str, batch_size: int | None = None,
                activation_checkpointing: bool = False, sharding: str = "none") -> tuple[dict[int, float], float]:
    """Each unit's predicted bytes (its model state + its saved activations) and the always-kept part's.

    Returns ``(cost per unit index, kept cost)``: what :func:`memory_plan` balances across workers.
    With checkpointing a block unit's activations are its input (the recompute is a transient).
    ``sharding="holders"``: a unit's state is split over its ``r`` holders and the kept part's over all K
    (:mod:`subnetdp.planning.shards`), so activations weigh more in the balance.
    """
    scale = (batch_size or profile.batch_size) / profile.batch_size
    per_param = BYTES_PER_ELEMENT * (2 + optimizer_kind(optimizer).state_tensors)
    unit_share, kept_share = (plan.holders_per_unit, plan.workers) if sharding == "holders" else (1, 1)
    sizes = {g.name: g.size for g in plan.groups}
    costs: dict[int, float] = {}
    for u in plan.units:
        if plan.level == "neuron":
            saved = profile.group_bytes_scaled.get(u.group, 0) / sizes[u.group]
        elif activation_checkpointing:
            saved = profile.block_input_bytes.get(u.name, 0)
        else:
            saved = profile.block_bytes.get(u.name, 0) - profile._reduced_bytes(plan, u.name)
        costs[u.index] = u.numel * per_param / unit_share + saved * scale
    if activation_checkpointing:
        kept_saved = profile.total - sum(profile.block_bytes.values()) - sum(profile.shortcut_bytes.values())
    else:
        kept_saved = profile.kept_bytes(plan)
        if plan.level == "block":  # a transition unit's reduced form saves its ReLU's output on every worker
            kept_saved += sum(profile._reduced_bytes(plan, u.name) for u in plan.units)
    return costs, plan.kept_params * per_param / kept_share + kept_saved * scale


def backward_memory_cost(plan: Plan, profile: ActivationProfile, optimizer: str, weight_grads: dict[str, int],
                         batch_size: int | None = None) -> tuple[dict[int, float], float]:
    """Backward masking's counterpart of :func:`memory_cost`: what a unit adds to each of its holders.

    Every worker holds the full parameters and the full forward's activations, so only two things
    differ between workers: the gradients and optimizer state of held units, and the saved bytes
    that only held units' weight gradients need (``weight_grads`` from :func:`profile_weight_grads`,
    at the profile's batch; a neuron-level group's share per unit).
    """
    scale = (batch_size or profile.batch_size) / profile.batch_size
    per_param = BYTES_PER_ELEMENT * (1 + optimizer_kind(optimizer).state_tensors)
    sizes = {g.name: g.size for g in plan.groups}
    costs: dict[int, float] = {}
    for u in plan.units:
        key_bytes = weight_grads.get(u.name if plan.level == "block" else u.group, 0)
        share = key_bytes if plan.level == "block" else key_bytes / sizes[u.group]
        costs[u.index] = u.numel * per_param + share * scale
    return costs, plan.kept_params * per_param


def memory_plan(model: nn.Module | ModelFactory, workers: int, coverage: float, level: str = "block",
                seed: int = 0, *, profile: ActivationProfile, optimizer: str, batch_size: int | None = None,
                activation_checkpointing: bool = False, masking: str = "forward",
                weight_grads: dict[str, int] | None = None, sharding: str = "none", **plan_kwargs: Any) -> Plan:
    """A plan balanced on predicted memory per worker (``balance="memory"``), from one activation profile.

    Same units and uniform representation as :func:`subnetdp.plan` (every unit exactly ``r``
    holders); only the slots differ, chosen so that the workers' model state plus saved activations
    (for ``optimizer`` at ``batch_size``) spread least. ``masking="backward"`` balances what differs
    between backward-masking workers (:func:`backward_memory_cost`; ``weight_grads`` from
    :func:`profile_weight_grads`, or ``{}`` to balance held state alone, as with activation
    checkpointing). ``sharding="holders"`` balances the state each worker keeps when every unit's state is
    split over its holders (:func:`memory_cost`). ``plan_kwargs`` go to :func:`subnetdp.plan`.
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking={masking!r}: choose one of {MASKINGS}")
    base = assign.plan(model, workers, coverage, level, seed, **plan_kwargs)
    if masking == "backward":
        if weight_grads is None:
            raise ValueError("memory_plan(masking='backward') needs weight_grads= (from profile_weight_grads, "
                             "or {} to balance the held gradients and optimizer state alone)")
        costs, kept = backward_memory_cost(base, profile, optimizer, weight_grads, batch_size)
    else:
        costs, kept = memory_cost(base, profile, optimizer, batch_size, activation_checkpointing, sharding)
    return assign.plan(model, workers, coverage, level, seed, cost=lambda u: costs[u.index], balance="memory",
                      kept_cost=kept, **plan_kwargs)


def memory_balanced_plan(model: nn.Module | ModelFactory, workers: int, coverage: float, level: str = "block",
                         seed: int = 0, *, sample: Any, loss_fn: LossFn, batch_size: int,
                         optimizer: str = "sgd-momentum", transitions: str = "keep",
                         activation_checkpointing: bool = False, masking: str = "forward",
                         profile: ActivationProfile | None = None,
                         weight_grads: dict[str, int] | None = None, sharding: str = "none") -> Plan:
    """The plan ``subnetdp train`` and ``subnetdp plan`` make by default (``--balance memory``; both make
    it through :func:`subnetdp.planning.job.main_job_plan`).

    :func:`subnetdp.plan` balances parameter counts; this plan balances what limits a device, the
    predicted memory per worker: model state for ``optimizer`` (a name of :mod:`subnetdp.optimizers`,
    e.g. ``"sgd-momentum"``, ``"adamw"``) plus the activations saved at ``batch_size`` samples per
    worker (under backward masking: held state plus the inputs only held units' weight gradients
    need). Same units and ``r`` holders per unit as :func:`subnetdp.plan`; only who holds which differs.

    The activations are profiled once, on the CPU, on the full model built from ``model`` under
    ``seed``: ``loss_fn(model, sample)`` on ``sample``, a small batch shaped like the training data
    (an ``(inputs, targets)`` pair of 2 samples suffices; bytes are scaled to ``batch_size``).
    Saved bytes depend on shapes only, so every rank given the same inputs gets the same plan.
    ``profile`` and ``weight_grads``, when given, were measured on ``sample`` already (to reuse
    them across several plans).
    """
    if profile is None:
        profile = profile_sample(model, sample, loss_fn, seed)
    if masking == "backward" and weight_grads is None:
        weight_grads = {}  # checkpointed blocks save their inputs anyway
        if not activation_checkpointing:
            units = assign.plan(model, workers, 1.0, level, seed, transitions=transitions)  # units do not depend on C
            weight_grads = profile_weight_grads(model, sample, loss_fn, units, seed=seed, device="cpu")
    return memory_plan(model, workers, coverage, level, seed, profile=profile, optimizer=optimizer,
                       batch_size=batch_size, transitions=transitions,
                       activation_checkpointing=activation_checkpointing, masking=masking, weight_grads=weight_grads,
                       sharding=sharding)


def backward_trainable_elements(plan: Plan, worker: int) -> int:
    """Parameter elements that require gradients on ``worker`` under backward masking.

    Block level: exactly the worker's parameters in the plan. Neuron level: every tensor with a held
    element, whole (a partly held tensor has a full-size gradient whose other slices are zeroed).
    """
    if plan.level == "block":
        return plan.param_count(worker)
    tmap = plan.tensor_map(worker)
    return sum(math.prod(plan.shapes[n]) for n in plan.params
               if n in tmap and (tmap[n] is None or len(tmap[n][1]) > 0))


def predict_backward_worker(plan: Plan, worker: int, optimizer: str, profile: ActivationProfile | None = None,
                            weight_grads: dict[str, int] | None = None,
                            batch_size: int | None = None) -> dict[str, int]:
    """Bytes of ``worker`` under backward masking: the full model's parameters, gradients and optimizer
    state of its trainable elements (:func:`backward_trainable_elements`), and the full forward's
    activations minus what only the weight gradients of the units it does not train would save
    (``weight_grads`` from :func:`profile_weight_grads`; a neuron-level group counts only when the
    worker holds none of it).
    """
    trained = backward_trainable_elements(plan, worker) * BYTES_PER_ELEMENT
    out = {"param_bytes": plan.total_params * BYTES_PER_ELEMENT, "grad_bytes": trained,
           "optimizer_bytes": trained * optimizer_kind(optimizer).state_tensors}
    out["state_bytes"] = out["param_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    if profile is not None:
        scale = (batch_size or profile.batch_size) / profile.batch_size
        if plan.level == "block":
            idle = [u.name for u in plan.units if not plan.holds(worker, u)]
        else:
            held = {u.group for u in plan.units_of(worker)}
            idle = [g.name for g in plan.groups if g.name not in held]
        spared = sum((weight_grads or {}).get(key, 0) for key in idle)
        out["activation_bytes"] = round((profile.total - spared) * scale)
        out["total_bytes"] = out["state_bytes"] + out["activation_bytes"]
    return out
