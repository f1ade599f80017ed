"""Fault injection into a running ``subnetdp train --workers K`` job: start a tiny run, wait until it has
logged a step, then signal one rank's worker process (SIGKILL to test restarts, SIGSTOP to test stalls).

Used by the robustness tests and by ``experiments/fault_trials.py`` (docs/robustness.md). It lives in the
package, not beside the tests, so that both import one copy: two copies drifted apart once already, when
the launcher began to run torchrun as a child process and only the tests learnt to look below it.
Finding a worker reads ``/proc``, so this works on Linux only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from subnetdp.metrics import read_jsonl

# ResNet-18 at width 4 on 256 CIFAR-10 (JPEG) images, one thread per process: exercises the fault
# handling, not training
TINY_RUN = ("--width", "4", "--train-subset", "256", "--test-subset", "64", "--batch-size", "32", "--no-progress",
            "--log-every", "1", "--threads", "1", "--bn-recalibrate", "2", "--eval-every", "0")


def run_env() -> dict[str, str]:
    """This process's environment with one OpenMP thread, so that K workers share the cores without thrashing."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start_workers(out: str | Path, *flags: str, workers: int = 2) -> subprocess.Popen:
    """``subnetdp train`` of :data:`TINY_RUN` on ``workers`` local processes with a checkpoint every step, in
    the background; ``flags`` come last, so they override the defaults."""
    cmd = [sys.executable, "-m", "subnetdp", "train", *TINY_RUN, "--workers", str(workers), "--checkpoint-every", "1",
           "--out", str(out), *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())


def steps_logged(out: str | Path) -> int:
    """The last step a run folder's ``metrics.jsonl`` records (0 before the first, or while it is unreadable)."""
    try:
        return max((r["step"] for r in read_jsonl(Path(out) / "metrics.jsonl") if r["kind"] == "step"), default=0)
    except (OSError, ValueError):
        return 0


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is ``ancestor`` or below it (the launcher runs torchrun as a child process)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = _parent(pid)
        except (OSError, ValueError, IndexError):
            return False
    return False


def worker_pid(launcher: int, rank: int, attempt: int = 0) -> int | None:
    """The pid of ``rank``'s worker process below ``launcher`` on torchrun attempt ``attempt`` (0: the first
    start, n: the n-th restart), or None if there is none (yet, or any more)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(x.split("=", 1) for x in (proc / "environ").read_text().split("\0") if "=" in x)
            parent = _parent(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
        if (_descends_from(parent, launcher) and env.get("RANK") == str(rank)
                and env.get("TORCHELASTIC_RESTART_COUNT", "0") == str(attempt)):
            return int(proc.name)
    return None


def signal_at_step(proc: subprocess.Popen, out: str | Path, step: int, sig: int = signal.SIGKILL, rank: int = 1,
                   timeout: float | None = None) -> float | None:
    """Wait until the run ``proc`` writes into ``out`` has logged ``step``, then send ``sig`` to ``rank``'s first
    worker; the ``time.monotonic()`` at which it was sent, or None if the run ended first, its worker was not
    found, or ``timeout`` seconds passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while steps_logged(out) < step:
        if proc.poll() is not None or (deadline is not None and time.monotonic() > deadline):
            return None
        time.sleep(0.02)
    pid = worker_pid(proc.pid, rank)
    if pid is None:
        return None
    os.kill(pid, sig)
    return time.monotonic()
