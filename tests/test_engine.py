"""SubnetDataParallel on real gloo process groups (2-4 ranks, CPU, tiny models, with timeouts)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import FACTORIES, ce_loss, image_batches
from distributed import (OPTIMIZERS, STEPS, assert_close_by_name, assert_ranks_equal_simulation, batches_for,
                         max_param_diff, params_of, run_ranks, simulate, tiny_sdp, train_step, values)
from torch.nn.parallel import DistributedDataParallel as DDP

import subnetdp as sd
from subnetdp.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint



def sdp_run(rank: int, world: int, model: str, level: str, coverage: float, opt: str) -> dict:
    sdp = tiny_sdp(world, coverage, level, model, seed=7)
    o = OPTIMIZERS[opt](sdp.parameters())
    for step in range(STEPS):
        train_step(sdp, o, step, rank, world)
    full = sdp.full_state_dict()
    return {"params": params_of(sdp.module),
            "bytes": sdp.stats.per_step_bytes, "predicted": sdp.predicted_bytes_per_sync(), "full": full}


@pytest.mark.parametrize("level,opt", [("block", "sgd"), ("neuron", "adamw"), ("neuron", "sgd"), ("block", "adamw")])
def test_distributed_run_equals_simulation(level, opt):
    """Invariant 5 (and 6 across ranks, 8 via the gathered full model), K=4, C=0.5."""
    ranks = values(run_ranks(sdp_run, 4, "resnet", level, 0.5, opt))
    sim = simulate("resnet", level, 0.5, opt, 4)
    # summation order differs between gloo's all-reduce and the simulation; Adam's 1/sqrt(v) magnifies it
    tol = dict(rtol=1e-5, atol=1e-6) if opt == "sgd" else dict(rtol=1e-4, atol=1e-5)
    assert_ranks_equal_simulation([res["params"] for res in ranks], sim, **tol)
    assert ranks[1]["full"] is None
    assert_close_by_name(ranks[0]["full"], sim.full_state_dict(), **tol)
    FACTORIES["resnet"]().load_state_dict(ranks[0]["full"])


def test_communication_volume_matches_the_plan_and_is_below_ddp():
    ranks = values(run_ranks(sdp_run, 4, "vit", "block", 0.5, "sgd"))
    f = FACTORIES["vit"]
    p = sd.plan(f, 4, 0.5, "block")
    ddp_bytes = p.total_params * 4
    for k, res in enumerate(ranks):
        # prediction from the plan alone: elements this rank holds that some other worker also holds
        shared = p.param_count(k) - sum(u.numel for u in p.units_of(k) if len(p.holders(u)) < 2)
        assert res["predicted"] == shared * 4
        assert res["bytes"] == [res["predicted"]] * STEPS
        assert res["predicted"] < ddp_bytes


def ddp_vs_sdp(rank: int, world: int, model: str) -> dict:
    sdp = tiny_sdp(world, 1.0, "block", model, seed=3)
    ddp = DDP(sd.materialize(FACTORIES[model], seed=3))
    opts = [OPTIMIZERS["sgd"](m.parameters()) for m in (sdp, ddp)]
    for step in range(STEPS):
        for m, o in zip((sdp, ddp), opts):
            train_step(m, o, step, rank, world)
    return max_param_diff(sdp.module, ddp.module)


@pytest.mark.parametrize("model", ["resnet", "vit"])
def test_coverage_one_equals_ddp(model):
    """Invariant 4: C=1 SDP equals DistributedDataParallel parameter for parameter."""
    assert all(d <= 1e-6 for d in values(run_ranks(ddp_vs_sdp, 2, model)))


def accumulate(rank: int, world: int) -> dict:
    sdp = tiny_sdp(world, 0.5, "neuron", seed=1)
    o = OPTIMIZERS["sgd"](sdp.parameters())
    micro = [image_batches(world, n=2, seed=s)[rank] for s in range(3)]
    o.zero_grad()
    with sdp.no_sync():
        for b in micro[:2]:
            ce_loss(sdp, b).backward()
    assert sdp.stats.syncs == 0
    ce_loss(sdp, micro[2]).backward()
    o.step()
    return params_of(sdp.module), sdp.stats.syncs


def test_no_sync_accumulates_then_syncs_once():
    ranks = values(run_ranks(accumulate, 2))
    f = FACTORIES["resnet"]
    sim = sd.Simulation(f, sd.plan(f, 2, 0.5, "neuron"), OPTIMIZERS["sgd"], seed=1)
    micro = [image_batches(2, n=2, seed=s) for s in range(3)]
    sim.step([[m[k] for m in micro] for k in range(2)], lambda model, bs: sum(ce_loss(model, b) for b in bs))
    assert [syncs for _, syncs in ranks] == [1, 1]
    assert_ranks_equal_simulation([params for params, _ in ranks], sim, rtol=1e-5, atol=1e-6)


def params_mode(rank: int, world: int) -> dict:
    sdp = tiny_sdp(world, 0.5, "block", seed=2, sync="params", sync_every=2)
    o = torch.optim.SGD(sdp.parameters(), lr=0.05)
    sdp.attach_optimizer(o)
    for step in range(4):
        train_step(sdp, o, step, rank, world)
    return params_of(sdp.module), sdp.stats.syncs


def test_parameter_averaging_mode_equals_simulation():
    ranks = values(run_ranks(params_mode, 2))
    f = FACTORIES["resnet"]
    sim = sd.Simulation(f, sd.plan(f, 2, 0.5, "block"), lambda ps: torch.optim.SGD(ps, lr=0.05), seed=2,
                        sync="params", sync_every=2)
    for step in range(4):
        sim.step(batches_for(step, 2), ce_loss)
    assert [syncs for _, syncs in ranks] == [2, 2]
    assert_ranks_equal_simulation([params for params, _ in ranks], sim, rtol=1e-5, atol=1e-6)


def resumed_params_mode(rank: int, world: int) -> tuple[int, int, str]:
    """Resuming after 1 of ``sync_every=2`` steps: the next step is the 2nd, so it averages."""
    f = FACTORIES["resnet"]
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "block"), seed=2, sync="params", sync_every=2)
    o = torch.optim.SGD(sdp.parameters(), lr=0.05)
    sdp.attach_optimizer(o)
    sdp.optimizer_steps = 1
    ce_loss(sdp, batches_for(0, world)[rank]).backward()
    o.step()
    try:
        sdp.optimizer_steps = -1
        bad = ""
    except ValueError as e:
        bad = str(e)
    return sdp.optimizer_steps, sdp.stats.syncs, bad


def test_restored_optimizer_steps_keep_the_parameter_averaging_cadence():
    for steps, syncs, bad in values(run_ranks(resumed_params_mode, 2)):
        assert (steps, syncs) == (2, 1)
        assert "optimizer_steps=-1" in bad


def mismatched(rank: int, world: int, what: str) -> None:
    f = FACTORIES["resnet"]
    if what == "plan":
        sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "block", seed=rank))
    elif what == "architecture":
        g = FACTORIES["resnet" if rank == 0 else "vit"]
        sd.SubnetDataParallel(g, sd.plan(g, world, 0.5, "block"))
    elif what == "bucket_elements":
        sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "block"), bucket_elements=1000 + rank)
    elif what == "check_every":  # a rank checking at another cadence would wait in a collective the others skip
        sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "block"), sd.SDPOptions(check_every=100 + rank))
    elif what == "values":
        torch.manual_seed(rank)  # an unseeded real model: each rank draws its own values
        sd.SubnetDataParallel(f(), sd.plan(f, world, 0.5, "block"))
    else:
        sd.SubnetDataParallel(f, sd.plan(f, 4, 0.5, "block"))


@pytest.mark.parametrize("what,message", [
    ("plan", "ranks disagree on the plan"),
    ("architecture", "ranks disagree on the architecture"),
    ("world", "the plan is for 4 workers but the world size is 2"),
    ("bucket_elements", "'bucket_elements': 1000"),
    ("check_every", "ranks disagree on the options: rank 0: {'check_every': 100}, rank 1: {'check_every': 101}"),
    ("values", "initial values differ between the holders parameters of [0, 1]"),
])
def test_mismatch_fails_fast_with_one_clear_error_on_every_rank(what, message):
    results = run_ranks(mismatched, 2, what, timeout=60)
    errors = [r.get("error", "") for r in results]
    assert all(message in e for e in errors), errors
    assert errors[0] == errors[1]


def resumable(rank: int, world: int, ckpt: str, stop_at: int | None, resume: bool) -> dict:
    f = FACTORIES["resnet"]
    p = sd.plan(f, world, 0.5, "neuron")
    torch.manual_seed(11 + rank)
    sdp = sd.SubnetDataParallel(f, p, seed=4)
    o = OPTIMIZERS["adamw"](sdp.parameters())
    start = load_checkpoint(ckpt, sdp, o, p)["step"] if resume else 0
    for step in range(start, 4):
        x = torch.randn(4, 3, 32, 32)  # drawn from the RNG state that a checkpoint must restore
        y = torch.randint(0, 10, (4,))
        o.zero_grad()
        ce_loss(sdp, (x, y)).backward()
        o.step()
        if step + 1 == 2:
            save_checkpoint(ckpt, step + 1, sdp, o, p)
        if stop_at is not None and step + 1 == stop_at:
            os._exit(0)  # killed: no cleanup, no final save
    return params_of(sdp.module)


def test_checkpoint_kill_and_resume_equals_uninterrupted(tmp_path):
    straight = values(run_ranks(resumable, 2, str(tmp_path / "a"), None, False))
    with pytest.raises(RuntimeError, match="died"):
        run_ranks(resumable, 2, str(tmp_path / "b"), 3, False)
    assert latest_checkpoint(tmp_path / "b").name == "step-000000002"
    resumed = values(run_ranks(resumable, 2, str(tmp_path / "b"), None, True))
    for a, b in zip(straight, resumed):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, model, None)

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, None)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-000000001"
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    load_checkpoint(tmp_path, model, None)
    assert torch.equal(model.weight, before)


def test_engine_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    f = FACTORIES["resnet"]
    with pytest.raises(RuntimeError, match="init_process_group"):
        sd.SubnetDataParallel(f, sd.plan(f, 2, 0.5))


def overlap(rank: int, world: int) -> tuple[int, int]:
    f = FACTORIES["resnet"]
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, "neuron"), bucket_elements=500)
    launched_before_end = []
    finish = sdp._finish_backward

    def spy() -> None:
        launched_before_end.append(sdp._next)
        finish()

    sdp._finish_backward = spy
    ce_loss(sdp, image_batches(world)[rank]).backward()
    return launched_before_end[0], len(sdp._chunks)


def test_buckets_are_launched_during_backward():
    for launched, total in values(run_ranks(overlap, 2)):
        assert total > 1 and 0 < launched <= total


def clipped_norm(rank: int, world: int) -> float:
    sdp = tiny_sdp(world, 0.5, "block", seed=5)
    ce_loss(sdp, batches_for(0, world)[rank]).backward()
    return float(sdp.clip_grad_norm_(1e-3))


def test_distributed_clipping_norm_equals_simulation():
    norms = values(run_ranks(clipped_norm, 2))
    f = FACTORIES["resnet"]
    sim = sd.Simulation(f, sd.plan(f, 2, 0.5, "block"), OPTIMIZERS["sgd"], seed=5)
    for m, b in zip(sim.workers, batches_for(0, 2)):
        ce_loss(m, b).backward()
    sim.sync_gradients()
    expected = sim.clip_grad_norm_(1e-3)
    assert norms[0] == norms[1] == pytest.approx(expected, rel=1e-5)


def exposed_tensors(rank: int, world: int) -> dict:
    f = FACTORIES["resnet"]
    p = sd.plan(f, world, 0.5, "neuron")
    sdp = sd.SubnetDataParallel(f, p)
    state = sdp.state_dict()
    return {"same_params": [id(t) for t in sdp.parameters()] == [id(t) for t in sdp.module.parameters()],
            "subnet_numel": sum(t.numel() for t in sdp.parameters()), "planned": p.param_count(rank),
            "keys_are_the_subnetworks": list(state) == list(sdp.module.state_dict()),
            "any_meta": any(t.is_meta for t in state.values()),
            "structure_numel": sum(t.numel() for t in sdp.structure.parameters()), "total": p.total_params}


@pytest.mark.timeout(120)
def test_parameters_and_state_dict_hold_only_the_subnetwork():
    """An optimizer over sdp.parameters() and a checkpoint of sdp.state_dict() see this rank's tensors only,
    not the full model's meta structure that the engine keeps for assembling."""
    for r in values(run_ranks(exposed_tensors, 2)):
        assert r["same_params"] and r["subnet_numel"] == r["planned"] < r["total"]
        assert r["keys_are_the_subnetworks"] and not r["any_meta"]
        assert r["structure_numel"] == r["total"]


