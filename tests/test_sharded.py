"""sharding="holders": SDP on FSDP2, each unit's state split over its holders (gloo, 4 ranks, tiny models)."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
import torch.distributed as dist
from conftest import FACTORIES, ce_loss, image_batches, llama_tiny
from distributed import OPTIMIZERS, assert_close_by_name, batches_for, one_thread, run_ranks, values

import subnetdp as sd
from subnetdp.planning.counting import state_bytes
from subnetdp.recompute import is_checkpointed
from subnetdp.sharded import HolderShardedSDP

WORLD = 4
STEPS = 4  # at step 5, worker 3's AdamW gradient jumps at a kink: see docs/sharding.md
# K=4, block level: every (optimizer, checkpointing) pair is trained in one set of 4 processes per plan
CONFIGS = [(opt, ckpt) for opt in ("sgd", "adamw") for ckpt in ("none", "blocks")]


def full_params(sdp: HolderShardedSDP) -> dict[str, torch.Tensor]:
    """This rank's parameters assembled from their shards (collective over each holder mesh, in model order)."""
    return {n: p.full_tensor().detach().clone() for n, p in sdp.named_parameters()}


def sharded_runs(rank: int, world: int, model: str, plan: sd.Plan, configs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for opt_name, ckpt in configs:
        sdp = sd.SubnetDataParallel(FACTORIES[model], plan, seed=7, sharding="holders", checkpointing=ckpt)
        opt = OPTIMIZERS[opt_name](sdp.parameters())
        for step in range(STEPS):
            opt.zero_grad()
            ce_loss(sdp, batches_for(step, world)[rank]).backward()
            opt.step()
        sdp.eval()
        with torch.no_grad():  # inference gathers each group as training does, and uses this worker's statistics
            evaluated = sdp(batches_for(STEPS, world)[rank][0])
        out.append({"type": type(sdp).__name__, "dtensors": all(hasattr(p, "device_mesh") for p in sdp.parameters()),
                    "eval": evaluated,
                    "checkpointed": sum(is_checkpointed(m) for m in sdp.module.modules()),
                    "params": full_params(sdp), "full": sdp.full_state_dict()})
    return out


def simulation(model: str, plan: sd.Plan, opt: str, checkpointing: str = "none") -> sd.Simulation:
    with one_thread():
        sim = sd.Simulation(FACTORIES[model], plan, OPTIMIZERS[opt], seed=7, checkpointing=checkpointing)
        for step in range(STEPS):
            sim.step(batches_for(step, plan.workers), ce_loss)
    return sim


def relative_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """The largest ``|got - expected| / max|expected|`` over tensors (what the tolerance below bounds)."""
    return max(float((t - expected[n].detach()).abs().max() / expected[n].detach().abs().max().clamp_min(1e-12))
               for n, t in got.items())


def assert_runs_equal_simulation(model: str, plan: sd.Plan, configs: list[tuple[str, str]], ranks: list[list[dict]]) -> None:
    for i, (opt, ckpt) in enumerate(configs):
        sim = simulation(model, plan, opt, ckpt)
        for k in range(plan.workers):
            res = ranks[k][i]
            assert res["type"] == "HolderShardedSDP" and res["dtensors"]
            assert (res["checkpointed"] > 0) == (ckpt == "blocks")  # checkpointing survives fully_shard
            expected = dict(sim.workers[k].named_parameters())
            assert set(res["params"]) == set(expected)
            assert_close_by_name(res["params"], expected, rtol=1e-5, atol=1e-6)
            with torch.no_grad(), one_thread():
                torch.testing.assert_close(res["eval"], sim.workers[k].eval()(batches_for(STEPS, plan.workers)[k][0]),
                                           rtol=1e-4, atol=1e-5)
        assert ranks[1][i]["full"] is None
        assert_close_by_name(ranks[0][i]["full"], sim.full_state_dict(), rtol=1e-5, atol=1e-6)
        FACTORIES[model]().load_state_dict(ranks[0][i]["full"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("coverage", [0.5, 0.25])
def test_sharded_training_equals_the_simulation(coverage):
    """K=4, block level, SGD-momentum and AdamW, with and without block checkpointing: every rank's (gathered)
    parameters after 4 steps, and the assembled full model, equal the simulation of the same plan."""
    f = FACTORIES["resnet"]
    plan = sd.plan(f, WORLD, coverage, "block")
    ranks = values(run_ranks(sharded_runs, WORLD, "resnet", plan, CONFIGS, timeout=500))
    assert_runs_equal_simulation("resnet", plan, CONFIGS, ranks)


# 20 steps in float32: a setting whose training does not amplify rounding (labels the model can fit, small
# learning rates; see docs/sharding.md: on random labels at the tests' rates both storages drift from the
# simulation by chaos, not by their math)
LONG_STEPS = 20
LONG_FACTORY = functools.partial(sd.models.resnet18, width=8)
LONG_OPTIMIZERS = {"sgd": lambda ps: torch.optim.SGD(ps, lr=5e-4, momentum=0.9, weight_decay=1e-4),
                   "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.01, eps=1e-5)}


def learnable_batch(step: int, worker: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 random images labelled by their mean colour under a fixed map (a function the model can fit)."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1000 * step + worker))
    return x, (x.mean(dim=(2, 3)) @ torch.randn(3, 10, generator=torch.Generator().manual_seed(12345))).argmax(1)


def long_runs(rank: int, world: int, plan: sd.Plan, opts: list[str]) -> list[dict[str, torch.Tensor]]:
    out = []
    for opt_name in opts:
        sdp = sd.SubnetDataParallel(LONG_FACTORY, plan, seed=7, sharding="holders")
        opt = LONG_OPTIMIZERS[opt_name](sdp.parameters())
        for step in range(LONG_STEPS):
            opt.zero_grad()
            ce_loss(sdp, learnable_batch(step, rank)).backward()
            opt.step()
        out.append(full_params(sdp))
    return out


@pytest.mark.timeout(600)
def test_twenty_float32_steps_equal_the_simulation_to_1e_5():
    """K=4, C=0.25 (the plan with the most holder sets), SGD-momentum and AdamW: after 20 float32 steps every
    rank's parameters equal the simulation's to 1e-5 relative over the whole parameter vector, and to 1e-5
    absolute element by element."""
    plan = sd.plan(LONG_FACTORY, WORLD, 0.25, "block")
    opts = ["sgd", "adamw"]
    ranks = values(run_ranks(long_runs, WORLD, plan, opts, timeout=500))
    for i, opt in enumerate(opts):
        with one_thread():
            sim = sd.Simulation(LONG_FACTORY, plan, LONG_OPTIMIZERS[opt], seed=7)
            for step in range(LONG_STEPS):
                sim.step([learnable_batch(step, k) for k in range(WORLD)], ce_loss)
        for k in range(WORLD):
            got, expected = ranks[k][i], {n: p.detach() for n, p in sim.workers[k].named_parameters()}
            assert set(got) == set(expected)
            flat, ref = (torch.cat([d[n].flatten() for n in sorted(got)]) for d in (got, expected))
            assert float((flat - ref).norm() / ref.norm()) <= 1e-5, (opt, k)
            assert float((flat - ref).abs().max()) <= 1e-5, (opt, k)


def interleaved_plan() -> sd.Plan:
    """A ViT plan in which rank 0 holds blocks 1, 2, 3 and rank 1 holds blocks 1 and 3 (both sets (0, 1)):
    FSDP2's default backward prefetch would have rank 0 gather block 1 after reducing block 3, and rank 1
    before, on the same process group."""
    plan = sd.plan(FACTORIES["vit"], WORLD, 0.5, "block")
    plan = dataclasses.replace(plan, slots=(3, 1, 0, 1))
    assert [plan.holders(u) for u in plan.units] == [(2, 3), (0, 1), (0, 3), (0, 1)]
    return plan


@pytest.mark.timeout(300)
def test_ranks_holding_different_blocks_issue_collectives_in_one_order():
    plan = interleaved_plan()
    configs = [("sgd", "none")]
    ranks = values(run_ranks(sharded_runs, WORLD, "vit", plan, configs, timeout=240))
    assert_runs_equal_simulation("vit", plan, configs, ranks)


@pytest.mark.timeout(300)
def test_transition_units_shard_their_shortcut_over_the_world():
    """``transitions="shortcut"``: a transition block is a unit whose shortcut every worker keeps (a non-holder
    runs the shortcut alone), so the shortcut is its own FSDP2 group over all K inside the holders' block."""
    f = FACTORIES["resnet"]
    plan = sd.plan(f, WORLD, 0.5, "block", transitions="shortcut")
    assert any(b.transition and b.name in {u.name for u in plan.units} for b in plan.blocks)
    configs = [("adamw", "blocks")]
    ranks = values(run_ranks(sharded_runs, WORLD, "resnet", plan, configs, timeout=240))
    assert_runs_equal_simulation("resnet", plan, configs, ranks)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def token_batch(step: int, worker: int) -> torch.Tensor:
    return torch.randint(0, 65, (2, 17), generator=torch.Generator().manual_seed(100 * step + worker))


TIED_LLAMA = functools.partial(llama_tiny, tie_embeddings=True)


def llama_run(rank: int, world: int) -> dict[str, torch.Tensor]:
    sdp = sd.SubnetDataParallel(TIED_LLAMA, sd.plan(TIED_LLAMA, world, 0.5, "block"), seed=3, sharding="holders",
                                checkpointing="blocks")
    opt = OPTIMIZERS["adamw"](sdp.parameters())
    for step in range(STEPS):
        opt.zero_grad()
        lm_loss(sdp, token_batch(step, rank)).backward()
        opt.step()
    return full_params(sdp)


@pytest.mark.timeout(300)
def test_a_decoder_with_tied_embeddings_equals_the_simulation():
    """The zoo's LLaMA, embedding and output tied (one parameter in the world's FSDP2 group), AdamW, checkpointed."""
    ranks = values(run_ranks(llama_run, WORLD, timeout=240))
    with one_thread():
        sim = sd.Simulation(TIED_LLAMA, sd.plan(TIED_LLAMA, WORLD, 0.5, "block"), OPTIMIZERS["adamw"], seed=3,
                            checkpointing="blocks")
        for step in range(STEPS):
            sim.step([token_batch(step, k) for k in range(WORLD)], lm_loss)
    for k, params in enumerate(ranks):
        assert_close_by_name(params, dict(sim.workers[k].named_parameters()), rtol=1e-5, atol=1e-6)


# ---- what is refused ------------------------------------------------------------------------------------

def neuron_level(rank: int, world: int) -> None:
    def no_collective(*_a: object, **_k: object) -> None:
        raise AssertionError("a collective ran before the error")

    dist.all_gather_object = no_collective  # this process only
    f = FACTORIES["resnet"]
    sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "neuron"), sharding="holders")


def test_neuron_level_is_refused_on_every_rank_before_any_collective():
    errors = [r.get("error", "") for r in run_ranks(neuron_level, 2, timeout=60)]
    assert errors[0] == errors[1], errors
    assert errors[0].startswith("ValueError: sharding='holders' with a neuron-level plan"), errors
    assert "level='block'" in errors[0]


def mixed_storage(rank: int, world: int) -> None:
    f = FACTORIES["resnet"]
    sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "block"), sharding="holders" if rank == 0 else "none")


def test_ranks_that_differ_in_sharding_fail_with_one_error():
    errors = [r.get("error", "") for r in run_ranks(mixed_storage, 2, timeout=60)]
    assert errors[0] == errors[1], errors
    assert "ranks disagree on the options: rank 0: {'sharding': 'holders'}, rank 1: {'sharding': 'none'}" in errors[0]


@pytest.mark.parametrize("options,message", [
    (dict(masking="backward"), "sharding='holders' with masking='backward'.*use masking='forward' or sharding='none'"),
    (dict(sync="params"), "sharding='holders' with sync='params'.*use sync='grads'"),
])
def test_what_fsdp2_cannot_express_is_refused_when_the_options_are_made(options, message):
    with pytest.raises(ValueError, match=message):
        sd.SDPOptions(sharding="holders", **options)


def test_sharding_none_builds_the_replicated_engine_unchanged():
    """Without a process group the constructor stops at the same check, in the class each storage names."""
    f = FACTORIES["resnet"]
    plan = sd.plan(f, 2, 0.5)
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.SubnetDataParallel(f, plan, sharding="none")
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.SubnetDataParallel(f, plan, sd.SDPOptions(sharding="holders"))
    assert sd.SDPOptions().sharding == "none"


# ---- the loop's tools: accumulation, clipping ---------------------------------------------------------------

def accumulate(rank: int, world: int) -> dict:
    f = FACTORIES["resnet"]
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "block"), sd.SDPOptions(seed=1, sharding="holders"))
    o = OPTIMIZERS["sgd"](sdp.parameters())
    micro = [image_batches(world, n=2, seed=s)[rank] for s in range(3)]
    o.zero_grad()
    with sdp.no_sync():
        for b in micro[:2]:
            ce_loss(sdp, b).backward()
    reduced_inside = [p.grad is not None for p in sdp.parameters()]  # FSDP2 keeps the unsharded sums meanwhile
    ce_loss(sdp, micro[2]).backward()
    o.step()
    return {"reduced_inside": any(reduced_inside), "params": full_params(sdp)}


