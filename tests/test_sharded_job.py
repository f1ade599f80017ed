"""The main job with ``--sharding holders`` (SDP on FSDP2): its rules, its equality with the replicated
engine, its memory and its resume (gloo, 4 processes, tiny ResNet-18, with timeouts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from subnetdp.cli import main

TINY = ["--width", "4", "--train-subset", "256", "--test-subset", "64", "--batch-size", "16", "--no-progress",
        "--threads", "1", "--level", "block", "--coverage", "0.5", "--transitions", "shortcut"]


def _train(out, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "subnetdp", "train", *TINY, "--out", str(out), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("flags,needs", [
    (["--strategy", "ddp"], "--sharding holders needs --strategy sdp"),
    (["--level", "neuron"], "--sharding holders needs --level block"),
    (["--masking", "backward"], "--sharding holders needs --masking forward"),
    (["--sync", "params"], "--sharding holders needs --sync grads"),
])
def test_sharding_refuses_what_it_cannot_shard(tmp_path, capsys, flags, needs):
    assert main(["train", *TINY, "--sharding", "holders", "--workers", "2", *flags, "--out", str(tmp_path / "x")]) == 2
    assert needs in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sharded_run_equals_the_simulation_and_holds_less(tmp_path):
    """4 processes, K=4, C=0.5: the assembled model equals ``--simulate 4 --sharding holders`` (the same plan,
    balanced for sharded storage, computed unsharded in one process) to fp32 rounding, each rank keeps less
    model state than the same plan's worker stored whole, and a resume that changes --sharding is refused with
    the settings named."""
    runs = {}
    for name, flags in (("holders", ["--workers", "4", "--sharding", "holders"]),
                        ("simulated", ["--simulate", "4", "--sharding", "holders"])):
        proc = _train(tmp_path / name, "--steps", "3", *flags)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert (tmp_path / "holders" / "plan.json").read_text() == (tmp_path / "simulated" / "plan.json").read_text()
    a, b = (load_file(tmp_path / s / "model_raw.safetensors") for s in ("simulated", "holders"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    plain, sharded = runs["simulated"]["memory_per_worker"], runs["holders"]["memory_per_worker"]  # one plan
    for p, s in zip(plain, sharded):
        for kind in ("param_bytes", "optimizer_bytes"):
            assert s[kind] < p[kind], (kind, plain, sharded)

    proc = _train(tmp_path / "holders", "--workers", "4", "--steps", "3", "--sharding", "none", "--resume")
    assert proc.returncode != 0
    assert "--sharding 'holders' -> 'none'" in proc.stdout + proc.stderr


def test_a_sharded_run_resumes_bitwise(tmp_path):
    """Stopped after 2 of 4 steps (--steps 2 with a constant schedule, then --steps 4 --resume): the
    sharded ranks reload their DTensor shards and optimizer state and end bitwise where an
    uninterrupted run ends."""
    flags = ["--workers", "4", "--sharding", "holders", "--schedule", "constant", "--warmup", "0",
             "--checkpoint-every", "1"]
    straight = _train(tmp_path / "straight", *flags, "--steps", "4")
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    first = _train(tmp_path / "resumed", *flags, "--steps", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _train(tmp_path / "resumed", *flags, "--steps", "4", "--resume")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout
    a, b = (load_file(tmp_path / s / "model_raw.safetensors") for s in ("straight", "resumed"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
