"""benchmarks/comm_step.py runs under torchrun (2 gloo ranks, tiny settings) and reports exact bytes.

Only the counts are checked (they are deterministic); timings are never asserted (DESIGN.md section 5).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

import subnetdp as sd
from subnetdp.models import resnet18

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "comm_step.py"
WORLD, WIDTH, STEPS, ROUNDS = 2, 4, 2, 2


def check(data: dict) -> None:
    """The assertions, on the JSON the script wrote (kept apart so that they can be tried on bad data)."""
    rows = {r["name"]: r for r in data["rows"]}
    expected = {"DDP"} | {f"SDP {lv} C={c:g}" for lv in ("block", "neuron") for c in (1, 0.5)}
    assert set(rows) == expected, sorted(rows)

    factory = functools.partial(resnet18, width=WIDTH)
    total = sum(p.numel() for p in sd.materialize(factory).parameters())  # counted here, not by the script
    assert data["meta"]["total_params"] == total and data["meta"]["world_size"] == WORLD

    ddp = rows["DDP"]
    # bytes counted by the DDP comm hook over the buckets it all-reduced, in every timed step
    assert ddp["bytes_seen_per_rank"] == [[4 * total]] * WORLD
    assert ddp["bytes_per_step_per_rank"] == [4 * total] * WORLD
    assert ddp["ring_bytes_per_rank"] == [2 * (WORLD - 1) / WORLD * 4 * total] * WORLD

    for name, r in rows.items():
        assert len(r["step_s"]["per_step"]) == STEPS * ROUNDS, name
        assert all(t > 0 for t in r["step_s"]["per_step"]), name
        assert r["wait_s"]["min"] >= 0, name
        if r["strategy"] != "sdp":
            continue
        p = sd.plan(factory, WORLD, r["coverage"], r["level"])
        assert r["params_per_rank"] == p.param_counts(), name
        # measured bytes: the same in every step, and equal to the engine's prediction
        assert all(len(seen) == 1 for seen in r["bytes_seen_per_rank"]), name
        assert r["bytes_per_step_per_rank"] == r["predicted_bytes_per_rank"], name
        assert r["bytes_match_prediction"] is True, name
        # and to the plan's: every element this rank holds that another worker holds too
        shared = [p.param_count(k) - sum(u.numel for u in p.units_of(k) if len(p.holders(u)) < 2)
                  for k in range(WORLD)]
        assert r["bytes_per_step_per_rank"] == [4 * s for s in shared], name
        if r["coverage"] < 1:
            assert all(b < 4 * total for b in r["bytes_per_step_per_rank"]), name
            assert r["bytes_ratio_to_ddp"] < 1, name
        else:
            assert r["bytes_per_step_per_rank"] == [4 * total] * WORLD, name
        # with 2 ranks every collective is over a group of 2: ring traffic 2*(2-1)/2 * bytes = bytes
        assert r["ring_bytes_per_rank"] == pytest.approx(r["bytes_per_step_per_rank"]), name
    assert "| DDP |" in data["table"]


@pytest.mark.timeout(180)
def test_comm_step_benchmark_under_torchrun(tmp_path):
    out = tmp_path / "comm_step.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           str(SCRIPT), "--width", str(WIDTH), "--warmup", "1", "--steps", str(STEPS), "--rounds", str(ROUNDS),
           "--coverages", "1,0.5", "--levels", "block,neuron", "--pg-timeout", "100", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "| configuration |" in proc.stdout
    check(json.loads(out.read_text()))