@pytest.mark.timeout(300)
def test_no_sync_accumulates_then_reduces_the_sum_once():
    ranks = values(run_ranks(accumulate, WORLD, timeout=240))
    f = FACTORIES["resnet"]
    with one_thread():
        sim = sd.Simulation(f, sd.plan(f, WORLD, 0.5, "block"), OPTIMIZERS["sgd"], seed=1)
        micro = [image_batches(WORLD, n=2, seed=s) for s in range(3)]
        sim.step([[m[k] for m in micro] for k in range(WORLD)], lambda model, bs: sum(ce_loss(model, b) for b in bs))
    assert not any(r["reduced_inside"] for r in ranks)
    for k, r in enumerate(ranks):
        assert_close_by_name(r["params"], dict(sim.workers[k].named_parameters()), rtol=1e-5, atol=1e-6)


def clipped(rank: int, world: int) -> dict:
    f = FACTORIES["resnet"]
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "block"), seed=5, sharding="holders")
    o = torch.optim.SGD(sdp.parameters(), lr=0.1)
    ce_loss(sdp, batches_for(0, world)[rank]).backward()
    try:  # the DDP habit: torch's own clipping refuses DTensors of different meshes on every rank (loud)
        torch.nn.utils.clip_grad_norm_(sdp.parameters(), 1e-3)
        torch_error = ""
    except RuntimeError as e:
        torch_error = str(e)
    norm = float(sd.clip_grad_norm_(sdp.parameters(), 1e-3))  # routed to the engine: torch's cannot mix meshes
    norm_after = float(sdp.clip_grad_norm_(float("inf")))  # max_norm=inf only measures
    max_after = float(sdp.clip_grad_norm_(float("inf"), norm_type=float("inf")))
    o.step()
    return {"norm": norm, "norm_after": norm_after, "max_after": max_after, "params": full_params(sdp),
            "torch_error": torch_error}