def failed_backward_then_step(rank: int, world: int) -> dict:
    sdp = tiny_sdp(world, 1.0, "block", seed=3)
    o = torch.optim.SGD(sdp.parameters(), lr=0.1)
    # raises when the stem's gradient arrives, i.e. after the other buckets' hooks ran: no end-of-backward
    handle = sdp.module.conv1.weight.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("injected")))
    try:
        ce_loss(sdp, batches_for(0, world)[rank]).backward()
    except RuntimeError as e:
        assert "injected" in str(e)
    handle.remove()
    train_step(sdp, o, 1, rank, world)
    return {"params": params_of(sdp.module), "syncs": sdp.stats.syncs}


def test_a_failed_backward_does_not_leave_the_next_step_unsynced():
    """Issue 11 item 3a: per-step state is reset at every forward, as DDP does."""
    a, b = values(run_ranks(failed_backward_then_step, 2, timeout=60))
    assert a["syncs"] == b["syncs"] == 1
    for n, t in a["params"].items():
        torch.testing.assert_close(t, b["params"][n], rtol=0, atol=0)


def nan_on_one_rank(rank: int, world: int) -> None:
    sdp = tiny_sdp(world, 0.5, "block")
    for step in range(3):
        loss = ce_loss(sdp, batches_for(step, world)[rank])
        if rank == 1 and step == 2:
            loss = loss * float("nan")
        sd.agree_finite(loss, step)
        loss.backward()


