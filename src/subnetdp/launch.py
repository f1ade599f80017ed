"""``subnetdp train --workers K``: start K local processes with torchrun's launcher and stand guard over them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from subnetdp import rundir, supervise
from subnetdp.config import TrainConfig

LAUNCHED = "SUBNETDP_LAUNCHED"  # set by --workers' launcher for its workers: an interrupt exits 0 there


def launch_local(cfg: TrainConfig, argv: list[str]) -> int:
    """``--workers K``: start K processes on this machine with torchrun's launcher; returns the exit code.

    The launcher owns the run folder for the whole job (its ranks come and go with restarts), checks
    it before any process starts, and gives each attempt a fresh rendezvous store in the folder; its
    ranks hold the folder's lock beside it, so the folder stays locked while any of them lives.
    torchrun runs in its own session, so a Ctrl-C, SIGTERM or SIGHUP (a closed terminal) reaches only
    this process, which asks every rank to stop through a file in the store folder (ranks that have
    not started yet see it too): they finish the step, save a checkpoint and exit, and this process
    exits 130 with one line instead of three processes' tracebacks. A second signal stops at once.
    SIGKILL, which no handler sees, reaches them through the kernel: torchrun and the ranks die with
    their parent (:func:`supervise.die_with_parent`). ``OMP_NUM_THREADS`` is set here (``--threads``,
    else the cores divided among the workers), so torchrun does not warn about it.
    """
    out = cfg.run_dir()
    claim = rundir.lock(out)
    store_dir = out / ".rendezvous"
    asked: list[int] = []
    proc: subprocess.Popen | None = None

    def on_signal(sig: int, _frame: object) -> None:
        asked.append(sig)
        if len(asked) == 1 and store_dir.is_dir():
            (store_dir / "stop").touch()  # every rank, started or not yet, stops at its next step boundary
        elif len(asked) > 1 and proc is not None:  # a second signal: stop at once
            for pid in [*_children(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in stops}
    try:
        problem = rundir.admit(cfg, out)
        if problem:
            raise SystemExit(problem)
        store_dir.mkdir(exist_ok=True)
        (store_dir / "stop").unlink(missing_ok=True)
        claim.share()
        rest = _drop_flag(_drop_flag(argv, "--workers"), "--max-restarts")
        args = ["--standalone", f"--nproc-per-node={cfg.workers}", f"--max-restarts={cfg.max_restarts}",
                "-m", "subnetdp", "train", *rest]
        if "--out" not in " ".join(rest):  # every process must agree on the run directory
            args += ["--out", str(out)]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(cfg.threads or max(1, (os.cpu_count() or 1) // (cfg.workers or 1))))
        env[LAUNCHED] = "1"
        env[rundir.OWNER_ENV] = claim.token
        env[supervise.STORE_ENV] = str(store_dir.resolve())
        env[supervise.STOP_ENV] = str((store_dir / "stop").resolve())
        env[supervise.PARENT_ENV] = str(os.getpid())
        if asked:  # stopped before any process started
            return 130
        proc = subprocess.Popen([sys.executable, "-c", supervise.TORCHRUN, *args], env=env, start_new_session=True)
        if asked:  # a signal between the check and the start: the stop file did not exist yet
            (store_dir / "stop").touch()
        code = proc.wait()
        return 130 if asked else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(store_dir, ignore_errors=True)
        claim.release()


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _drop_flag(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out
