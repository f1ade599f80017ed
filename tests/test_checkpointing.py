"""SDP with activation checkpointing (``checkpointing="blocks"``): same math, same names, fewer saved bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FACTORIES, ce_loss, image_batches
from distributed import run_ranks, values
from test_engine import OPTIMIZERS, STEPS, batches_for
from torch.nn.parallel import DistributedDataParallel as DDP

import subnetdp as sd
from subnetdp.checkpointing import checkpoint_blocks, is_checkpointed
from subnetdp.measure.meters import SavedTensorMeter
from subnetdp.subnet import SkippedBlock


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_state_dict_keys_unchanged_and_assembled_model_loads(level):
    f = FACTORIES["resnet"]
    p = sd.plan(f, 4, 0.5, level)
    for k in range(4):
        plain = sd.build_subnetwork(f, p, k, seed=1)
        ckpt = sd.build_subnetwork(f, p, k, seed=1, checkpointing="blocks")
        assert list(ckpt.state_dict()) == list(plain.state_dict())
        assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
        present = [b.name for b in p.blocks if not isinstance(ckpt.get_submodule(b.name), SkippedBlock)]
        assert present and all(is_checkpointed(ckpt.get_submodule(n)) for n in present)
    sim = sd.Simulation(f, p, OPTIMIZERS["sgd"], seed=1, checkpointing="blocks")
    sim.step(image_batches(4), ce_loss)
    f().load_state_dict(sim.full_state_dict())  # strict: no prefixed or missing keys


def test_checkpointed_full_model_keeps_its_keys_and_copies():
    model = sd.materialize(FACTORIES["resnet"], seed=0)
    keys = list(model.state_dict())
    checkpoint_blocks(model)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)  # the copy's blocks run their own parameters
    with torch.no_grad():
        for t in twin.parameters():
            t.zero_()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(model(x), twin(x))


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_checkpointing_reduces_saved_bytes(level):
    """Measured bytes saved for backward, on the full model and on every SDP worker (K=4, C=0.5)."""
    f = FACTORIES["resnet"]
    x = torch.randn(8, 3, 32, 32)

    def saved(model: torch.nn.Module) -> int:
        with SavedTensorMeter(model) as meter:
            model(x).sum()
        return meter.activation_bytes

    full = sd.materialize(f, seed=0)
    plain_bytes = saved(full)
    assert saved(checkpoint_blocks(full)) < 0.6 * plain_bytes
    p = sd.plan(f, 4, 0.5, level)
    for k in range(4):
        assert saved(sd.build_subnetwork(f, p, k, checkpointing="blocks")) < saved(sd.build_subnetwork(f, p, k))


@pytest.mark.parametrize("level,opt", [("block", "sgd"), ("neuron", "adamw")])
def test_simulation_with_checkpointing_equals_without(level, opt):
    """Recomputation changes no value: parameters and BatchNorm statistics (updated once, not twice)."""
    f = FACTORIES["resnet"]
    p = sd.plan(f, 4, 0.5, level)
    sims = [sd.Simulation(f, p, OPTIMIZERS[opt], seed=7, checkpointing=c) for c in (None, "blocks")]
    for step in range(STEPS):
        for sim in sims:
            sim.step(batches_for(step, 4), ce_loss)
    for plain, ckpt in zip(*(s.workers for s in sims)):
        theirs = plain.state_dict()
        for name, t in ckpt.state_dict().items():
            torch.testing.assert_close(t, theirs[name], rtol=1e-5, atol=1e-6)


def sdp_ckpt_run(rank: int, world: int, level: str) -> dict:
    f = FACTORIES["resnet"]
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, level), seed=7, checkpointing="blocks")
    o = OPTIMIZERS["sgd"](sdp.parameters())
    for step in range(STEPS):
        o.zero_grad()
        ce_loss(sdp, batches_for(step, world)[rank]).backward()
        o.step()
    return {"params": {n: t.detach().clone() for n, t in sdp.module.named_parameters()},
            "full": sdp.full_state_dict()}


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_distributed_with_checkpointing_equals_simulation(level):
    """Invariant 5 with checkpointing on: 2 gloo ranks against the in-process simulation."""
    ranks = values(run_ranks(sdp_ckpt_run, 2, level))
    f = FACTORIES["resnet"]
    sim = sd.Simulation(f, sd.plan(f, 2, 0.5, level), OPTIMIZERS["sgd"], seed=7, checkpointing="blocks")
    for step in range(STEPS):
        sim.step(batches_for(step, 2), ce_loss)
    for k, res in enumerate(ranks):
        mine = dict(sim.workers[k].named_parameters())
        for name, t in res["params"].items():
            torch.testing.assert_close(t, mine[name].detach(), rtol=1e-5, atol=1e-6)
    full = sim.full_state_dict()
    for name, t in ranks[0]["full"].items():
        torch.testing.assert_close(t, full[name], rtol=1e-5, atol=1e-6)
    f().load_state_dict(ranks[0]["full"])


def ddp_ckpt_vs_sdp_ckpt(rank: int, world: int, level: str) -> tuple[float, float]:
    f = FACTORIES["resnet"]
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 1.0, level), seed=3, checkpointing="blocks")
    # the ddp-ckpt strategy's model; buffers stay local, as SDP's do until they are averaged
    ddp = DDP(checkpoint_blocks(sd.materialize(f, seed=3)), broadcast_buffers=False)
    opts = [OPTIMIZERS["sgd"](m.parameters()) for m in (sdp, ddp)]
    for step in range(STEPS):
        for m, o in zip((sdp, ddp), opts):
            o.zero_grad()
            ce_loss(m, batches_for(step, world)[rank]).backward()
            o.step()
    ref = dict(ddp.module.named_parameters())
    params = max(float((t - ref[n]).abs().max()) for n, t in sdp.module.named_parameters())
    bufs = dict(ddp.module.named_buffers())
    buffers = max(float((t.float() - bufs[n].float()).abs().max()) for n, t in sdp.module.named_buffers())
    return params, buffers


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_coverage_one_with_checkpointing_equals_ddp_with_checkpointing(level):
    """Invariant 4 with checkpointing on both sides (the ddp-ckpt strategy's model)."""
    for params, buffers in values(run_ranks(ddp_ckpt_vs_sdp_ckpt, 2, level)):
        assert params <= 1e-6 and buffers <= 1e-6


def test_bad_checkpointing_value_names_it():
    f = FACTORIES["resnet"]
    with pytest.raises(ValueError, match="checkpointing='layers'.*'blocks'"):
        sd.build_subnetwork(f, sd.plan(f, 2, 0.5, "block"), 0, checkpointing="layers")
