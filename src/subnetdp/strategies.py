"""One interface over the ways the main job can train: SDP (distributed or simulated), DDP, FSDP2,
each with or without activation checkpointing (``cfg.recomputes_blocks``; ``ddp-ckpt`` is DDP with it).
The training loop in :mod:`subnetdp.train` sees only this, never which class it has.

A backend trains the workers of this process (all K when simulating, else one), steps their
optimizers and schedulers, reports memory and communication, and assembles the full model. Its
state is exposed as stateful components (``state_dict``/``load_state_dict``, as torchtitan's
checkpointer takes them): ``model`` and ``optimizer`` go into a checkpoint's model and optimizer
slots, :meth:`state_dict` holds the rest of the loop's state; ``trained`` is the SDP engine the
full model is assembled from (``None`` for DDP and FSDP2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from subnetdp import optimizers
from subnetdp.baselines import wrap_baseline
from subnetdp.config import TrainConfig
from subnetdp.engine import SubnetDataParallel, agree_finite
from subnetdp.init import ModelFactory, materialize
from subnetdp.models import is_user_model, zoo_model
from subnetdp.planning import Plan
from subnetdp.planning.counting import state_bytes as count_state_bytes
from subnetdp.simulate import Simulation

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


def make_optimizer(cfg: TrainConfig, params: Sequence[nn.Parameter] | Any) -> torch.optim.Optimizer:
    """``cfg``'s optimizer from the one table (:mod:`subnetdp.optimizers`), at its peak rate."""
    hyper = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    return optimizers.make_optimizer(cfg.optimizer, params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay, **hyper)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to zero, a one-cycle schedule, or a constant rate."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.peak_lr, total_steps=max(total, 2),
                                                   pct_start=max(cfg.warmup, 0.01))
    warm = int(cfg.warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state on this worker now (local shards when sharded)."""
    counted = count_state_bytes(model, opt)
    return {k: counted[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes")}


def _channels_last(cfg: TrainConfig, model: nn.Module, device: torch.device) -> nn.Module:
    """Convolutional models train faster in channels-last layout on a GPU (in place; parameters keep identity)."""
    if device.type == "cuda" and not is_user_model(cfg.model) and zoo_model(cfg.model).convolutional:
        model.to(memory_format=torch.channels_last)
    return model


class Optimizers:
    """Several optimizers as one stateful component: their state dicts, in worker order."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    def state_dict(self) -> dict[str, Any]:
        return {"per_worker": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["per_worker"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"the checkpoint holds {len(saved)} optimizers, this run has {len(self.optimizers)} workers")
        for o, sd in zip(self.optimizers, saved):
            o.load_state_dict(sd)


class SimulatedSDP:
    """K SDP workers in this process (``--simulate K``)."""

    def __init__(self, cfg: TrainConfig, factory: ModelFactory, plan: Plan, device: torch.device, total: int) -> None:
        self.cfg, self.plan = cfg, plan
        self.sim = Simulation(factory, plan, lambda ps: make_optimizer(cfg, ps), cfg.sdp_options(), device=device)
        for w in self.sim.workers:
            _channels_last(cfg, w, device)
        self.schedulers = [make_scheduler(cfg, o, total) for o in self.sim.optimizers]
        self.models = self.sim.workers
        self.optimizers = self.sim.optimizers
        self.model: nn.Module = nn.ModuleList(self.models)  # what a checkpoint's model slot holds
        self.optimizer = Optimizers(self.optimizers)
        self.trained = self.sim

    def train_step(self, batches: Sequence[Any], loss_fn: LossFn, autocast: Callable) -> list[dict[str, float]]:
        metrics: list[dict[str, float]] = []

        def run(model: nn.Module, batch: Any) -> torch.Tensor:
            with autocast():
                loss, m = loss_fn(model, batch)
            metrics.append({"loss": float(loss.detach()), **m})
            return loss

        self.sim.step(batches, run, max_grad_norm=self.cfg.grad_clip)
        for s in self.schedulers:
            s.step()
        return metrics

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.sim.full_state_dict()

    def comm_bytes_per_step(self) -> list[int]:
        """Per worker: bytes it would hand to collectives per sync (its elements held by others too).

        Under backward masking, plus the broadcast after each step (every element some worker lacks).
        """
        return [self.sim.predicted_bytes_per_sync(k) for k in range(self.plan.workers)]

    def memory(self) -> list[dict[str, int]]:
        return [state_bytes(m, o) for m, o in zip(self.sim.workers, self.sim.optimizers)]

    def state_dict(self) -> dict[str, Any]:
        """The loop's state beside the model and optimizers: schedulers and the simulation's step count."""
        return {"schedulers": [s.state_dict() for s in self.schedulers], "sim_steps": self.sim.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, sd in zip(self.schedulers, state["schedulers"]):
            s.load_state_dict(sd)
        self.sim.steps = state["sim_steps"]

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]


class Distributed:
    """One worker per process under torch.distributed: SDP, DDP or FSDP2, each optionally with checkpointing."""

    def __init__(self, cfg: TrainConfig, factory: ModelFactory, plan: Plan | None, device: torch.device,
                 total: int) -> None:
        self.cfg, self.plan, self.device = cfg, plan, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sdp: SubnetDataParallel | None = None
        if cfg.strategy == "sdp":
            assert plan is not None
            self.sdp = SubnetDataParallel(factory, plan, cfg.sdp_options(), device=device)
            _channels_last(cfg, self.sdp.module, device)
            model: nn.Module = self.sdp
        else:
            base = materialize(factory, seed=cfg.seed, device=device, init=cfg.init)
            base = _channels_last(cfg, base, device)
            model = wrap_baseline(base, cfg.strategy, checkpointing=cfg.recomputes_blocks, device=device)
        self.model = model
        self.opt = make_optimizer(cfg, model.parameters())
        if self.sdp is not None and self.sdp.needs_optimizer:
            self.sdp.attach_optimizer(self.opt)
        self.scheduler = make_scheduler(cfg, self.opt, total)
        self.models = [model]
        self.optimizers = [self.opt]
        self.optimizer = self.opt
        self.trained = self.sdp

    def train_step(self, batches: Sequence[Any], loss_fn: LossFn, autocast: Callable) -> list[dict[str, float]]:
        self.opt.zero_grad(set_to_none=True)
        with autocast():
            loss, m = loss_fn(self.model, batches[0])
        agree_finite(loss, self.scheduler.last_epoch)  # every rank raises the same error, none waits in a collective
        loss.backward()
        if self.cfg.grad_clip:
            if self.sdp is not None:
                self.sdp.clip_grad_norm_(self.cfg.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.scheduler.step()
        return [{"loss": float(loss.detach()), **m}]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The assembled full model on rank 0 (None elsewhere). Collective."""
        if self.sdp is not None:
            return self.sdp.full_state_dict()
        if self.cfg.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return full if self.rank == 0 else None
        sd = {k: v.detach().cpu() for k, v in self.model.module.state_dict().items()}
        return sd if self.rank == 0 else None

    def comm_bytes_per_step(self) -> list[int | None]:
        if self.sdp is not None:
            return [self.sdp.predicted_bytes_per_sync() if self.cfg.sync == "grads" else None]
        if self.cfg.strategy in ("ddp", "ddp-ckpt"):
            return [sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)]  # DDP all-reduces every gradient
        return [None]  # FSDP2: all-gathers and reduce-scatters, not counted here

    def memory(self) -> list[dict[str, int]]:
        return [state_bytes(self.model, self.opt)]

    def state_dict(self) -> dict[str, Any]:
        """The loop's state beside the model and optimizer: the scheduler and the optimizer-step count."""
        steps = self.sdp.optimizer_steps if self.sdp is not None else 0
        return {"scheduler": self.scheduler.state_dict(), "optimizer_steps": steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sdp is not None:
            self.sdp.optimizer_steps = state["optimizer_steps"]  # keeps the --sync-every cadence

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


def autocast_for(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