def test_a_non_finite_loss_on_one_rank_raises_the_same_error_on_every_rank():
    errors = [r.get("error", "") for r in run_ranks(nan_on_one_rank, 2, timeout=60)]
    assert errors[0] == errors[1], errors
    assert errors[0].startswith("FloatingPointError: non-finite loss on rank(s) [1] at step 2"), errors


def state_around_full_state_dict(rank: int, world: int) -> tuple[bool, dict | None]:
    sdp = tiny_sdp(world, 0.5, "block")
    ce_loss(sdp, batches_for(0, world)[rank]).backward()  # train-mode forward: each rank's own BN statistics
    before = {k: v.clone() for k, v in sdp.module.state_dict().items()}
    full = sdp.full_state_dict()
    after = sdp.module.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before), full


def test_full_state_dict_is_a_pure_read():
    """Issue 11 item 3d: BatchNorm buffers are averaged into copies, not into the workers' state."""
    (same0, full), (same1, _) = values(run_ranks(state_around_full_state_dict, 2, timeout=60))
    assert same0 and same1
    f = FACTORIES["resnet"]
    sim = sd.Simulation(f, sd.plan(f, 2, 0.5, "block"), lambda ps: torch.optim.SGD(ps, lr=0.0))
    for k, w in enumerate(sim.workers):
        ce_loss(w, batches_for(0, 2)[k]).backward()
    before = [{k: v.clone() for k, v in w.state_dict().items()} for w in sim.workers]
    ref = sim.full_state_dict()
    for b, w in zip(before, sim.workers):
        assert all(torch.equal(v, w.state_dict()[k]) for k, v in b.items())
    # the distributed and simulated gathers average the same statistics
    for k, v in ref.items():
        torch.testing.assert_close(full[k], v, rtol=1e-6, atol=1e-7)
    # stem BatchNorm: held by both, so averaged (and the workers' own statistics differ)
    assert not torch.equal(before[0]["bn1.running_mean"], before[1]["bn1.running_mean"])
    torch.testing.assert_close(ref["bn1.running_mean"], (before[0]["bn1.running_mean"] + before[1]["bn1.running_mean"]) / 2)


