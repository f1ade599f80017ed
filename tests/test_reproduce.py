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


def _result(grid: str, strategy: str, seed: int, curve: list[tuple[int, float]], level: str | None = None,
            coverage: float = 1.0, regime: str = "same-steps", peak: int = 100, longer: int = 1) -> dict:
    reproduce = _module()
    run = reproduce.Run(grid, 4, strategy, level, coverage, regime, seed, longer)
    metric = "test_acc" if grid == "image" else "val_loss"
    return {"run": reproduce.dataclasses.asdict(run), "name": run.name, "config": run.config, "label": run.label,
            "metric": metric, "final": curve[-1][1], "steps": curve[-1][0],
            "curve": [{"step": s, metric: v} for s, v in curve], "memory": {"worst_worker_peak_bytes": peak}}


def test_convergence_judges_the_last_quarter_of_the_mean_curve():
    reproduce = _module()
    flat = [(s, 0.60 + 0.001 * (s >= 80)) for s in range(10, 110, 10)]  # last quarter: steps 80..100
    rising = [(s, 0.30 + 0.004 * s) for s in range(10, 110, 10)]
    runs = [_result("image", "ddp", 0, flat), _result("image", "ddp", 1, flat)]
    line = reproduce.convergence(runs, 1.0)
    assert "steps 80-100, 3 evaluations" in line and "moves by 0 points" in line and "**converged" in line
    line = reproduce.convergence([_result("image", "ddp", 0, rising)], 1.0)
    assert "moves by 8 points" in line and "**not converged by this criterion**" in line
    # nats for the language model; fewer than 3 evaluations in the last quarter: not judged
    lm = [_result("lm", "ddp", 0, [(100, 2.0), (150, 1.9), (175, 1.89), (200, 1.885)])]
    assert "0.015 nats" in reproduce.convergence(lm, 0.03) and "**converged" in reproduce.convergence(lm, 0.03)
    assert "**not converged" in reproduce.convergence(lm, 0.01)
    assert "**not judged**" in reproduce.convergence([_result("lm", "ddp", 0, [(50, 2.0), (100, 1.9)])], 0.03)


def test_flop_matched_runs_are_evaluated_at_the_same_flops():
    reproduce = _module()
    settings = reproduce.scale_settings("cpu-converged", False)
    argv = ["--scale", "cpu-converged", "--grids", "image", "--baselines", "--seeds", "0", "--levels", "block",
            "--out", "x"]
    runs = reproduce.build_grid(settings, ["image"], reproduce.parse_args(argv))
    every = {}
    for run in runs:
        a = reproduce.train_argv(run, settings, "cpu", None, "simulate", Path("x"))
        assert a.count("--eval-every") <= 1 and a.count("--flop-matched") == (run.regime == "flop-matched")
        every[(run.coverage, run.regime, run.longer)] = a[a.index("--eval-every") + 1] if "--eval-every" in a else None
    assert every == {(0.5, "same-steps", 1): None, (0.5, "flop-matched", 1): "2",
                     (0.25, "same-steps", 1): None, (0.25, "flop-matched", 1): "4", (0.5, "same-steps", 4): "4"}
    # the converged scale: 3 seeds, K=4, C=0.5 and 0.25, both levels, DDP as its math in one process
    g = settings["image"]
    assert g["seeds"] == [0, 1, 2] and g["workers"] == [4] and sorted(g["coverages"]) == [0.25, 0.5]
    assert "--test-subset" not in g["flags"] and settings["ddp_launch"] == "simulate"


def test_sdp_runs_are_placed_at_each_seeds_sdp_ckpt_memory(tmp_path):
    reproduce = _module()
    (tmp_path / "memory").mkdir()
    for seed, peak in ((0, 40), (1, 44)):
        configs = {"ddp": {"worst_worker_peak_bytes": 100}, "ddp-ckpt": {"worst_worker_peak_bytes": 30},
                   "sdp-block-C0.5": {"worst_worker_peak_bytes": 70},
                   "sdp-ckpt-block-C0.5": {"worst_worker_peak_bytes": peak}}
        (tmp_path / "memory" / f"image-K4-s{seed}.json").write_text(json.dumps({"configs": configs}))
    curve = [(10, 0.5), (20, 0.6)]
    by_config = {}
    for seed in (0, 1):
        for r in (_result("image", "ddp", seed, curve),
                  _result("image", "sdp", seed, curve, "block", 0.5, peak=70),
                  _result("image", "sdp", seed, curve, "block", 0.5, "flop-matched", peak=70)):
            by_config.setdefault(r["config"], []).append(r)
    reproduce._add_checkpointing_points(tmp_path, by_config)
    placed = by_config["image-K4-sdp-ckpt-block-C0.5-same-steps"]
    assert [r["memory"]["worst_worker_peak_bytes"] for r in placed] == [40, 44]
    assert all(r["placed"] and r["run"]["strategy"] == "sdp-ckpt" and r["final"] == 0.6 for r in placed)
    assert placed[0]["label"] == "SDP+ckpt block C=0.5 (SDP's runs: same math)"
    assert "image-K4-sdp-ckpt-block-C0.5-flop-matched" in by_config
    assert [r["memory"]["worst_worker_peak_bytes"] for r in by_config["image-K4-ddp-ckpt"]] == [30, 30]
    assert by_config["image-K4-sdp-block-C0.5-same-steps"][0]["memory"]["worst_worker_peak_bytes"] == 70


