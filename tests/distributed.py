"""Run a function on K gloo ranks in fresh processes, with a timeout, and collect what they return."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


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
