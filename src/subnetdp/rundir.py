"""The run folder: who owns it, what may start in it, and which settings a resume may change.

A run folder holds one run. A new run refuses a folder that holds another run's state unless told
(``--resume`` continues it, ``--overwrite`` replaces it); a run locks its folder while it runs, with
``fcntl.flock`` on the folder itself, so the kernel releases the lock when the owner dies (a stale
lock cannot exist) and ``.owner.json`` only says who holds it. A resume whose settings change the
training math is refused with the differing keys named, before any file is written.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from subnetdp.files import atomic_write
from subnetdp.config import TrainConfig

OWNER = ".owner.json"
OWNER_ENV = "SUBNETDP_RUN_OWNER"  # set by the --workers launcher, which holds the lock for its ranks
# what a run writes into its folder; any of them means the folder holds a run's state
RUN_FILES = ("config.json", "plan.json", "plan.txt", "metrics.jsonl", "summary.json", "model.safetensors",
             "model_raw.safetensors", "checkpoints", "tensorboard")
RUN_FOLDERS = ("checkpoints", "tensorboard", ".rendezvous")  # a run writes inside these: never through a link
# settings that do not change what is trained: a resume may change them (residual_scaling only changes the
# evaluated model, and the summary names the rule applied)
FREE_ON_RESUME = frozenset({"progress", "log_every", "eval_every", "threads", "resume", "overwrite", "timeout",
                            "max_restarts", "out", "data_dir", "download", "checkpoint_every", "workers",
                            "residual_scaling"})
# settings that set the run's length; they change the learning-rate schedule unless it is constant
LENGTH = frozenset({"steps", "epochs", "flop_matched"})


class RunLock:
    """A claim on a run folder, released by :meth:`release` or when the process dies.

    The owner (a run, or the ``--workers`` launcher) writes ``.owner.json`` and removes it on release;
    a launcher's ranks hold shared claims beside their launcher's (:func:`lock`).
    """

    def __init__(self, out: Path, fd: int | None, token: str, owner: bool = True) -> None:
        self.out, self._fd, self.token, self._owner = out, fd, token, owner

    def share(self) -> None:
        """Turn the owner's exclusive lock into a shared one, so that its ranks can hold the folder beside it.

        Every process of the run then holds the lock, and the folder stays locked until the last of them
        ends: a launcher killed by SIGKILL no longer lets a second run in while its ranks still write.
        """
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # type: ignore[arg-type]
        except BlockingIOError:  # flock converts by unlocking first: another run took it in between
            raise SystemExit(_in_use(self.out)) from None

    def release(self) -> None:
        if self._fd is None:
            return
        if self._owner:
            (self.out / OWNER).unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def lock(out: Path) -> RunLock:
    """Claim ``out`` for this process; SystemExit naming the holder if another run has it.

    A run takes an exclusive ``flock``. Inside a ``--workers`` launch (the token the launcher exported
    matches ``.owner.json``) each rank takes a shared lock beside its launcher's, so the folder stays
    locked for as long as any process of the run lives.
    """
    out.mkdir(parents=True, exist_ok=True)
    owner = _owner(out)
    launched = bool(os.environ.get(OWNER_ENV)) and owner.get("token") == os.environ[OWNER_ENV]
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if launched else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(_in_use(out)) from None
    if launched:
        return RunLock(out, fd, owner["token"], owner=False)
    token = uuid.uuid4().hex
    atomic_write(out / OWNER, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                                          "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    return RunLock(out, fd, token)


def _in_use(out: Path) -> str:
    owner = _owner(out)
    who = (f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}" if owner
           else "a process that has not yet named itself")
    return f"{out} is in use by another run ({who}); wait for it to end or choose another --out"


def _owner(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / OWNER).read_text())
    except (OSError, ValueError):
        return {}


def existing_state(out: Path) -> list[str]:
    """The run files already in ``out``."""
    return [name for name in RUN_FILES if os.path.lexists(out / name)]


def admit(cfg: TrainConfig, out: Path) -> str | None:
    """Why this run may not start in ``out`` (one line), or None; ``--overwrite`` clears the old run.

    Reads only, except that ``--overwrite`` removes the previous run's files (never anything else).
    """
    linked = [name for name in RUN_FOLDERS if (out / name).is_symlink()]
    if linked:
        return (f"{out / linked[0]} is a symbolic link; a run writes and deletes only inside its own folder, "
                "so it refuses to follow it: remove the link (or choose another --out)")
    found = existing_state(out)
    if not cfg.resume:
        if not found:
            return None
        if not cfg.overwrite:
            what = "a finished run" if "summary.json" in found else "another run's state"
            return (f"{out} already holds {what} ({', '.join(found)}); continue it with --resume, replace it "
                    "with --overwrite, or choose another --out")
        _remove_run_files(out, found)
        return None
    saved = out / "config.json"
    if not saved.exists():
        return None
    try:
        before = json.loads(saved.read_text())
    except ValueError as e:
        return f"--resume: {saved} is unreadable ({e}); cannot check that the settings match"
    differing = math_differences(before, cfg.to_dict())
    if differing:
        shown = ", ".join(f"--{k.replace('_', '-')} {before.get(k)!r} -> {v!r}"
                          for k, v in ((k, cfg.to_dict().get(k)) for k in differing))
        return (f"--resume: these settings differ from the run in {out} and change the training: {shown}; "
                "resume with the run's own settings, or start a new run with another --out")
    return None


def _remove_run_files(out: Path, found: list[str]) -> None:
    """``--overwrite``: remove the previous run's files and nothing else, never through a link.

    Files (or links, which are removed themselves) go; ``checkpoints/`` loses only its ``step-NNNNNNNNN``
    folders and ``latest``, and stays if anything else is in it; ``tensorboard/`` is TensorBoard's own.
    """
    from subnetdp.checkpoint import LATEST, step_dirs

    for name in found:
        path = out / name
        if name == "checkpoints" and not path.is_symlink():
            for step_dir in step_dirs(path):
                shutil.rmtree(step_dir)
            (path / LATEST).unlink(missing_ok=True)
            if not any(path.iterdir()):
                path.rmdir()
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def math_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Keys whose change would make a resumed run compute something else than the run it continues.

    The run's length may grow when the schedule does not depend on it (constant, no warm-up).
    """
    length_free = after.get("schedule") == "constant" and not after.get("warmup")
    skip = FREE_ON_RESUME | (LENGTH if length_free else frozenset())
    # a setting a run's config.json lacks is younger than the run, which therefore ran with its default
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    was = {**{k: v for k, v in defaults.items() if k not in before}, **before}
    return sorted(k for k in set(was) | set(after) if k not in skip and was.get(k) != after.get(k))
