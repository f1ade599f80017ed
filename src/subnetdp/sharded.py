"""``HolderShardedSDP``: SDP whose units' state FSDP2 shards over the workers that hold them.

SDP decides what a worker computes (its subnetwork); this engine decides how the state of what it
holds is stored. Each held block is one FSDP2 group (``fully_shard``) on a mesh made from its holder
set's process group, so its parameters, gradients and optimizer state are split over its holders;
the always-kept parameters (stem, head, kept transition blocks, shortcuts) are sharded over all K.
The user's loop is unchanged: ``loss.backward(); optimizer.step()`` with the optimizer over
``sdp.parameters()`` (DTensors). The math is the replicated engine's, and
:class:`subnetdp.Simulation` stays its oracle.

Reached through ``SubnetDataParallel(model, plan, sharding="holders")`` (or
``SDPOptions(sharding="holders")``): :meth:`subnetdp.SubnetDataParallel.__new__` returns this class,
so one constructor serves both storages and the replicated engine's code is untouched.

How each piece is FSDP2's, not ours:

- **Values.** The worker's subnetwork is built as the replicated engine builds it (the forward
  regime, :func:`subnetdp.build_subnetwork`: the same initial values, block checkpointing already
  applied: checkpoint, then shard, torchtitan's order). Holders' initial values are compared across
  ranks before FSDP2 keeps each holder's shard of its own copy.
- **Averaging over holders.** A block's FSDP2 group reduce-scatters its gradients over the block's
  holder mesh; it is told to sum (``set_force_sum_reduction_for_comms``, never ``ReduceOp.AVG``, as
  :func:`subnetdp.sync.divide_by_holders_` requires) and to divide by the holder count
  (``set_gradient_divide_factor(len(holders))``), so each shard holds ``sum over holders / holders``.
  The world-mesh groups divide by K, every worker being a holder.
- **Groups.** One process group per holder set, created once, in the plan's sorted order on every
  rank (as the replicated engine does); a set of one rank gets its own group and a mesh of size 1,
  so that its block is still its own FSDP2 group (FSDP2 then reduces with a copy, no collective).
  One FSDP2 group per block, never per holder set: a group spanning non-adjacent blocks would stay
  gathered across the blocks between them.
- **Order of collectives.** FSDP2's collectives on CPU (gloo) are blocking, and its default backward
  prefetch gathers *this rank's* previous group early; ranks holding different blocks would then issue
  one process group's all-gathers and reduce-scatters in different orders (a mismatch, or a deadlock
  across groups). Every FSDP2 module here is told to prefetch only itself in backward (a no-op, FSDP2's
  way to switch the default off), so each rank issues its collectives in the model's block order: a
  subsequence of one global order, which cannot deadlock.

Teardown: in torch 2.14 a group that FSDP2 resolved through its mesh (``DeviceMesh.get_group()``) stays
alive after ``dist.destroy_process_group()``, so, unlike the replicated engine's, these groups are
destroyed at interpreter shutdown, where gloo can abort a correct run; end a script with a barrier
before ``destroy_process_group()`` (measured in docs/sharding.md, "At exit").

What it cannot do: neuron level (the slices of one tensor have different holder sets, which one
FSDP2 parameter cannot express), backward masking and ``sync="params"`` (refused by
:class:`subnetdp.SDPOptions`). There are no replicas to compare, so there is no ``check_holders``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from subnetdp.assemble import assemble_state_dict
from subnetdp.buckets import Holders, build_buckets, rebind
from subnetdp.consistency import holder_slots
from subnetdp.engine import (_ENGINE_OF, _watch_optimizers, agree_on_setup, check_initial_values, into_destination,
                             rank_device, require_process_group)
from subnetdp.init import ModelFactory, structure_of
from subnetdp.masking import regime
from subnetdp.options import SDPOptions, sdp_options
from subnetdp.planning import Plan
from subnetdp.planning.shards import check_shardable, shard_groups
from subnetdp.sync import clip_gradients_, divide_by_holders_

__all__ = ["HolderShardedSDP", "fsdp_traffic", "holder_meshes", "shard_over_holders"]


def check_mixed_precision(module: nn.Module) -> None:
    """Refuse FSDP2's bf16 parameters for a model with BatchNorm: FSDP2 casts its weight and bias to bf16
    while its running statistics (buffers) stay fp32, and torch's ``batch_norm`` refuses that mix (measured
    on the CPU; not measured on a GPU). Local: raised on every rank before any collective."""
    norms = sorted({type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    if norms:
        raise ValueError(f"param_dtype='bfloat16' with {', '.join(norms)} in the model: FSDP2 would cast its weight "
                         "to bf16 while its running statistics stay fp32, which torch's batch_norm refuses; use "
                         "param_dtype='float32' (with torch.autocast) for models with BatchNorm")


def holder_meshes(plan: Plan, device_type: str) -> dict[Holders, DeviceMesh]:
    """A 1-D mesh per holder set this rank is in (the world's from the default group), each from one process
    group created once, in the plan's sorted order on every rank (every rank takes part in every ``new_group``)."""
    rank, world = dist.get_rank(), tuple(range(plan.workers))
    meshes = {world: DeviceMesh.from_group(dist.group.WORLD, device_type)}
    for h in plan.holder_sets():
        if h == world:
            continue
        group = dist.new_group(ranks=list(h))
        if rank in h:  # elsewhere new_group returns a marker, not a group
            meshes[h] = DeviceMesh.from_group(group, device_type)
    return meshes


def shard_over_holders(module: nn.Module, plan: Plan, meshes: dict[Holders, DeviceMesh],
                       mp_policy: MixedPrecisionPolicy | None = None) -> tuple[nn.Module, list[tuple[FSDPModule, int]]]:
    """``fully_shard`` this rank's subnetwork ``module`` in place, group by group as
    :func:`subnetdp.planning.shards.shard_groups` lists them: each held block over its holders' mesh (its
    shortcut, always kept, over the world's first), each kept block and then the root over the world.

    Returns the root and every FSDP2 module with its holder count, innermost first (the root last). Each
    sums its gradients and divides by its holder count, and prefetches nothing in backward (module docstring).
    ``mp_policy`` (FSDP2's mixed precision) goes to every group.
    """
    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    sharded = [(fully_shard(module.get_submodule(path), mesh=meshes[holders], **policy), len(holders))
               for path, holders in shard_groups(plan, dist.get_rank())]  # the root ("") last
    for m, holder_count in sharded:
        m.set_force_sum_reduction_for_comms(True)
        m.set_gradient_divide_factor(float(holder_count))
        m.set_modules_to_backward_prefetch([m])
    return module, sharded


def fsdp_groups(sharded: list[tuple[FSDPModule, int]]) -> list[tuple[list[nn.Parameter], int]]:
    """Each FSDP2 group's parameters and holder count: a module's parameters that no module sharded
    before it (innermost first) took, FSDP2's own rule for what ``fully_shard`` groups."""
    taken: set[int] = set()
    groups = []
    for m, holder_count in sharded:
        mine = [p for p in m.parameters() if id(p) not in taken]
        taken.update(id(p) for p in mine)
        groups.append((mine, holder_count))
    return groups


def handed_bytes(params: list[nn.Parameter], holder_count: int, gathers: int,
                 gather_element_size: int | None = None) -> int:
    """Bytes one rank hands to one FSDP2 group's collectives per step: ``gathers`` all-gathers of its padded
    shard (in ``gather_element_size`` bytes per element under mixed precision) and one reduce-scatter of the
    padded gradient (FSDP2 pads dim 0 to a multiple of the mesh size); nothing for a mesh of one, where
    FSDP2 copies instead."""
    if holder_count == 1:
        return 0
    elements = sum(math.ceil((p.shape[0] if p.dim() else 1) / holder_count) * holder_count * math.prod(p.shape[1:])
                   for p in params)
    size = params[0].element_size() if params else 4
    return gathers * elements * (gather_element_size or size) // holder_count + elements * size


def fsdp_traffic(groups: list[tuple[list[nn.Parameter], int]],
                 gather_element_size: int | None = None) -> tuple[int, float]:
    """Bytes one rank hands to FSDP2's collectives per step, and the ring traffic, over FSDP2 groups (parameters,
    holder count; the root last): each group's padded shard all-gathered in forward and again in backward (once
    for the root, which FSDP2 keeps gathered from forward to backward) and its padded gradient reduce-scattered
    (:func:`handed_bytes`); a ring moves ``(n - 1) / n`` of each gathered or scattered full buffer over ``n`` holders."""
    handed, ring = 0, 0.0
    for i, (params, n) in enumerate(groups):
        gathers = 1 if i == len(groups) - 1 else 2
        mine = handed_bytes(params, n, gathers, gather_element_size)
        full_gradient = handed_bytes(params, n, 0)  # the reduce-scatter's input
        handed += mine
        ring += (n - 1) / n * (full_gradient + (mine - full_gradient) * n)  # gathered buffers: n shards each
    return handed, ring


class HolderShardedSDP(nn.Module):
    """This rank's SDP subnetwork with each unit's state sharded over its holders by FSDP2.

    Built by ``subnetdp.SubnetDataParallel(model, plan, sharding="holders")`` (the same arguments and
    options; ``sharding`` is ``"holders"`` whatever ``options`` says). Call inside an initialised process
    group whose world size is ``plan.workers``; ``device`` is this rank's own (default: its CUDA device
    under NCCL). Train with the ordinary loop over ``sdp.parameters()``, which are FSDP2's DTensors.

    The surface follows the replicated engine where it has a meaning: :meth:`no_sync` (FSDP2's
    ``set_requires_gradient_sync``), :meth:`clip_grad_norm_` (also reached by
    :func:`subnetdp.clip_grad_norm_`), :meth:`full_state_dict`, :meth:`averaged_buffers`, ``plan``,
    ``structure``, ``device``, ``options``, ``regime``, ``rank``, ``world_size``,
    :meth:`predicted_bytes_per_sync`. Holders cannot diverge (each value exists once, split), so
    :meth:`check_holders` raises; nothing moves after an optimizer step, so ``needs_optimizer`` is False.
    :meth:`state_dict` and :meth:`load_state_dict` are made for ``torch.distributed.checkpoint``
    (``dcp.save({"model": sdp.state_dict(), "optim": get_optimizer_state_dict(sdp, opt)})``; ``get_state_dict`` and
    ``set_state_dict`` work too).
    """

    needs_optimizer = False

    def __init__(
        self,
        model: nn.Module | ModelFactory,
        plan: Plan,
        options: SDPOptions | None = None,
        *,
        device: torch.device | str | None = None,
        **overrides: object,
    ) -> None:
        super().__init__()
        require_process_group()
        options = sdp_options(options, **overrides)
        if options.sharding != "holders":
            options = dataclasses.replace(options, sharding="holders")  # checked again: refuses what FSDP2 cannot do
        check_shardable("holders", plan.level, options.masking)
        self.options = options
        self.regime = regime(options.masking)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        structure, source = structure_of(model, options.seed, options.init)
        if options.param_dtype == "bfloat16":
            check_mixed_precision(structure)  # the full model's: the same on every rank
        agree_on_setup(plan, structure, options)
        self.plan = plan
        self.device = rank_device(device)
        self.__dict__["structure"] = structure  # the full model's meta structure, kept out of the module tree
        layout = self.regime.worker(source if source is not None else model, plan, self.rank, options, self.device)
        del source
        check_initial_values(holder_slots(structure, layout, plan, self.rank, "params"),
                             holder_slots(structure, layout, plan, self.rank, "buffers"), self.device)
        meshes = holder_meshes(plan, self.device.type)
        mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                     if options.param_dtype == "bfloat16" else None)
        self.module, sharded = shard_over_holders(layout.module, plan, meshes, mp_policy)
        self._fsdp_groups = fsdp_groups(sharded)
        del sharded
        # held weakly, as the replicated engine holds its groups (FSDP2 itself keeps its own references)
        self._groups = {h: weakref.ref(m.get_group()) for h, m in meshes.items()}
        del meshes
        # BatchNorm statistics stay whole on every holder (FSDP2 shards parameters only)
        self._buffer_buckets = [b for b in build_buckets(self.module, plan, self.rank, "buffers") if b.shared]
        self._tensor_map = plan.tensor_map(self.rank)
        for p in self.module.parameters():
            _ENGINE_OF[p] = weakref.ref(self)
        _watch_optimizers()

    @property
    def sync(self) -> str:
        return self.options.sync

    # ---- the usual nn.Module surface --------------------------------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters (DTensor shards) under their full-model names, without the ``module.`` level."""
        if recurse:
            yield from self.module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's buffers (whole, as FSDP2 leaves them) under their full-model names."""
        if recurse:
            yield from self.module.named_buffers(prefix, recurse, remove_duplicate)

    def forward(self, *args: object, **kwargs: object) -> object:
        out = self.module(*args, **kwargs)
        if not torch.is_grad_enabled():
            # FSDP2 keeps the root's group gathered from forward until backward; without a backward (inference)
            # it would stay gathered, and parameters() would name whole plain tensors instead of the shards
            self.module.reshard()
        return out

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication), as ``DistributedDataParallel.no_sync``; the
        first backward after it reduces the sum. FSDP2 keeps the unsharded gradients meanwhile."""
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        parameters: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
        """Clip by the norm of the full model's averaged gradient, the same on every rank (call after
        backward). Collective. Returns the total norm as a tensor, like torch's.

        Each gradient element lives in exactly one rank's shard (FSDP2's padding is zero), so the ranks'
        local sums of ``|g|**p`` add up (all-reduce ``SUM`` over the world; ``MAX`` for ``inf``) to the
        full gradient's. torch's own function cannot combine DTensors of different meshes.
        ``parameters`` (default: all of this rank's) restricts the norm and the clip to those.
        """
        norm_type = float(norm_type)
        only = None if parameters is None else {id(p) for p in parameters}
        chosen = [p for p in self.module.parameters() if p.grad is not None and (only is None or id(p) in only)]
        inf = math.isinf(norm_type)
        local = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in chosen:
            g = p.grad.to_local().float().abs()
            if g.numel():
                local = torch.maximum(local, g.max()) if inf else local + g.pow(norm_type).sum()
        dist.all_reduce(local, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=self._group(self._world))
        total = local if inf else local.pow(1.0 / norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)}), "
                               "the same on every rank; pass error_if_nonfinite=False to clip anyway")
        clip_gradients_(chosen, float(total), max_norm)
        return total

    def predicted_bytes_per_sync(self) -> int:
        """Bytes this rank hands to collectives per training step, derived from FSDP2's groups as built: each
        group's padded shard all-gathered in forward and again in backward (once for the root, which FSDP2
        keeps gathered from forward to backward), and its padded gradient reduce-scattered over its holders.
        Counted as the replicated engine counts (the buffer handed over); under :meth:`no_sync` no reduce-scatter."""
        gathered = 2 if self.options.param_dtype == "bfloat16" else None  # bf16 all-gathers under mixed precision
        return fsdp_traffic(self._fsdp_groups, gathered)[0]

    # ---- checkpoints (torch.distributed.checkpoint) -------------------------------------------------
    @torch.no_grad()
    def state_dict(self, *args: object, destination: dict | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """This rank's state for ``torch.distributed.checkpoint``, keys without the ``module.`` level (as
        ``get_state_dict`` gives DDP's): parameters as FSDP2's DTensor shards, which DCP writes once each
        and loads back into the same plan; buffers averaged over their holders. Collective.

        Why averaged: DCP keeps one rank's copy of a plain tensor that several ranks save under one name,
        and each holder's BatchNorm statistics are its own, so ``nn.Module``'s state dict would resume
        every holder from one holder's statistics (the assembled model silently wrong). The average is
        what the full model gets, and a resume from it assembles the same model (the statistics' update
        is linear). Tensors are detached aliases (``keep_vars`` is accepted and ignored).
        """
        if args:
            raise TypeError("SubnetDataParallel.state_dict takes keyword arguments only (destination=, prefix=)")
        buffers = self.averaged_buffers()
        return into_destination({n: buffers.get(n, t).detach() for n, t in self.module.state_dict().items()},
                                destination, prefix)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True,
                        assign: bool = False) -> nn.modules.module._IncompatibleKeys:
        """Load :meth:`state_dict`'s form (as ``dcp.load`` filled it): DTensor shards into the parameters,
        the buffers into every holder's. ``assign`` is not supported (tensors are copied)."""
        if assign:
            raise ValueError("SubnetDataParallel.load_state_dict(assign=True) is not supported: values are copied")
        return self.module.load_state_dict(state_dict, strict=strict)

    def _fqn_modifiers(self) -> dict[str, str]:
        """``torch.distributed.checkpoint.state_dict``'s hook: :meth:`state_dict`'s keys omit the ``module.``
        level, so ``get_state_dict``/``set_state_dict`` see the model's own names, as for DDP."""
        return {name: "module" for name, _ in self.module.named_children()}

    # ---- groups -------------------------------------------------------------------------------------
    @property
    def _world(self) -> Holders:
        return tuple(range(self.world_size))

    def _group(self, holders: Holders) -> object:
        """The live process group of ``holders``, or a clear error once the groups were destroyed."""
        group = self._groups[holders]()
        if group is None or not dist.is_initialized():
            raise RuntimeError("SubnetDataParallel's process groups were destroyed (dist.destroy_process_group() "
                               "was called): it communicates only inside the process group it was built in")
        return group

    # ---- the full model -----------------------------------------------------------------------------
    @torch.no_grad()
    def averaged_buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the buffers, averaged over their holders; the workers' own are untouched. Collective."""
        copies = {e.name: e.tensor.detach().clone() for b in self._buffer_buckets for e in b.entries}
        for b in self._buffer_buckets:  # sorted holder sets: one global order
            flat = rebind(b, copies).gather(grads=False)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._group(b.holders))
            rebind(b, copies).scatter(divide_by_holders_(flat, b.holders), grads=False)
        return copies

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gather the full model onto rank 0 (other ranks get ``None``), buffers averaged over holders.

        Each parameter is first all-gathered over its holders' mesh (``DTensor.full_tensor``, in the model's
        order on every rank), then sent by its lowest-numbered holder. A pure read. Collective.
        """
        buffers = self.averaged_buffers()
        where: dict[str, None] = {}
        piece: dict[str, torch.Tensor] = {}
        for name, value in self.module.state_dict().items():
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            value = buffers.get(name, value)
            _, holders = self.plan.element_holders(dict(self.plan.aliases).get(name, name))
            if holders[0][0] == self.rank:
                where[name], piece[name] = None, value.detach().cpu()
        pieces = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object((where, piece), pieces, dst=0, group=self._group(self._world))
        if self.rank != 0:
            return None
        return assemble_state_dict(pieces, self.plan, self.structure)

    def check_synced_holders(self, where: str) -> None:
        """Nothing to compare (each value exists once, split over its holders): what the main job's
        checkpoint saves and resumes call on either engine."""

    @property
    def optimizer_steps(self) -> int:
        """Always 0: ``sync="params"`` is refused here, so no optimizer-step cadence is kept (the replicated
        engine's counter, which the main job saves and restores)."""
        return 0

    @optimizer_steps.setter
    def optimizer_steps(self, steps: int) -> None:
        if steps != 0:
            raise ValueError(f"optimizer_steps={steps!r}: sharding='holders' keeps no sync='params' cadence (only 0)")

    def check_holders(self, where: str = "check_holders()") -> None:
        """Not available: each value exists once, split over its holders, so there are no replicas to compare."""
        raise NotImplementedError("check_holders compares replicas of the replicated engine (sharding='none'); "
                                  "under sharding='holders' each value exists once, split over its holders")