def test_budget_check_compares_each_doubling_on_the_seeds_both_ran():
    reproduce = _module()
    one = [_result("image", "ddp", s, [(100, v)]) for s, v in ((0, 0.60), (1, 0.70), (2, 0.65))]
    two = [_result("image", "ddp", 0, [(200, 0.64)], longer=2)]
    four = [_result("image", "ddp", 0, [(400, 0.645)], longer=4)]
    line = reproduce.budget_convergence({1: one, 2: two, 4: four}, 1.0)
    # paired on seed 0: 60 -> 64 (not the 3 seeds' mean of 65), then 64 -> 64.5
    assert "100 -> 200 steps moves the final from 60 to 64 (+4 points, seed(s) 0)" in line, line
    assert "200 -> 400 steps moves the final from 64 to 64.5 (+0.5 points, seed(s) 0)" in line, line
    assert "**converged by this criterion at 200 steps**" in line
    # a later doubling that moves it again undoes an earlier "converged"
    eight = [_result("image", "ddp", 0, [(800, 0.67)], longer=8)]
    line = reproduce.budget_convergence({1: one, 2: two, 4: four, 8: eight}, 1.0)
    assert "**not converged by this criterion at any length measured**" in line
    line = reproduce.budget_convergence({1: one, 2: two}, 1.0)
    assert "**not converged by this criterion at any length measured**" in line
    lm = {1: [_result("lm", "ddp", 0, [(10, 1.62)])], 2: [_result("lm", "ddp", 0, [(20, 1.60)], longer=2)]}
    assert "(-0.02 nats, seed(s) 0)" in reproduce.budget_convergence(lm, 0.03)
    assert "**not judged**" in reproduce.budget_convergence({1: one, 2: [_result("image", "ddp", 5, [(200, 0.6)],
                                                                                  longer=2)]}, 1.0)


