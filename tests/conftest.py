"""Tiny models shared by the tests (each factory builds on the meta device), and the shared-data marker."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from subnetdp.data import shared_data_dir
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


# ---- tests that read ../shared/data ---------------------------------------------------------------------
# Mark them ``@pytest.mark.shared_data(CIFAR10_JPEG, ...)`` (paths inside the shared data folder), or call
# ``require_shared_data`` where only some parameters need the data. Without the data they skip, naming the
# missing path; under CI (``CI=true``) they fail instead: a CI job without its data is a broken setup.

CIFAR10_JPEG = "cifar10-jpeg/cifar10_jpeg.npz"
TINY_SHAKESPEARE = "tinyshakespeare/input.txt"


def in_ci() -> bool:
    """Whether the ``CI`` environment variable says this is a CI run (``true``, ``1`` or ``yes``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_shared_data(*relative: str, root: Path | None = None) -> Path:
    """The shared data folder (``root``, else :func:`shared_data_dir`) if it holds every ``relative`` path.

    Otherwise skips the calling test with a reason naming the first missing path, or, under CI, fails it.
    """
    base = root if root is not None else shared_data_dir()
    if base is None:
        missing = "../shared/data" + "".join(f"/{r}" for r in relative[:1])
        problem = f"needs {missing}: no shared data folder found (set SUBNETDP_SHARED_DATA to its path)"
    else:
        absent = [base / r for r in relative if not (base / r).exists()]
        if base.is_dir() and not absent:
            return base
        problem = f"needs {absent[0] if absent else base}: not found (set SUBNETDP_SHARED_DATA to the data folder)"
    if in_ci():
        pytest.fail(f"{problem}; CI={os.environ['CI']} so this fails instead of skipping (a broken setup)",
                    pytrace=False)
    pytest.skip(problem)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shared_data(*paths): the test reads these paths inside ../shared/data; "
                                       "skips naming a missing one, fails instead under CI=true")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("shared_data"):
        require_shared_data(*mark.args)


@pytest.fixture
def shared_data(request: pytest.FixtureRequest) -> Path:
    """The shared data folder, holding every path the test's ``shared_data`` marks name."""
    return require_shared_data(*(a for mark in request.node.iter_markers("shared_data") for a in mark.args))


__all__ = ["CIFAR10_JPEG", "FACTORIES", "TINY_SHAKESPEARE", "ResidualMLP", "ce_loss", "image_batches", "in_ci",
           "llama_tiny", "require_shared_data", "resnet50"]
