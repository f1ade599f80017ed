"""The sync arithmetic against hand computations: the division by the holder count (invariant 7),
the holder-weighted clip norm, and the traffic with the element size taken from the tensors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ResidualMLP

import subnetdp as sd
from subnetdp.buckets import Bucket, Entry
from subnetdp.masking import build_backward_worker
from subnetdp.sync import (
    average_over_holders,
    bucket_bytes,
    clip_gradients_,
    divide_by_holders_,
    holder_weighted_sq_norm,
    step_traffic,
    traffic,
)

# K = 4 workers; holder sets of size 1, 2 and r = 3 (and the world, 4)
SETS = [(0,), (1, 2), (0, 1, 3), (0, 1, 2, 3)]


def _per_worker_buckets(values: dict[tuple[int, ...], list[float]]) -> tuple[list[dict], dict]:
    """For each holder set, one gradient tensor per holder, holder ``k`` holding ``values[h][i]``
    (``i`` = ``k``'s position in ``h``) in every element; the world set's tensor is a sliced one."""
    buckets: list[dict] = [{} for _ in range(4)]
    grads = {}
    for h, vals in values.items():
        for k, v in zip(h, vals):
            if len(h) == 4:  # a slice: rows 1 and 3 of a 4x2 tensor belong to this bucket
                t = torch.zeros(4, 2, requires_grad=True)
                t.grad = torch.full((4, 2), -7.0)
                t.grad[[1, 3]] = v
                entry = Entry("w", t, 0, torch.tensor([1, 3]))
            else:
                t = torch.zeros(3, requires_grad=True)
                t.grad = torch.full((3,), v)
                entry = Entry("w", t)
            buckets[k][h] = Bucket(h, [entry])
            grads[(h, k)] = t
    return buckets, grads


def test_average_over_holders_divides_by_each_holder_sets_own_size():
    values = {(0,): [6.0], (1, 2): [2.0, 5.0], (0, 1, 3): [1.0, 2.0, 6.0], (0, 1, 2, 3): [1.0, 2.0, 3.0, 6.0]}
    buckets, grads = _per_worker_buckets(values)
    average_over_holders(buckets, grads=True)
    # by hand: (0,): 6 alone, not divided by K; (1,2): 7/2; (0,1,3): 9/3; world: 12/4
    expected = {(0,): 6.0, (1, 2): 3.5, (0, 1, 3): 3.0, (0, 1, 2, 3): 3.0}
    for (h, k), t in grads.items():
        if len(h) == 4:
            torch.testing.assert_close(t.grad[[1, 3]], torch.full((2, 2), expected[h]), rtol=0, atol=0)
            torch.testing.assert_close(t.grad[[0, 2]], torch.full((2, 2), -7.0), rtol=0, atol=0)  # not its bucket
        else:
            torch.testing.assert_close(t.grad, torch.full((3,), expected[h]), rtol=0, atol=0)


def test_average_over_holders_averages_values_when_not_grads():
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 8.0])
    average_over_holders([{(0, 1): Bucket((0, 1), [Entry("x", a)])}, {(0, 1): Bucket((0, 1), [Entry("x", b)])}],
                         grads=False)
    assert a.tolist() == b.tolist() == [2.0, 6.0]


@pytest.mark.parametrize("holders, expected", [((3,), 12.0), ((0, 2), 6.0), ((0, 1, 2), 4.0)])
def test_divide_by_holders_is_in_place_and_uses_the_holder_count(holders, expected):
    summed = torch.tensor([12.0])
    out = divide_by_holders_(summed, holders)
    assert out is summed and summed.item() == expected


def test_holder_weighted_squared_norm_by_hand():
    def bucket(h: tuple[int, ...], grad: list[float]) -> Bucket:
        t = torch.zeros(len(grad), requires_grad=True)
        t.grad = torch.tensor(grad)
        return Bucket(h, [Entry("t", t)])

    buckets = [bucket((1,), [1.0, 2.0]), bucket((0, 1), [2.0, 2.0]), bucket((0, 1, 2), [3.0])]
    # (1 + 4) / 1 + (4 + 4) / 2 + 9 / 3
    assert holder_weighted_sq_norm(buckets).item() == pytest.approx(5.0 + 4.0 + 3.0)
    assert holder_weighted_sq_norm([]).item() == 0.0


def test_workers_shares_of_the_squared_norm_count_every_element_once():
    p = sd.plan(ResidualMLP, 4, 0.5, "block")
    sim = sd.Simulation(ResidualMLP, p, lambda ps: torch.optim.SGD(ps, lr=0.0), seed=1)
    g = torch.Generator().manual_seed(0)
    for m in sim.workers:
        x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
        torch.nn.functional.cross_entropy(m(x), y).backward()
    sim.sync_gradients()
    # after sync, every holder of an element has the same value: the full gradient is any holder's
    full = {}
    for w in sim.workers:
        for n, t in w.named_parameters():
            full[n] = t.grad
    expected = sum(float(t.pow(2).sum()) for t in full.values())
    assert sim.clip_grad_norm_(1e9) == pytest.approx(math.sqrt(expected), rel=1e-6)


def test_clip_gradients_scales_only_above_the_limit():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    clip_gradients_([p], norm=5.0, max_norm=10.0)
    assert p.grad.tolist() == [3.0, 4.0]
    clip_gradients_([p], norm=5.0, max_norm=2.5)
    torch.testing.assert_close(p.grad, torch.tensor([1.5, 2.0]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_traffic_by_hand_takes_the_element_size_from_the_tensors(dtype, size):
    """ResidualMLP(4, 4, 3), K=4, C=0.5, block level: each worker holds one block (40 elements, 2 holders)
    and the head (15 elements, all 4 workers)."""
    p = sd.plan(ResidualMLP, 4, 0.5, "block")
    for k in range(4):
        sub = sd.build_subnetwork(ResidualMLP, p, k).to(dtype)
        assert step_traffic(sub, p, k) == {"collective_bytes": 55 * size,
                                           "ring_bytes": (2 * 1 / 2 * 40 + 2 * 3 / 4 * 15) * size}
        full = build_backward_worker(ResidualMLP, p, k).to(dtype)
        # backward masking: plus both blocks' new values broadcast (80 elements, 1 byte per byte sent)
        assert step_traffic(full, p, k, "backward") == {"collective_bytes": (55 + 80) * size,
                                                        "ring_bytes": (40 + 22.5 + 80) * size,
                                                        "broadcast_bytes": 80 * size}


def test_bucket_bytes_of_mixed_dtypes_is_the_gathered_buffers():
    b = Bucket((0, 1), [Entry("a", torch.zeros(3, dtype=torch.bfloat16)), Entry("b", torch.zeros(2))])
    flat = b.gather(grads=False)
    assert bucket_bytes(b) == flat.numel() * flat.element_size() == 5 * 4
    assert traffic([Bucket((0,), [Entry("c", torch.zeros(7))]), b])["collective_bytes"] == 20  # own elements: no sync


@pytest.mark.parametrize("masking", ["forward", "backward"])
def test_simulation_predicts_the_traffic_step_traffic_computes(masking):
    p = sd.plan(ResidualMLP, 4, 0.5, "block")
    sim = sd.Simulation(ResidualMLP, p, lambda ps: torch.optim.SGD(ps, lr=0.0), masking=masking)
    for k, w in enumerate(sim.workers):
        assert sim.predicted_bytes_per_sync(k) == step_traffic(w, p, k, masking)["collective_bytes"] > 0
    with pytest.raises(ValueError, match="worker 4 is out of range"):
        sim.predicted_bytes_per_sync(4)


def test_step_traffic_rejects_an_unknown_masking():
    p = sd.plan(ResidualMLP, 2, 0.5, "block")
    with pytest.raises(ValueError, match="masking='sideways'"):
        step_traffic(sd.build_subnetwork(ResidualMLP, p, 0), p, 0, "sideways")
