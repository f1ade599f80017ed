"""SDP with activation checkpointing (``checkpointing="blocks"``): same math, same names, fewer saved bytes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FACTORIES, ce_loss, image_batches
from distributed import (OPTIMIZERS, STEPS, assert_close_by_name, assert_ranks_equal_simulation, max_param_diff,
                         params_of, run_ranks, simulate, tiny_sdp, train_step, values)
from torch.nn.parallel import DistributedDataParallel as DDP

import subnetdp as sd
from subnetdp.recompute import checkpoint_blocks, is_checkpointed
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
    sims = [simulate("resnet", level, 0.5, opt, 4, checkpointing=c) for c in (None, "blocks")]
    for plain, ckpt in zip(*(s.workers for s in sims)):
        assert_close_by_name(ckpt.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-6)


def sdp_ckpt_run(rank: int, world: int, level: str) -> dict:
    sdp = tiny_sdp(world, 0.5, level, seed=7, checkpointing="blocks")
    o = OPTIMIZERS["sgd"](sdp.parameters())
    for step in range(STEPS):
        train_step(sdp, o, step, rank, world)
    return {"params": params_of(sdp.module), "full": sdp.full_state_dict()}


@pytest.mark.parametrize("level", ["block", "neuron"])
def test_distributed_with_checkpointing_equals_simulation(level):
    """Invariant 5 with checkpointing on: 2 gloo ranks against the in-process simulation."""
    ranks = values(run_ranks(sdp_ckpt_run, 2, level))
    sim = simulate("resnet", level, 0.5, "sgd", 2, checkpointing="blocks")
    assert_ranks_equal_simulation([res["params"] for res in ranks], sim, rtol=1e-5, atol=1e-6)
    assert_close_by_name(ranks[0]["full"], sim.full_state_dict(), rtol=1e-5, atol=1e-6)
    FACTORIES["resnet"]().load_state_dict(ranks[0]["full"])


def ddp_ckpt_vs_sdp_ckpt(rank: int, world: int, level: str) -> tuple[float, float]:
    sdp = tiny_sdp(world, 1.0, level, seed=3, checkpointing="blocks")
    # the ddp-ckpt strategy's model; buffers stay local, as SDP's do until they are averaged
    ddp = DDP(checkpoint_blocks(sd.materialize(FACTORIES["resnet"], seed=3)), broadcast_buffers=False)
    opts = [OPTIMIZERS["sgd"](m.parameters()) for m in (sdp, ddp)]
    for step in range(STEPS):
        for m, o in zip((sdp, ddp), opts):
            train_step(m, o, step, rank, world)
    params = max_param_diff(sdp.module, ddp.module)
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
