"""The activation profile of the full model: saved-for-backward bytes by unit, measured once.

Every saved storage is credited to the module running when it was first saved (module hooks and
:class:`~subnetdp.planning.counting.SavedTensorMeter`), and a worker's activations are predicted from
these parts (:meth:`ActivationProfile.predict`):

- block level: ``always-kept part + sum of the held blocks' parts``. A skipped block saves nothing
  and its successor saves the same-sized tensor it would have saved anyway, so the parts add up;
- neuron level: ``fixed part + sum over width groups of f_g x (the group's width-dependent part)``,
  where ``f_g = held / size`` is the fraction of group ``g``'s width the worker holds. The
  width-dependent part of a group is what is saved between the end of its first producer (the layer
  whose output width is sliced) and the end of its consumer (the layer that sums over that width),
  not counting what the producers themselves save (their inputs, which keep full width). It is
  measured twice: as the full model runs (used where ``f_g = 1``) and with the subnetwork's
  inverted-scaling hook installed at factor 1 (used where ``f_g < 1``), so that whatever that hook
  saves is counted;
- activations scale linearly with the batch (a profile taken at batch ``b0`` is multiplied by
  ``b / b0``; the per-channel statistics that batch norm saves do not scale, a negligible error);
- a transition block reduced to its shortcut (``transitions="shortcut"``) saves its shortcut's
  bytes (always counted) plus its post-add ReLU's output;
- with block checkpointing (every block the worker runs wrapped in non-reentrant
  ``torch.utils.checkpoint``), what runs outside the blocks plus each running block's input (unless an
  uncheckpointed module saved that tensor already) plus what reduced transitions save.

Backward masking's counterpart, :func:`profile_weight_grads`, measures what only each unit's weight
gradients need saved (docs/masking.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from subnetdp.init import ModelFactory, materialize
from subnetdp.planning.counting import LossFn, SavedTensorMeter, loss_of, storage_key
from subnetdp.planning.data import Plan
from subnetdp.subnet import inverted_scaling_hook
from subnetdp.units import find_blocks, find_width_groups


class _Attribution:
    """Who is running when a tensor is first saved: the innermost block (or shortcut), and the open width
    group (between its first producer's end and its consumers' end, outside the producers)."""

    def __init__(self, model: nn.Module, blocks: Sequence, groups: Sequence) -> None:
        self.stack: list[str] = []
        self.producer_depth = 0
        self.open: list[str] = []
        self.handles: list[Any] = []
        modules = dict(model.named_modules())
        watch = {}
        for b in blocks:
            watch[b.name] = f"block:{b.name}"
            if b.shortcut:
                watch[f"{b.name}.{b.shortcut}"] = f"shortcut:{b.name}"
        for path, key in watch.items():
            self._hook(modules[path], lambda key=key: self.stack.append(key), lambda key=key: self.stack.pop())
        self._pending: dict[str, set[str]] = {}
        for g in groups:
            producers = {s.tensor.rsplit(".", 1)[0] for s in g.slices if s.dim == 0}
            producers = {p for p in producers if getattr(modules[p], "weight", None) is not None
                         and modules[p].weight.dim() >= 2}
            for p in producers:
                self._hook(modules[p], self._enter_producer, lambda g=g.name: self._leave_producer(g))
            for c in g.consumers:
                self._hook(modules[c], lambda: None, lambda g=g.name, c=c: self._leave_consumer(g, c))
            self._pending[g.name] = set(g.consumers)
        self._consumers = dict(self._pending)
        self._started: set[str] = set()

    def _hook(self, module: nn.Module, pre: Callable[[], None], post: Callable[[], None]) -> None:
        def pre_hook(*_: object) -> None:
            pre()

        def post_hook(*_: object) -> None:  # returns None: a forward hook's result would replace the output
            post()

        self.handles.append(module.register_forward_pre_hook(pre_hook, prepend=True))
        self.handles.append(module.register_forward_hook(post_hook, always_call=True))

    def _enter_producer(self) -> None:
        self.producer_depth += 1

    def _leave_producer(self, group: str) -> None:
        self.producer_depth -= 1
        if group not in self._started:
            self._started.add(group)
            self._pending[group] = set(self._consumers[group])
            self.open.append(group)

    def _leave_consumer(self, group: str, consumer: str) -> None:
        if group in self.open:
            self._pending[group].discard(consumer)
            if not self._pending[group]:
                self.open.remove(group)

    def owner(self) -> tuple[str, str | None]:
        block = self.stack[-1] if self.stack else "kept"
        group = self.open[-1] if self.open and self.producer_depth == 0 else None
        return block, group

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class ActivationProfile:
    """Saved-for-backward bytes of the full model at ``batch_size``, split by unit.

    ``block_bytes[name]``: bytes first saved inside block ``name`` (its shortcut excluded);
    ``group_bytes[g]`` / ``group_bytes_scaled[g]``: width group ``g``'s width-dependent bytes as the
    full model runs / with the inverted-scaling input hooks at factor 1 (see the module docstring).
    For block checkpointing and the transient: ``block_input_bytes[name]`` (the block's input),
    ``input_saved_by_kept`` (blocks whose input an always-kept module saves anyway),
    ``block_output_bytes[name]``, ``block_largest[name]`` / ``kept_largest`` (the largest single saved
    tensor inside a block / outside every block), ``output_bytes`` (the model's output: the logits) and
    ``relu_blocks`` (blocks with a ``relu`` module, which a transition reduced to its shortcut runs).
    """

    batch_size: int
    total: int
    block_bytes: dict[str, int]
    group_bytes: dict[str, int]
    group_bytes_scaled: dict[str, int]
    shortcut_bytes: dict[str, int] = field(default_factory=dict)
    block_input_bytes: dict[str, int] = field(default_factory=dict)
    input_saved_by_kept: frozenset[str] = frozenset()
    block_output_bytes: dict[str, int] = field(default_factory=dict)
    block_largest: dict[str, int] = field(default_factory=dict)
    kept_largest: int = 0
    output_bytes: int = 0
    relu_blocks: frozenset[str] = frozenset()  # blocks with a ``relu`` module (ShortcutOnly runs it)

    def kept_bytes(self, plan: Plan) -> int:
        """Bytes that every worker saves at this batch size, at ``plan``'s level."""
        if plan.level == "block":
            return self.total - sum(self.block_bytes.get(u.name, 0) for u in plan.units)
        return self.total - sum(self.group_bytes.get(g.name, 0) for g in plan.groups)

    def _reduced_bytes(self, plan: Plan, block: str) -> int:
        """What a transition reduced to its shortcut saves besides the shortcut: its ReLU's output."""
        info = next((b for b in plan.blocks if b.name == block), None)
        return self.block_output_bytes.get(block, 0) if info and info.transition and block in self.relu_blocks else 0

    def predict(self, plan: Plan, worker: int, batch_size: int | None = None,
                neuron_scaling: str = "inverted", activation_checkpointing: bool = False) -> int:
        """Predicted activation bytes of ``worker``'s subnetwork (see the module docstring)."""
        scale = (batch_size or self.batch_size) / self.batch_size
        if activation_checkpointing:
            return round(self._checkpointed(plan, worker) * scale)
        total = self.kept_bytes(plan)
        if plan.level == "block":
            total += sum(self.block_bytes.get(u.name, 0) for u in plan.units_of(worker))
            total += sum(self._reduced_bytes(plan, b.name) for b in plan.dropped_blocks(worker) if b.transition)
        else:
            held = plan.held_per_group(worker)
            for g in plan.groups:
                f = held.get(g.name, 0) / g.size
                part = self.group_bytes if f == 1 or neuron_scaling == "none" else self.group_bytes_scaled
                total += f * part.get(g.name, 0)
        return round(total * scale)

    def _checkpointed(self, plan: Plan, worker: int) -> float:
        """Saved bytes when every block ``worker`` runs is checkpointed (at the profile's batch size).

        What is outside every block, plus each running block's input unless an uncheckpointed module
        saved that very tensor already (the stem's ReLU, or a transition reduced to its shortcut and
        ReLU), plus what such reduced transitions save (they run uncheckpointed: their input too). A neuron-level worker runs every block, each
        one's input at full width (the residual stream is never sliced).
        """
        outside = self.total - sum(self.block_bytes.values()) - sum(self.shortcut_bytes.values())
        dropped = {b.name for b in plan.dropped_blocks(worker)} if plan.level == "block" else set()
        total, carried = float(outside), False
        for b in plan.blocks:
            carried = carried or b.name in self.input_saved_by_kept
            if b.name not in dropped:
                total += 0 if carried else self.block_input_bytes.get(b.name, 0)
                carried = False  # the next block's input comes out of a checkpointed block
            elif b.transition:  # reduced to its shortcut, uncheckpointed: its first layer saves the input
                total += 0 if carried else self.block_input_bytes.get(b.name, 0)
                total += self.shortcut_bytes.get(b.name, 0) + self._reduced_bytes(plan, b.name)
                carried = b.name in self.relu_blocks
        return total

    def transient(self, plan: Plan, worker: int, batch_size: int | None = None,
                  activation_checkpointing: bool = False) -> int:
        """Bytes alive at the backward's peak on top of the saved activations and the model state.

        The loss's buffers (the gradient of the logits and of their log-softmax: two logits-sized
        tensors), or the largest gradient formed while its activation is still saved (one tensor the
        size of the largest saved one), whichever is larger; with checkpointing, a block's recompute
        (the largest running block's saved bytes) plus that block's largest gradient.
        """
        scale = (batch_size or self.batch_size) / self.batch_size
        dropped = {b.name for b in plan.dropped_blocks(worker)} if plan.level == "block" else set()
        running = [b.name for b in plan.blocks if b.name not in dropped]
        largest = max([self.kept_largest] + [self.block_largest.get(n, 0) for n in running])
        out = max(2 * self.output_bytes, largest)
        if activation_checkpointing and running:
            recompute = max(self.block_bytes.get(n, 0) + self.shortcut_bytes.get(n, 0)
                            + self.block_largest.get(n, 0) for n in running)
            out = max(out, recompute)
        return round(out * scale)


def _measure_saved(model: nn.Module, batch: Any, loss_fn: LossFn, blocks: Sequence, groups: Sequence
                   ) -> tuple[SavedTensorMeter, dict[str, Any]]:
    """The forward's saves by owner, and per block: its input/output bytes, whether a kept module saved its input."""
    attribution = _Attribution(model, blocks, groups)
    seen: dict[str, Any] = {"input": {}, "output": {}, "kept_input": set()}
    modules = dict(model.named_modules())
    handles = []
    meter = SavedTensorMeter(model, owner=attribution.owner)

    def pre(name: str) -> Callable:
        def fn(_m: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                key, nbytes = storage_key(args[0])
                seen["input"][name] = nbytes
                if meter.owner_of.get(key, (("",),))[0][0] == "kept":
                    seen["kept_input"].add(name)
        return fn

    def post(name: str) -> Callable:
        def fn(_m: nn.Module, _args: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor):
                seen["output"][name] = storage_key(out)[1]
        return fn

    for b in blocks:
        handles.append(modules[b.name].register_forward_pre_hook(pre(b.name)))
        handles.append(modules[b.name].register_forward_hook(post(b.name)))
    try:
        model.train()
        with meter:
            out = loss_fn(model, batch)
            loss = loss_of(out)
        del loss, out  # frees the graph: only the forward's saves matter
    finally:
        attribution.remove()
        for h in handles:
            h.remove()
    return meter, seen


def _output_bytes(model: nn.Module, batch: Any) -> int:
    """Bytes of the model's output for ``batch`` (the logits), without building a graph."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    with torch.no_grad():
        out = model(x)
    out = getattr(out, "logits", out)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0


def _own_copies(batch: Any) -> Any:
    """``batch`` with every tensor (in tuples, lists and dicts) cloned into a storage of its own size."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, (tuple, list)):
        return type(batch)(_own_copies(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _own_copies(v) for k, v in batch.items()}
    return batch


def profile_activations(model: nn.Module | ModelFactory, batch: Any, loss_fn: LossFn, batch_size: int,
                        *, seed: int = 0, device: torch.device | str = "cpu", blocks: Sequence | None = None,
                        groups: Sequence | None = None) -> ActivationProfile:
    """Measure the full model's saved bytes per block and per width group, once.

    ``model`` is a factory (materialised on ``device`` with ``seed``) or a real full model; ``batch``
    holds ``batch_size`` samples. ``blocks``/``groups`` default to discovery; pass a plan's
    ``plan.blocks``/``plan.groups`` when it names its units. Runs the forward twice (without and with
    the scaling hooks at factor 1) and once more without a graph, for the size of the output.
    """
    full = model if isinstance(model, nn.Module) and not _is_meta(model) else materialize(model, seed, device)
    # Saves are counted by storage: a batch that is a view of a larger one (``x[:2]`` of a loaded batch)
    # would count the whole storage as the saved input, then be scaled by batch_size / len. Own copies.
    batch = _own_copies(batch)
    if blocks is None:
        blocks = find_blocks(full)
    if groups is None:
        try:
            groups = find_width_groups(full)
        except ValueError:  # no inner widths: block level only
            groups = []
    plain, seen = _measure_saved(full, batch, loss_fn, blocks, groups)
    handles = []
    modules = dict(full.named_modules())
    for g in groups:
        for c in g.consumers:  # the subnetwork's inverted scaling, at factor 1: same values, its copies
            handles.append(modules[c].register_forward_hook(inverted_scaling_hook(1.0)))
    try:
        scaled, _ = _measure_saved(full, batch, loss_fn, blocks, groups)
    finally:
        for h in handles:
            h.remove()
    largest: dict[str, int] = {}
    for (owner, _group), nbytes in plain.owner_of.values():
        name = owner.split(":", 1)[1] if ":" in owner else "kept"
        largest[name] = max(largest.get(name, 0), nbytes)
    return ActivationProfile(
        batch_size=batch_size,
        total=plain.activation_bytes,
        block_bytes=_sum_by(plain.by_owner, 0, "block:"),
        group_bytes=_sum_by(plain.by_owner, 1, ""),
        group_bytes_scaled=_sum_by(scaled.by_owner, 1, ""),
        shortcut_bytes=_sum_by(plain.by_owner, 0, "shortcut:"),
        block_input_bytes=seen["input"],
        input_saved_by_kept=frozenset(seen["kept_input"]),
        block_output_bytes=seen["output"],
        block_largest={n: v for n, v in largest.items() if n != "kept"},
        kept_largest=largest.get("kept", 0),
        output_bytes=_output_bytes(full, batch),
        relu_blocks=frozenset(b.name for b in blocks if isinstance(getattr(modules[b.name], "relu", None), nn.Module)),
    )


def profile_sample(model: nn.Module | ModelFactory, sample: Any, loss_fn: LossFn, seed: int = 0) -> ActivationProfile:
    """:func:`profile_activations` on the CPU at ``sample``'s own size: every rank given the same sample
    measures the same profile, so plans balanced on it agree without communication."""
    n = len(sample[0]) if isinstance(sample, (tuple, list)) else len(sample)
    return profile_activations(model, sample, loss_fn, n, seed=seed, device="cpu")


def _is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters())


def _sum_by(by_owner: dict, index: int, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, nbytes in by_owner.items():
        name = key[index]
        if name is not None and name.startswith(prefix):
            out[name[len(prefix):]] = out.get(name[len(prefix):], 0) + nbytes
    return out


def _frozen_sets(plan: Plan) -> dict[str, list[str]]:
    """Per unit key (block name, or width group at neuron level): the parameters it would freeze."""
    if plan.level == "block":
        out: dict[str, list[str]] = {u.name: [] for u in plan.units}
        for name in plan.params:
            unit = plan.block_of(name)
            if unit is not None:
                out[unit.name].append(name)
        return out
    return {g.name: [s.tensor for s in g.slices if s.tensor in set(plan.params)] for g in plan.groups}


def profile_weight_grads(model: nn.Module | ModelFactory, batch: Any, loss_fn: LossFn, plan: Plan,
                         *, seed: int = 0, device: torch.device | str = "cpu") -> dict[str, int]:
    """Saved bytes that only the weight gradients of each unit need, measured on the full model.

    For each block (or width group), the full forward's saved bytes with and without that unit's
    parameters requiring gradients; the difference is what backward masking saves on a worker that
    does not hold it (inputs of linear layers and convolutions that nothing else saves). One forward
    per unit at the batch of ``batch``.
    """
    full = model if isinstance(model, nn.Module) and not _is_meta(model) else materialize(model, seed, device)
    full.train()
    params = dict(full.named_parameters())

    def saved() -> int:
        with SavedTensorMeter(full) as meter:
            loss = loss_of(loss_fn(full, batch))
        del loss
        return meter.activation_bytes

    base = saved()
    out = {}
    for key, names in _frozen_sets(plan).items():
        for n in names:
            params[n].requires_grad_(False)
        try:
            out[key] = base - saved()
        finally:
            for n in names:
                params[n].requires_grad_(True)
    return out
