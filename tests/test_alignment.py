"""Gradient alignment between subnetworks and the full model."""

from __future__ import annotations

import pytest
import torch
from conftest import FACTORIES, ce_loss, image_batches

import subnetdp as sd
from subnetdp.alignment import gradient_alignment


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_full_coverage_is_perfectly_aligned(level):
    f = FACTORIES["vit"]
    sim = sd.Simulation(f, sd.plan(f, 2, 1.0, level), lambda ps: torch.optim.SGD(ps, lr=0.1))
    for row in gradient_alignment(sim, image_batches(2), ce_loss):
        assert row["held"] == pytest.approx(1.0, abs=1e-5) and row["full"] == pytest.approx(1.0, abs=1e-5)
        assert row["held_fraction"] == 1.0


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_partial_coverage_is_measured_and_leaves_parameters_alone(level):
    f = FACTORIES["vit"]
    sim = sd.Simulation(f, sd.plan(f, 4, 0.5, level), lambda ps: torch.optim.SGD(ps, lr=0.1))
    before = [p.detach().clone() for p in sim.workers[0].parameters()]
    rows = gradient_alignment(sim, image_batches(4), ce_loss)
    assert len(rows) == 4
    for row in rows:
        assert -1 <= row["full"] < 0.999 and -1 <= row["held"] <= 1
        # zeros outside the subnetwork: cos_full = cos_held * |g_held| / |g_full|
        assert abs(row["full"]) <= abs(row["held"]) + 1e-6
        assert 0 < row["held_fraction"] < 1
    assert all(torch.equal(a, b) for a, b in zip(before, sim.workers[0].parameters()))
    assert all(p.grad is None for p in sim.workers[0].parameters())
