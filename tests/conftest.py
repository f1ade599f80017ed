"""Tiny models shared by the tests; each factory builds on the meta device."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from subnetdp.models import llama_tiny, resnet18, resnet50
from subnetdp.models.vit import VisionTransformer

FACTORIES = {
    "resnet": functools.partial(resnet18, width=4),
    "vit": functools.partial(VisionTransformer, dim=16, depth=4, num_heads=4),
}


class ResidualMLP(nn.Module):
    """A hand-checkable model: two residual blocks of two linears, then a head."""

    def __init__(self, dim: int = 4, hidden: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Mlp(dim, hidden) for _ in range(2))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def image_batches(workers: int, n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(workers)]


def ce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(params=sorted(FACTORIES))
def factory(request: pytest.FixtureRequest):
    return FACTORIES[request.param]


__all__ = ["FACTORIES", "ResidualMLP", "ce_loss", "image_batches", "llama_tiny", "resnet50"]
