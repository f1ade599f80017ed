"""A DDP user's habits on SubnetDataParallel (issue 18): each gets the right result or one clear error.

``ddp_habits_script.py`` runs every habit under torchrun with 2 and 4 gloo ranks, at block and neuron
level; this file reads what each rank saw. A checkpoint saved with one world size loads into another
(run_ranks below), and the holder check's message names the tensor, the ranks and the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from conftest import FACTORIES
from distributed import run_ranks, values

import subnetdp as sd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run_script(world: int, level: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(HERE / "ddp_habits_script.py"), level, str(out)]
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module", params=[(2, "block"), (2, "neuron"), (4, "block"), (4, "neuron")],
                ids=["K2-block", "K2-neuron", "K4-block", "K4-neuron"])
def habits(request, tmp_path_factory) -> tuple[int, str, list[dict]]:
    world, level = request.param
    out = tmp_path_factory.mktemp(f"habits-{world}-{level}")
    return world, level, _run_script(world, level, out)


def _every_rank(results: list[dict], habit: str) -> list[dict]:
    return [r[habit] for r in results]


@pytest.mark.timeout(600)
def test_subnetdp_clip_grad_norm_is_torchs_call_and_keeps_holders_equal(habits):
    _, _, results = habits
    for r in _every_rank(results, "clip_subnetdp"):
        assert r == {"ok": {"norms_equal_across_ranks": True, "returns_tensor": True}}, r


@pytest.mark.timeout(600)
def test_torch_clip_grad_norm_per_rank_is_caught_on_every_rank(habits):
    """torch's clip_grad_norm_ clips each rank by its own norm: the periodic check (check_every=3 here)
    and state_dict() both stop every rank with the same message naming the tensors, ranks and fix."""
    _, _, results = habits
    for habit, where in (("clip_torch", "the periodic check at training forward 3"),
                         ("clip_torch_then_state_dict", "(state_dict())")):
        seen = _every_rank(results, habit)
        assert all(r.get("error") == "HolderDivergenceError" for r in seen), seen  # a RuntimeError
        assert len({r["message"] for r in seen}) == 1
        message = seen[0]["message"]
        assert where in message and "conv1.weight (ranks" in message
        assert "subnetdp.clip_grad_norm_(sdp.parameters(), max_norm)" in message


@pytest.mark.timeout(600)
def test_no_sync_accumulation_keeps_holders_equal(habits):
    _, _, results = habits
    assert all(r == {"ok": {"steps": 2}} for r in _every_rank(results, "no_sync"))


@pytest.mark.timeout(600)
def test_dcp_of_state_dict_and_optimizer_state_dict_resumes_bitwise(habits):
    _, _, results = habits
    for r in _every_rank(results, "dcp_plain"):
        assert r == {"ok": {"resumed_equals_straight": True, "no_module_prefix": True}}, r


@pytest.mark.timeout(600)
def test_dcp_checkpoint_loads_into_another_plan(habits):
    _, _, results = habits
    seen = _every_rank(results, "dcp_other_plan")
    assert all(r.get("ok", {}).get("plans_differ") for r in seen), seen
    assert seen[0]["ok"]["same_full_model"]


@pytest.mark.timeout(600)
def test_get_state_dict_round_trips_at_block_level_and_is_refused_at_neuron_level(habits):
    _, level, results = habits
    seen = _every_rank(results, "dcp_get_state_dict")
    if level == "block":
        assert all(r == {"ok": {"resumed_equals_straight": True, "no_module_prefix": True}} for r in seen), seen
    else:
        assert all(r.get("error") == "RuntimeError" and "sdp.optimizer_state_dict(optimizer)" in r["message"]
                   for r in seen), seen


@pytest.mark.timeout(600)
def test_an_optimizers_own_state_dict_through_dcp_never_loads_silently(habits):
    """Positional ids collide between ranks: DCP refuses the save where shapes differ (block level), and
    where they agree the load is refused by the state's rank-and-plan origin (neuron level)."""
    _, _, results = habits
    seen = _every_rank(results, "dcp_optimizer_positional_ids")
    dcp_refused = [r for r in seen if r.get("error") == "CheckpointException"]
    origin = [r for r in seen if "sdp.optimizer_state_dict(optimizer)" in r.get("message", "")]
    # DCP keeps one rank's copy: that rank loads its own state, every other rank refuses (and a job whose
    # ranks raised stops: torchrun ends the rest)
    assert len(dcp_refused) == len(seen) or (len(origin) == len(seen) - 1 and sum("ok" in r for r in seen) == 1), seen


# ---- another world size: through the full state -----------------------------------------------------------
def _momentum(sdp: sd.SubnetDataParallel, opt: torch.optim.Optimizer) -> dict:
    return {"momentum": {n: opt.state[p]["momentum_buffer"].clone() for n, p in sdp.named_parameters()},
            "tensor_map": sdp.plan.tensor_map(dist.get_rank())}


def _save(rank: int, world: int, path: str, level: str) -> dict:
    f = FACTORIES["resnet"]
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, level), seed=1)
    opt = torch.optim.SGD(sdp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(sdp(torch.randn(4, 3, 32, 32, generator=g)), torch.randint(0, 10, (4,), generator=g)).backward()
        opt.step()
    dcp.save({"model": sdp.state_dict(), "optim": sdp.optimizer_state_dict(opt)}, checkpoint_id=path)
    return {"full": sdp.full_state_dict(), **_momentum(sdp, opt)}


def _load(rank: int, world: int, path: str, level: str) -> dict:
    f = FACTORIES["resnet"]
    sdp = sd.SubnetDataParallel(f, sd.plan(f, world, 0.5, level), seed=5)
    opt = torch.optim.SGD(sdp.parameters(), lr=0.1, momentum=0.9)
    state = {"model": sdp.state_dict(), "optim": sdp.optimizer_state_dict(opt)}
    dcp.load(state, checkpoint_id=path)
    sdp.load_state_dict(state["model"])
    sdp.load_optimizer_state_dict(opt, state["optim"])
    return {"full": sdp.full_state_dict(), **_momentum(sdp, opt)}


def _full_momentum(ranks: list[dict], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Every parameter's momentum in the full model's shape, from the ranks' slices."""
    full = {n: torch.full(s, float("nan")) for n, s in shapes.items()}
    for r in ranks:
        for name, m in r["momentum"].items():
            loc = r["tensor_map"][name]
            if loc is None:
                full[name].copy_(m)
            else:
                full[name].index_copy_(loc[0], torch.tensor(loc[1]), m)
    return full


@pytest.mark.timeout(300)
@pytest.mark.parametrize("level", ["block", "neuron"])
def test_a_checkpoint_of_two_ranks_loads_into_four_plans_of_another_seed(level, tmp_path):
    saved = values(run_ranks(_save, 2, str(tmp_path / "ckpt"), level))
    loaded = values(run_ranks(_load, 4, str(tmp_path / "ckpt"), level))
    model = saved[0]["full"]
    for name, t in model.items():
        if t.is_floating_point() and "running" not in name:  # running statistics: averages over the holders
            assert torch.equal(t, loaded[0]["full"][name]), name
    shapes = {n: model[n].shape for r in saved + loaded for n in r["momentum"]}
    before, after = _full_momentum(saved, shapes), _full_momentum(loaded, shapes)
    for name in shapes:
        assert not before[name].isnan().any() and before[name].abs().sum() > 0, name
        assert torch.equal(before[name], after[name]), name
