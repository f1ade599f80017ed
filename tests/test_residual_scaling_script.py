"""experiments/transformer_residual_scaling.py --evaluate: finished runs evaluated without training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import TINY_SHAKESPEARE

from subnetdp.cli import main

pytestmark = pytest.mark.shared_data(TINY_SHAKESPEARE)
ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("transformer_residual_scaling",
                                                  ROOT / "experiments" / "transformer_residual_scaling.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["transformer_residual_scaling"] = mod
    spec.loader.exec_module(mod)
    return mod


def _train(out: Path, level: str, seed: int) -> Path:
    assert main(["train", "--model", "llama_tiny", "--dataset", "tinyshakespeare", "--simulate", "4", "--coverage", "0.5",
                 "--level", level, "--optimizer", "adamw", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--seed", str(seed), "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    return out


def test_evaluate_mode_reports_assembly_and_both_rules_per_cell(tmp_path, capsys):
    trs = _module()
    runs = [_train(tmp_path / f"block-s{s}", "block", s) for s in (0, 1)] + [_train(tmp_path / "neuron", "neuron", 0)]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    capsys.readouterr()
    trs.main(["--evaluate", *map(str, runs), str(unfinished), "--out", str(tmp_path / "eval.json"), "--eval-batch-size", "2"])
    out = capsys.readouterr().out
    assert f"{unfinished}: not a finished run (no summary.json): skipped" in out
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["settings"] == {"evaluate": [str(d) for d in [*runs, unfinished]], "model": None, "eval_batch_size": 2, "threads": 1,
                                   "out": str(tmp_path / "eval.json")}
    results = {r["run"]: r for r in written["runs"]}
    assert sorted(results) == ["block-s0", "block-s1", "neuron"]
    for name in ("block-s0", "block-s1"):
        r = results[name]  # the LLaMA's default rule leaves it unscaled: the saved model is the unscaled one
        assert r["val_loss_saved"] == pytest.approx(r["val_loss_unscaled"], abs=1e-6)
        assert r["val_loss_scaled"] != pytest.approx(r["val_loss_unscaled"], abs=1e-6)
        assert r["scaled_minus_unscaled"] == pytest.approx(r["val_loss_scaled"] - r["val_loss_unscaled"])
    neuron = results["neuron"]
    assert "val_loss_scaled" not in neuron and neuron["level"] == "neuron"
    assert neuron["saved_minus_subnetworks"] == pytest.approx(neuron["val_loss_saved"] - neuron["subnetwork_val_loss"])
    rows = [line for line in out.splitlines() if line.startswith("| llama_tiny |")]
    assert len(rows) == 2 and rows[0].startswith("| llama_tiny | block | 0.5 | 2 | 0, 1 |")
    assert rows[1].startswith("| llama_tiny | neuron | 0.5 | 2 | 0 |") and "| n/a | n/a | n/a |" in rows[1]


def test_evaluate_mode_imports_no_code_a_folder_names_reads_it_as_data_and_needs_out(tmp_path):
    trs = _module()
    run = _train(tmp_path / "run", "block", 0)
    with pytest.raises(SystemExit, match="--out PATH"):
        trs.main(["--evaluate", str(run)])
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": "os:system"}))
    with pytest.raises(SystemExit, match="names the model 'os:system': this script imports no code"):
        trs.main(["--evaluate", str(run), "--out", str(tmp_path / "eval.json"), "--model", trs.MODEL_FLAGS["gpt2"]])
    # even the script's own model is imported only when the user names it; then the folder's config is read
    own = trs.MODEL_FLAGS["gpt2"]
    (run / "config.json").write_text(json.dumps({**config, "model": own}))
    with pytest.raises(SystemExit, match=f"names the model '{own}'.*if you trust it, name it: --model {own}"):
        trs.main(["--evaluate", str(run), "--out", str(tmp_path / "eval.json")])
    assert trs.run_config(run, own).model == own
    with pytest.raises(SystemExit, match="only --evaluate takes it"):
        trs.main(["--model", own, "--out", str(tmp_path / "eval.json")])
    for text, message in [("{", "config.json: not a readable JSON file"), ("[1]", "expected a JSON object, found list"),
                          (json.dumps({**config, "coverage": "half"}), "--coverage 'half': expected float")]:
        (run / "config.json").write_text(text)
        with pytest.raises(SystemExit, match=message):
            trs.main(["--evaluate", str(run), "--out", str(tmp_path / "eval.json")])
    (run / "config.json").write_text(json.dumps(config))
    summary = (run / "summary.json").read_text()
    (run / "summary.json").write_text(json.dumps({"steps": 2}))
    with pytest.raises(SystemExit, match="summary.json: not a summary of a finished text run"):
        trs.main(["--evaluate", str(run), "--out", str(tmp_path / "eval.json")])
    (run / "summary.json").write_text(summary)
    for text, message in [("{\n", "metrics.jsonl, line 1: not a JSON record"),
                          ('{"kind": "step", "loss": "x"}\n', "line 1: a step record without a numeric loss"),
                          ('{"kind": "epoch"}\n', "metrics.jsonl: no step records")]:
        (run / "metrics.jsonl").write_text(text)
        with pytest.raises(SystemExit, match=message):
            trs.main(["--evaluate", str(run), "--out", str(tmp_path / "eval.json")])
    assert not (tmp_path / "eval.json").exists()
