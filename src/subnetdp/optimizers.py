"""The one table of optimizers: how each is built, and how much memory it holds per parameter.

Training (:func:`subnetdp.strategies.make_optimizer`), the memory prediction
(:mod:`subnetdp.planning.memory`) and the planner build and count optimizers only through this
table, so that what ``subnetdp plan --optimizer X`` predicts is what ``subnetdp train --optimizer X``
holds. ``sgd`` is what ``train`` runs: SGD with Nesterov momentum (0.9 unless ``momentum`` says
otherwise), which keeps one momentum buffer per parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class OptimizerKind:
    """How to build one optimizer and what it keeps.

    ``state_tensors``: parameter-sized tensors in its state after a step (momentum: 1; Adam's two
    moments: 2); ``step_temporaries``: parameter-sized tensors its step forms at once (the foreach
    Adam(W) step, the default on a GPU, forms the denominator ``sqrt(v) + eps`` for every parameter).
    """

    build: Callable[..., torch.optim.Optimizer]
    state_tensors: int
    step_temporaries: int
    description: str


def _sgd(params: list[nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 0.0
         ) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


def _sgd_momentum(params: list[nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 0.0
                  ) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _sgd_plain(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _adamw(params: list[nn.Parameter], lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _adam(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, OptimizerKind] = {
    "sgd": OptimizerKind(_sgd, 1, 0, "SGD with Nesterov momentum 0.9 (what subnetdp train --optimizer sgd runs)"),
    "sgd-momentum": OptimizerKind(_sgd_momentum, 1, 0, "SGD with (heavy-ball) momentum 0.9"),
    "sgd-plain": OptimizerKind(_sgd_plain, 0, 0, "SGD without momentum (train --optimizer sgd --momentum 0)"),
    "adamw": OptimizerKind(_adamw, 2, 1, "AdamW"),
    "adam": OptimizerKind(_adam, 2, 1, "Adam"),
}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)


def optimizer_kind(name: str) -> OptimizerKind:
    """The table's entry for ``name``; a clear error naming the choices otherwise."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} unknown; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float = 0.01, **hyper: Any) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params``; ``hyper`` (``momentum``, ``weight_decay``) as its entry takes them."""
    return optimizer_kind(name).build(list(params), lr=lr, **hyper)


def name_for(optimizer: str, momentum: float) -> str:
    """The table's name of what ``train --optimizer OPTIMIZER --momentum MOMENTUM`` runs (SGD without
    momentum keeps no state, so it is predicted as ``sgd-plain``)."""
    return "sgd-plain" if optimizer == "sgd" and momentum == 0 else optimizer
