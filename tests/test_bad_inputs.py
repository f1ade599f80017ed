"""Bad inputs end in one clear line (issue 11 item 5): CLI and API.

Every CLI case exits non-zero with exactly one stderr line that names the bad value or file and
says what to do, prints no traceback, and leaves every pre-existing file byte-identical. The CLI
runs in-process (``subnetdp.cli.main``) for speed; a few cases run the real command in a
subprocess (pipes into ``head``, no traceback from the interpreter).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CIFAR10_JPEG, TINY_SHAKESPEARE

import subnetdp as sd
from subnetdp.cli import main
from subnetdp.data.text import load_text, read_token_file, write_token_file

TRAIN = ["train", "--no-progress", "--threads", "1", "--simulate", "2"]


def _files(tmp: Path) -> None:
    """The files some cases read; every one must be byte-identical afterwards."""
    (tmp / "bad.yaml").write_text("lr: [0.1\nepochs: 2\n")
    (tmp / "bad.toml").write_text("lr = = 0.1\n")
    (tmp / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (tmp / "list.yaml").write_text("- lr\n- 0.1\n")
    (tmp / "settings.json").write_text('{"lr": 0.1}\n')
    (tmp / "latin1.yaml").write_bytes("lr: 0.1 # d\xe9j\xe0\n".encode("latin-1"))
    (tmp / "wrongtype.yaml").write_text("lr: fast\n")
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes("na\xefve caf\xe9 ".encode("latin-1") * 100)
    (tmp / "badnpz").mkdir()
    (tmp / "badnpz" / "cifar10_jpeg.npz").write_bytes(b"not a zip file at all" * 50)
    (tmp / "truncnpz").mkdir()
    (tmp / "truncnpz" / "cifar10_jpeg.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    write_token_file(list(range(50)) * 40, tmp / "tokens.bin", vocab_size=50)
    data = (tmp / "tokens.bin").read_bytes()
    (tmp / "tokens.bin").write_bytes(data[: len(data) // 2])  # truncated after writing
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("a user's own file in the run folder\n")
    _token_headers(tmp)
    os.mkfifo(tmp / "fifo.txt")  # nobody writes into it: reading it would wait for ever
    _labelled_npz(tmp / "badlabels" / "cifar10_jpeg.npz", [0, 1, 10, 2])
    _run_folders(tmp)
    (tmp / "overwrite.toml").write_text(f'out = "{tmp / "run"}"\noverwrite = true\n')
    (tmp / "steps-text.toml").write_text('steps = "10"\n')
    (tmp / "seed-bool.yaml").write_text("seed: true\n")
    (tmp / "notmodel.py").write_text("def build(**kwargs):\n    return 'not a model'\n")


def _run_folders(tmp: Path) -> None:
    """Run folders an attacker (or an accident) left: each must end in one line, with nothing run or changed."""
    import json

    from safetensors.torch import save_file

    write_token_file(list(range(50)) * 40, tmp / "ok.bin", vocab_size=50)
    config = {"model": "llama_tiny", "dataset": str(tmp / "ok.bin"), "seq_len": 8, "batch_size": 2}
    for name, cfg, weights in (
            ("pwn", {**config, "model": "pwn_planted:build"}, b"\0" * 64),  # pwn_planted.py is in the folder
            ("damaged", config, b"not safetensors at all" * 10),
            ("mismatched", config, None),
            ("badtypes", {**config, "batch_size": "big"}, None),
            ("badjson", None, None)):
        d = tmp / "runs" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text("{not json" if cfg is None else json.dumps(cfg))
        if weights is None:
            save_file({"weight": torch.zeros(3)}, d / "model.safetensors")
        else:
            (d / "model.safetensors").write_bytes(weights)
    (tmp / "runs" / "pwn" / "pwn_planted.py").write_text(
        f"open({str(tmp / 'PWNED')!r}, 'w').write('ran')\ndef build(**kwargs):\n    raise SystemExit('ran')\n")
    for name, summary in (("notjson", "{"), ("list", "[1, 2]"), ("missing-keys", '{"strategy": "sdp"}'),
                          ("wrong-types", json.dumps({"strategy": "ddp", "model": 5, "dataset": "d", "workers": 2,
                                                     "simulated": False, "final": {"test_acc": "high"},
                                                     "params_per_worker": None, "model_state_bytes_per_worker": [],
                                                     "peak_memory_per_process": [{}], "steps": 1, "wall_s": 1,
                                                     "comm_bytes_per_step_per_worker": []}))):
        d = tmp / "summaries" / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(summary)


def _token_headers(tmp: Path) -> None:
    """Token files whose ``.json`` header lies (issue 19 item 1): each field wrong in its own way."""
    import json

    for name, change in (("tok-object", {"dtype": "|O"}), ("tok-half", {"dtype": "<f2"}),
                         ("tok-bigendian", {"dtype": ">u2"}), ("tok-dtype-number", {"dtype": 2}),
                         ("tok-length-text", {"length": "2000"}), ("tok-length-bool", {"length": True}),
                         ("tok-length-negative", {"length": -2}), ("tok-vocab-small", {"vocab_size": 10}),
                         ("tok-vocab-float", {"vocab_size": 50.5}), ("tok-vocab-huge", {"vocab_size": 10**30}),
                         ("tok-not-a-table", None), ("tok-not-json", "{")):
        write_token_file(list(range(50)) * 40, tmp / f"{name}.bin", vocab_size=50)
        head = tmp / f"{name}.bin.json"
        if isinstance(change, dict):
            head.write_text(json.dumps({**json.loads(head.read_text()), **change}))
        else:
            head.write_text("[1, 2]" if change is None else change)
    write_token_file(list(range(50)) * 40, tmp / "tok-signed.bin")  # ids as int16 with one negative id
    data = bytearray((tmp / "tok-signed.bin").read_bytes())
    data[10:12] = (-3).to_bytes(2, "little", signed=True)
    (tmp / "tok-signed.bin").write_bytes(bytes(data))
    head = tmp / "tok-signed.bin.json"
    head.write_text(head.read_text().replace('"<u2"', '"<i2"'))


def _labelled_npz(path: Path, labels: list[int]) -> None:
    """A CIFAR-10 (JPEG) file in the shared format with the given labels (each image its own JPEG)."""
    import io

    import numpy as np
    from PIL import Image

    blobs = []
    for i in range(len(labels)):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(buf, format="JPEG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    path.parent.mkdir()
    np.savez(path, blob=np.concatenate(blobs), ends=np.cumsum([len(b) for b in blobs]),
             y=np.array(labels), train=np.array([True, True, True, False]))


# (id, argv with {tmp}, substrings the one line must hold: the bad value or file, and the fix)
CLI = [
    ("lr-nan", TRAIN + ["--lr", "nan"], ["--lr nan", "finite number > 0"]),
    ("lr-inf", TRAIN + ["--lr", "inf"], ["--lr inf", "finite number > 0"]),
    ("lr-negative", TRAIN + ["--lr", "-0.1"], ["--lr -0.1", "> 0"]),
    ("lr-zero", TRAIN + ["--lr", "0"], ["--lr 0.0", "> 0"]),
    ("lr-text", TRAIN + ["--lr", "fast"], ["--lr", "'fast'", "see --help"]),
    ("epochs-nan", TRAIN + ["--epochs", "nan"], ["--epochs nan", "finite number > 0"]),
    ("epochs-inf", TRAIN + ["--epochs", "inf"], ["--epochs inf", "finite number > 0"]),
    ("epochs-zero", TRAIN + ["--epochs", "0"], ["--epochs 0.0", "> 0"]),
    ("epochs-text", TRAIN + ["--epochs", "two"], ["--epochs", "'two'", "see --help"]),
    ("momentum-5", TRAIN + ["--momentum", "5"], ["--momentum 5.0", "[0, 1)"]),
    ("momentum-negative", TRAIN + ["--momentum", "-0.5"], ["--momentum -0.5", ">= 0"]),
    ("momentum-nan", TRAIN + ["--momentum", "nan"], ["--momentum nan", "finite number"]),
    ("weight-decay-nan", TRAIN + ["--weight-decay", "nan"], ["--weight-decay nan", "finite number"]),
    ("weight-decay-negative", TRAIN + ["--weight-decay", "-1"], ["--weight-decay -1.0", ">= 0"]),
    ("grad-clip-nan", TRAIN + ["--grad-clip", "nan"], ["--grad-clip nan", "finite number > 0"]),
    ("grad-clip-zero", TRAIN + ["--grad-clip", "0"], ["--grad-clip 0.0", "> 0"]),
    ("coverage-nan", TRAIN + ["--coverage", "nan"], ["--coverage nan", "(0, 1]"]),
    ("coverage-zero", TRAIN + ["--coverage", "0"], ["--coverage 0.0", "(0, 1]"]),
    ("coverage-above-one", TRAIN + ["--coverage", "1.5"], ["--coverage 1.5", "(0, 1]"]),
    ("coverage-not-whole", TRAIN + ["--simulate", "2", "--coverage", "0.3"], ["--coverage 0.3", "Coverages that work"]),
    ("warmup-nan", TRAIN + ["--warmup", "nan"], ["--warmup nan", "[0, 1)"]),
    ("warmup-one", TRAIN + ["--warmup", "1"], ["--warmup 1.0", "[0, 1)"]),
    ("label-smoothing-nan", TRAIN + ["--label-smoothing", "nan"], ["--label-smoothing nan", "[0, 1)"]),
    ("batch-size-zero", TRAIN + ["--batch-size", "0"], ["--batch-size 0", "> 0"]),
    ("batch-size-negative", TRAIN + ["--batch-size", "-4"], ["--batch-size -4", "> 0"]),
    ("seq-len-zero", TRAIN + ["--seq-len", "0"], ["--seq-len 0", "> 0"]),
    ("steps-zero", TRAIN + ["--steps", "0"], ["--steps 0", "> 0"]),
    ("simulate-zero", TRAIN + ["--simulate", "0"], ["--simulate 0", "> 0"]),
    ("workers-zero", TRAIN + ["--workers", "0"], ["--workers 0", "> 0"]),
    ("threads-zero", TRAIN + ["--threads", "0"], ["--threads 0", "> 0"]),
    ("width-zero", TRAIN + ["--width", "0"], ["--width 0", "> 0"]),
    ("steps-per-epoch-zero", TRAIN + ["--steps-per-epoch", "0"], ["--steps-per-epoch 0", "> 0"]),
    ("log-every-zero", TRAIN + ["--log-every", "0"], ["--log-every 0", "> 0"]),
    ("sync-every-zero", TRAIN + ["--sync-every", "0"], ["--sync-every 0", "> 0"]),
    ("checkpoint-every-negative", TRAIN + ["--checkpoint-every", "-1"], ["--checkpoint-every -1", ">= 0"]),
    ("eval-every-negative", TRAIN + ["--eval-every", "-2"], ["--eval-every -2", ">= 0"]),
    ("train-subset-zero", TRAIN + ["--train-subset", "0"], ["--train-subset 0", "> 0"]),
    ("test-subset-negative", TRAIN + ["--test-subset", "-1"], ["--test-subset -1", "> 0"]),
    ("strategy", TRAIN + ["--strategy", "zero3"], ["--strategy 'zero3'", "choose one of"]),
    ("level", TRAIN + ["--level", "layer"], ["--level 'layer'", "choose one of"]),
    ("sync", TRAIN + ["--sync", "both"], ["--sync 'both'", "choose one of"]),
    ("optimizer", TRAIN + ["--optimizer", "lion"], ["--optimizer 'lion'", "choose one of"]),
    ("schedule", TRAIN + ["--schedule", "step"], ["--schedule 'step'", "choose one of"]),
    ("device", TRAIN + ["--device", "tpu"], ["--device 'tpu'", "choose one of"]),
    ("precision", TRAIN + ["--precision", "fp8"], ["--precision 'fp8'", "choose one of"]),
    ("init", TRAIN + ["--init", "kaiming"], ["--init 'kaiming'", "choose one of: full, per-module"]),
    ("neuron-scaling", TRAIN + ["--neuron-scaling", "half"], ["--neuron-scaling 'half'", "choose one of"]),
    ("model-unknown", TRAIN + ["--model", "resnet1000"], ["--model 'resnet1000'", "choose one of"]),
    ("simulate-and-workers", TRAIN + ["--simulate", "2", "--workers", "2"], ["--simulate and --workers", "exclude"]),
    ("simulate-ddp", TRAIN + ["--simulate", "2", "--strategy", "ddp"], ["--strategy ddp", "--coverage 1"]),
    ("width-on-vit", TRAIN + ["--model", "vit_s4", "--width", "8"], ["--width", "vit_s4", "resnet18"]),
    ("text-with-image-model", TRAIN + ["--dataset", "tinyshakespeare"], ["--model resnet18", "use a language model"]),
    ("image-with-language-model", TRAIN + ["--model", "llama_tiny"], ["--model llama_tiny", "--dataset tinyshakespeare"]),
    ("tokenizer", TRAIN + ["--model", "llama_tiny", "--dataset", "tinyshakespeare", "--tokenizer", "words"],
     ["--tokenizer 'words'", "use char, byte"]),
    ("dataset-missing", TRAIN + ["--dataset", "{tmp}/nothere.txt"], ["nothere.txt", "neither a known data set"]),
    ("data-dir-missing", TRAIN + ["--data-dir", "{tmp}/nodata"], ["nodata", "no such file or folder", "give the folder"]),
    ("config-missing", TRAIN + ["--config", "{tmp}/none.toml"], ["none.toml", "no such file"]),
    ("config-yaml-syntax", TRAIN + ["--config", "{tmp}/bad.yaml"], ["bad.yaml", "not valid YAML", "line"]),
    ("config-toml-syntax", TRAIN + ["--config", "{tmp}/bad.toml"], ["bad.toml", "not valid TOML", "line"]),
    ("config-unknown-key", TRAIN + ["--config", "{tmp}/unknown.yaml"], ["unknown.yaml", "learning_rate", "known:"]),
    ("config-not-a-table", TRAIN + ["--config", "{tmp}/list.yaml"], ["list.yaml", "table of settings"]),
    ("config-suffix", TRAIN + ["--config", "{tmp}/settings.json"], ["settings.json", "use a .toml, .yaml"]),
    ("config-not-utf8", TRAIN + ["--config", "{tmp}/latin1.yaml"], ["latin1.yaml", "not UTF-8", "save it as UTF-8"]),
    ("config-wrong-type", TRAIN + ["--config", "{tmp}/wrongtype.yaml"], ["--lr 'fast'", "expected float"]),
    ("text-empty", TRAIN + ["--model", "llama_tiny", "--dataset", "{tmp}/empty.txt", "--simulate", "2"],
     ["empty.txt", "empty", "give a file"]),
    ("text-not-utf8", TRAIN + ["--model", "llama_tiny", "--dataset", "{tmp}/latin1.txt", "--simulate", "2"],
     ["latin1.txt", "not UTF-8", "convert it"]),
    ("token-file-truncated", TRAIN + ["--model", "llama_tiny", "--dataset", "{tmp}/tokens.bin", "--simulate", "2"],
     ["tokens.bin", "truncated", "write it again"]),
    *[(f"token-header-{name}", TRAIN + ["--model", "llama_tiny", "--dataset", f"{{tmp}}/tok-{name}.bin", "--steps", "1",
                                        "--batch-size", "2", "--seq-len", "8"], [f"tok-{name}.bin", *want])
      for name, want in (
          ("object", ['"dtype" \'|O\'', "not a token id type", "write it again"]),
          ("half", ['"dtype" \'<f2\'', "not a token id type", "<u2"]),
          ("bigendian", ['"dtype" \'>u2\'', "not a token id type"]),
          ("dtype-number", ['"dtype" 2', "not a token id type"]),
          ("length-text", ['"length" \'2000\'', "whole number"]),
          ("length-bool", ['"length" True', "whole number"]),
          ("length-negative", ['"length" -2', "whole number"]),
          ("vocab-small", ["token id 49", "vocabulary 0..9", '"vocab_size"']),
          ("vocab-float", ['"vocab_size" 50.5', "whole number"]),
          ("vocab-huge", ['"vocab_size" 1000000000000000000000000000000', "1..4294967296"]),
          ("not-a-table", ["not a subnetdp-tokens-v1 header", "write it again"]),
          ("not-json", ["not a JSON token-file header", "write it again"]),
          ("signed", ["token id -3", "ids >= 0"]))],
    ("dataset-fifo", TRAIN + ["--model", "llama_tiny", "--dataset", "{tmp}/fifo.txt"],
     ["fifo.txt", "not a regular file", "give a text file"]),
    ("cifar-labels-beyond-classes", TRAIN + ["--data-dir", "{tmp}/badlabels", "--train-subset", "2", "--batch-size", "1"],
     ["cifar10-jpeg in", "badlabels", "label 10", "10 classes", "copy the data set again"]),
    ("evaluate-planted-code", ["evaluate", "{tmp}/runs/pwn"], ["runs/pwn/config.json", "'pwn_planted:build'",
                                                              "--model pwn_planted:build", "--trust-run-code"]),
    ("evaluate-damaged-weights", ["evaluate", "{tmp}/runs/damaged"], ["runs/damaged/model.safetensors",
                                                                      "not a readable safetensors file"]),
    ("evaluate-mismatched-weights", ["evaluate", "{tmp}/runs/mismatched"],
     ["runs/mismatched/model.safetensors", "does not fit the model", "config.json"]),
    ("evaluate-config-wrong-type", ["evaluate", "{tmp}/runs/badtypes"], ["--batch-size 'big'", "expected int",
                                                                         "runs/badtypes/config.json"]),
    ("evaluate-config-not-json", ["evaluate", "{tmp}/runs/badjson"], ["runs/badjson/config.json", "not a readable"]),
    *[(f"report-summary-{name}", ["report", f"{{tmp}}/summaries/{name}", "--out", "{tmp}/report"],
       [f"summaries/{name}/summary.json", "malformed run summary", "leave this run out"])
      for name in ("notjson", "list", "missing-keys", "wrong-types")],
    ("epochs-absurd", TRAIN + ["--epochs", "1e308"], ["--epochs 1e+308", "at most 1e+06"]),
    ("steps-absurd", TRAIN + ["--steps", str(10**15)], ["--steps 1000000000000000", "at most 1e+12"]),
    ("config-overwrite", TRAIN + ["--config", "{tmp}/overwrite.toml"],
     ["overwrite.toml", "'overwrite' is a command-line decision", "give --overwrite on the command line"]),
    ("config-steps-text", TRAIN + ["--config", "{tmp}/steps-text.toml"], ["--steps '10'", "expected int", "steps-text.toml"]),
    ("config-seed-bool", TRAIN + ["--config", "{tmp}/seed-bool.yaml"], ["--seed True", "expected int"]),
    ("model-not-a-model", TRAIN + ["--model", "notmodel:build", "--dataset", "{tmp}/ok.bin", "--steps", "1"],
     ["'notmodel:build'", "returned str, not a torch.nn.Module"]),
    ("model-wrong-signature", TRAIN + ["--model", "os:getcwd", "--dataset", "{tmp}/ok.bin", "--steps", "1"],
     ["'os:getcwd'", "cannot be called with vocab_size=, max_seq_len="]),
    ("cifar-corrupt", TRAIN + ["--data-dir", "{tmp}/badnpz", "--simulate", "2"],
     ["cifar10_jpeg.npz", "not a readable CIFAR-10 (JPEG) file", "copy it again"]),
    ("cifar-truncated", TRAIN + ["--data-dir", "{tmp}/truncnpz", "--simulate", "2"],
     ["cifar10_jpeg.npz", "not a readable CIFAR-10 (JPEG) file", "copy it again"]),
    ("plan-workers-zero", ["plan", "--workers", "0"], ["workers=0", "positive integer"]),
    ("plan-coverage-two", ["plan", "--coverage", "2"], ["coverage", "2"]),
    ("plan-coverage-nan", ["plan", "--coverage", "nan"], ["coverage", "nan"]),
    ("plan-not-uniform", ["plan", "--workers", "3", "--coverage", "0.5"], ["0.5", "3"]),
    ("plan-model-unknown", ["plan", "--model", "nope"], ["'nope'", "known models"]),
    ("plan-width-zero", ["plan", "--width", "0"], ["--width 0", "positive whole number"]),
    ("plan-level", ["plan", "--level", "layer"], ["--level", "'layer'", "choose from"]),
    ("plan-save-nowhere", ["plan", "--width", "4", "--save", "{tmp}/nofolder/plan.json"],
     ["nofolder/plan.json", "existing, writable folder"]),
    ("bench-coverages", ["bench", "--coverages", "2"], ["--coverages '2'", "(0, 1]"]),
    ("bench-coverages-text", ["bench", "--coverages", "half"], ["--coverages 'half'", "(0, 1]"]),
    ("bench-models", ["bench", "--models", "vgg"], ["--models 'vgg'", "resnet18, llama"]),
    ("bench-levels", ["bench", "--levels", "layer"], ["--levels 'layer'", "block, neuron"]),
    ("bench-workers-zero", ["bench", "--workers", "0"], ["--workers 0", "positive whole number"]),
    ("bench-time-limit-nan", ["bench", "--time-limit", "nan"], ["--time-limit nan", "finite number > 0"]),
    ("bench-device", ["bench", "--device", "xpu9"], ["--device 'xpu9'", "use cpu or cuda"]),
    ("report-missing", ["report", "{tmp}/norun"], ["norun", "finished run directory"]),
    ("unknown-command", ["fly"], ["'fly'", "see --help"]),
]
NEEDS_DATA = [  # fail after loading the shared CIFAR-10 (JPEG): the shard checks
    ("simulate-1000", TRAIN + ["--simulate", "1000", "--out", "{tmp}/run"], ["--batch-size 128", "1000 workers", "lower"]),
    ("batch-above-shard", TRAIN + ["--simulate", "2", "--train-subset", "100", "--batch-size", "64", "--out", "{tmp}/run"],
     ["--batch-size 64", "50 of 100", "lower"]),
    ("train-subset-one", TRAIN + ["--simulate", "2", "--train-subset", "1", "--out", "{tmp}/run"],
     ["--batch-size 128", "0 of 1", "larger --train-subset"]),
]


_PROGRESS = re.compile(r"^decoding .*: +\d+%\|")


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit, as the command line sees it
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def _check(case: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, argv, expected = case
    _files(tmp_path)
    before = _snapshot(tmp_path)
    code, err = _run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    # A first run on a fresh machine decodes the data set with a progress bar (stderr, as tqdm
    # writes it); that is progress, not part of the error, so only the other lines are checked.
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not _PROGRESS.match(ln.strip())]
    assert code != 0, f"exit status 0 for {argv}"
    assert len(lines) == 1, f"want one line, got:\n{err}"
    assert lines[0].startswith("subnetdp") and "error" in lines[0] and "Traceback" not in err
    for want in expected:
        assert want.replace("{tmp}", str(tmp_path)) in lines[0], f"{want!r} not in: {lines[0]}"
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in before} == before, "a pre-existing file changed"
    assert not (tmp_path / "PWNED").exists(), "code named by a run folder ran"


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_bad_cli_input_ends_in_one_clear_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default run folder would land here, never in the repository
    monkeypatch.setenv("SUBNETDP_CACHE", str(tmp_path / "cache"))  # decoded data sets too
    monkeypatch.syspath_prepend(str(tmp_path))  # a module planted beside the data, as `python -m` in that folder
    monkeypatch.syspath_prepend(str(tmp_path / "runs" / "pwn"))
    _check(case, tmp_path, capsys)


@pytest.mark.shared_data(CIFAR10_JPEG)
@pytest.mark.parametrize("case", NEEDS_DATA, ids=[c[0] for c in NEEDS_DATA])
def test_a_batch_that_a_shard_cannot_fill_ends_in_one_clear_line(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _check(case, tmp_path, capsys)


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=65, n_positions=32))



def _api_cases(tmp: Path) -> list[tuple[str, object, type, str]]:
    from subnetdp.config import ConfigError, TrainConfig, validate
    from subnetdp.models import resnet18

    f = lambda: resnet18(width=4)  # noqa: E731
    p = sd.plan(f, 2, 0.5, "block")
    opt = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes(b"caf\xe9")
    write_token_file([1, 2, 3] * 10, tmp / "t.bin", vocab_size=4)
    (tmp / "t.bin").write_bytes((tmp / "t.bin").read_bytes()[:7])
    return [
        ("simulation-sync-every-zero", lambda: sd.Simulation(f, p, opt, sync_every=0), ValueError,
         "sync_every=0: need a positive whole number"),
        ("simulation-sync-every-float", lambda: sd.Simulation(f, p, opt, sync_every=1.5), ValueError, "sync_every=1.5"),
        ("simulation-sync", lambda: sd.Simulation(f, p, opt, sync="both"), ValueError, "sync='both': choose one of"),
        ("simulation-init", lambda: sd.Simulation(f, p, opt, init="xavier"), ValueError, "init='xavier': choose"),
        ("plan-from-bad-json", lambda: sd.Plan.from_json("{not json"), ValueError, "invalid JSON.*Plan.to_json"),
        ("plan-from-other-json", lambda: sd.Plan.from_json('{"workers": 2}'), ValueError,
         "missing or malformed field.*Plan.to_json"),
        ("plan-from-json-list", lambda: sd.Plan.from_json("[1, 2]"), ValueError, "malformed field"),
        ("plan-workers-true", lambda: sd.plan(f, True, 1.0), ValueError, "workers=True: need a positive integer"),
        ("plan-workers-float", lambda: sd.plan(f, 2.0, 0.5), ValueError, "workers=2.0"),
        ("plan-coverage-nan", lambda: sd.plan(f, 2, math.nan), ValueError, "coverage"),
        ("plan-level", lambda: sd.plan(f, 2, 0.5, "layer"), ValueError, "level='layer': choose one of"),
        ("materialize-init", lambda: sd.materialize(f, init="kaiming"), ValueError, "init='kaiming'"),
        ("subnetwork-worker", lambda: sd.build_subnetwork(f, p, 5), ValueError, "5"),
        ("subnetwork-scaling", lambda: sd.build_subnetwork(f, p, 0, neuron_scaling="half"), ValueError,
         "neuron_scaling='half'"),
        ("engine-without-process-group", lambda: sd.SubnetDataParallel(f, p), RuntimeError, r"init_process_group\(\) first"),
        ("text-empty", lambda: load_text(tmp / "empty.txt"), ValueError, "empty.txt: the text file is empty"),
        ("text-not-utf8", lambda: load_text(tmp / "latin1.txt"), ValueError, "latin1.txt: not UTF-8 text"),
        ("token-file-truncated", lambda: read_token_file(tmp / "t.bin"), ValueError, "t.bin has 7 bytes"),
        ("token-write-beyond-vocab", lambda: write_token_file([0, 7], tmp / "w.bin", vocab_size=4), ValueError,
         "token id 7 is beyond vocab_size=4"),
        ("token-header-object", lambda: read_token_file(_object_header(tmp)), ValueError, r"'\|O' is not a token id type"),
        ("config-momentum", lambda: validate(TrainConfig(momentum=5.0)), ConfigError, r"--momentum 5.0: must be in \[0, 1\)"),
        ("config-lr-nan", lambda: validate(TrainConfig(lr=math.nan)), ConfigError, "--lr nan"),
    ]


def _object_header(tmp: Path) -> Path:
    """A token file whose header asks numpy to map pointers (a segfault before issue 19)."""
    path = write_token_file(list(range(8)), tmp / "obj.bin", vocab_size=8)
    (tmp / "obj.bin.json").write_text((tmp / "obj.bin.json").read_text().replace('"<u2"', '"|O"'))
    return path


API_IDS = ["simulation-sync-every-zero", "simulation-sync-every-float", "simulation-sync", "simulation-init",
           "plan-from-bad-json", "plan-from-other-json", "plan-from-json-list", "plan-workers-true",
           "plan-workers-float", "plan-coverage-nan", "plan-level", "materialize-init", "subnetwork-worker",
           "subnetwork-scaling", "engine-without-process-group", "text-empty", "text-not-utf8",
           "token-file-truncated", "token-write-beyond-vocab", "token-header-object", "config-momentum", "config-lr-nan"]


@pytest.mark.parametrize("name", API_IDS)
def test_bad_api_input_raises_a_clear_error(name, tmp_path):
    cases = {c[0]: c for c in _api_cases(tmp_path)}
    _, call, error, match = cases[name]
    with pytest.raises(error, match=match):
        call()


def test_a_gpt2_plan_with_a_headless_worker_is_rejected_before_any_forward():
    pytest.importorskip("transformers")
    p = sd.plan(_gpt2, 6, 1 / 6, "neuron")
    for k in range(6):  # the same error on every worker (hence every rank), naming the fix
        with pytest.raises(ValueError, match=r"would hold none of the 4 heads .* Use a coverage of at least 0.333333"):
            sd.build_subnetwork(_gpt2, p, k)
    x = torch.randint(0, 65, (1, 8))
    p = sd.plan(_gpt2, 6, 2 / 6, "neuron")
    for k in range(6):
        sd.build_subnetwork(_gpt2, p, k)(x)


def _cli(*args: str, cwd: Path) -> tuple[list[str], dict[str, str], Path]:
    """The real command line (this checkout's code), its environment and working folder."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "subnetdp", *args], env, cwd


def test_the_real_command_prints_no_traceback(tmp_path):
    cmd, env, cwd = _cli("train", "--lr", "nan", cwd=tmp_path)
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "subnetdp train: error: --lr nan: must be a finite number > 0"
    cmd, env, cwd = _cli("plan", "--save", str(tmp_path / "no" / "p.json"), "--width", "4", cwd=tmp_path)
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_plan_piped_into_head_exits_quietly(tmp_path):
    cmd, env, cwd = _cli("plan", "--width", "4", cwd=tmp_path)
    r = subprocess.run(" ".join(cmd) + " | head -n 1; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("SDP plan:")


@pytest.mark.shared_data(TINY_SHAKESPEARE)
def test_train_piped_into_head_still_writes_its_final_model(tmp_path):
    out = tmp_path / "run"
    cmd, env, cwd = _cli("train", "--model", "llama_tiny", "--dataset", "tinyshakespeare", "--simulate", "2",
                         "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--threads", "1", "--log-every", "1",
                         "--out", str(out), cwd=tmp_path)
    r = subprocess.run(" ".join(cmd) + " | head -n 1; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr
    assert (out / "model.safetensors").is_file() and (out / "summary.json").is_file()


def test_the_table_is_large_enough():
    assert len(CLI) + len(NEEDS_DATA) + len(API_IDS) + 1 >= 60


def test_the_test_extra_installs_what_the_yaml_cases_need():
    """`pip install -e .[test]` alone must run this table: its YAML --config cases need PyYAML (issue 19 item 9)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(re.fullmatch(r"pyyaml>=\d+(\.\d+)*", d.lower()) for d in project["optional-dependencies"]["test"])


def test_bench_time_limit_ends_in_one_line_and_leaves_no_timing_rank(tmp_path):
    """issue 19 item 7: the limit used to end in TimeoutExpired's traceback, its timing ranks still running."""
    cmd, env, cwd = _cli("bench", "--models", "resnet18", "--width", "4", "--batch", "4", "--workers", "2",
                         "--coverages", "0.5", "--levels", "block", "--repeats", "1", "--sdp-checkpointing", "none",
                         "--time-ranks", "2", "--time-steps", "50", "--rounds", "5", "--time-limit", "3",
                         "--out", str(tmp_path / "bench"), cwd=tmp_path)
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("subnetdp bench: error: --time-limit 3: the timing part")
    deadline = time.monotonic() + 30
    while (left := _timing_ranks(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"timing ranks outlived bench: {left}"


def _timing_ranks(cwd: Path) -> list[int]:
    """Processes of ``python -m subnetdp.measure.timing`` started from ``cwd``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"subnetdp.measure.timing" in (proc / "cmdline").read_bytes()
                    and os.readlink(proc / "cwd") == str(cwd)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found