@pytest.mark.timeout(300)
def test_clipping_uses_the_full_models_averaged_gradient_norm():
    ranks = values(run_ranks(clipped, WORLD, timeout=240))
    f = FACTORIES["resnet"]
    with one_thread():
        sim = sd.Simulation(f, sd.plan(f, WORLD, 0.5, "block"), lambda ps: torch.optim.SGD(ps, lr=0.1), seed=5)
        for m, b in zip(sim.workers, batches_for(0, WORLD)):
            ce_loss(m, b).backward()
        sim.sync_gradients()
        expected = sim.clip_grad_norm_(1e-3)
        largest = max(float(p.grad.abs().max()) for w in sim.workers for p in w.parameters() if p.grad is not None)
        for o in sim.optimizers:
            o.step()
    assert all("must have the same mesh" in r["torch_error"] for r in ranks)  # it failed before clipping anything
    assert len({r["norm"] for r in ranks}) == 1
    assert ranks[0]["norm"] == pytest.approx(expected, rel=1e-5)
    assert all(r["norm_after"] == pytest.approx(1e-3, rel=1e-3) for r in ranks)
    assert all(r["max_after"] == pytest.approx(largest, rel=1e-5) for r in ranks)
    for k, r in enumerate(ranks):
        assert_close_by_name(r["params"], dict(sim.workers[k].named_parameters()), rtol=1e-5, atol=1e-7)