def test_longer_ddp_runs_train_a_full_schedule_over_more_epochs():
    reproduce = _module()
    settings = reproduce.scale_settings("cpu-converged", False)
    base = ["--scale", "cpu-converged", "--grids", "lm", "--levels", "block", "--coverages", "0.5", "--out", "x"]
    runs = reproduce.build_grid(settings, ["lm"], reproduce.parse_args(base))
    longer = [r for r in runs if r.longer > 1 and r.strategy == "ddp"]
    assert [(r.name, r.label) for r in longer] == [(f"lm-K4-ddp-x{n}-s{s}", f"DDP, {n}x steps") for n in (2, 4)
                                                   for s in (0, 1, 2)] + [("lm-K4-ddp-x8-s0", "DDP, 8x steps")]
    assert runs[:7] == longer  # first: they judge whether the grid's length converges
    assert [r.name for r in runs if r.longer > 1 and r.strategy == "sdp"] == [
        f"lm-K4-sdp-block-C0.5-same-steps-x4-s{s}" for s in (0, 1, 2)]
    image = reproduce.build_grid(settings, ["image"], reproduce.parse_args(base))
    assert [r.name for r in image if r.longer > 1] == [f"image-K4-ddp-x{n}-s{s}" for n in (2, 4) for s in (0, 1, 2)] + [
        "image-K4-ddp-x8-s0"] + [f"image-K4-sdp-block-C0.5-same-steps-x4-s{s}" for s in (0, 1, 2)]
    # SDP C=0.5 at the image model's converged length: same steps as DDP 4x, last (the costliest runs)
    sdp4 = [r for r in image if r.strategy == "sdp" and r.longer > 1]
    assert image[-3:] == sdp4 and sdp4[0].label == "SDP block C=0.5, 4x steps"
    a = reproduce.train_argv(sdp4[0], settings, "cpu", None, "simulate", Path("x"))
    assert a[a.index("--epochs") + 1] == "96" and a[a.index("--eval-every") + 1] == "4" and "--flop-matched" not in a
    assert a[a.index("--coverage") + 1] == "0.5" and a[a.index("--level") + 1] == "block"
    for flags in (["--longer", "2"], ["--longer"], ["--regimes", "flop-matched"], ["--coverages", "0.25"]):
        assert not [r for r in reproduce.build_grid(settings, ["image"], reproduce.parse_args([*base, *flags]))
                    if r.strategy == "sdp" and r.longer > 1], flags
    only = reproduce.build_grid(settings, ["lm"], reproduce.parse_args([*base, "--longer", "4"]))
    assert [r.name for r in only if r.longer > 1] == [f"lm-K4-ddp-x4-s{s}" for s in (0, 1, 2)] + [
        f"lm-K4-sdp-block-C0.5-same-steps-x4-s{s}" for s in (0, 1, 2)]
    for run in longer:
        a = reproduce.train_argv(run, settings, "cpu", None, "simulate", Path("x"))
        assert a[a.index("--epochs") + 1] == str(20 * run.longer) and a.count("--epochs") == 1
        assert a[a.index("--eval-every") + 1] == str(run.longer) and "--flop-matched" not in a
        assert a[a.index("--coverage") + 1] == "1" and a[a.index("--steps-per-epoch") + 1] == "50"
    # only on the seeds planned for each factor; none with a bare --longer, and none without the DDP baseline
    assert [r.name for r in reproduce.build_grid(settings, ["lm"], reproduce.parse_args([*base, "--seeds", "1"]))
            if r.longer > 1] == ["lm-K4-ddp-x2-s1", "lm-K4-ddp-x4-s1", "lm-K4-sdp-block-C0.5-same-steps-x4-s1"]
    assert not [r for r in reproduce.build_grid(settings, ["lm"], reproduce.parse_args([*base, "--longer"]))
                if r.longer > 1]
    assert not [r for r in reproduce.build_grid(settings, ["lm"], reproduce.parse_args([*base, "--baselines"]))
                if r.longer > 1 and r.strategy == "ddp"]
    with pytest.raises(SystemExit):
        reproduce.parse_args([*base, "--longer", "1"])
    assert not [r for r in reproduce.build_grid(reproduce.scale_settings("cpu", False), ["lm"],
                                                reproduce.parse_args(["--out", "x"])) if r.longer > 1]


