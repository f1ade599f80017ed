"""Where ``sharding="holders"`` puts each parameter, and what that worker's memory is predicted to be.

:func:`shard_groups` is the one description of the FSDP2 groups of a worker (which module is
``fully_shard``-ed over which holder set, innermost first); :mod:`subnetdp.sharded` builds them from it
and :func:`predict_sharded_worker` predicts from it, so the two cannot drift apart. With ``plan`` at
coverage 1 (every unit held by all K) the same groups and prediction are FSDP2's over the world
(each block, then the root), which is how ``subnetdp plan`` puts FSDP2 beside the sharded plan.

What a worker holds under FSDP2 sharding, in fp32:

* **state**: each parameter's shard (FSDP2 pads dim 0 to a multiple of the mesh size, so a rank keeps
  ``ceil(dim0 / holders)`` rows), its gradient's shard and the optimizer's states of the shard;
* **activations**: the subnetwork's saved bytes, as unsharded (sharding moves no activation);
* **gathered parameters** (the transient FSDP2 adds): the root group's full parameters, which FSDP2 keeps
  gathered from forward to backward, and, in backward, one block group's full parameters, its full
  gradients and the reduce-scatter's padded input (three group-sized tensors), for the largest group.
"""

from __future__ import annotations

import math

from subnetdp.optimizers import optimizer_kind
from subnetdp.options import check_sharding
from subnetdp.planning.data import Plan
from subnetdp.planning.memory import BYTES_PER_ELEMENT, plan_summary
from subnetdp.planning.profile import ActivationProfile

Holders = tuple[int, ...]

# full-size tensors of the largest group alive at once in its backward: the gathered parameters, their
# unsharded gradients and the reduce-scatter's input buffer (FSDP2's ``foreach_reduce``)
GROUP_COPIES_IN_BACKWARD = 2


def check_shardable(sharding: str, level: str, masking: str = "forward") -> None:
    """Refuse a ``sharding`` a plan cannot take: :func:`subnetdp.options.check_sharding`'s rules (forward
    masking), and ``"holders"`` only at block level (one FSDP2 parameter is sharded over one mesh, and a
    neuron-level unit is a slice of one). Local: raise it on every rank before any collective."""
    check_sharding(sharding, masking, "grads")
    if sharding == "holders" and level != "block":
        raise ValueError(f"sharding='holders' with a {level}-level plan: at neuron level the slices of one tensor "
                         "have different holder sets, and one FSDP2 parameter is sharded over one mesh; make the plan "
                         "with level='block', or use sharding='none'")


def shard_groups(plan: Plan, worker: int) -> list[tuple[str, Holders]]:
    """``(module path, holder set)`` of each FSDP2 group ``worker`` builds, innermost first, the root
    (path ``""``, over all K) last.

    In the model's block order: a transition unit's shortcut (always kept) over all K, then each block
    ``worker`` runs over its holders (a block that is not a unit, kept on every worker, over all K).
    Block level only (:func:`subnetdp.sharded.check_shardable`)."""
    world = tuple(range(plan.workers))
    units = {u.name: u for u in plan.units}
    groups: list[tuple[str, Holders]] = []
    for info in plan.blocks:  # a dropped block is skipped, or reduced to its shortcut
        unit = units.get(info.name)
        holders = plan.holders(unit) if unit is not None else world
        if info.shortcut is not None and unit is not None:
            groups.append((f"{info.name}.{info.shortcut}", world))
        if worker in holders:
            groups.append((info.name, holders))
    groups.append(("", world))
    return groups


def group_params(plan: Plan, worker: int) -> list[tuple[list[str], Holders]]:
    """Each group's parameter names (FSDP2's rule: a module's parameters that no group before it took)."""
    tmap = plan.tensor_map(worker)
    left = [n for n in plan.params if n in tmap]
    out = []
    for path, holders in shard_groups(plan, worker):
        mine = [n for n in left if not path or n.startswith(path + ".")]
        taken = set(mine)
        left = [n for n in left if n not in taken]
        out.append((mine, holders))
    return out


def _shard_elements(shape: tuple[int, ...], holders: int) -> int:
    rows = shape[0] if shape else 1
    return math.ceil(rows / holders) * math.prod(shape[1:])


def predict_sharded_worker(plan: Plan, worker: int, optimizer: str, profile: ActivationProfile | None = None,
                           batch_size: int | None = None, activation_checkpointing: bool = False) -> dict[str, int]:
    """Predicted bytes of ``worker`` under ``sharding="holders"`` (the module docstring says what counts).

    The keys of :func:`subnetdp.planning.memory.predict_worker`, plus ``gathered_bytes`` (the root's full
    parameters plus the largest block group's backward copies), which is part of ``transient_bytes``."""
    kind = optimizer_kind(optimizer)
    shapes = plan.shapes
    groups = group_params(plan, worker)
    shard = sum(_shard_elements(shapes[n], len(h)) for names, h in groups for n in names) * BYTES_PER_ELEMENT
    full = [sum(_shard_elements(shapes[n], len(h)) * len(h) for n in names) * BYTES_PER_ELEMENT
            for names, h in groups]
    out = {"param_bytes": shard, "grad_bytes": shard, "optimizer_bytes": shard * kind.state_tensors}
    out["state_bytes"] = shard * (2 + kind.state_tensors)
    out["gathered_bytes"] = full[-1] + GROUP_COPIES_IN_BACKWARD * max(full[:-1], default=0)
    if profile is not None:
        out["activation_bytes"] = profile.predict(plan, worker, batch_size, "inverted", activation_checkpointing)
        out["total_bytes"] = out["state_bytes"] + out["activation_bytes"]
        out["transient_bytes"] = (profile.transient(plan, worker, batch_size, activation_checkpointing)
                                  + out["gathered_bytes"])
        out["peak_bytes"] = max(out["total_bytes"] + out["transient_bytes"],
                                out["state_bytes"] + shard * kind.step_temporaries)
    return out


def storage_summary(plan: Plan, optimizer: str, sharding: str) -> str:
    """:func:`~subnetdp.planning.memory.plan_summary` with the state column of ``sharding``: each worker's whole
    units (``"none"``) or its shards (``"holders"``); what ``subnetdp plan`` prints and a run's ``plan.txt`` holds."""
    if sharding == "holders":
        return plan.summary([predict_sharded_worker(plan, k, optimizer)["state_bytes"] for k in range(plan.workers)],
                            f"{optimizer}, sharded over holders")
    return plan_summary(plan, optimizer)
