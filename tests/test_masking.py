"""Backward masking: full forward on every worker, gradients and updates only for held units."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FACTORIES, ce_loss, image_batches
from distributed import (OPTIMIZERS, STEPS, max_param_diff, params_of, run_ranks, simulate, tiny_sdp, train_step,
                         values)
from torch.nn.parallel import DistributedDataParallel as DDP

import subnetdp as sd
from subnetdp.masking import broadcast_buckets, full_buckets



def backward_run(rank: int, world: int, level: str, coverage: float, opt: str) -> dict:
    sdp = tiny_sdp(world, coverage, level, seed=7, masking="backward")
    o = OPTIMIZERS[opt](sdp.parameters())
    sdp.attach_optimizer(o)
    after_each_step = []
    for step in range(STEPS):
        train_step(sdp, o, step, rank, world)
        after_each_step.append(params_of(sdp.module))
    state_numel = sum(t.numel() for s in o.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"steps": after_each_step, "full": sdp.full_state_dict(), "bytes": sdp.stats.per_step_bytes,
            "broadcast": sdp.stats.broadcast_bytes, "predicted": sdp.predicted_bytes_per_sync(),
            "state_numel": state_numel, "own": {n: t.detach().clone() for n, t in sdp.module.state_dict().items()}}


@pytest.mark.parametrize("level,opt", [("block", "sgd"), ("neuron", "adamw"), ("block", "adamw"), ("neuron", "sgd")])
def test_backward_masking_distributed_equals_simulation_and_workers_stay_identical(level, opt):
    ranks = values(run_ranks(backward_run, 4, level, 0.5, opt))
    snapshots: list = []
    sim = simulate("resnet", level, 0.5, opt, 4, snapshots=snapshots, masking="backward")
    tol = dict(rtol=1e-5, atol=1e-6) if opt == "sgd" else dict(rtol=1e-4, atol=1e-5)
    for step in range(STEPS):
        for k, res in enumerate(ranks):
            for name, t in res["steps"][step].items():
                # every worker holds identical full parameters after every step: exactly, since all
                # non-holders copy the one holder's values and holders apply the same averaged gradient
                torch.testing.assert_close(t, ranks[0]["steps"][step][name], rtol=0, atol=0)
                torch.testing.assert_close(t, snapshots[step][k][name], **tol)
                torch.testing.assert_close(snapshots[step][k][name], snapshots[step][0][name], rtol=0, atol=0)
    # the assembled model is any worker's copy, and it loads strictly into the plain architecture
    full = sim.full_state_dict()
    assert ranks[1]["full"] is None
    trained = {n for n, _ in FACTORIES["resnet"]().named_parameters()}
    for name, t in ranks[0]["full"].items():
        torch.testing.assert_close(t, full[name], **tol)
        if name in trained:  # parameters: any worker's copy; BatchNorm statistics: averaged over the workers
            torch.testing.assert_close(t, ranks[3]["own"][name].cpu(), **tol)
        elif t.is_floating_point():
            mean = sum(r["own"][name].cpu() for r in ranks) / len(ranks)
            torch.testing.assert_close(t, mean, **tol)
    FACTORIES["resnet"]().load_state_dict(ranks[0]["full"], strict=True)
    # every step: the held gradients' all-reduces plus one broadcast of every holder set not the world
    p = sim.plan
    sent = sum(b.numel for b in broadcast_buckets(full_buckets(sim.workers[0], p), 4).values()) * 4
    for res in ranks:
        assert res["broadcast"] == sent * STEPS
        assert res["bytes"] == [res["predicted"]] * STEPS
    # optimizer state only for held parameters: at block level exactly the plan's count per worker
    momentum_like = 1 if opt == "sgd" else 2
    for k, res in enumerate(ranks):
        if level == "block":
            assert res["state_numel"] == momentum_like * p.param_count(k)
        else:  # partly held tensors keep full-size state (docs/masking.md): every tensor with a held element
            held = sum(math.prod(p.shapes[n]) for n, where in p.tensor_map(k).items()
                       if n in p.params and (where is None or where[1]))
            assert res["state_numel"] == momentum_like * held >= momentum_like * p.param_count(k)


def ddp_vs_backward(rank: int, world: int, model: str) -> float:
    sdp = tiny_sdp(world, 1.0, "block", model, seed=3, masking="backward")
    ddp = DDP(sd.materialize(FACTORIES[model], seed=3))
    opts = [OPTIMIZERS["sgd"](m.parameters()) for m in (sdp, ddp)]
    sdp.attach_optimizer(opts[0])
    for step in range(STEPS):
        for m, o in zip((sdp, ddp), opts):
            train_step(m, o, step, rank, world)
    return max_param_diff(sdp.module, ddp.module)


def test_backward_masking_at_coverage_one_equals_ddp():
    assert all(d <= 1e-6 for d in values(run_ranks(ddp_vs_backward, 2, "resnet")))


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_only_held_parameters_get_gradients_and_optimizer_state(level):
    f = FACTORIES["resnet"]
    p = sd.plan(f, 4, 0.5, level)
    sim = sd.Simulation(f, p, OPTIMIZERS["adamw"], seed=1, masking="backward")
    sim.step(image_batches(4, n=4, seed=5), ce_loss)
    for k, (w, o) in enumerate(zip(sim.workers, sim.optimizers)):
        tmap = p.tensor_map(k)
        assert sum(t.numel() for t in w.parameters()) == p.total_params  # every worker holds every parameter
        for name, t in w.named_parameters():
            held = name in tmap and (tmap[name] is None or len(tmap[name][1]) > 0)
            assert t.requires_grad == held, name
            assert (t in o.state) == held, name
            if held and tmap[name] is not None and len(tmap[name][1]) < t.shape[tmap[name][0]]:
                dim, idx = tmap[name]
                others = sorted(set(range(t.shape[dim])) - set(idx))
                assert float(t.grad.index_select(dim, torch.tensor(others)).abs().max()) == 0.0


def test_backward_masking_differs_from_forward_masking_but_not_at_coverage_one():
    """Same init: the regimes agree when every worker holds everything, and only then."""
    f = FACTORIES["resnet"]
    out = {}
    for coverage in (1.0, 0.5):
        for masking in ("forward", "backward"):
            sim = sd.Simulation(f, sd.plan(f, 2, coverage, "block"), OPTIMIZERS["sgd"], seed=2, masking=masking)
            sim.step(image_batches(2, n=4, seed=9), ce_loss)
            out[coverage, masking] = sim.full_state_dict()
    for name, t in out[1.0, "forward"].items():
        torch.testing.assert_close(out[1.0, "backward"][name], t, rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(out[0.5, "backward"][n], t) for n, t in out[0.5, "forward"].items()
               if t.is_floating_point())


def missing_attach(rank: int, world: int) -> str:
    sdp = tiny_sdp(world, 0.5, "block", masking="backward")
    try:
        sdp(image_batches(1)[0][0])
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_backward_masking_needs_the_optimizer_attached():
    assert all("attach_optimizer" in m for m in values(run_ranks(missing_attach, 2)))


def test_bad_masking_options_fail_with_a_clear_message():
    f = FACTORIES["resnet"]
    p = sd.plan(f, 2, 0.5, "block")
    with pytest.raises(ValueError, match="masking='sideways'"):
        sd.Simulation(f, p, OPTIMIZERS["sgd"], masking="sideways")
    with pytest.raises(ValueError, match="use sync='grads'"):
        sd.Simulation(f, p, OPTIMIZERS["sgd"], masking="backward", sync="params")
