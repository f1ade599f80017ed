"""Checkpoints that a crash cannot corrupt, and exact resume.

Layout: ``DIR/step-000123/rank-00000.pt`` (one per rank: subnetwork, optimizer, step, RNG states,
plan) and ``DIR/latest`` naming the newest complete step directory. Every file is written to a
temporary name and renamed (``os.replace`` is atomic on POSIX), and ``latest`` moves only after all
ranks have written theirs, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from subnetdp.plan import Plan

LATEST = "latest"


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    plan: Plan | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Save this rank's state for ``step``; collective when distributed. Returns the step directory.

    ``model`` is a :class:`SubnetDataParallel` (its subnetwork is saved) or any module. Only the
    newest ``keep`` complete checkpoints are kept.
    """
    rank, world = _rank_world()
    root = Path(directory)
    step_dir = root / f"step-{step:09d}"
    step_dir.mkdir(parents=True, exist_ok=True)
    module = getattr(model, "module", model)
    payload = {
        "step": step,
        "rank": rank,
        "world_size": world,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(),
        "plan": plan.to_json() if plan is not None else None,
        "extra": extra or {},
    }
    _atomic_write(step_dir / f"rank-{rank:05d}.pt", lambda p: torch.save(payload, p))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _atomic_write(root / LATEST, lambda p: p.write_text(step_dir.name + "\n"))
        complete = sorted(d for d in root.glob("step-*") if d.is_dir())
        for old in complete[:-keep] if keep > 0 else []:
            if old != step_dir:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return step_dir


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete step directory under ``directory``, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    step_dir = Path(directory) / pointer.read_text().strip()
    return step_dir if step_dir.is_dir() else None


def load_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    plan: Plan | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore this rank's state from the latest checkpoint; returns the payload (``step``, ``extra``).

    Raises if there is none, if it was written by a different world size, or for a different plan.
    """
    rank, world = _rank_world()
    step_dir = latest_checkpoint(directory)
    if step_dir is None:
        raise FileNotFoundError(f"no complete checkpoint under {directory} (no {LATEST!r} file)")
    payload = torch.load(step_dir / f"rank-{rank:05d}.pt", map_location="cpu", weights_only=False)
    if payload["world_size"] != world:
        raise ValueError(f"checkpoint {step_dir} was written by {payload['world_size']} ranks, this run has {world}")
    if plan is not None and payload["plan"] is not None and Plan.from_json(payload["plan"]) != plan:
        raise ValueError(f"checkpoint {step_dir} was written for a different plan; resume with the same "
                         "model, workers, coverage, level and seed")
    getattr(model, "module", model).load_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return payload
