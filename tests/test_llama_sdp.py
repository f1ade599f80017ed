"""LLaMA (the zoo's decoder) under SDP at both levels: invariants 2, 4-8 and GQA-consistent slicing.

Invariant 3 (subnetwork = slice of the full model at init) and the layer-level GQA check are in
test_subnet.py; the generic invariants are checked there and in test_simulate.py/test_engine.py on
ResNet and ViT. Here they run on token batches and a causal-LM loss.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import llama_tiny
from distributed import run_ranks, values
from test_simulate import assert_sync_matches_world_reduction, full_coordinates
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import subnetdp as sd

VOCAB = 65
SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)  # 2 query heads per kv head
LLAMAS = {
    "untied": functools.partial(llama_tiny, **SMALL),
    "tied": functools.partial(llama_tiny, **SMALL, tie_embeddings=True),
}
DISTRIBUTED_CASES = [("untied", "block"), ("tied", "neuron")]
STEPS = 3


def token_batches(workers: int, n: int = 2, seq: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(workers):
        w = torch.randint(0, VOCAB, (n, seq + 1), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    out = model(batch[0])
    logits = getattr(out, "logits", out)  # Hugging Face models return a ModelOutput
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def masked_full_model(factory, p: sd.Plan, worker: int, seed: int) -> nn.Module:
    """The full model with every width unit ``worker`` does not hold cut off at its consumer.

    Zeroing a unit's consumer columns (o_proj for a kv group, down_proj/c_proj/fc2 for MLP
    hidden units) removes its contribution; without inverted scaling the subnetwork must equal this.
    """
    full = sd.materialize(factory, seed=seed)
    tensors = dict(full.named_parameters())
    tmap = p.tensor_map(worker)
    with torch.no_grad():
        for g in p.groups:
            for consumer in g.consumers:
                spec = next(s for s in g.slices if s.tensor == consumer + ".weight")
                t = tensors[spec.tensor]
                keep = torch.zeros(t.shape[spec.dim], dtype=torch.bool)
                keep[tmap[spec.tensor][1]] = True
                shape = [1] * t.dim()
                shape[spec.dim] = -1
                t.mul_(keep.view(shape))
    return full


@pytest.mark.parametrize("tie", sorted(LLAMAS))
def test_neuron_subnetwork_equals_the_full_model_without_the_units_it_lacks(tie):
    f = LLAMAS[tie]
    p = sd.plan(f, 2, 0.5, "neuron")
    x = token_batches(1)[0][0]
    for k in range(2):
        sub = sd.build_subnetwork(f, p, k, seed=3, neuron_scaling="none")
        attn = sub.layers[0].attention
        assert (attn.n_heads, attn.n_kv_heads) == (2, 1)  # one kv group of two, with its two query heads
        torch.testing.assert_close(sub(x), masked_full_model(f, p, k, seed=3)(x), rtol=1e-5, atol=1e-5)


def simulate(tie: str, level: str, coverage: float, workers: int, opt: str = "sgd") -> sd.Simulation:
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, eps=1e-5)}[opt]
    f = LLAMAS[tie]
    sim = sd.Simulation(f, sd.plan(f, workers, coverage, level), make, seed=7)
    for step in range(STEPS):
        sim.step(token_batches(workers, seed=step), lm_loss)
    return sim


@pytest.mark.parametrize("level", ["block", "neuron"])
@pytest.mark.parametrize("tie", sorted(LLAMAS))
def test_sync_and_training_invariants(level, tie):
    """Invariants 7 (holder averaging = world-reduction oracle), 6, 2 and 8, on K=4, C=0.5."""
    f = LLAMAS[tie]
    p = sd.plan(f, 4, 0.5, level)
    probe = sd.Simulation(f, p, lambda ps: torch.optim.SGD(ps, lr=0.0))
    assert_sync_matches_world_reduction(probe, token_batches(4), lm_loss)

    sim = simulate(tie, level, 0.5, 4, "adamw")
    for name, items in full_coordinates(sim).items():
        for _, full in items[1:]:
            both = ~torch.isnan(items[0][1]) & ~torch.isnan(full)
            torch.testing.assert_close(full[both], items[0][1][both], rtol=0, atol=0)
    for k, (w, o) in enumerate(zip(sim.workers, sim.optimizers)):
        assert sum(t.numel() for t in w.parameters()) == p.param_count(k)
        state = sum(s.numel() for st in o.state.values() for key, s in st.items() if key != "step")
        assert state == 2 * p.param_count(k)  # AdamW's two moments, for held parameters only
        if tie == "tied":
            assert w.output.weight is w.tok_embeddings.weight
    model = f()
    model.load_state_dict(sim.full_state_dict())
    assert lm_loss(model, token_batches(1)[0]).isfinite()


def distributed(rank: int, world: int) -> list[dict]:
    out = []
    for tie, level in DISTRIBUTED_CASES:
        f = LLAMAS[tie]
        sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, level), seed=7)
        opt = torch.optim.SGD(sdp.parameters(), lr=0.1, momentum=0.9)
        for step in range(STEPS):
            opt.zero_grad()
            lm_loss(sdp, token_batches(world, seed=step)[rank]).backward()
            opt.step()
        params = {n: t.detach().clone() for n, t in sdp.module.named_parameters()}
        # invariant 4: coverage 1 equals DistributedDataParallel, parameter for parameter
        one = sd.SubnetDataParallel(f, sd.plan(f, world, 1.0, level), seed=3)
        ddp = DDP(sd.materialize(f, seed=3))
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (one, ddp)]
        for step in range(STEPS):
            for m, o in zip((one, ddp), opts):
                o.zero_grad()
                lm_loss(m, token_batches(world, seed=step)[rank]).backward()
                o.step()
        ref = dict(ddp.module.named_parameters())
        ddp_diff = max(float((t - ref[n]).detach().abs().max()) for n, t in one.module.named_parameters())
        out.append({"params": params, "full": sdp.full_state_dict(), "ddp_diff": ddp_diff})
    return out


def test_distributed_equals_simulation_and_coverage_one_equals_ddp():
    """Invariants 5 and 4 on 2 gloo ranks; the gathered full model loads into the plain LLaMA (8)."""
    ranks = values(run_ranks(distributed, 2))
    for case, (tie, level) in enumerate(DISTRIBUTED_CASES):
        sim = simulate(tie, level, 0.5, 2)
        for k, per_case in enumerate(ranks):
            res = per_case[case]
            assert res["ddp_diff"] <= 1e-6, (tie, level)
            mine = dict(sim.workers[k].named_parameters())
            for name, t in res["params"].items():
                torch.testing.assert_close(t, mine[name].detach(), rtol=1e-5, atol=1e-6)
        full = sim.full_state_dict()
        for name, t in ranks[0][case]["full"].items():
            torch.testing.assert_close(t, full[name], rtol=1e-5, atol=1e-6)
        LLAMAS[tie]().load_state_dict(ranks[0][case]["full"])
