"""Gradient alignment between subnetworks and the full model."""

from __future__ import annotations

import pytest
import torch
from conftest import FACTORIES, ce_loss, image_batches

import subnetdp as sd
from subnetdp.measure.alignment import alignment_table, gradient_alignment, plot_alignment, track_alignment


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


def test_track_alignment_trains_and_measures_on_schedule():
    f = FACTORIES["vit"]
    sim = sd.Simulation(f, sd.plan(f, 2, 0.5, "block"), lambda ps: torch.optim.SGD(ps, lr=0.1))
    before = [p.detach().clone() for p in sim.workers[0].parameters()]
    steps = [image_batches(2, seed=s) for s in range(3)]  # steps 0, 1, 2; one batch per worker each
    streams = [iter([batches[k] for batches in steps]) for k in range(2)]
    rows = track_alignment(sim, streams, ce_loss, steps=2, every=2)
    assert [r["step"] for r in rows] == [0, 2]
    for r in rows:
        assert r["held_min"] <= r["held"] <= r["held_max"] and abs(r["full"]) <= abs(r["held"]) + 1e-6
    assert not all(torch.equal(a, b) for a, b in zip(before, sim.workers[0].parameters()))  # it trained


def test_track_alignment_stops_at_the_deadline_and_checks_its_arguments():
    f = FACTORIES["vit"]
    sim = sd.Simulation(f, sd.plan(f, 2, 0.5, "neuron"), lambda ps: torch.optim.SGD(ps, lr=0.1))
    streams = [iter([b]) for b in image_batches(2)]
    rows = track_alignment(sim, streams, ce_loss, steps=50, every=1, deadline=0.0)  # already passed
    assert [r["step"] for r in rows] == [0]
    with pytest.raises(ValueError, match="every=0"):
        track_alignment(sim, streams, ce_loss, steps=1, every=0)
    with pytest.raises(ValueError, match="1 batch streams for 2 workers"):
        track_alignment(sim, streams[:1], ce_loss, steps=1, every=1)


def test_alignment_table_and_plot(tmp_path):
    results = {"block C=0.5": [{"step": 0, "held": 0.5, "full": 0.4}, {"step": 5, "held": 0.6, "full": 0.5}],
               "neuron C=0.5": [{"step": 0, "held": 0.45, "full": 0.3}]}
    table = alignment_table(results)
    assert "| block C=0.5 | 0.500 / 0.400 | 0.600 / 0.500 |" in table
    assert "| neuron C=0.5 | 0.450 / 0.300 | - |" in table
    plot_alignment(results, str(tmp_path / "a.png"), "t")
    assert (tmp_path / "a.png").stat().st_size > 1000
