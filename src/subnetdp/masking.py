"""Masking regimes: what a worker holds, trains and sends, decided once for both engines.

The two regimes (docs/masking.md):

- ``"forward"`` (the default): units a worker does not hold are absent from its model (forward
  and backward); see :mod:`subnetdp.subnet`.
- ``"backward"``: every worker holds every parameter and runs the full model's forward. Only the
  parameters of its held units require gradients, so autograd computes no weight gradient (and
  saves no input that only a weight gradient would need) for the rest, and the optimizer, which
  skips parameters without a gradient, keeps no state for them. Held gradients are averaged over
  their holders (sum / holder count), exactly as in forward masking. After the optimizer step,
  the new values of each holder set's elements go from its lowest-numbered holder to every worker
  (one broadcast per holder set over the world), so all workers again hold identical full models.

A tensor that is only partly held (neuron level: a layer whose rows are split among units) must
require a gradient as a whole under backward masking; a gradient hook zeroes its non-held slices,
so they are neither averaged nor trusted (their values are overwritten by the broadcast). Its
gradient and optimizer state are full-size: the memory saving of backward masking is per whole tensor.

A :class:`Regime` builds a worker's model and its :class:`Layout`: where its tensors sit in the full
model, the holder-set buckets it averages, the buckets it sends after each step, its buffer buckets
and who holds each value. :class:`subnetdp.SubnetDataParallel` and :class:`subnetdp.Simulation` use
the layout as it is, without asking which regime made it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from subnetdp.checkpointing import checkpoint_blocks
from subnetdp.buckets import Bucket, Entry, Holders, build_buckets, layout_buckets, sync_tensors
from subnetdp.init import ModelFactory, materialize_, structure_of
from subnetdp.options import MASKINGS, SDPOptions, sdp_options
from subnetdp.planning import Plan
from subnetdp.subnet import build_subnetwork, check_architecture

TensorMap = dict[str, "tuple[int, list[int]] | None"]
ValueHolders = Callable[[str], "tuple[int | None, list[Holders]]"]


@dataclass
class Layout:
    """One worker's model and what it holds and sends, in the terms both engines use.

    - ``tensor_map``: where each of its tensors sits in the full model (``None``: the whole tensor,
      else ``(dim, full indices)``), as :meth:`subnetdp.Plan.tensor_map` gives it;
    - ``reduce``: one bucket per holder set it belongs to, over the tensors whose gradients (or, under
      ``sync="params"``, values) it averages with that set; a set of one needs no collective;
    - ``broadcast``: per holder set, values that go from the set's lowest worker to every worker after
      each optimizer step (empty when every worker trains what it holds);
    - ``buffers``: its float buffers, one bucket per holder set, averaged before evaluation and checkpoints;
    - ``value_holders(name)``: who holds equal values of each element of a tensor, as
      :meth:`subnetdp.Plan.element_holders` answers (``(None, [holders])`` for a whole tensor): what
      the holder-agreement check compares and what the full model is assembled from.
    """

    module: nn.Module
    tensor_map: TensorMap
    reduce: list[Bucket]
    broadcast: dict[Holders, Bucket]
    buffers: list[Bucket]
    value_holders: ValueHolders


class Regime:
    """A masking regime: builds a worker's model and lays it out (:class:`Layout`).

    ``sends_values``: after each optimizer step values go to workers that do not train them, so the
    distributed engine needs the optimizer attached. ``partial_forward``: each worker runs only its
    subnetwork's forward, so an assembled model trained at ``C<1`` needs the evaluation conventions.
    """

    name: ClassVar[str]
    sends_values: ClassVar[bool] = False
    partial_forward: ClassVar[bool] = True

    def build(self, model: nn.Module | ModelFactory, plan: Plan, worker: int, options: SDPOptions,
              device: torch.device | str) -> nn.Module:
        raise NotImplementedError

    def layout(self, module: nn.Module, plan: Plan, worker: int) -> Layout:
        raise NotImplementedError

    def worker(self, model: nn.Module | ModelFactory, plan: Plan, worker: int, options: SDPOptions,
               device: torch.device | str) -> Layout:
        """``worker``'s model built from ``model`` (a factory, meta or real model) and laid out."""
        return self.layout(self.build(model, plan, worker, options, device), plan, worker)


class ForwardMasking(Regime):
    """Units a worker does not hold are absent: its model is its subnetwork (:func:`subnetdp.build_subnetwork`)."""

    name = "forward"

    def build(self, model: nn.Module | ModelFactory, plan: Plan, worker: int, options: SDPOptions,
              device: torch.device | str) -> nn.Module:
        return build_subnetwork(model, plan, worker, options, device=device)

    def layout(self, module: nn.Module, plan: Plan, worker: int) -> Layout:
        return Layout(module, plan.tensor_map(worker), build_buckets(module, plan, worker), {},
                      build_buckets(module, plan, worker, "buffers"), plan.element_holders)


