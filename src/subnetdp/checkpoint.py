"""Checkpoints that a crash cannot corrupt, that load without executing code, and exact resume.

Layout: ``DIR/step-000123/rank-00000.pt`` (one per rank: subnetwork, optimizer, step, RNG states,
plan), ``DIR/step-000123/manifest.json`` (every rank file's size and sha256) and ``DIR/latest``
naming the newest complete step directory. Every run file goes through :func:`atomic_write` (temp
file in the same folder, fsync, rename), and ``latest`` moves only after all ranks have written
theirs, so a crash mid-save leaves the previous checkpoint as the latest.

Rank files hold only tensors, plain containers, strings and numbers (RNG states as tensors, the
plan as a JSON string), and are read with ``torch.load(weights_only=True)``: a planted pickle
payload is refused instead of run. A step directory counts only when its manifest matches.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from subnetdp.engine import SubnetDataParallel
from subnetdp.files import RunFileError, atomic_write
from subnetdp.planning import Plan

LATEST = "latest"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-\d{9}")  # the only name a checkpoint folder has


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the cause."""


def rng_state() -> dict[str, Any]:
    """Every RNG this library draws from, as tensors and plain numbers (safe to load)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


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

    ``model`` is a :class:`SubnetDataParallel` (its subnetwork is saved) or any module. ``extra``
    must hold only tensors, plain containers, strings and numbers. Only the newest ``keep``
    complete checkpoints are kept.
    """
    rank, world = _rank_world()
    if isinstance(model, SubnetDataParallel):
        model.check_synced_holders("checkpoint save")  # never save diverged holders as a good checkpoint
    root = Path(directory)
    step_dir = root / f"step-{step:09d}"
    for folder in (root, step_dir):
        if folder.is_symlink():
            raise RunFileError(errno.ELOOP, f"cannot write {folder}: it is a symbolic link, and a run writes only "
                                            "inside its own folder; remove the link")
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
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    blob = buffer.getvalue()
    atomic_write(step_dir / _rank_file(rank), blob)
    entry = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    entries: list[Any] = [entry]
    if dist.is_initialized():
        entries = [None] * world
        dist.all_gather_object(entries, entry)
    if rank == 0:
        manifest = {"step": step, "world_size": world,
                    "files": {_rank_file(r): e for r, e in enumerate(entries)}}
        atomic_write(step_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        atomic_write(root / LATEST, step_dir.name + "\n")
        for old in step_dirs(root)[:-keep] if keep > 0 else []:
            if old != step_dir and _manifest_step(old) == int(old.name[len("step-"):]):  # one this run completed
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return step_dir


def step_dirs(root: str | Path) -> list[Path]:
    """The checkpoint folders under ``root``, oldest first: real folders named exactly ``step-NNNNNNNNN``.

    A user's copy (``step-000000004-good``) or a symbolic link is never one: nothing else is read as a
    checkpoint, and rotation deletes nothing else.
    """
    root = Path(root)
    if not root.is_dir() or root.is_symlink():
        return []
    return sorted(d for d in root.iterdir() if STEP_DIR.fullmatch(d.name) and d.is_dir() and not d.is_symlink())


def _manifest_step(step_dir: Path) -> int | None:
    """The step that ``step_dir``'s manifest records, or None: the record that this library wrote the folder."""
    try:
        step = json.loads((step_dir / MANIFEST).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if type(step) is int else None


def _named_by_latest(root: Path) -> Path | None:
    """The step folder ``latest`` names, when it names one of :func:`step_dirs`' form (never ``../``)."""
    name = (root / LATEST).read_text(errors="replace").strip()
    return root / name if STEP_DIR.fullmatch(name) else None


def verify(step_dir: Path, rank: int | None = None) -> str | None:
    """Why ``step_dir`` is not an intact checkpoint (for ``rank``'s file, or all), or None if it is."""
    manifest_path = step_dir / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest_path} is unreadable ({e})"
    names = [_rank_file(rank)] if rank is not None else sorted(files)
    for name in names:
        f = step_dir / name
        want = files.get(name)
        if want is None:
            return f"{manifest_path} lists no {name}"
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, its manifest says {want['bytes']}"
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != want["sha256"]:
            return f"{f} does not match its sha256 in {manifest_path}"
    return None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The step directory ``latest`` names, or None when there is no ``latest`` or it names nothing."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    step_dir = _named_by_latest(Path(directory))
    return step_dir if step_dir is not None and step_dir in step_dirs(directory) else None


def find_resumable(directory: str | Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint under ``directory`` and the reasons newer candidates were skipped.

    ``latest`` is tried first; when it names a missing or damaged step directory, the newest other
    step directory that passes :func:`verify` is used. ``(None, reasons)`` means nothing intact.
    """
    root = Path(directory)
    skipped: list[str] = []
    candidates = step_dirs(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        named = _named_by_latest(root)
        if named is None:
            skipped.append(f"{pointer} does not name a step-NNNNNNNNN folder")
        elif named in candidates:
            candidates = [named] + [d for d in candidates if d != named]
        else:
            skipped.append(f"{pointer} names {named.name}, which does not exist")
    for d in candidates:
        problem = verify(d)
        if problem is None:
            return d, skipped
        skipped.append(problem)
    return None, skipped


def load_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    plan: Plan | None = None,
    restore_rng: bool = True,
    step_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Restore this rank's state from ``step_dir`` (default: the newest intact checkpoint).

    Returns the payload (``step``, ``extra``). Raises :class:`CheckpointError` naming the file if
    there is none, if it fails its manifest, holds anything but plain data, or was written by a
    different world size or for a different plan.
    """
    rank, world = _rank_world()
    if step_dir is None:
        step_dir, skipped = find_resumable(directory)
        if step_dir is None:
            why = "; ".join(skipped) if skipped else "no step directories"
            raise CheckpointError(f"no intact checkpoint under {directory} ({why})")
    step_dir = Path(step_dir)
    problem = verify(step_dir, rank)
    if problem is not None:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {problem}")
    file = step_dir / _rank_file(rank)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types; all mean the same here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: refused to load; it holds more than tensors and plain data, or is "
                              f"corrupt ({first})") from None
    if not isinstance(payload, dict) or "world_size" not in payload:
        raise CheckpointError(f"{file}: not a subnetdp checkpoint")
    if payload["world_size"] != world:
        raise CheckpointError(f"checkpoint {step_dir} was written by {payload['world_size']} ranks, this run has {world}")
    if payload.get("rank") != rank or payload.get("step") != int(step_dir.name[len("step-"):]):
        raise CheckpointError(f"{file} holds rank {payload.get('rank')!r} at step {payload.get('step')!r}, not rank "
                              f"{rank} at the step its folder names (copied or edited?)")
    try:
        if plan is not None and payload["plan"] is not None and Plan.from_json(payload["plan"]) != plan:
            raise CheckpointError(f"checkpoint {step_dir} was written for a different plan; resume with the same "
                                  "model, workers, coverage, level and seed")
        getattr(model, "module", model).load_state_dict(payload["model"])
        if optimizer is not None:
            if payload["optimizer"] is None:  # loading on would silently restart the optimizer from scratch
                raise CheckpointError(f"{file} holds no optimizer state, and this run has an optimizer (written by "
                                      "an older subnetdp, or saved without one); restore a checkpoint that has it, "
                                      "or start over with --overwrite")
            optimizer.load_state_dict(payload["optimizer"])
        if restore_rng:
            set_rng_state(payload["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        if isinstance(e, CheckpointError):
            raise
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"{file}: its contents do not fit this run ({type(e).__name__}: {first}); restore "
                              "the checkpoint, or start over with --overwrite") from None
    return payload
