"""The process group's life: start it with the run's ``--timeout``, name a stalled rank, end it in order.

A rank that stops (stalled, paused, or stuck in I/O) would otherwise show up only as a transport
timeout that does not say who is missing. At epoch and checkpoint boundaries every rank passes
``dist.monitored_barrier``, which makes rank 0 name the ranks that did not arrive within the
timeout. When a collective inside a step fails (its own timeout is ``--timeout`` too), the ranks
probe each other the same way before giving up, so the error names the rank that stopped. The
barrier exists only on gloo, and a group whose collective timed out may be unusable, so the probes
run on a gloo side group created once at start, for every backend.

Under the ``--workers`` launcher each attempt (first start and every restart) meets in a fresh file
store inside the run folder rather than in torchrun's shared TCP store, so a restart never meets
the keys or ports of the attempt that failed.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

STORE_ENV = "SUBNETDP_STORE_DIR"  # set by the --workers launcher: where each attempt's file store lives
STOP_ENV = "SUBNETDP_STOP_FILE"  # set by the --workers launcher: this file's existence asks every rank to stop
PARENT_ENV = "SUBNETDP_PARENT_PID"  # the parent a --workers process must still have when it starts
TORCHRUN = "from subnetdp.supervise import run_torchrun; run_torchrun()"  # `python -c` of the --workers launcher
_PR_SET_PDEATHSIG = 1

_side_group: object | None = None
_timeout_s: float = 300.0


class StallError(RuntimeError):
    """Some ranks did not reach a boundary within the timeout; the message names them."""


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent ends (Linux ``PR_SET_PDEATHSIG``).

    The ``--workers`` launcher's torchrun and its ranks call this, so that a launcher killed by SIGKILL
    (no handler sees it) takes them along: torchrun gets SIGTERM and ends its ranks; a rank whose
    torchrun dies gets SIGTERM, finishes its step, saves and exits. A parent that ended before the call
    (``PARENT_ENV`` names the expected one) is caught by comparing the parent pid. Elsewhere: no-op.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    expected = os.environ.get(PARENT_ENV)
    if expected and os.getppid() != int(expected):
        os.kill(os.getpid(), sig)


def run_torchrun() -> None:
    """torchrun (``sys.argv[1:]`` are its arguments) as the ``--workers`` launcher runs it.

    It dies with the launcher, and its ranks with it (:func:`die_with_parent`). When a rank fails, the
    rank has already printed its one line; torchrun's own report (a traceback and a table of the
    same failure, 40 to 110 lines) is replaced by its exit code, or by one line when the rank was killed.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    die_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())  # each rank checks that this torchrun is still its parent
    for name in list(logging.Logger.manager.loggerDict):  # each of torchrun's loggers has its own level
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        main()
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:  # killed: the rank could not say so itself
            print(f"subnetdp train: error: rank {rank} (pid {failure.pid}) was killed by "
                  f"{signal.Signals(-failure.exitcode).name}; continue the run with --resume", file=sys.stderr)
        raise SystemExit(failure.exitcode if 0 < failure.exitcode < 128 else 1) from None
    except SignalException as e:  # its launcher ended (die_with_parent): the ranks were stopped
        raise SystemExit(128 + int(e.sigval)) from None


def restart_count() -> int:
    """How many times torchrun has restarted this run's processes (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def start(backend: str, timeout_s: float) -> None:
    """Initialise the default process group (and a gloo side group for NCCL) with ``timeout_s``."""
    global _side_group, _timeout_s
    _timeout_s = timeout_s
    timeout = timedelta(seconds=timeout_s)
    store_dir = os.environ.get(STORE_ENV)
    if store_dir:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        store = Path(store_dir) / f"store-{run_id}-attempt{restart_count()}"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    _side_group = dist.new_group(backend="gloo", timeout=timeout)


def boundary(where: str, timeout_s: float | None = None) -> None:
    """Wait for every rank at ``where``; a rank missing after the timeout ends the run, named.

    Raises :class:`StallError` on the ranks that can tell (rank 0 names the missing ranks).
    """
    timeout_s = _timeout_s if timeout_s is None else timeout_s
    e = _missing(timeout_s)
    if e is not None:
        raise StallError(f"rank {dist.get_rank()}: {_who(e)} at the {where} within --timeout {timeout_s:g} s "
                         f"({_one_line(e)})")


def is_transport_error(e: BaseException) -> bool:
    """Whether ``e`` came from the communication layer (gloo raises plain RuntimeError on a timeout)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("gloo/transport", "Timed out waiting", "Connection closed by peer", "NCCL"))


def name_missing(where: str, error: BaseException) -> None:
    """After a collective failed at ``where``: raise :class:`StallError` naming the ranks that do not answer.

    Returns (the caller re-raises ``error``) when every rank answers: then the failure was not a stall.
    The probe waits a fifth of the timeout (2 to 30 s): the live ranks hit the same failure together.
    """
    e = _missing(min(max(2.0, 0.2 * _timeout_s), 30.0))
    if e is not None:
        raise StallError(f"rank {dist.get_rank()}: a collective at {where} failed after --timeout {_timeout_s:g} s; "
                         f"probing the ranks: {_who(e)} ({_one_line(e)}; the collective: {_one_line(error)})")


def _missing(timeout_s: float) -> RuntimeError | None:
    """The side group's monitored barrier within ``timeout_s``: None when every rank arrived (or there
    is no group to wait for), else its error, which names the missing ranks on rank 0."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    try:
        dist.monitored_barrier(group=_side_group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        return e
    return None


def _who(e: BaseException) -> str:
    """The missing ranks as rank 0's monitored barrier names them, else that rank 0 was lost."""
    found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
    if found:
        ranks = found.group(1).strip().rstrip(",")
        return f"rank{'s' if ',' in ranks else ''} {ranks} stalled or died: did not arrive"
    return "lost contact with rank 0, which checks who arrives: did not pass"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + "..."


def stop() -> None:
    """End the process groups in order: the side group, then the default group (all its subgroups).

    Then collect garbage, so that a group object caught in a reference cycle is freed now (its
    destructor joins gloo's worker threads) and not during interpreter shutdown, when those threads
    can abort the process ("terminate called without an active exception") after a correct run.
    The engine itself holds its groups weakly for the same reason.
    """
    global _side_group
    if not dist.is_initialized():
        return
    if _side_group is not None:
        dist.destroy_process_group(_side_group)
        _side_group = None
    dist.destroy_process_group()
    gc.collect()