class BackwardMasking(Regime):
    """The full model on every worker, trained only where it holds (:func:`build_backward_worker`);
    after each step the holders' new values go to every other worker, so every value is everyone's."""

    name = "backward"
    sends_values = True
    partial_forward = False

    def build(self, model: nn.Module | ModelFactory, plan: Plan, worker: int, options: SDPOptions,
              device: torch.device | str) -> nn.Module:
        return build_backward_worker(model, plan, worker, options, device=device)

    def layout(self, module: nn.Module, plan: Plan, worker: int) -> Layout:
        every = full_buckets(module, plan)
        whole: TensorMap = {n: None for n, _ in plan.tensors}
        whole.update({alias: None for alias, _ in plan.aliases})
        world = tuple(range(plan.workers))
        buffers = buffer_bucket(module, plan.workers)
        return Layout(module, whole, list(held_buckets(every, worker).values()), broadcast_buckets(every, plan.workers),
                      [buffers] if buffers is not None else [], lambda _name: (None, [world]))


REGIMES: dict[str, Regime] = {r.name: r for r in (ForwardMasking(), BackwardMasking())}


def regime(masking: str) -> Regime:
    """The regime named ``masking`` (one of :data:`subnetdp.options.MASKINGS`)."""
    if masking not in REGIMES:
        raise ValueError(f"masking={masking!r}: choose one of {MASKINGS}")
    return REGIMES[masking]


def _mask_hook(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask

    return hook


def build_backward_worker(
    model: nn.Module | ModelFactory,
    plan: Plan,
    worker: int,
    options: SDPOptions | None = None,
    *,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> nn.Module:
    """``worker``'s model under backward masking: the full model, trainable only where ``worker`` holds.

    Values equal :func:`subnetdp.materialize` with the same ``seed`` (or ``model``'s own values).
    ``checkpointing="blocks"`` runs every block of the full forward under activation checkpointing.
    Options (:class:`subnetdp.SDPOptions`, or its fields as keywords): ``seed`` and ``checkpointing`` apply.
    """
    options = sdp_options(options, **overrides)
    plan.check_worker(worker)
    structure, source = structure_of(model)
    check_architecture(structure, plan)
    materialize_(structure, options.seed, source=source, device=device)
    tmap = plan.tensor_map(worker)
    for name, p in structure.named_parameters():
        if not p.requires_grad:
            continue  # frozen by the user: stays frozen
        if name not in tmap:
            p.requires_grad_(False)  # a unit this worker does not hold: no gradient, no optimizer state
            continue
        where = tmap[name]
        if where is None:
            continue
        dim, idx = where
        if not idx:
            p.requires_grad_(False)
        elif len(idx) < p.shape[dim]:
            shape = [1] * p.dim()
            shape[dim] = p.shape[dim]
            mask = torch.zeros(p.shape[dim], dtype=p.dtype, device=p.device)
            mask[torch.tensor(idx, dtype=torch.long, device=p.device)] = 1
            p.register_hook(_mask_hook(mask.view(shape)))
    if options.checkpointing == "blocks":
        checkpoint_blocks(structure, [b.name for b in plan.blocks])
    return structure


def full_buckets(module: nn.Module, plan: Plan) -> dict[Holders, Bucket]:
    """One bucket per holder set of the plan over ``module``'s full-size parameters (trainable or not).

    Laid out as :func:`subnetdp.buckets.build_buckets` does, with indices that are full-model
    positions, so every worker builds the same buckets.
    """
    return layout_buckets(dict(module.named_parameters()), plan, lambda _name, size: range(size))


def held_buckets(buckets: dict[Holders, Bucket], worker: int) -> dict[Holders, Bucket]:
    """The buckets whose elements ``worker`` holds: what it averages gradients of."""
    return {h: b for h, b in buckets.items() if worker in h}


def broadcast_buckets(buckets: dict[Holders, Bucket], workers: int) -> dict[Holders, Bucket]:
    """The buckets some worker does not hold: their new values go from ``h[0]`` to everyone after a step."""
    return {h: b for h, b in buckets.items() if len(h) < workers}


def buffer_bucket(module: nn.Module, workers: int) -> Bucket | None:
    """Every float buffer, held by all workers: each computes them all in its full forward."""
    world = tuple(range(workers))
    entries = [Entry(n, b) for n, b in sync_tensors(module, "buffers").items()]
    return Bucket(world, entries) if entries else None
