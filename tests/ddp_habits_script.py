"""A DDP user's habits on SubnetDataParallel, run under torchrun by tests/test_ddp_habits.py.

``torchrun --standalone --nproc-per-node K ddp_habits_script.py LEVEL OUT`` runs each habit on K gloo ranks
with a tiny ResNet at ``LEVEL`` and writes what each rank saw to ``OUT/rank-R.json``: a habit's result,
or the error it raised (type and message), so the test can tell a right result from a clear error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import subnetdp
from subnetdp.models import resnet18

LEVEL, OUT = sys.argv[1], Path(sys.argv[2])
factory = lambda: resnet18(width=4)  # noqa: E731


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


def new_sdp(check_every: int = 0, seed: int = 0) -> tuple[subnetdp.SubnetDataParallel, torch.optim.Optimizer]:
    plan = subnetdp.plan(factory, workers=dist.get_world_size(), coverage=0.5, level=LEVEL, seed=seed)
    sdp = subnetdp.SubnetDataParallel(factory, plan, seed=0, check_every=check_every)
    return sdp, torch.optim.SGD(sdp.parameters(), lr=0.1, momentum=0.9)


def step(sdp: subnetdp.SubnetDataParallel, opt: torch.optim.Optimizer, i: int, clip: str | None = None) -> None:
    opt.zero_grad()
    F.cross_entropy(sdp(batch(i, dist.get_rank())[0]), batch(i, dist.get_rank())[1]).backward()
    if clip == "subnetdp":
        subnetdp.clip_grad_norm_(sdp.parameters(), 1e-2)
    elif clip == "torch":
        torch.nn.utils.clip_grad_norm_(sdp.parameters(), 1e-2)
    opt.step()


def local(sdp: subnetdp.SubnetDataParallel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in sdp.module.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def outcome(fn) -> dict:
    try:
        return {"ok": fn()}
    except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
        return {"error": type(e).__name__, "message": str(e)}


def clip_subnetdp() -> dict:
    sdp, opt = new_sdp(check_every=1)
    norms = []
    for i in range(4):
        opt.zero_grad()
        x, y = batch(i, dist.get_rank())
        F.cross_entropy(sdp(x), y).backward()
        norms.append(float(subnetdp.clip_grad_norm_(sdp.parameters(), 1e-2)))
        opt.step()
    sdp.check_holders()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, norms)
    return {"norms_equal_across_ranks": all(n == norms for n in everyone),
            "returns_tensor": isinstance(subnetdp.clip_grad_norm_(sdp.parameters(), 1e-2), torch.Tensor)}


def clip_torch() -> dict:
    sdp, opt = new_sdp(check_every=3)
    for i in range(6):
        step(sdp, opt, i, clip="torch")
    return {"steps": 6}


def clip_torch_then_state_dict() -> dict:
    sdp, opt = new_sdp()
    for i in range(2):
        step(sdp, opt, i, clip="torch")
    sdp.state_dict()
    return {}


def no_sync() -> dict:
    sdp, opt = new_sdp(check_every=1)
    for i in range(2):
        opt.zero_grad()
        with sdp.no_sync():
            x, y = batch(2 * i, dist.get_rank())
            F.cross_entropy(sdp(x), y).backward()
        x, y = batch(2 * i + 1, dist.get_rank())
        F.cross_entropy(sdp(x), y).backward()
        opt.step()
    sdp.check_holders()
    return {"steps": 2}


def dcp_plain(tmp: Path) -> dict:
    sdp, opt = new_sdp()
    for i in range(2):
        step(sdp, opt, i)
    dcp.save({"model": sdp.state_dict(), "optim": sdp.optimizer_state_dict(opt)}, checkpoint_id=str(tmp / "plain"))
    for i in range(2, 4):
        step(sdp, opt, i)
    straight = local(sdp)
    again, opt2 = new_sdp(seed=0)
    state = {"model": again.state_dict(), "optim": again.optimizer_state_dict(opt2)}
    dcp.load(state, checkpoint_id=str(tmp / "plain"))
    again.load_state_dict(state["model"])
    again.load_optimizer_state_dict(opt2, state["optim"])
    for i in range(2, 4):
        step(again, opt2, i)
    keys = list(sdp.state_dict())
    return {"resumed_equals_straight": same(straight, local(again)),
            "no_module_prefix": not any(k.startswith("module.") for k in keys)}


def dcp_other_plan(tmp: Path) -> dict:
    """A checkpoint of one plan loads into another plan's ranks: the same full model either way."""
    sdp, opt = new_sdp()
    for i in range(2):
        step(sdp, opt, i)
    dcp.save({"model": sdp.state_dict()}, checkpoint_id=str(tmp / "other"))
    full = sdp.full_state_dict()
    other, _ = new_sdp(seed=3)
    state = {"model": other.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp / "other"))
    other.load_state_dict(state["model"])
    full_other = other.full_state_dict()
    if dist.get_rank() != 0:
        return {"plans_differ": sdp.plan.digest() != other.plan.digest()}
    return {"plans_differ": sdp.plan.digest() != other.plan.digest(),
            "same_full_model": all(torch.equal(full[k], full_other[k]) for k in full if k.endswith("weight"))}


def dcp_get_state_dict(tmp: Path) -> dict:
    sdp, opt = new_sdp()
    for i in range(2):
        step(sdp, opt, i)
    model_sd, optim_sd = get_state_dict(sdp, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dsd"))
    for i in range(2, 4):
        step(sdp, opt, i)
    straight = local(sdp)
    again, opt2 = new_sdp()
    model_sd, optim_sd = get_state_dict(again, opt2)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp / "dsd"))
    set_state_dict(again, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for i in range(2, 4):
        step(again, opt2, i)
    return {"resumed_equals_straight": same(straight, local(again)),
            "no_module_prefix": not any(k.startswith("module.") for k in model_sd)}


def dcp_optimizer_positional_ids(tmp: Path) -> dict:
    """The habit that cannot be right: opt.state_dict() keys state by position, which differs per rank."""
    sdp, opt = new_sdp()
    for i in range(2):
        step(sdp, opt, i)
    dcp.save({"model": sdp.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(tmp / "ids"))
    again, opt2 = new_sdp()
    step(again, opt2, 0)  # an optimizer state to load into
    state = {"model": again.state_dict(), "optim": opt2.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp / "ids"))
    again.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])  # the rank whose copy DCP kept loads its own; the others must refuse
    return {"loaded": True}


def main() -> None:
    dist.init_process_group("gloo")
    tmp = OUT / "ckpt"
    habits = {
        "clip_subnetdp": clip_subnetdp,
        "clip_torch": clip_torch,
        "clip_torch_then_state_dict": clip_torch_then_state_dict,
        "no_sync": no_sync,
        "dcp_plain": lambda: dcp_plain(tmp),
        "dcp_other_plan": lambda: dcp_other_plan(tmp),
        "dcp_get_state_dict": lambda: dcp_get_state_dict(tmp),
        "dcp_optimizer_positional_ids": lambda: dcp_optimizer_positional_ids(tmp),
    }
    results = {}
    for name, fn in habits.items():
        results[name] = outcome(fn)
        dist.barrier()  # a habit that raised on every rank leaves no collective behind
    (OUT / f"rank-{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
