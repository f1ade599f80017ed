"""The main job end to end: tiny models, tiny slices of real data, a few steps."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CIFAR10_JPEG, TINY_SHAKESPEARE
from safetensors.torch import load_file

from subnetdp.cli import main
from subnetdp.config import TrainConfig
from subnetdp.models import llama_tiny, resnet18

pytestmark = pytest.mark.shared_data(CIFAR10_JPEG, TINY_SHAKESPEARE)
TINY = ["--width", "4", "--train-subset", "256", "--test-subset", "200", "--batch-size", "32", "--no-progress", "--log-every", "1"]


def train(tmp: Path, name: str, *flags: str) -> Path:
    out = tmp / name
    assert main(["train", *TINY, "--out", str(out), *flags]) == 0
    return out


def test_simulated_sdp_run_writes_everything_and_the_model_loads(tmp_path):
    out = train(tmp_path, "sim", "--simulate", "4", "--coverage", "0.5", "--level", "neuron", "--steps", "4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 <= summary["final"]["test_acc"] <= 1
    assert len(summary["params_per_worker"]) == 4 and max(summary["params_per_worker"]) < summary["full_params"]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "step"] == [1, 2, 3, 4]
    assert any(m["kind"] == "epoch" and "test_acc" in m for m in metrics)
    config = json.loads((out / "config.json").read_text())
    assert config["coverage"] == 0.5 and config["simulate"] == 4
    model = resnet18(width=4)
    model.load_state_dict(load_file(out / "model.safetensors"))  # loadable without subnetdp


def test_resume_continues_where_the_run_stopped(tmp_path):
    flags = ["--simulate", "2", "--schedule", "constant", "--warmup", "0", "--optimizer", "adamw"]
    straight = train(tmp_path, "straight", *flags, "--steps", "6")
    stopped = train(tmp_path, "stopped", *flags, "--steps", "3")
    resumed = train(tmp_path, "stopped", *flags, "--steps", "6", "--resume")
    assert resumed == stopped
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    params = {n for n, _ in resnet18(width=4).named_parameters()}
    # BatchNorm running statistics are averaged over holders whenever the full model is assembled,
    # which the stopped run did once more (at its end, step 3): compare the trained parameters
    for k in params:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_finished_run_is_not_overwritten(tmp_path, capsys):
    train(tmp_path, "done", "--simulate", "2", "--steps", "1")
    with pytest.raises(SystemExit, match="already holds a finished run"):
        main(["train", *TINY, "--out", str(tmp_path / "done"), "--simulate", "2", "--steps", "1"])


@pytest.mark.parametrize("strategy", ["sdp", "ddp", "fsdp", "ddp-ckpt"])
def test_each_strategy_runs_on_two_processes(tmp_path, strategy):
    out = tmp_path / strategy
    cmd = [sys.executable, "-m", "subnetdp", "train", *TINY, "--workers", "2", "--strategy", strategy,
           "--steps", "2", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["workers"] == 2 and summary["steps"] == 2
    assert "test_acc" in summary["final"]
    resnet18(width=4).load_state_dict(load_file(out / "model.safetensors"))
    assert summary["activation_checkpointing"] is (strategy == "ddp-ckpt")
    comm = summary["comm_bytes_per_step_per_worker"]
    if strategy in ("ddp", "ddp-ckpt"):
        assert comm == [4 * sum(p.numel() for p in resnet18(width=4).parameters())] * 2


@pytest.mark.parametrize("flags", [["--strategy", "sdp", "--level", "block", "--workers", "2"],
                                   ["--strategy", "sdp", "--level", "neuron", "--simulate", "2"],
                                   ["--strategy", "fsdp", "--workers", "2"], ["--strategy", "ddp", "--workers", "2"]])
def test_activation_checkpointing_on_every_strategy(tmp_path, flags):
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "subnetdp", "train", *TINY, *flags, "--activation-checkpointing", "--steps", "2",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "activation checkpointing" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["activation_checkpointing"] is True and summary["steps"] == 2
    assert json.loads((out / "config.json").read_text())["activation_checkpointing"] is True
    resnet18(width=4).load_state_dict(load_file(out / "model.safetensors"))  # names as in the plain model


def test_language_model_on_tiny_shakespeare(tmp_path):
    out = tmp_path / "lm"
    assert main(["train", "--model", "llama_tiny", "--dataset", "tinyshakespeare", "--simulate", "2",
                 "--coverage", "0.5", "--level", "neuron", "--optimizer", "adamw", "--steps", "3",
                 "--batch-size", "4", "--seq-len", "32", "--no-progress", "--grad-clip", "1.0", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val_loss"] > 0 and summary["final"]["val_ppl"] > 1
    model = llama_tiny(vocab_size=65, max_seq_len=32)
    model.load_state_dict(load_file(out / "model.safetensors"))


@pytest.mark.parametrize("flags,scaled", [([], False), (["--residual-scaling"], True),
                                          (["--residual-scaling", "on"], True), (["--no-residual-scaling"], False)])
def test_block_level_language_model_residual_scaling_rule(tmp_path, capsys, flags, scaled):
    """auto (the default) leaves a LLaMA unscaled (docs/evaluation.md); the summary, its text and `evaluate`
    name the rule; --residual-scaling / --no-residual-scaling still choose."""
    out = tmp_path / "lm"
    assert main(["train", "--model", "llama_tiny", "--dataset", "tinyshakespeare", "--simulate", "4",
                 "--coverage", "0.5", "--level", "block", "--optimizer", "adamw", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "16", "--threads", "1", "--no-progress", "--out", str(out), *flags]) == 0
    ev = json.loads((out / "summary.json").read_text())["evaluation"]
    rule = {(): "auto: off", ("--no-residual-scaling",): "off (chosen)"}.get(tuple(flags), "on (chosen)")
    assert ev["residual_scaling"] is scaled and ev["residual_scaling_rule"].startswith(rule)
    raw, shipped = load_file(out / "model_raw.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(raw[k], t) for k, t in shipped.items()) is not scaled
    assert f"[residual scaling: {rule}" in capsys.readouterr().out
    assert main(["evaluate", str(out)]) == 0
    assert f"[residual scaling: {rule}" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--coverage", "1.5"], "--coverage 1.5 is outside (0, 1]"),
    (["--simulate", "4", "--coverage", "0.3"], "--coverage 0.3 with 4 workers"),
    (["--strategy", "zero3"], "--strategy 'zero3' is not allowed"),
    (["--transitions", "skip"], "--transitions 'skip' is not allowed; choose one of: keep, shortcut"),
    (["--balance", "flops"], "--balance 'flops' is not allowed; choose one of: memory, params"),
    (["--residual-scaling", "yes"], "--residual-scaling 'yes' is not allowed; choose one of: auto, on, off"),
    (["--model", "gpt9"], "--model 'gpt9' is unknown"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--epochs", "x"], "argument --epochs: invalid float value: 'x'"),
    (["--simulate", "2", "--strategy", "ddp"], "--simulate runs SDP workers only"),
    (["--model", "llama_tiny", "--simulate", "2"], "is a language model but --dataset cifar10-jpeg is images"),
    ([], "--coverage 0.5 with 1 workers gives 0.5 holders per unit; it must be whole. Coverages that work with 1 "
         "workers: 1 (this is one worker: run K workers with --simulate K, --workers K or torchrun)"),
])
def test_bad_flags_give_one_clear_line(flags, message, capsys):
    with pytest.raises(SystemExit) if "invalid float" in message else contextlib.nullcontext():
        code = main(["train", *flags])
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_bad_config_file_gives_one_clear_line(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('coverage = 0.5\nlayers = 3\n')
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown settings ['layers']" in err and len(err.splitlines()) == 1
    cfg.write_text('coverage = "half"\n')
    assert main(["train", "--config", str(cfg)]) == 2
    assert "--coverage 'half': expected float" in capsys.readouterr().err


def test_residual_scaling_as_a_boolean_still_reads(tmp_path):
    """Config files and the config.json of runs from before "auto" hold true/false: they mean on/off, and a
    resume of such a run with today's default is allowed (the rule only changes the evaluated model)."""
    from subnetdp.cli import build_parser, config_from_args
    from subnetdp.rundir import math_differences

    cfg = tmp_path / "c.toml"
    cfg.write_text("residual_scaling = false\n")
    assert config_from_args(build_parser().parse_args(["train", "--config", str(cfg)])).residual_scaling == "off"
    assert TrainConfig(residual_scaling=True).residual_scaling == "on"
    assert math_differences({**TrainConfig().to_dict(), "residual_scaling": True}, TrainConfig().to_dict()) == []