def groups_after_destroy(rank: int, world: int) -> tuple[int, int, int, str]:
    import sys
    import weakref

    import torch._dynamo  # noqa: F401 - imported after init_process_group, it holds the default group itself
    from torch.distributed.distributed_c10d import _world
    default_refs = sys.getrefcount(dist.group.WORLD)
    sdp = tiny_sdp(world, 0.5, "neuron")
    o = OPTIMIZERS["sgd"](sdp.parameters())
    train_step(sdp, o, 0, rank, world)
    sdp.full_state_dict()
    extra = sys.getrefcount(dist.group.WORLD) - default_refs
    subgroups = [weakref.ref(g) for g in _world.pg_map if g is not dist.group.WORLD]
    dist.destroy_process_group()
    alive = sum(g() is not None for g in subgroups)
    try:
        sdp.average_parameters()
        error = ""
    except RuntimeError as e:
        error = str(e)
    return extra, len(subgroups), alive, error


def test_destroy_process_group_frees_the_engine_groups():
    """The engine must not keep process groups alive past ``destroy_process_group``: a group kept until
    interpreter exit lets gloo's worker threads abort a correct run ("terminate called without an
    active exception": 2 of 23 runs of docs/language_models.md's script before the fix, 0 of 50 after)."""
    for extra, n, alive, error in values(run_ranks(groups_after_destroy, 4, timeout=60)):
        assert extra == 0, f"the engine holds {extra} references to the default group"
        assert n > 0 and alive == 0, (n, alive)  # neuron level at K=4, C=0.5: subgroups of two holders
        assert "process groups were destroyed" in error, error