# ---- memory: each unit's state split over its holders --------------------------------------------------------

def state_on_rank(rank: int, world: int, coverage: float) -> dict:
    f = FACTORIES["resnet"]
    plan = sd.plan(f, world, coverage, "block")
    out = {}
    for sharding in ("none", "holders"):
        sdp = sd.SubnetDataParallel(f, plan, seed=3, sharding=sharding)
        o = OPTIMIZERS["adamw"](sdp.parameters())
        o.zero_grad()
        ce_loss(sdp, batches_for(0, world)[rank]).backward()
        o.step()
        out[sharding] = state_bytes(sdp, o)
        if sharding == "holders":
            names = {id(p): n for n, p in sdp.named_parameters()}
            out["groups"] = [(sorted(names[id(p)] for p in params), n) for params, n in sdp._fsdp_groups]
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("coverage", [0.5, 0.25])
def test_each_rank_keeps_less_state_and_each_element_once(coverage):
    """Local shard bytes of parameters, gradients and AdamW state, counted after a step: below the replicated
    engine's on every rank, and over all ranks each parameter element is stored exactly once."""
    ranks = values(run_ranks(state_on_rank, WORLD, coverage, timeout=240))
    plan = sd.plan(FACTORIES["resnet"], WORLD, coverage, "block")
    for k, r in enumerate(ranks):
        mine, replicated = r["holders"], r["none"]
        assert replicated["param_bytes"] == plan.param_count(k) * 4
        for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
            assert mine[key] < replicated[key], (k, key, mine, replicated)
    assert sum(r["holders"]["param_bytes"] for r in ranks) == plan.total_params * 4
    assert sum(r["holders"]["grad_bytes"] for r in ranks) == plan.total_params * 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("coverage", [0.5, 0.25])
