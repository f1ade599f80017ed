"""Run a function on K gloo ranks in fresh processes, with a timeout, and collect what they return; and the
scaffolding the multi-rank tests share: their optimizers and batches, one training step on a rank, the
in-process simulation a run is compared with, and the comparisons themselves.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import FACTORIES, ce_loss, image_batches

import subnetdp as sd

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4),
    # eps well above float32 noise: Adam's first steps are ~lr*sign(g), which magnifies rounding
    # differences of near-zero gradients (4-way sums are ordered differently by gloo and the simulation)
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, eps=1e-5),
}
STEPS = 3


def _child(fn: Callable, rank: int, world: int, store: str, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        result = fn(rank, world, *args)
        torch.save({"ok": result}, f"{out}/rank-{rank}.pt")
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        torch.save({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}, f"{out}/rank-{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: object, timeout: float = 120.0) -> list[dict]:
    """``fn(rank, world, *args)`` on ``world`` processes; returns per rank ``{"ok": value}`` or ``{"error": ...}``."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, args=(fn, r, world, store, tmp, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout:.0f} s (a hang)")
        results = []
        for r in range(world):
            f = Path(tmp) / f"rank-{r}.pt"
            if not f.exists():
                raise RuntimeError(f"rank {r} died with exit code {procs[r].exitcode} before reporting")
            results.append(torch.load(f, weights_only=False))
        return results


def values(results: list[dict]) -> list:
    """The ranks' return values, or the first rank's traceback as the failure."""
    for r, res in enumerate(results):
        if "error" in res:
            raise AssertionError(f"rank {r} failed:\n{res['trace']}")
    return [res["ok"] for res in results]


# ---- what the multi-rank tests share --------------------------------------------------------------------

def batches_for(step: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Step ``step``'s batches, one per worker: the same on every rank and in the simulation."""
    return image_batches(world, n=4, seed=100 + step)


def tiny_sdp(world: int, coverage: float, level: str, model: str = "resnet", **kw: object) -> sd.SubnetDataParallel:
    """This rank's SubnetDataParallel of a tiny model (``conftest.FACTORIES``) on a plan for ``world`` workers."""
    f = FACTORIES[model]
    return sd.SubnetDataParallel(f, sd.plan(f, world, coverage, level), **kw)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int, world: int) -> None:
    """One training step of ``model`` on rank ``rank``'s batch of step ``step``."""
    opt.zero_grad()
    ce_loss(model, batches_for(step, world)[rank]).backward()
    opt.step()


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``model``'s parameters, by name (safe to return from a rank)."""
    return {n: t.detach().clone() for n, t in model.named_parameters()}


def max_param_diff(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """The largest absolute difference between ``model``'s parameters and ``reference``'s of the same names."""
    ref = dict(reference.named_parameters())
    return max(float((t - ref[n]).abs().max()) for n, t in model.named_parameters())


def simulate(model: str, level: str, coverage: float, opt: str, world: int, *, seed: int = 7, steps: int = STEPS,
             snapshots: list | None = None, **kw: object) -> sd.Simulation:
    """The in-process simulation of ``world`` workers trained ``steps`` steps on :func:`batches_for`; with
    ``snapshots``, appends every worker's parameters (:func:`params_of`) after each step to it."""
    f = FACTORIES[model]
    with one_thread():
        sim = sd.Simulation(f, sd.plan(f, world, coverage, level), OPTIMIZERS[opt], seed=seed, **kw)
        for step in range(steps):
            sim.step(batches_for(step, world), ce_loss)
            if snapshots is not None:
                snapshots.append([params_of(w) for w in sim.workers])
    return sim


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one CPU thread, as every rank does (:func:`_child`): CPU kernels split their sums
    by thread count, and AdamW's first steps magnify the last-bit differences on some processors."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_close_by_name(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tol: float) -> None:
    """Every tensor in ``got`` is close to ``expected``'s of the same name."""
    for name, t in got.items():
        torch.testing.assert_close(t, expected[name].detach(), **tol)


def assert_ranks_equal_simulation(rank_params: list[dict[str, torch.Tensor]], sim: sd.Simulation,
                                  **tol: float) -> None:
    """Invariant 5: each rank's parameters equal its simulated worker's."""
    for k, params in enumerate(rank_params):
        assert_close_by_name(params, dict(sim.workers[k].named_parameters()), **tol)
