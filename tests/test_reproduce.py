"""experiments/reproduce.py on a tiny grid: one JSON per run, resume skips finished runs, the page."""

from __future__ import annotations

import importlib.util
import json
import shutil
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import CIFAR10_JPEG


pytestmark = pytest.mark.shared_data(CIFAR10_JPEG)
ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "experiments" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = mod
    spec.loader.exec_module(mod)
    return mod


GRID = ["--scale", "cpu", "--shrink", "--grids", "image", "--workers", "2", "--coverages", "0.5", "--levels",
        "block", "--seeds", "0", "1", "--baselines", "ddp", "--ddp-launch", "simulate"]


def test_tiny_grid_writes_runs_resumes_and_the_page(tmp_path, capsys):
    reproduce = _module()
    out = tmp_path / "grid"
    assert reproduce.main([*GRID, "--regimes", "same-steps", "--out", str(out)]) == 0
    first = sorted(p.name for p in (out / "results").glob("*.json"))
    assert first == [f"image-K2-{c}-s{s}.json" for c in ("ddp", "sdp-block-C0.5-same-steps") for s in (0, 1)]
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}

    # a second pass with the FLOP-matched regime added runs only the new runs
    capsys.readouterr()
    assert reproduce.main([*GRID, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "same-steps-s0:" not in printed and "ddp-s0:" not in printed  # skipped: their JSON exists
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert len(results) == 6
    same, flop = results["image-K2-sdp-block-C0.5-same-steps-s0"], results["image-K2-sdp-block-C0.5-flop-matched-s0"]
    assert flop["steps"] == 2 * same["steps"]  # 1/C times the steps
    for r in results.values():
        assert 0 <= r["final"] <= 1 and r["curve"] and r["curve"][-1]["step"] == r["steps"]
        assert r["memory"]["worst_worker_peak_bytes"] > 0
    assert results["image-K2-ddp-s0"]["summary"]["coverage"] == 1.0

    page = (out / "results.md").read_text()
    accs = sorted(100 * results[f"image-K2-ddp-s{s}"]["final"] for s in (0, 1))
    mean = (accs[0] + accs[1]) / 2
    row = next(line for line in page.splitlines() if line.startswith("| DDP |"))
    assert re.search(rf"{mean:.2f} \+- \d+\.\d\d \(n=2\)", row), row
    sdp = next(line for line in page.splitlines() if line.startswith("| SDP block C=0.5 |"))
    assert sdp.count("(n=2)") == 2 and f"| {same['steps']} / {flop['steps']} |" in sdp
    assert (out / "curves.png").stat().st_size > 0 and (out / "frontier.png").stat().st_size > 0

    # the SDP runs train without activation checkpointing: their memory is the plain SDP row of the
    # benchmark (not its SDP+ckpt or old-default rows, which share level and coverage)
    from subnetdp.measure.bench import memory_part

    settings = reproduce.scale_settings("cpu", True)
    part = memory_part(settings["image"]["memory"], 2, [0.5], ["block"], repeats=2, device=torch.device("cpu"),
                       seed=0, log=lambda *a: None)
    plain = next(r for r in part["rows"] if r["name"] == "SDP block C=0.5")
    ckpt = next(r for r in part["rows"] if r["name"] == "SDP+ckpt block C=0.5")
    worst = max(w["measured"]["total_bytes"] for w in plain["workers"])
    assert worst != max(w["measured"]["total_bytes"] for w in ckpt["workers"])
    assert same["memory"]["worst_worker_peak_bytes"] == worst == flop["memory"]["worst_worker_peak_bytes"]

    # a result from an older memory measurement is re-collected (not retrained), keeping its wall time
    stale_path = out / "results" / "image-K2-sdp-block-C0.5-same-steps-s0.json"
    stale = json.loads(stale_path.read_text())
    stale["memory"] = {"worst_worker_peak_bytes": 1, "per_worker_peak_bytes": [1, 1], "basis": "old"}
    stale_path.write_text(json.dumps(stale))
    (out / "memory" / "image-K2-s0.json").unlink()
    capsys.readouterr()
    assert reproduce.main([*GRID, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "same-steps-s0:" in printed and "flop-matched-s0:" not in printed
    fresh = json.loads(stale_path.read_text())
    assert fresh["memory"]["worst_worker_peak_bytes"] == worst and fresh["memory"]["version"] == reproduce.MEMORY_VERSION
    assert fresh["process_wall_s"] == stale["process_wall_s"] and fresh["final"] == stale["final"]
    assert "--resume" not in (out / "logs" / f"{stale_path.stem}.log").read_text()


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    reproduce = _module()
    out = tmp_path / "grid"
    args = reproduce.parse_args([*GRID, "--regimes", "same-steps", "--baselines", "--seeds", "0", "--out", str(out)])
    settings = reproduce.scale_settings("cpu", True)
    (run,) = reproduce.build_grid(settings, ["image"], args)
    run_dir = out / "runs" / run.name
    argv = reproduce.train_argv(run, settings, "cpu", None, "simulate", run_dir)
    # a run stopped before its last step: train it with a checkpoint every step, then drop the newest
    # (a resume whose settings change the math is refused, so the run itself is left as it was)
    from subnetdp.cli import main

    assert main(["train", *argv, "--checkpoint-every", "1"]) == 0
    (run_dir / "summary.json").unlink()  # as if it had been interrupted before finishing
    steps = sorted(d for d in (run_dir / "checkpoints").iterdir() if d.is_dir())
    assert len(steps) >= 2
    shutil.rmtree(steps[-1])
    status = reproduce.execute(run, argv, run_dir, out / "logs" / "x.log", deadline=None)
    assert status == "done"
    log = (out / "logs" / "x.log").read_text()
    assert "--resume" in log and "resumed from" in log
