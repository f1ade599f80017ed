"""Fault trials for docs/robustness.md: kill a rank at a random step under ``--workers 2 --max-restarts 2``
(does the run finish alone, bitwise identical to an uninterrupted one, or hang?) and stop a rank with
SIGSTOP (how long until the run ends, and does the error name the rank?).

Tiny on purpose (ResNet-18 at width 4, 256 CIFAR-10 (JPEG) training images, 8 steps, 2 gloo processes
with one thread each): it measures the fault handling, not training.

Usage: python experiments/fault_trials.py [--trials 10] [--stalls 3] [--timeout 10] [--out runs/fault_trials]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from subnetdp.faults import signal_at_step, start_workers, worker_pid


def watch_stderr(proc: subprocess.Popen, seen: dict[str, float]) -> None:
    """Record when each stderr line appears (the error comes well before torchrun finishes its teardown)."""
    for line in proc.stderr:
        seen.setdefault(line.rstrip(), time.monotonic())


def identical(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--stalls", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--out", default="runs/fault_trials")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(args.seed)
    reference = root / "reference"
    proc = start_workers(reference, "--steps", "8")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    results = []
    for i in range(args.trials):
        out, step, rank = root / f"kill-{i}", rng.randint(1, 7), rng.randint(0, 1)
        proc = start_workers(out, "--steps", "8", "--max-restarts", "2")
        killed = signal_at_step(proc, out, step, signal.SIGKILL, rank)
        try:
            stdout, stderr = proc.communicate(timeout=300)
            hung = False
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            hung = True
        finished = proc.returncode == 0 and (out / "summary.json").exists()
        row = {"trial": i, "kill_rank": rank, "kill_after_step": step, "killed": killed is not None,
               "finished_alone": finished, "hung": hung, "identical": finished and identical(reference, out),
               "resumed_line": next((x for x in stdout.splitlines() if "resumed from" in x), None),
               "teardown_abort": "terminate called" in stderr}
        results.append(row)
        print(json.dumps(row), flush=True)
    stalls = []
    for i in range(args.stalls):
        out = root / f"stall-{i}"
        proc = start_workers(out, "--steps", "400", "--timeout", f"{args.timeout:g}")
        seen: dict[str, float] = {}
        reader = threading.Thread(target=watch_stderr, args=(proc, seen), daemon=True)
        reader.start()
        stopped = signal_at_step(proc, out, 2 + i, signal.SIGSTOP, 1)
        proc.wait(timeout=600)
        ended = time.monotonic()
        reader.join(timeout=10)
        pid = worker_pid(proc.pid, 1)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        line = next((x for x in seen if "stalled or died" in x), None)
        row = {"stall": i, "timeout_s": args.timeout,
               "seconds_to_error": round(seen[line] - stopped, 1) if line and stopped else None,
               "seconds_to_exit": round(ended - stopped, 1) if stopped else None,
               "named": line is not None and "rank 1 stalled or died" in line, "error": line}
        stalls.append(row)
        print(json.dumps(row), flush=True)
    totals = {"trials": len(results), "finished_alone": sum(r["finished_alone"] for r in results),
              "identical": sum(r["identical"] for r in results), "hung": sum(r["hung"] for r in results),
              "teardown_aborts": sum(r["teardown_abort"] for r in results)}
    (root / "results.json").write_text(json.dumps({"kills": results, "stalls": stalls, "totals": totals}, indent=1))
    print(json.dumps(totals))


if __name__ == "__main__":
    main()
