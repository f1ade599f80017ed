"""K workers in one process: SDP's math on one device, for research and as the distributed oracle."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from subnetdp.assemble import assemble_state_dict
from subnetdp.buckets import rebind
from subnetdp.init import ModelFactory, structure_of
from subnetdp.masking import regime
from subnetdp.options import SDPOptions, sdp_options
from subnetdp.planning import Plan
from subnetdp.sync import average_over_holders, clip_gradients_, holder_weighted_sq_norm, traffic

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[nn.Module, object], torch.Tensor]


class Simulation:
    """``plan.workers`` SDP workers in one process, each with its subnetwork, optimizer and data.

    Same math as :class:`subnetdp.SubnetDataParallel`, with the same options
    (:class:`subnetdp.SDPOptions`, or its fields as keywords; ``bucket_elements`` and ``check_every``
    concern collectives and do nothing here), including ``sync="params"`` (average parameters over
    holders every ``sync_every`` steps instead of gradients every step), ``checkpointing="blocks"``
    (activation checkpointing of every block a worker has) and ``masking="backward"`` (full forward
    on every worker; see :mod:`subnetdp.masking`).

    >>> sim = Simulation(factory, plan, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    >>> losses = sim.step(batches, lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]))
    >>> state = sim.full_state_dict()  # loads into factory()
    >>> model = subnetdp.evaluation_model(sim, batches)  # the full model with the evaluation conventions
    """

    def __init__(
        self,
        model: nn.Module | ModelFactory,
        plan: Plan,
        optimizer: OptimizerFactory,
        options: SDPOptions | None = None,
        *,
        device: torch.device | str = "cpu",
        **overrides: Any,
    ) -> None:
        self.options = sdp_options(options, **overrides)
        self.plan = plan
        self.regime = regime(self.options.masking)
        self.device = torch.device(device)
        # the full model's meta structure: what full_state_dict() assembles and evaluation_model() loads into
        self.structure, source = structure_of(model, self.options.seed, self.options.init)
        # init="full": the factory's model is built once and every worker slices it, then it is freed
        values = source if source is not None else model
        self.layouts = [self.regime.worker(values, plan, k, self.options, device) for k in range(plan.workers)]
        del source, values
        self.workers = [layout.module for layout in self.layouts]
        # every parameter goes to the optimizer; one without a gradient (backward masking: a unit not
        # held) gets no state
        self.optimizers = [optimizer(w.parameters()) for w in self.workers]
        self._grad_buckets = [{b.holders: b for b in layout.reduce} for layout in self.layouts]
        self._buffer_buckets = [{b.holders: b for b in layout.buffers} for layout in self.layouts]
        self.steps = 0

    def predicted_bytes_per_sync(self, worker: int) -> int:
        """Bytes ``worker`` would hand to collectives per sync, as :class:`subnetdp.SubnetDataParallel`
        on that rank does: its elements held by others too (:func:`subnetdp.sync.traffic`), plus the
        values it sends after each step under backward masking (every element some worker lacks).
        """
        self.plan.check_worker(worker)
        layout = self.layouts[worker]
        return int(traffic(layout.reduce, layout.broadcast.values())["collective_bytes"])

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Every worker takes the values of each holder set it is not in from the set's lowest holder
        (backward masking, after each step; nothing to send under forward masking)."""
        for h in self.layouts[0].broadcast:
            values = self.layouts[h[0]].broadcast[h].gather(grads=False)
            for k in range(self.plan.workers):
                if k not in h:
                    self.layouts[k].broadcast[h].scatter(values, grads=False)

    def train(self, mode: bool = True) -> Simulation:
        for w in self.workers:
            w.train(mode)
        return self

    def sync_gradients(self) -> None:
        """Average every gradient element over the workers that hold it."""
        average_over_holders(self._grad_buckets, grads=True)

    def average_parameters(self) -> None:
        """Average every parameter element over its holders (the ``sync="params"`` rule)."""
        with torch.no_grad():
            average_over_holders(self._grad_buckets, grads=False)

    def average_buffers(self) -> None:
        """Average BatchNorm running statistics (float buffers) over their holders."""
        with torch.no_grad():
            average_over_holders(self._buffer_buckets, grads=False)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip every worker's (synced) gradients by the norm of the full model's averaged gradient.

        Each element is counted once: a worker weighs its elements by ``1 / holder count``, and the
        workers' sums add up to the full gradient's squared norm. Returns the norm before clipping.
        """
        norm = math.sqrt(sum(float(holder_weighted_sq_norm(per.values())) for per in self._grad_buckets))
        clip_gradients_((p for w in self.workers for p in w.parameters()), norm, max_norm)
        return norm

    def step(self, batches: Sequence[object], loss_fn: LossFn, max_grad_norm: float | None = None) -> list[float]:
        """One SDP step: each worker's forward and backward on its batch, sync, optimizer step.

        ``max_grad_norm`` clips by the full model's averaged-gradient norm (:meth:`clip_grad_norm_`).
        """
        if len(batches) != self.plan.workers:
            raise ValueError(f"got {len(batches)} batches for {self.plan.workers} workers: give one per worker")
        losses = []
        for k, (model, opt, batch) in enumerate(zip(self.workers, self.optimizers, batches)):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"worker {k} got a non-finite loss ({value}) at step {self.steps}")
            loss.backward()
            losses.append(value)
        if self.options.sync == "grads":
            self.sync_gradients()
        if max_grad_norm:
            self.clip_grad_norm_(max_grad_norm)
        for opt in self.optimizers:
            opt.step()
        self.broadcast_parameters()
        self.steps += 1
        if self.options.sync == "params" and self.steps % self.options.sync_every == 0:
            self.average_parameters()
        return losses

    @torch.no_grad()
    def averaged_buffers(self) -> list[dict[str, torch.Tensor]]:
        """Per worker, copies of its buffers averaged over their holders; the workers' own are untouched."""
        copies = [{e.name: e.tensor.detach().clone() for b in per.values() for e in b.entries}
                  for per in self._buffer_buckets]
        average_over_holders([{h: rebind(b, copies[k]) for h, b in per.items()}
                              for k, per in enumerate(self._buffer_buckets)], grads=False)
        return copies

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The assembled full model's state dict, buffers averaged over holders (a pure read)."""
        buffers = self.averaged_buffers()
        return assemble_state_dict(((layout.tensor_map, {**layout.module.state_dict(), **buffers[k]})
                                    for k, layout in enumerate(self.layouts)), self.plan, self.structure)