def test_config_file_values_apply_and_flags_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('simulate = 2\nsteps = 1\ncoverage = 1.0\nlevel = "neuron"\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), *TINY, "--level", "block", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["simulate"] == 2 and saved["steps"] == 1 and saved["level"] == "block"


def test_report_builds_table_and_plots(tmp_path, capsys):
    a = train(tmp_path, "a", "--simulate", "2", "--steps", "2")
    b = train(tmp_path, "b", "--simulate", "2", "--coverage", "1.0", "--steps", "2")
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "SDP block C=0.5" in md and "SDP block C=1" in md and md.count("\n| ") == 2
    for png in ("curves.png", "accuracy_vs_memory.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_plan_command_prints_the_summary(capsys):
    assert main(["plan", "--workers", "8", "--coverage", "0.25", "--level", "neuron", "--width", "8"]) == 0
    out = capsys.readouterr().out
    assert "holders per unit r=2" in out and "spread" in out
    assert main(["plan", "--workers", "8", "--coverage", "0.3"]) == 2


def test_readme_documents_every_train_flag():
    import dataclasses

    from subnetdp.config import TrainConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name.replace('_', '-')}" not in readme]
    assert not missing, f"README's flag table lacks {missing}"


def test_language_model_on_a_memory_mapped_token_file(tmp_path):
    from subnetdp.data import CharTokenizer, default_text_path, write_token_file

    text = default_text_path().read_text()[:20000]
    tok = CharTokenizer.from_text(text)
    path = write_token_file(tok.encode(text), tmp_path / "tokens.bin", vocab_size=tok.vocab_size)
    out = tmp_path / "lm"
    assert main(["train", "--model", "llama_tiny", "--dataset", str(path), "--simulate", "2", "--coverage", "0.5",
                 "--optimizer", "adamw", "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--no-progress",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["val_loss"] > 0
    llama_tiny(vocab_size=tok.vocab_size, max_seq_len=32).load_state_dict(load_file(out / "model.safetensors"))


def _steps_logged(out: Path) -> int:
    f = out / "metrics.jsonl"
    lines = f.read_text().splitlines() if f.exists() else []
    return max([json.loads(x)["step"] for x in lines if '"kind": "step"' in x] or [0])


def _interrupt_at(cmd: list[str], out: Path, at_step: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``cmd``, send it SIGINT once ``out``'s metrics show ``at_step``, and wait for it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    try:
        while _steps_logged(out) < at_step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_ctrl_c_stops_at_a_step_boundary_and_resume_is_bitwise_identical(tmp_path):
    flags = [*TINY, "--simulate", "2", "--steps", "40", "--threads", "1"]  # 4 steps per epoch: BN, evals, resume mid-epoch
    straight = train(tmp_path, "straight", *flags[len(TINY):])
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "subnetdp", "train", *flags, "--out", str(out)]
    proc = _interrupt_at(cmd, out, at_step=3)
    assert proc.returncode == 130, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    stopped_at = [line for line in proc.stdout.splitlines() if line.startswith("interrupted:")]
    assert len(stopped_at) == 1 and not (out / "summary.json").exists()
    assert main(["train", *flags, "--out", str(out), "--resume"]) == 0
    for name in ("model_raw.safetensors", "model.safetensors"):  # BatchNorm buffers and counters included
        a, b = load_file(straight / name), load_file(out / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs after Ctrl-C and --resume"
    s_straight = json.loads((straight / "summary.json").read_text())
    s_resumed = json.loads((out / "summary.json").read_text())
    assert s_resumed["final"] == s_straight["final"] and s_resumed["steps"] == 40
    assert s_resumed["epochs"] == [{**e, "time_s": r["time_s"]} for e, r in zip(s_straight["epochs"], s_resumed["epochs"])]


def test_ctrl_c_under_workers_prints_one_line_and_no_traceback(tmp_path):
    out = tmp_path / "workers"
    cmd = [sys.executable, "-m", "subnetdp", "train", *TINY, "--workers", "2", "--steps", "400", "--threads", "1",
           "--out", str(out)]
    proc = _interrupt_at(cmd, out, at_step=2)
    assert proc.returncode == 130, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "OMP_NUM_THREADS" not in proc.stderr  # the launcher sets it: torchrun does not warn
    assert len([x for x in proc.stdout.splitlines() if x.startswith("interrupted:")]) == 1
    assert (out / "checkpoints" / "latest").exists() and not (out / "summary.json").exists()


def test_evaluate_reproduces_the_summary_from_the_run_files(tmp_path, capsys):
    out = train(tmp_path, "run", "--simulate", "4", "--coverage", "0.5", "--level", "block", "--steps", "4")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"]["residual_scaling"] and summary["evaluation"]["bn_recalibrate"] > 0
    assert summary["evaluation"]["residual_scaling_rule"].startswith("auto: on")  # ResNet blocks
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == summary["final"]
    assert main(["evaluate", str(out)]) == 0
    assert "residual branches scaled by r/K=0.5" in capsys.readouterr().out.splitlines()[-1]
    raw, baked = load_file(out / "model_raw.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(raw["layer1.0.bn2.weight"], baked["layer1.0.bn2.weight"])
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "has no config.json or model.safetensors" in capsys.readouterr().err


def test_report_tells_runs_apart_and_mixes_images_and_text(tmp_path, capsys):
    a = train(tmp_path, "run-a", "--simulate", "2", "--steps", "2")
    b = train(tmp_path, "run-b", "--simulate", "2", "--steps", "2", "--seed", "1")
    lm = tmp_path / "lm"
    assert main(["train", "--model", "llama_tiny", "--dataset", "tinyshakespeare", "--simulate", "2", "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--no-progress", "--out", str(lm)]) == 0
    assert main(["report", str(a), str(b), str(lm), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "nan" not in md and "test_acc 0." in md and "val_loss " in md
    from subnetdp.report import _label, load_run
    labels = [_label(load_run(d)) for d in (a, b, lm)]
    assert len(set(labels)) == 3 and labels[0].startswith("run-a")
    from subnetdp.report import worst_worker_peak

    s = json.loads((a / "summary.json").read_text())  # simulated: the planner's peak (state + activations)
    peak, basis = worst_worker_peak(s)
    assert basis == "predicted" and peak == max(s["predicted_peak_bytes_per_worker"]) > max(s["model_state_bytes_per_worker"])


def test_plan_takes_module_callable_and_predicts_the_peak(capsys):
    assert main(["plan", "--workers", "4", "--width", "8"]) == 0
    out = capsys.readouterr().out
    assert "predicted memory per worker (batch 128 per worker" in out and "worst worker:" in out
    assert main(["plan", "--workers", "4", "--model", "subnetdp.models:resnet18"]) == 0
    assert "holders per unit" in capsys.readouterr().out


def test_every_flag_of_every_verb_shows_its_default():
    import argparse

    from subnetdp.cli import build_parser

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for verb, parser in verbs.items():
        fmt = parser.formatter_class(verb)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            text = fmt._expand_help(action) if action.help else ""
            if "%(default)" not in (action.help or "") and "(default" not in text:
                text = argparse.ArgumentDefaultsHelpFormatter(verb)._get_help_string(action) or ""
            assert action.help and ("default" in text), f"subnetdp {verb} {action.option_strings[0]}: {text!r}"


def test_workers_report_the_same_step_metrics_as_simulate(tmp_path):
    flags = [*TINY, "--steps", "3", "--threads", "1"]
    sim = train(tmp_path, "sim", "--simulate", "2", *flags[len(TINY):])
    out = tmp_path / "procs"
    proc = subprocess.run([sys.executable, "-m", "subnetdp", "train", *flags, "--workers", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in x]
            for d in (sim, out)]
    for a, b in zip(*rows):  # loss and accuracy over both workers, not rank 0's alone
        assert a["step"] == b["step"]
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["acc"] - b["acc"]) < 1e-9, (a, b)
    s = [json.loads((d / "summary.json").read_text()) for d in (sim, out)]
    assert abs(s[0]["final"]["test_acc"] - s[1]["final"]["test_acc"]) < 1e-9


def test_flop_matched_scales_steps_too(tmp_path):
    out = train(tmp_path, "flop", "--simulate", "2", "--coverage", "0.5", "--steps", "3", "--flop-matched")
    assert json.loads((out / "summary.json").read_text())["steps"] == 6  # 3 / C
    out = train(tmp_path, "same", "--simulate", "2", "--coverage", "0.5", "--steps", "3")
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_flop_matched_step_arithmetic():
    from subnetdp.config import TrainConfig
    from subnetdp.train import total_steps

    assert total_steps(TrainConfig(coverage=0.75, steps=300, flop_matched=True), 50) == 400
    assert total_steps(TrainConfig(coverage=0.5, epochs=2.0, flop_matched=True), 97) == 388
    assert total_steps(TrainConfig(coverage=0.25, epochs=1.0), 97) == 97  # not FLOP-matched
    assert total_steps(TrainConfig(strategy="ddp", coverage=0.5, steps=30, flop_matched=True), 97) == 30  # DDP: C=1


def test_shortcut_transitions_and_memory_balance_in_the_main_job(tmp_path):
    """Every block a unit, plan balanced on predicted memory (the default), evaluated with residual scaling."""
    from subnetdp.planning import Plan

    out = train(tmp_path, "sc", "--simulate", "4", "--coverage", "0.5", "--transitions", "shortcut", "--steps", "2")
    p = Plan.from_json((out / "plan.json").read_text())
    assert p.balance == "memory" and p.transitions == "shortcut" and len(p.units) == 8
    assert {len(p.holders(u)) for u in p.units} == {2}
    assert "balanced on memory" in (out / "plan.txt").read_text()
    assert 0 <= json.loads((out / "summary.json").read_text())["final"]["test_acc"] <= 1
    params = train(tmp_path, "params", "--simulate", "4", "--coverage", "0.5", "--balance", "params", "--steps", "1")
    assert Plan.from_json((params / "plan.json").read_text()).balance == "params"


def test_backward_masking_run_records_its_regime_and_assembles_any_workers_copy(tmp_path):
    out = train(tmp_path, "bwd", "--simulate", "4", "--coverage", "0.5", "--level", "block", "--steps", "3",
                "--masking", "backward")
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["masking"] == summary["masking"] == "backward"
    # the full forward trained every block: no residual rescaling or BatchNorm recalibration at evaluation
    assert summary["evaluation"] == {"residual_scaling": False, "bn_recalibrate": 0}
    full = sum(p.numel() for p in resnet18(width=4).parameters())
    assert all(m["param_bytes"] == full * 4 for m in summary["memory_per_worker"])  # every worker holds all
    assert all(0 < m["grad_bytes"] < full * 4 for m in summary["memory_per_worker"])  # only held units have them
    resnet18(width=4).load_state_dict(load_file(out / "model.safetensors"))


def test_backward_masking_is_an_sdp_regime(tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(tmp_path / "x"), "--strategy", "ddp", "--masking", "backward"]) == 2
    assert "--masking backward is an SDP regime" in capsys.readouterr().err


def test_swin_trains_at_both_levels_from_the_zoo(tmp_path):
    for level in ("block", "neuron"):
        out = train(tmp_path, f"swin-{level}", "--model", "swin_t_cifar", "--width", "12", "--simulate", "2",
                    "--coverage", "0.5", "--level", level, "--steps", "2", "--optimizer", "adamw")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["model"] == "swin_t_cifar" and 0 <= summary["final"]["test_acc"] <= 1


def test_backward_masking_resume_equals_uninterrupted(tmp_path):
    flags = ["--simulate", "2", "--masking", "backward", "--schedule", "constant", "--warmup", "0",
             "--optimizer", "adamw"]
    straight = train(tmp_path, "straight", *flags, "--steps", "4")
    train(tmp_path, "stopped", *flags, "--steps", "2")
    resumed = train(tmp_path, "stopped", *flags, "--steps", "4", "--resume")
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in (n for n, _ in resnet18(width=4).named_parameters()):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_backward_masking_on_two_processes_equals_its_simulation(tmp_path):
    common = [*TINY, "--steps", "2", "--threads", "1", "--masking", "backward", "--coverage", "0.5",
              "--optimizer", "adamw", "--schedule", "constant", "--warmup", "0"]
    out = tmp_path / "procs"
    cmd = [sys.executable, "-m", "subnetdp", "train", *common, "--workers", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sim = train(tmp_path, "sim", *common[len(TINY):], "--simulate", "2")
    a, b = load_file(out / "model.safetensors"), load_file(sim / "model.safetensors")
    for k in (n for n, _ in resnet18(width=4).named_parameters()):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    procs, simulated = (json.loads((d / "summary.json").read_text()) for d in (out, sim))
    assert procs["masking"] == "backward"
    assert procs["comm_bytes_per_step_per_worker"] == simulated["comm_bytes_per_step_per_worker"]


def test_plan_shares_trains_flag_definitions():
    """The flags plan shares with train come from the same TrainConfig fields: same help, and argparse
    checks plan's choices with the list config.validate checks train's with (the implementing module's)."""
    import argparse
    import dataclasses

    from subnetdp.cli import build_parser
    from subnetdp.config import TrainConfig
    from subnetdp.masking import MASKINGS
    from subnetdp.planning import LEVELS, TRANSITIONS

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    plan_flags = {a.dest: a for a in verbs["plan"]._actions}
    train_flags = {a.dest: a for a in verbs["train"]._actions}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    shared = ("model", "width", "coverage", "level", "seed", "activation_checkpointing", "masking", "transitions",
              "balance")
    for name in shared:
        assert plan_flags[name].help == fields[name].metadata["help"], name
        assert train_flags[name].help.startswith(fields[name].metadata["help"]), name
        assert plan_flags[name].choices == fields[name].metadata.get("choices"), name
        assert plan_flags[name].default == fields[name].default, name
    assert plan_flags["level"].choices == LEVELS and plan_flags["transitions"].choices == TRANSITIONS
    assert plan_flags["masking"].choices == MASKINGS
    assert plan_flags["workers"].default == 8  # plan's K; train's --workers starts processes


def test_plan_flags_that_train_also_has_cannot_drift():
    """Issue 20 item 7: every flag plan shares with train is made from the same TrainConfig field: same
    default, choices, type and help (plan's --seq-len was 256 and its --optimizer sgd-momentum while train's
    were 128 and sgd). The one flag that differs on purpose is --workers: plan's K, train's processes."""
    import argparse
    import dataclasses

    from subnetdp.cli import build_parser
    from subnetdp.config import PLAN_FIELDS, TrainConfig

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    plan_flags, train_flags = ({a.option_strings[0]: a for a in verbs[v]._actions if a.option_strings}
                               for v in ("plan", "train"))
    fields = {"--" + f.name.replace("_", "-"): f for f in dataclasses.fields(TrainConfig)}
    shared = set(plan_flags) & set(train_flags) - {"-h"}
    assert shared == {"--" + n.replace("_", "-") for n in PLAN_FIELDS}
    for flag in sorted(shared - {"--workers"}):
        field, plan_flag = fields[flag], plan_flags[flag]
        assert plan_flag.default == field.default, flag
        assert plan_flag.choices == field.metadata.get("choices"), flag
        assert plan_flag.type == train_flags[flag].type and plan_flag.help == field.metadata["help"], flag
        assert train_flags[flag].help == f"{plan_flag.help} (default: {plan_flag.default})", flag
    assert plan_flags["--seq-len"].default == 128 and plan_flags["--optimizer"].default == "sgd"


@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--seq-len", "-1"], ["--momentum", "1.5"], ["--width", "0"],
                                   ["--model", "vit_s4", "--width", "8"], ["--model", "nope"], ["--level", "layer"]])
def test_plan_and_train_reject_a_bad_shared_value_with_the_same_line(flags, capsys):
    """One rule per flag (subnetdp.config), one message: plan says what train says about the same value."""
    def error(*argv: str) -> str:
        try:
            assert main(list(argv)) == 2
        except SystemExit as e:  # argparse's own check of plan's choices
            assert e.code == 2
        return capsys.readouterr().err.split(": error: ", 1)[1]

    plan_error = error("plan", *flags)
    train_error = error("train", "--simulate", "2", *flags)
    if flags[0] == "--level":  # argparse checks plan's choices (the field's list) before config.validate_plan
        assert "'layer'" in plan_error and "'block', 'neuron'" in plan_error and "'layer'" in train_error
    else:
        assert plan_error == train_error


@pytest.mark.parametrize("masking", ["forward", "backward"])
def test_train_makes_the_memory_balanced_plan_of_the_library(tmp_path, masking):
    """The main job's default plan is subnetdp.memory_balanced_plan's for the same model, sample shape,
    batch size and optimizer (subnetdp plan --json too: tests/test_budget.py)."""
    import functools

    import subnetdp as sd
    from subnetdp.losses import classification_loss
    from subnetdp.planning import Plan

    out = train(tmp_path, "run", "--simulate", "4", "--level", "block", "--transitions", "shortcut", "--steps", "1",
                "--masking", masking, "--eval-every", "0")
    run_plan = Plan.from_json((out / "plan.json").read_text())
    sample = (torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    p = sd.memory_balanced_plan(functools.partial(resnet18, width=4, num_classes=10), 4, 0.5, "block", sample=sample,
                                loss_fn=lambda m, b: classification_loss(m(b[0]), b[1]), batch_size=32,
                                optimizer="sgd", transitions="shortcut", masking=masking)
    assert run_plan.digest() == p.digest()
