"""``SubnetDataParallel``: SDP on ``torch.distributed``, used like ``DistributedDataParallel``.

One process per worker (rank = worker). Each rank builds only its subnetwork. After backward every
gradient element is averaged over the ranks that hold it: gradients sharing a holder set are packed
into flat buckets, and each bucket is all-reduced (``SUM``, then divided by the holder count in
:func:`subnetdp.sync.divide_by_holders_`) in the process group of its holder set, launched
asynchronously as soon as its gradients are ready so that communication overlaps the rest of
backward, as DDP does. The arithmetic is :mod:`subnetdp.sync`'s; this module is the distributed part.

Deadlock freedom: buckets carry a key computed from their content only (their holder set and the
position of their first tensor), identical on every member, and each rank launches its buckets in
increasing key order. Process groups are created once, at construction, in one order on all ranks.

The engine holds its process groups weakly (the whole world as ``None``, torch's default group;
subgroups through ``weakref``), so ``dist.destroy_process_group()`` frees them even while the
engine is alive. A group kept alive past it is destroyed only at interpreter exit, and gloo's
worker threads, still releasing their last collective's tensors then, abort the process
("terminate called without an active exception") after a correct run. For the same reason this
module imports ``torch._dynamo`` at once: in torch 2.14 its first import after ``init_process_group``
(which building any optimizer triggers) takes references to the default group that
``destroy_process_group()`` never drops; imported with ``subnetdp``, before the group exists, it takes
none (measured in docs/robustness.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch._dynamo  # noqa: F401  (imported before the user's init_process_group: see below)
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from subnetdp.assemble import assemble_state_dict
from subnetdp.buckets import Bucket, Entry, rebind
from subnetdp.consistency import disagreements, divergence_error, holder_slots, local_checksums
from subnetdp.init import ModelFactory, structure_of
from subnetdp.masking import regime
from subnetdp.options import DEFAULT_BUCKET_ELEMENTS, DEFAULT_CHECK_EVERY, SDPOptions, differing, sdp_options
from subnetdp.planning import Plan
from subnetdp.state_dicts import (
    checkpointable,
    init_optimizer_state,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    tag_optimizer,
)
from subnetdp.sync import clip_gradients_, divide_by_holders_, holder_weighted_norm_part, traffic

__all__ = ["DEFAULT_BUCKET_ELEMENTS", "DEFAULT_CHECK_EVERY", "SubnetDataParallel", "agree_finite", "clip_grad_norm_"]

FIRST_BUCKET_ELEMENTS = 2**20 // 4  # DDP's first bucket: 1 MiB of fp32
_ENGINE_OF = WeakIdKeyDictionary()  # parameter -> weakref to its engine, for clip_grad_norm_


def into_destination(state: dict[str, torch.Tensor], destination: dict | None,
                     prefix: str) -> dict[str, torch.Tensor]:
    """``nn.Module.state_dict``'s ``destination``/``prefix`` contract for a state dict both engines build whole."""
    if destination is None:
        return state
    destination.update({prefix + k: v for k, v in state.items()})
    return destination


def require_process_group() -> None:
    """Fail clearly when no process group exists: both storages (replicated and sharded) need one."""
    if not dist.is_initialized():
        raise RuntimeError("SubnetDataParallel needs torch.distributed: call "
                           "torch.distributed.init_process_group() first, in every process (torchrun "
                           "only sets the environment it reads; it does not initialise the group)")