def test_the_planner_predicts_the_groups_and_state_fsdp2_builds(coverage):
    """``planning.shards`` describes the FSDP2 groups the engine builds (names and holder counts), and its
    predicted state is each rank's counted shards plus FSDP2's padding (dim 0 rounded up per mesh)."""
    ranks = values(run_ranks(state_on_rank, WORLD, coverage, timeout=240))
    plan = sd.plan(FACTORIES["resnet"], WORLD, coverage, "block")
    for k, r in enumerate(ranks):
        assert r["groups"] == [(sorted(names), len(h)) for names, h in sd.planning.shards.group_params(plan, k)]
        predicted = sd.planning.predict_sharded_worker(plan, k, "adamw")
        counted = r["holders"]
        padding = sum(plan.shapes[n][0] % len(h) and math.prod(plan.shapes[n][1:]) * 4 * len(h)
                      for names, h in sd.planning.shards.group_params(plan, k) for n in names)
        for key in ("param_bytes", "grad_bytes"):
            assert counted[key] <= predicted[key] <= counted[key] + padding, (k, key, counted, predicted)
        assert predicted["state_bytes"] == predicted["param_bytes"] * 4  # AdamW: parameter, gradient, two moments


# ---- traffic: what FSDP2 hands to collectives, as predicted -------------------------------------------------