def test_page_reports_the_budget_check_and_plots_the_longer_runs(tmp_path):
    reproduce = _module()
    args = reproduce.parse_args(["--scale", "cpu-converged", "--grids", "image", "--levels", "block", "--coverages",
                                 "0.5", "--regimes", "same-steps", "--seeds", "0", "--longer", "2", "4",
                                 "--out", str(tmp_path)])
    # planned: DDP at 1x, 2x, 4x and SDP block C=0.5 same steps at 1x and 4x, all seed 0; the FLOP-matched run
    # is found too
    settings = reproduce.scale_settings("cpu-converged", False)
    results = [_result("image", "ddp", 0, [(s, 0.5 + s / 1000) for s in range(10, 110, 10)]),
               _result("image", "ddp", 0, [(s, 0.6 + s / 10000) for s in range(20, 220, 20)], longer=2),
               _result("image", "ddp", 0, [(s, 0.62 + s / 100000) for s in range(40, 440, 40)], longer=4),
               _result("image", "sdp", 0, [(s, 0.4 + s / 1000) for s in range(10, 110, 10)], "block", 0.5, peak=60),
               _result("image", "sdp", 0, [(s, 0.5 + s / 10000) for s in range(20, 220, 20)], "block", 0.5,
                       "flop-matched", peak=60),
               _result("image", "sdp", 0, [(s, 0.55 + s / 10000) for s in range(40, 440, 40)], "block", 0.5,
                       peak=60, longer=4)]
    (tmp_path / "results").mkdir()
    (tmp_path / "memory").mkdir()  # the checkpointed variants' measured memory (seed 0)
    (tmp_path / "memory" / "image-K4-s0.json").write_text(json.dumps({"configs": {
        "ddp-ckpt": {"worst_worker_peak_bytes": 40}, "sdp-ckpt-block-C0.5": {"worst_worker_peak_bytes": 25}}}))
    for r in results:  # the page totals the main job's wall time (resumed parts included), not the runner's clock
        r.update(summary={"device": "cpu", "wall_s": 90.0}, process_wall_s=60.0)
        r["memory"]["basis"] = "test"
        (tmp_path / "results" / f"{r['name']}.json").write_text(json.dumps(r))
    page = reproduce.write_page(tmp_path, settings, args, reproduce.build_grid(settings, ["image"], args)).read_text()
    four = next(line for line in page.splitlines() if line.startswith("Convergence of DDP, 4x steps:"))
    assert "(steps 320-400, 3 evaluations)" in four and "moves by 0.08 points" in four and "**converged" in four
    budget = next(line for line in page.splitlines() if line.startswith("Budget of DDP:"))
    assert "100 -> 200 steps moves the final from 60 to 62 (+2 points" in budget
    assert "200 -> 400 steps moves the final from 62 to 62.4 (+0.4 points" in budget
    assert "**converged by this criterion at 200 steps**" in budget
    row = next(line for line in page.splitlines() if line.startswith("| DDP, 4x steps |"))
    assert "62.40 (n=1)" in row and "| 400 |" in row and "| 1.00 |" in row
    # FLOP-matched against DDP 2x, and SDP same steps trained 4x against DDP 4x
    assert "| SDP block C=0.5 FLOP-matched | 200 | 52.00 (n=1) | 62.00 (n=1) | -10.00 |" in page
    assert "| SDP block C=0.5, 4x steps | 400 | 59.00 (n=1) | 62.40 (n=1) | -3.40 |" in page
    row = next(line for line in page.splitlines() if line.startswith("| SDP block C=0.5, 4x steps |"))
    assert "| 59.00 (n=1) | n/a | 400 |" in row and "| 0.60 |" in row  # its own row: memory beside DDP's
    assert "5 of 5 planned runs finished (1 more found in the folder); their training took 9.0 min" in page
    # at convergence (by the budget at 200 steps): every configuration trained at least that long against DDP
    # at its own steps, at its own and its checkpointed variant's memory; the 100-step runs are left out
    table = page[page.index("At convergence (DDP converged by the budget at 200 steps"):].split("\n\n")[1]
    assert table.splitlines()[2:] == [
        "| DDP, 2x steps | 200 | 62.00 (n=1) |  | 1.00 | 0.40 |",
        "| SDP block C=0.5 FLOP-matched | 200 | 52.00 (n=1) | -10.00 | 0.60 | 0.25 |",
        "| DDP, 4x steps | 400 | 62.40 (n=1) |  | 1.00 | 0.40 |",
        "| SDP block C=0.5, 4x steps | 400 | 59.00 (n=1) | -3.40 | 0.60 | 0.25 |"]
    assert (tmp_path / "frontier_converged.png").stat().st_size > 0 and "frontier_converged.png)" in page
    by_config = {}
    for r in results:
        by_config.setdefault(r["config"], []).append(r)
    assert reproduce.converged_points(tmp_path, by_config, "image", 4, 0.1) == (None, [])  # no doubling within
    assert reproduce.converged_points(tmp_path, by_config, "lm", 4, 1.0) == (None, [])  # no runs
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "frontier.png").stat().st_size > 0


def test_a_result_trained_with_other_flags_is_refused_not_counted(tmp_path):
    reproduce = _module()
    argv = ["--model", "resnet18", "--epochs", "24", "--no-progress", "--out", "/old/place/runs/r", "--simulate", "4"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"argv": argv, "memory": {"version": reproduce.MEMORY_VERSION}}))
    moved = [*argv[:5], "--out", str(tmp_path / "runs" / "r"), "--simulate", "4", "--data-dir", "/data"]
    assert reproduce._previous_result(path, moved, "cpu-converged")["argv"] == argv  # a moved folder is fine
    assert reproduce._previous_result(tmp_path / "absent.json", argv, "cpu-converged") is None
    longer = [*argv[:3], "48", *argv[4:], "--eval-every", "2"]
    with pytest.raises(SystemExit, match=r"--epochs 24 -> 48, --eval-every \(absent\) -> 2\); resume it"):
        reproduce._previous_result(path, longer, "cpu-converged")
    with pytest.raises(SystemExit, match=r"--no-progress \(set\) -> \(absent\)"):
        reproduce._previous_result(path, [a for a in argv if a != "--no-progress"], "cpu-converged")
    for broken in ("{not json", json.dumps({"argv": argv}), json.dumps([1]), json.dumps({"argv": 3, "memory": {}})):
        path.write_text(broken)
        with pytest.raises(SystemExit, match="not a result this runner wrote"):
            reproduce._previous_result(path, argv, "cpu-converged")