def rank_device(device: torch.device | str | None) -> torch.device:
    """``device``, or by default this rank's own: its current CUDA device under NCCL, else the CPU."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.device(device)


def architecture_digest(model: nn.Module) -> str:
    """A hash of the model's class and every tensor name and shape (meta models are fine)."""
    text = type(model).__qualname__ + ";" + ";".join(
        f"{n}:{tuple(t.shape)}" for n, t in list(model.named_parameters()) + list(model.named_buffers()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_architecture_digest(plan: Plan, class_name: str) -> str:
    text = class_name + ";" + ";".join(f"{n}:{s}" for n, s in plan.tensors)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def agree_on_setup(plan: Plan, structure: nn.Module, options: SDPOptions) -> None:
    """Every rank checks the same facts (plan, architecture, options, world size) and raises the same
    error, so nothing hangs. Collective: one ``all_gather_object``; both engines call it first."""
    world_size = dist.get_world_size()
    mine = {
        "plan": plan.digest(),
        "architecture": architecture_digest(structure),
        "plan architecture": plan_architecture_digest(plan, type(structure).__qualname__),
        "plan workers": plan.workers,
        # every option decides values or which collectives a rank issues (bucket_elements: the chunks)
        "options": options.digest(),
        "option values": options.as_dict(),
    }
    everyone: list[dict] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine)
    problems = []
    for key in ("plan", "architecture", "options"):
        values = [d[key] for d in everyone]
        if key == "options":
            values = differing([d["option values"] for d in everyone])
        if len({d[key] for d in everyone}) > 1:
            problems.append(f"ranks disagree on the {key}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))
    if any(d["architecture"] != d["plan architecture"] for d in everyone):
        bad = [r for r, d in enumerate(everyone) if d["architecture"] != d["plan architecture"]]
        problems.append(f"the model does not match the plan's architecture on ranks {bad}")
    if any(d["plan workers"] != world_size for d in everyone):
        problems.append(f"the plan is for {everyone[0]['plan workers']} workers but the world size is "
                        f"{world_size}; make the plan with workers={world_size}")
    if problems:
        raise ValueError("SubnetDataParallel setup failed on every rank: " + "; ".join(problems))


def slot_disagreements(slots: list, device: torch.device, group: object = None) -> list:
    """The slots whose holders differ: one all-gather of every rank's checksums, the same verdict on every rank."""
    mine = local_checksums(slots, device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    return disagreements(torch.stack(table), slots)


@torch.no_grad()
def check_initial_values(param_slots: list, buffer_slots: list, device: torch.device) -> None:
    """Holders must start from identical values (DDP broadcasts them; here they are compared). Collective."""
    found = slot_disagreements(param_slots + buffer_slots, device)
    if found:
        kinds = {s.name: "buffers" if s in buffer_slots else "parameters" for s, _ in found}
        bad = sorted({(kinds[s.name], s.holders) for s, _ in found})
        raise ValueError(
            "SubnetDataParallel setup failed on every rank: initial values differ between the holders "
            f"{', '.join(f'{kind} of {list(h)}' for kind, h in bad[:5])}; give a factory (seeded by seed=) or the same real model on every rank "
            "(e.g. call torch.manual_seed with one seed on every rank before building it)")


@dataclass
class CommStats:
    """What this rank handed to collectives, and how long it waited for them (since the last reset)."""

    bytes: int = 0
    calls: int = 0
    wait_s: float = 0.0
    syncs: int = 0
    per_step_bytes: list[int] = field(default_factory=list)
    broadcast_bytes: int = 0  # backward masking: the holders' new values sent after each step (in ``bytes`` too)


@dataclass
class _Chunk:
    key: tuple
    bucket: Bucket
    params: list[nn.Parameter]
    pending: int = 0
    work: object = None
    flat: torch.Tensor | None = None


def _split(bucket: Bucket, cap: int, order: dict[str, int]) -> list[tuple[tuple, Bucket]]:
    """Cut a holder-set bucket into chunks of at most ``cap`` elements, last-computed tensors first.

    As in DDP, the first chunk is small (at most ``FIRST_BUCKET_ELEMENTS``), so its all-reduce
    starts early in backward and overlaps the rest.
    """
    entries = sorted(bucket.entries, key=lambda e: -order[e.name])
    chunks: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        limit = min(cap, FIRST_BUCKET_ELEMENTS) if len(chunks) == 1 else cap
        if chunks[-1] and size + e.numel > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(e)
        size += e.numel
    return [((-order[c[0].name], bucket.holders), Bucket(bucket.holders, c)) for c in chunks]


class SubnetDataParallel(nn.Module):
    """Wrap a model (or a factory) so that this rank trains its SDP subnetwork.

    Call inside an initialised process group whose world size equals ``plan.workers``. Train with
    the ordinary loop: ``loss = criterion(sdp(x), y); loss.backward(); optimizer.step()`` where the
    optimizer is built over ``sdp.parameters()``.

    How the plan is trained is one :class:`subnetdp.SDPOptions` (``options``), or its fields as
    keywords (``SubnetDataParallel(model, plan, seed=0, masking="backward")``); every rank must give
    the same, which setup checks. ``device`` is this rank's own (default: its CUDA device under NCCL).

    ``sync="grads"`` (default) averages gradients over holders in every backward.
    ``sync="params"`` instead averages parameters after every ``sync_every`` optimizer steps
    (local-SGD style); attach the optimizer with :meth:`attach_optimizer`.

    ``checkpointing="blocks"`` recomputes each of the subnetwork's blocks in backward instead of
    keeping its activations (see :func:`subnetdp.build_subnetwork`); the math is unchanged.

    ``masking="backward"`` holds the full model on every rank and trains only the held units (see
    :mod:`subnetdp.masking`); attach the optimizer with :meth:`attach_optimizer`, so that after
    each step the holders' new values reach the other ranks.

    A factory's initial values are its own under ``torch.manual_seed(seed)`` (``init="full"``, built
    once in host memory and sliced) or module by module (``init="per-module"``, for models too large
    for host memory); see :mod:`subnetdp.init`. Setup compares the holders' initial values across
    ranks and fails on every rank if they differ. Call :func:`agree_finite` on the loss before
    backward so that a non-finite loss on one rank stops every rank with the same error.

    Holders must stay equal whatever the loop does: :meth:`check_holders` compares one checksum per
    holder set and tensor across ranks and raises the same error on every rank, naming the tensors
    and ranks. It runs every ``check_every`` training forwards (0: never; under ``sync="params"``
    every ``check_every`` parameter averages instead), in :meth:`state_dict`, :meth:`full_state_dict`
    and checkpoint saves, and in the two training forwards after a load. Clip gradients with
    :func:`subnetdp.clip_grad_norm_` (or :meth:`clip_grad_norm_`): torch's clips each rank by its
    own local norm and makes holders diverge.

    ``state_dict()`` (collective) holds this rank's tensors under their full-model names, as
    ``torch.distributed.checkpoint`` expects (neuron-level slices marked as chunks of the full
    tensor), and :meth:`optimizer_state_dict` the optimizer's state the same way: ``dcp.save({"model":
    sdp.state_dict(), "optim": sdp.optimizer_state_dict(opt)})`` round-trips at both levels and loads
    into another plan or world size.

    ``sharding="holders"`` gives a :class:`subnetdp.sharded.HolderShardedSDP` instead: each unit's
    state split over its holders by FSDP2 (see :meth:`__new__` and :mod:`subnetdp.sharded`).
    """

    def __new__(cls, *args: object, **kwargs: object) -> SubnetDataParallel:
        """``sharding="holders"`` (a keyword, or the ``options``' field) builds the sharded engine, so that one
        constructor serves both storages; anything else builds this class, whose ``__init__`` then runs.

        Python runs ``__init__`` only on an instance of this class: the sharded engine, built here in full, is not one.
        """
        options = args[2] if len(args) > 2 else kwargs.get("options")
        sharding = kwargs.get("sharding", getattr(options, "sharding", "none"))
        if cls is SubnetDataParallel and sharding == "holders":
            from subnetdp.sharded import HolderShardedSDP

            return HolderShardedSDP(*args, **kwargs)  # type: ignore[return-value]
        return super().__new__(cls)

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
        self.options = options = sdp_options(options, **overrides)
        self.regime = regime(options.masking)
        self.check_every = options.check_every
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        structure, source = structure_of(model, options.seed, options.init)  # init="full": the factory's own model, on the host
        agree_on_setup(plan, structure, options)
        self.plan = plan
        self.device = rank_device(device)
        # The full model's meta structure (for assembling), kept out of the module tree: registered as a
        # submodule it would add the full model's (meta) parameters to parameters() and state_dict().
        self.__dict__["structure"] = structure
        self._optimizer_attached = False
        layout = self.regime.worker(source if source is not None else model, plan, self.rank, options, self.device)
        del source  # the full model built for init="full" is freed here
        self.module = layout.module
        self._layout = layout
        self.stats = CommStats()
        self._groups = self._make_groups(plan)
        order = {n: i for i, (n, _) in enumerate(plan.tensors)}
        params = dict(self.module.named_parameters())
        self._all_buckets = layout.reduce
        self._broadcast = layout.broadcast
        self._chunks: list[_Chunk] = []
        for b in self._all_buckets:
            if not b.shared:
                continue  # held by this rank alone: nothing to average
            for key, piece in _split(b, options.bucket_elements, order):
                members = list({id(params[e.name]): params[e.name] for e in piece.entries}.values())
                self._chunks.append(_Chunk(key, piece, members))
        self._chunks.sort(key=lambda c: c.key)
        self._buffer_buckets = [b for b in layout.buffers if b.shared]
        self._param_slots = holder_slots(structure, layout, plan, self.rank, "params")
        check_initial_values(self._param_slots, holder_slots(structure, layout, plan, self.rank, "buffers"), self.device)
        self._chunks_of: dict[int, list[_Chunk]] = {}
        for c in self._chunks:
            for p in c.params:
                self._chunks_of.setdefault(id(p), []).append(c)
        self._enabled = True
        self._next = 0
        self._callback_queued = False
        self._step_bytes = 0
        self._optimizer_steps = 0
        self._forwards = 0
        self._initialising_state = False
        self._checks_pending = 0  # training forwards still to check after a load
        self._names = {id(p): n for n, p in params.items()}
        for p in params.values():
            _ENGINE_OF[p] = weakref.ref(self)
        _watch_optimizers()
        if options.sync == "grads":
            for p in params.values():
                if id(p) in self._chunks_of:
                    p.register_post_accumulate_grad_hook(self._on_grad_ready)

    @property
    def sync(self) -> str:
        return self.options.sync

    @property
    def needs_optimizer(self) -> bool:
        """Whether :meth:`attach_optimizer` must be called: values move after optimizer steps
        (``sync="params"``, or a regime that sends values, as backward masking does)."""
        return self.options.sync == "params" or self.regime.sends_values

    # ---- setup ------------------------------------------------------------------------------------
    def _disagreements(self, slots: list) -> list:
        """The slots whose holders differ: one all-gather of every rank's checksums, the same verdict on every rank."""
        return slot_disagreements(slots, self.device, self._group(tuple(range(self.world_size))))

    @torch.no_grad()
    def check_holders(self, where: str = "check_holders()") -> None:
        """Raise the same :class:`~subnetdp.consistency.HolderDivergenceError` (a ``RuntimeError``) on every rank if any holders of a parameter hold different
        values, naming the tensors, the ranks and the likely causes. Collective: call on every rank.

        Costs one checksum pass over this rank's parameters and one all-gather of a few thousand
        integers (measured in docs/ddp_habits.md); ``where`` says in the message what triggered it.
        """
        found = self._disagreements(self._param_slots)
        if found:
            if self.sync == "params":
                where += "; with sync='params' holders differ between parameter averages: call sdp.average_parameters() first"
            raise divergence_error(found, where)

    def _make_groups(self, plan: Plan) -> dict[tuple[int, ...], weakref.ref | None]:
        """One group per holder set of two or more ranks, held weakly (see the module docstring)."""
        groups: dict[tuple[int, ...], weakref.ref | None] = {}
        for h in plan.holder_sets():  # same order on every rank; every rank takes part in every new_group
            if len(h) == self.world_size:
                groups[h] = None  # the default group, looked up by torch at each call
            elif len(h) > 1:
                group = dist.new_group(ranks=list(h))
                if self.rank in h:  # elsewhere new_group returns a marker, not a group
                    groups[h] = weakref.ref(group)
        return groups

    def _group(self, holders: tuple[int, ...]) -> object:
        """The live process group of ``holders`` (``None``: the default group), or a clear error."""
        ref = None if len(holders) == self.world_size else self._groups[holders]
        group = ref() if ref is not None else None
        if (ref is not None and group is None) or not dist.is_initialized():
            raise RuntimeError("SubnetDataParallel's process groups were destroyed (dist.destroy_process_group() "
                               "was called): it communicates only inside the process group it was built in")
        return group

    # ---- the usual nn.Module surface --------------------------------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under their full-model names, without the ``module.`` level: the names
        :meth:`state_dict` keys them by (and ``get_state_dict`` gives DDP's)."""
        if recurse:
            yield from self.module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's buffers under their full-model names, as :meth:`named_parameters`."""
        if recurse:
            yield from self.module.named_buffers(prefix, recurse, remove_duplicate)

    def forward(self, *args: object, **kwargs: object) -> object:
        if self.regime.sends_values and not self._optimizer_attached and torch.is_grad_enabled():
            raise RuntimeError("masking='backward' needs sdp.attach_optimizer(optimizer) before training: after "
                               "each optimizer step the holders' new values must reach the other ranks")
        if torch.is_grad_enabled():
            self._reset_step()
            self._forwards += 1
            if self.sync == "grads" and self._checks_pending:
                self._checks_pending -= 1
                self.check_holders(f"training forward {self._forwards}, after a load")
            elif self.sync == "grads" and self.check_every and self._forwards % self.check_every == 0:
                self.check_holders(f"the periodic check at training forward {self._forwards}")
        return self.module(*args, **kwargs)

    def _reset_step(self) -> None:
        """Start every step clean, as DDP does: a backward that raised part-way never ran its
        end-of-backward callback, and its leftover state would otherwise skip the next step's sync."""
        self._next = 0
        self._callback_queued = False
        self._step_bytes = 0
        for c in self._chunks:
            c.pending, c.work, c.flat = 0, None, None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication), as ``DistributedDataParallel.no_sync``."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    # ---- gradient sync ----------------------------------------------------------------------------
    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._enabled:
            return
        if not self._callback_queued:
            self._callback_queued = True
            for c in self._chunks:
                c.pending = len(c.params)
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        for c in self._chunks_of[id(param)]:
            c.pending -= 1
        self._launch_ready()

    def _launch(self, c: _Chunk) -> None:
        c.flat, c.work = self._sum_async(c.bucket, grads=True)

    def _sum_async(self, bucket: Bucket, grads: bool) -> tuple[torch.Tensor, object]:
        """Start the all-reduce (``SUM``) of ``bucket``'s gradients or values in its holders' group, counted in stats."""
        flat = bucket.gather(grads=grads)
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._group(bucket.holders), async_op=True)
        self._step_bytes += flat.numel() * flat.element_size()
        self.stats.calls += 1
        return flat, work

    def _launch_ready(self) -> None:
        while self._next < len(self._chunks) and self._chunks[self._next].pending == 0:
            self._launch(self._chunks[self._next])
            self._next += 1

    def _finish_backward(self) -> None:
        start = time.perf_counter()
        while self._next < len(self._chunks):  # unused parameters: their (zero) gradients still take part
            self._launch(self._chunks[self._next])
            self._next += 1
        for c in self._chunks:
            c.work.wait()
            c.bucket.scatter(divide_by_holders_(c.flat, c.bucket.holders), grads=True)
            c.work, c.flat = None, None
        self.stats.wait_s += time.perf_counter() - start
        self._record_sync()

    def _record_sync(self) -> None:
        self.stats.bytes += self._step_bytes
        self.stats.per_step_bytes.append(self._step_bytes)
        self.stats.syncs += 1
        self._step_bytes = 0
        self._next = 0
        self._callback_queued = False

    def predicted_bytes_per_sync(self) -> int:
        """Bytes this rank hands to collectives per sync: its elements held by more than one worker.

        Under backward masking, plus the broadcast after each step: every element some rank does not hold.
        """
        return int(traffic(self._all_buckets, self._broadcast.values())["collective_bytes"])

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Backward masking: each holder set's new values go from its lowest holder to every rank.

        One broadcast per holder set over the world: every non-holder needs the values, and a
        broadcast moves each element once, where an all-reduce of zero-filled buffers would move
        it about twice and needs the zeros. Holders receive values they already have.
        """
        start = time.perf_counter()
        works = []
        for h, b in self._broadcast.items():  # same order on every rank
            flat = b.gather(grads=False)
            works.append((h, b, flat, dist.broadcast(flat, src=h[0], async_op=True)))
            nbytes = flat.numel() * flat.element_size()
            self.stats.bytes += nbytes
            self.stats.broadcast_bytes += nbytes
            if self.stats.per_step_bytes:
                self.stats.per_step_bytes[-1] += nbytes
            self.stats.calls += 1
        for h, b, flat, work in works:
            work.wait()
            if self.rank not in h:
                b.scatter(flat, grads=False)
        self.stats.wait_s += time.perf_counter() - start

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        parameters: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
        """Clip by the norm of the full model's averaged gradient, as ``torch.nn.utils.clip_grad_norm_``
        clips DDP's (call after backward). Collective. Returns the total norm as a tensor, like torch's.

        Each rank counts its gradient elements weighted by ``1 / holder count`` (for ``norm_type=inf``,
        the largest); combined over ranks that is exactly the full gradient's norm, the same on every
        rank, so the holders of a unit scale it by the same factor and stay identical. ``parameters``
        (default: all of this rank's) restricts the norm and the clip to those, as torch's does.
        """
        norm_type = float(norm_type)
        only = None if parameters is None else {id(p) for p in parameters}
        local = holder_weighted_norm_part(self._all_buckets, norm_type, self.device, only)
        inf = math.isinf(norm_type)
        dist.all_reduce(local, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
        total = local if inf else local.pow(1.0 / norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)}), "
                               "the same on every rank; pass error_if_nonfinite=False to clip anyway")
        clip_gradients_((p for p in self.module.parameters() if only is None or id(p) in only), float(total), max_norm)
        return total

    # ---- parameter averaging ----------------------------------------------------------------------
    @torch.no_grad()
    def average_parameters(self) -> None:
        """Average every parameter element over its holders now (one collective per bucket)."""
        start = time.perf_counter()
        works = [(c, *self._sum_async(c.bucket, grads=False)) for c in self._chunks]
        for c, flat, work in works:
            work.wait()
            c.bucket.scatter(divide_by_holders_(flat, c.bucket.holders), grads=False)
        self.stats.wait_s += time.perf_counter() - start
        self._record_sync()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """In ``sync="params"`` mode: average parameters after every ``sync_every`` optimizer steps.

        Under ``masking="backward"``: send the holders' new values to the other ranks after every step.
        """
        if self.regime.sends_values:
            def broadcast_after(_opt: torch.optim.Optimizer, _args: tuple, _kwargs: dict) -> None:
                if self._initialising_state:
                    return  # optimizer_state_dict's step at learning rate 0 changed nothing
                self._optimizer_steps += 1
                self.broadcast_parameters()

            optimizer.register_step_post_hook(broadcast_after)
            self._optimizer_attached = True
            return
        if self.sync != "params":
            raise ValueError("attach_optimizer is for sync='params' or masking='backward'; "
                             "gradient sync needs no optimizer hook")

        def after_step(_opt: torch.optim.Optimizer, _args: tuple, _kwargs: dict) -> None:
            if self._initialising_state:
                return
            self._optimizer_steps += 1
            if self._optimizer_steps % self.options.sync_every == 0:
                self.average_parameters()
                syncs = self._optimizer_steps // self.options.sync_every
                if self.check_every and syncs % self.check_every == 0:
                    self.check_holders(f"the periodic check after parameter average {syncs}")

        optimizer.register_step_post_hook(after_step)

    @property
    def optimizer_steps(self) -> int:
        """Steps of the attached optimizer so far: what ``sync_every`` counts. Save it with a checkpoint
        and set it on resume, so that parameter averaging keeps its cadence."""
        return self._optimizer_steps

    @optimizer_steps.setter
    def optimizer_steps(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"optimizer_steps={steps!r}: need a whole number of steps, 0 or more")
        self._optimizer_steps = steps

    @torch.no_grad()
    def average_buffers(self) -> None:
        """Average BatchNorm running statistics over their holders (before evaluation and checkpoints)."""
        for b in self._buffer_buckets:
            b.scatter(self._buffer_average(b), grads=False)

    # ---- checkpoints: this rank's state under full-model names ----------------------------------------
    def check_synced_holders(self, where: str) -> None:
        """:meth:`check_holders` where holders must agree: always under gradient sync; under
        ``sync="params"`` they differ between averages by design, so nothing is checked. Collective."""
        if self.sync == "grads":
            self.check_holders(where)

    def _tensor_map(self) -> dict[str, tuple[int, list[int]] | None]:
        """Where this rank's tensors sit in the full model (the regime's layout)."""
        return self._layout.tensor_map

    @torch.no_grad()
    def state_dict(self, *args: object, destination: dict | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """This rank's parameters and buffers under their full-model names (no ``module.`` prefix, as
        ``get_state_dict`` gives DDP's), buffers averaged over their holders. Collective: call on every rank.

        Made for ``torch.distributed.checkpoint``: a neuron-level slice is marked as chunks of the
        full tensor, so ``dcp.save`` writes each element once and ``dcp.load`` fills it back, also
        into another plan or world size. Holders are checked to agree first. Tensors are detached
        aliases of the live ones (``keep_vars`` is accepted for ``nn.Module`` compatibility and ignored).
        """
        if args:
            raise TypeError("SubnetDataParallel.state_dict takes keyword arguments only (destination=, prefix=)")
        self.check_synced_holders("state_dict()")
        buffers = self.averaged_buffers()
        return into_destination(model_state(self.module, self.plan, self._tensor_map(), buffers), destination, prefix)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True,
                        assign: bool = False) -> nn.modules.module._IncompatibleKeys:
        """Load :meth:`state_dict`'s form, or a full model's state dict (each rank takes its part).

        Collective: checks afterwards that holders agree, and again in the next two training forwards,
        where a wrong optimizer state shows. ``assign`` is not supported (tensors are copied).
        """
        if assign:
            raise ValueError("SubnetDataParallel.load_state_dict(assign=True) is not supported: values are copied")
        missing, unexpected = load_model_state(self.module, self.plan, self._tensor_map(), state_dict, strict)
        self.check_holders("load_state_dict()")
        self._checks_pending = 2
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, object]:
        """``optimizer``'s state keyed by parameter name (never by the optimizer's positional ids, which
        name different tensors on different ranks), sliced state marked as chunks as in :meth:`state_dict`.

        Save it beside the model: ``dcp.save({"model": sdp.state_dict(), "optim": sdp.optimizer_state_dict(opt)})``.
        An optimizer that has not stepped gets its state tensors first by one step at learning rate 0
        on zero gradients (as ``get_state_dict`` does), so the dict is also the template ``dcp.load`` fills.
        """
        self._initialising_state = True
        try:
            init_optimizer_state(optimizer)
        finally:
            self._initialising_state = False
        tmap = self._tensor_map()
        return optimizer_state(optimizer, self._names, lambda t, name: checkpointable(t, self.plan, tmap, name))

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, object]) -> None:
        """Load :meth:`optimizer_state_dict`'s form into ``optimizer`` (state of full-size tensors is sliced)."""
        tmap = self._tensor_map()
        load_optimizer_state(optimizer, self._names, state_dict, tmap.get)
        self._checks_pending = 2

    def _fqn_modifiers(self) -> dict[str, str]:
        """``torch.distributed.checkpoint.state_dict``'s hook: :meth:`state_dict`'s keys omit the ``module.``
        level, so ``get_state_dict``/``set_state_dict`` see the model's own names, as for DDP.

        Those functions key the optimizer state by parameter name with plain tensors, which cannot tell
        the ranks' neuron-level slices apart: there they are refused, naming the supported calls.
        """
        if any(where is not None for where in self._tensor_map().values()):  # slices of tensors
            raise RuntimeError(
                "torch.distributed.checkpoint.state_dict.get_state_dict/set_state_dict cannot checkpoint neuron-level "
                "SDP: each rank holds other slices of a tensor under one name. Use dcp.save({'model': sdp.state_dict(), "
                "'optim': sdp.optimizer_state_dict(optimizer)}) and, after dcp.load of the same dict, "
                "sdp.load_state_dict(state['model']); sdp.load_optimizer_state_dict(optimizer, state['optim'])")
        return {name: "module" for name, _ in self.module.named_children()}

    # ---- the full model -----------------------------------------------------------------------------
    @torch.no_grad()
    def averaged_buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the buffers, averaged over their holders; the workers' own buffers are untouched. Collective."""
        copies = {e.name: e.tensor.detach().clone() for b in self._buffer_buckets for e in b.entries}
        for b in self._buffer_buckets:
            rebind(b, copies).scatter(self._buffer_average(b), grads=False)
        return copies

    def _buffer_average(self, b: Bucket) -> torch.Tensor:
        """``b``'s buffer values averaged over its holders (a new flat tensor; ``b`` is untouched)."""
        flat = b.gather(grads=False)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._group(b.holders))
        return divide_by_holders_(flat, b.holders)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gather the full model onto rank 0 (other ranks get ``None``), buffers averaged over holders.

        A pure read: the workers' state is unchanged. Each element travels once, from its
        lowest-numbered holder. Collective: call on every rank. Checks first that holders agree.
        """
        self.check_synced_holders("full_state_dict()")
        state = {**self.module.state_dict(), **self.averaged_buffers()}
        where: dict[str, tuple[int, list[int]] | None] = {}
        piece: dict[str, torch.Tensor] = {}
        for name, loc in self._tensor_map().items():
            if name not in state:
                continue
            dim, holders = self._layout.value_holders(_canonical(self.plan, name))
            if dim is None:
                if holders[0][0] == self.rank:
                    where[name], piece[name] = None, state[name].cpu()
            else:
                mine = [(p, i) for p, i in enumerate(loc[1]) if holders[i][0] == self.rank]
                if mine:
                    local = torch.tensor([p for p, _ in mine], dtype=torch.long, device=state[name].device)
                    where[name] = (dim, [i for _, i in mine])
                    piece[name] = state[name].index_select(dim, local).cpu()
        pieces = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object((where, piece), pieces, dst=0)
        if self.rank != 0:
            return None
        return assemble_state_dict(pieces, self.plan, self.structure)


_TAGGED: weakref.WeakSet = weakref.WeakSet()  # optimizers whose state_dict() names its rank and plan
_WATCH: list = []  # the handle of the one global optimizer hook, once registered


def _watch_optimizers() -> None:
    """Once per process: every optimizer that steps a SubnetDataParallel's parameters gets its
    ``state_dict()`` tagged with its rank and plan (:func:`subnetdp.state_dicts.tag_optimizer`)."""
    if not _WATCH:
        _WATCH.append(register_optimizer_step_pre_hook(_tag_if_sdp))


def _tag_if_sdp(optimizer: torch.optim.Optimizer, _args: tuple, _kwargs: dict) -> None:
    if optimizer in _TAGGED:
        return
    _TAGGED.add(optimizer)
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        ref = _ENGINE_OF.get(p)
        engine = ref() if ref is not None else None
        if engine is not None:
            tag_optimizer(optimizer, engine.rank, engine.plan.digest())
            return


def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that is right for SDP: the same call, the same return value.

    For a :class:`SubnetDataParallel`'s parameters it clips by the norm of the full model's averaged
    gradient, the same on every rank (:meth:`SubnetDataParallel.clip_grad_norm_`; collective), where
    torch's would clip each rank by its own local norm and make the holders of a unit diverge. Other
    parameters go to torch's own function unchanged (``foreach`` applies to those only).
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    refs = [_ENGINE_OF.get(p) for p in params]
    engines = {id(e): e for e in (r() for r in refs if r is not None) if e is not None}
    if not engines:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    if len(engines) > 1 or any(r is None for r in refs):
        raise ValueError("clip_grad_norm_: the parameters belong to several models (or only some to a "
                         "SubnetDataParallel); clip each model's parameters in its own call")
    engine = next(iter(engines.values()))
    return engine.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite, parameters=params)


def agree_finite(loss: torch.Tensor, step: int | None = None, group: object = None) -> None:
    """Raise the same ``FloatingPointError`` on every rank when any rank's loss is not finite.

    One all-reduce of ``world size`` numbers (each rank marks its own slot), before backward, so no
    rank starts gradient collectives that another will never join. Collective: call on every rank.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flags = torch.zeros(world, device=loss.device)
    flags[rank] = float(not torch.isfinite(loss.detach()).all())
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
    if flags.any():
        bad = [r for r in range(world) if flags[r] > 0]
        at = f" at step {step}" if step is not None else ""
        raise FloatingPointError(f"non-finite loss on rank(s) {bad}{at} (every rank stops here); "
                                 "lower the learning rate (--lr), clip gradients (--grad-clip) or check the data")


def _canonical(plan: Plan, name: str) -> str:
    return dict(plan.aliases).get(name, name)