def handed_per_step(rank: int, world: int, coverage: float) -> dict:
    from subnetdp.measure.meters import counted_fsdp2_collectives

    f = FACTORIES["resnet"]
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, coverage, "block"), seed=2, sharding="holders",
                                checkpointing="blocks")
    o = OPTIMIZERS["sgd"](sdp.parameters())
    per_step = []
    with counted_fsdp2_collectives() as handed:  # FSDP2's calls through torch.distributed, this process only
        for step in range(2):
            before = handed["bytes"]
            o.zero_grad()
            ce_loss(sdp, batches_for(step, world)[rank]).backward()
            o.step()
            per_step.append(handed["bytes"] - before)
    if dist.all_gather_single.__name__ != "all_gather_single":
        raise AssertionError("counted_fsdp2_collectives left torch.distributed wrapped")
    return {"measured": per_step, "predicted": sdp.predicted_bytes_per_sync()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("coverage", [0.5, 0.25])
def test_predicted_bytes_per_sync_equal_what_fsdp2_hands_over(coverage):
    for r in values(run_ranks(handed_per_step, WORLD, coverage, timeout=240)):
        assert r["measured"] == [r["predicted"]] * 2 and r["predicted"] > 0, r


# ---- checkpoints through torch.distributed.checkpoint ------------------------------------------------------

def dcp_resume(rank: int, world: int, path: str, route: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, get_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)

    f = FACTORIES["resnet"]
    plan = sd.plan(f, world, 0.5, "block")

    def build() -> tuple[HolderShardedSDP, torch.optim.Optimizer]:
        sdp = sd.SubnetDataParallel(f, plan, seed=5, sharding="holders")
        return sdp, OPTIMIZERS["adamw"](sdp.parameters())

    def train(sdp: HolderShardedSDP, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            ce_loss(sdp, batches_for(step, world)[rank]).backward()
            opt.step()

    def state_of(sdp: HolderShardedSDP, opt: torch.optim.Optimizer) -> dict:
        if route == "state_dict":
            return {"model": sdp.state_dict(), "optim": get_optimizer_state_dict(sdp, opt)}
        model_sd, optim_sd = get_state_dict(sdp, opt)
        return {"model": model_sd, "optim": optim_sd}

    sdp, opt = build()
    train(sdp, opt, range(2))
    own_buffers = {n: b.clone() for n, b in sdp.named_buffers() if n.endswith("running_mean")}
    dcp.save(state_of(sdp, opt), checkpoint_id=path)
    train(sdp, opt, range(2, 4))
    straight = {"params": full_params(sdp), "full": sdp.full_state_dict()}
    again, opt2 = build()
    state = state_of(again, opt2)  # the template dcp.load fills
    dcp.load(state, checkpoint_id=path)
    if route == "state_dict":
        again.load_state_dict(state["model"])
        set_optimizer_state_dict(again, opt2, state["optim"])
    else:
        set_state_dict(again, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(again, opt2, range(2, 4))
    return {"straight": straight, "resumed": {"params": full_params(again), "full": again.full_state_dict()},
            "own_buffers": own_buffers, "keys": sorted(state["model"])}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("route", ["state_dict", "get_state_dict"])
def test_a_dcp_checkpoint_resumes_to_the_same_parameters_and_assembled_model(tmp_path, route):
    """dcp.save of ``sdp.state_dict()`` (or ``get_state_dict``) after 2 AdamW steps, a fresh engine loaded from
    it and trained 2 more: every rank's parameters bitwise equal to the uninterrupted run's, the assembled
    model equal (its BatchNorm statistics, which differ between holders, saved as their holders' average)."""
    ranks = values(run_ranks(dcp_resume, WORLD, str(tmp_path / "ckpt"), route, timeout=240))
    for r in ranks:
        assert not any(k.startswith("module.") for k in r["keys"])
        for name, value in r["straight"]["params"].items():
            assert torch.equal(value, r["resumed"]["params"][name]), name
    holders_differ = [n for n in ranks[0]["own_buffers"] for a in ranks for b in ranks
                      if n in a["own_buffers"] and n in b["own_buffers"]
                      and not torch.equal(a["own_buffers"][n], b["own_buffers"][n])]
    assert holders_differ  # else the test could not tell one holder's statistics from their average
    straight, resumed = ranks[0]["straight"]["full"], ranks[0]["resumed"]["full"]
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)


# ---- FSDP2's mixed precision --------------------------------------------------------------------------------

def mixed_precision(rank: int, world: int) -> dict:
    from subnetdp.measure.meters import counted_fsdp2_collectives

    f = FACTORIES["vit"]
    plan = sd.plan(f, world, 0.5, "block")
    out = {}
    for dtype in ("float32", "bfloat16"):
        sdp = sd.SubnetDataParallel(f, plan, seed=4, sharding="holders", param_dtype=dtype)
        o = OPTIMIZERS["sgd"](sdp.parameters())
        seen = set()
        hooks = [m.register_forward_pre_hook(lambda m, _a: seen.update(p.dtype for p in m.parameters(recurse=False)))
                 for m in sdp.module.modules() if isinstance(m, torch.nn.Linear)]
        with counted_fsdp2_collectives() as handed:
            for step in range(3):
                before = handed["bytes"]
                o.zero_grad()
                ce_loss(sdp, batches_for(step, world)[rank]).backward()
                o.step()
        for h in hooks:
            h.remove()
        out[dtype] = {"computed_in": sorted(str(d) for d in seen), "handed": handed["bytes"] - before,
                      "predicted": sdp.predicted_bytes_per_sync(), "params": full_params(sdp),
                      "stored": sorted({str(p.dtype) for p in sdp.parameters()}),
                      "optimizer": sorted({str(t.dtype) for s in o.state.values() for t in s.values()
                                           if torch.is_tensor(t)})}
    return out


@pytest.mark.timeout(300)
def test_bfloat16_parameters_are_gathered_and_computed_in_bf16_and_stored_in_fp32():
    """``param_dtype="bfloat16"`` (FSDP2's MixedPrecisionPolicy), a ViT: linears run on bf16 parameters, the
    shards, the gradients they are updated with and the optimizer state stay fp32, the all-gathers hand half
    the bytes (counted = predicted), and the parameters after 3 steps stay within bf16 rounding of fp32's."""
    ranks = values(run_ranks(mixed_precision, WORLD, timeout=240))
    for r in ranks:
        full, half = r["float32"], r["bfloat16"]
        assert full["computed_in"] == ["torch.float32"] and half["computed_in"] == ["torch.bfloat16"]
        assert half["stored"] == full["stored"] == ["torch.float32"]
        assert half["optimizer"] == ["torch.float32"]
        for run in (full, half):
            assert run["handed"] == run["predicted"]
        assert half["predicted"] < full["predicted"]
        for name, value in full["params"].items():
            torch.testing.assert_close(half["params"][name], value, rtol=0.05, atol=0.02, msg=name)


def batch_norm_in_bf16(rank: int, world: int) -> None:
    f = FACTORIES["resnet"]
    sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "block"), sharding="holders", param_dtype="bfloat16")


def test_bfloat16_parameters_refuse_batch_norm_on_every_rank():
    errors = [r.get("error", "") for r in run_ranks(batch_norm_in_bf16, 2, timeout=60)]
    assert all("BatchNorm" in e and "param_dtype='float32'" in e for e in errors), errors


def test_bfloat16_parameters_need_sharding_over_holders():
    with pytest.raises(ValueError, match="needs sharding='holders'"):
        sd.SDPOptions(param_dtype="bfloat16")
    with pytest.raises(ValueError, match="param_dtype='float16'"):
        sd.SDPOptions(sharding="holders", param_dtype="float16")
