"""Block-level residual-branch scaling on pre-norm transformers: scaled against unscaled, paired.

At block level the evaluated model has each unit block's residual branches scaled by ``r/K``
(docs/evaluation.md); the evidence for that rule comes from ResNets with BatchNorm. This script
measures it on two pre-norm decoders trained by the main job (``subnetdp train``, K workers
simulated in one process) on character-level Tiny Shakespeare:

- ``llama``: the zoo's ``llama_char_small`` (RMSNorm, rotary, SwiGLU, untied; 2.46M parameters);
- ``gpt2``: a Hugging Face ``GPT2LMHeadModel`` built here from a small config (:func:`gpt2_char`:
  LayerNorm, learned positions, GELU MLP, tied head; no downloads).

Each run is evaluated both ways from the SAME trained weights (its ``model_raw.safetensors``, the
assembled state as trained): as assembled ("unscaled") and with :func:`subnetdp.scale_residual_branches`
("scaled"), on 20 validation batches of ``--eval-batch-size`` sequences from the held-out last 10% of
the text, drawn as the main job draws its own (whose smaller evaluation is recorded too). For context
each worker's own subnetwork (from the run's last checkpoint) is evaluated on the same batches, and the
workers' training loss over the last tenth of the steps is read from ``metrics.jsonl``. Two step
regimes: ``same`` (``--steps``) and ``flop`` (``--flop-matched``: 1/C times as many steps).

``--evaluate RUN_DIR ...`` trains nothing: it evaluates finished run folders of ``subnetdp train`` (any
level, e.g. the long reproduction tier's) the same way, the model as saved beside the workers'
subnetworks, and at block level unscaled against scaled, and prints the table per (model, level, C,
steps). A folder is read as data: a ``module:callable`` model it names is imported only when ``--model``
names it too (this script's own GPT-2 included), as ``subnetdp evaluate`` asks. Its figures for the long
tier's language-model runs are in docs/reproduction.md::

    python experiments/transformer_residual_scaling.py --evaluate runs/conv/runs/lm-K4-sdp-* \
        --out docs/results/repro_cpu_converged/assembly.json

Resumable: a run whose result file (``RUN_DIR/scaling.json``) exists is skipped; a run folder without
one is trained again from the start. ``--out`` (JSON with every run and the per-cell summary) is
rewritten after every run. The runs docs/evaluation.md reports (about an hour of one core)::

    python experiments/transformer_residual_scaling.py --coverages 0.5 0.25 \
        --out docs/results/transformer_residual_scaling.json
    python experiments/transformer_residual_scaling.py --families gpt2 --steps 400 --regimes flop \
        --runs-dir runs/transformer_scaling_long --out docs/results/transformer_residual_scaling_long.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

FAMILIES = ("llama", "gpt2")
REGIMES = ("same", "flop")


def gpt2_char(vocab_size: int, max_seq_len: int) -> nn.Module:
    """A GPT-2-style decoder about the size of ``llama_char_small`` (6 layers, width 192, 6 heads; 2.68M
    parameters at 65 characters), dropout off as in the zoo's LLaMA; ``subnetdp train --model`` calls it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=192, n_head=6, vocab_size=vocab_size, n_positions=max_seq_len,
                                      bos_token_id=0, eos_token_id=0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


MODEL_FLAGS = {"llama": "llama_char_small", "gpt2": f"{Path(__file__).stem}:gpt2_char"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--coverages", nargs="+", type=float, default=[0.5], help="SDP coverages C (block level)")
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES),
                   help="same: --steps steps; flop: --flop-matched (1/C times as many)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=4, help="K, simulated in one process")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of the same-steps regime")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per worker per step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine after 5%% warm-up)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-batch-size", type=int, default=32,
                   help="sequences per validation batch of the paired evaluation (20 batches, drawn as the main job "
                        "draws its own; the main job's own, at --batch-size, is reported too)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs-dir", default="runs/transformer_scaling", help="one run folder per training")
    p.add_argument("--out", default=None,
                   help="the results JSON (default for training: docs/results/transformer_residual_scaling.json; "
                        "--evaluate needs it named)")
    p.add_argument("--evaluate", nargs="+", type=Path, metavar="RUN_DIR", default=None,
                   help="train nothing: evaluate these finished run folders (any level) and print their table")
    p.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                   help="with --evaluate: the one 'module:callable' model the run folders may name, imported because "
                        f"you name it here (e.g. {MODEL_FLAGS['gpt2']}); zoo models need no flag")
    return p.parse_args(argv)


def run_name(family: str, coverage: float, regime: str, seed: int) -> str:
    return f"{family}-C{coverage:g}-{regime}-s{seed}"


def train_argv(args: argparse.Namespace, family: str, coverage: float, regime: str, seed: int, out: Path) -> list[str]:
    """The ``subnetdp train`` flags of one run (one epoch: the run is evaluated once, at its end)."""
    steps = args.steps * (round(1 / coverage) if regime == "flop" else 1)
    argv = ["--model", MODEL_FLAGS[family], "--dataset", "tinyshakespeare", "--simulate", str(args.workers),
            "--level", "block", "--coverage", f"{coverage:g}", "--optimizer", "adamw", "--lr", f"{args.lr:g}",
            "--weight-decay", f"{args.weight_decay:g}", "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--steps-per-epoch", str(steps),
            "--seed", str(seed), "--threads", str(args.threads), "--no-progress", "--out", str(out), "--overwrite"]
    return argv + (["--flop-matched"] if regime == "flop" else [])


def run_config(run_dir: Path, trusted: str | None) -> Any:
    """A run folder's ``TrainConfig``, read as data: the only ``module:callable`` model it may name is
    ``trusted``, the one the caller chose (training: the family's own; ``--evaluate``: ``--model``), so
    evaluating a folder never imports code the folder chose."""
    from subnetdp.config import ConfigError, from_values

    values = read_json_object(run_dir / "config.json")
    model = values.get("model")
    if isinstance(model, str) and ":" in model and model != trusted:
        fix = (f"if you trust it, name it: --model {model}" if trusted is None else
               f"this grid trains {trusted}; give its run folders their own --runs-dir")
        raise SystemExit(f"{run_dir / 'config.json'} names the model {model!r}: this script imports no code that a "
                         f"run folder names; {fix}")
    try:
        return from_values(values, str(run_dir / "config.json"))
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a run folder, or an error that names the file (a folder is data: no traceback)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: expected a JSON object, found {type(values).__name__}")
    return values


@torch.no_grad()
def evaluate_both(run_dir: Path, cfg: Any, eval_batch_size: int) -> dict[str, Any]:
    """Validation loss of the run's assembled state as trained, unscaled and with branches scaled by r/K:
    on the main job's validation batches and on ``eval_batch_size`` sequences per batch (more held-out text)."""
    from safetensors.torch import load_file

    import subnetdp as sd
    from subnetdp.tasks import make_task

    plan = sd.Plan.from_json((run_dir / "plan.json").read_text())
    task = make_task(cfg, torch.device("cpu"))
    big = make_task(dataclasses.replace(cfg, batch_size=eval_batch_size), torch.device("cpu"))
    model = sd.materialize(task.model_factory(), seed=cfg.seed)
    model.load_state_dict(load_file(run_dir / "model_raw.safetensors"))
    out: dict[str, Any] = {}
    for rule in ("unscaled", "scaled"):
        if rule == "scaled":
            out["scaled_layers"] = len(sd.scale_residual_branches(model, plan))
        out[f"val_loss_{rule}"] = big.evaluate(model, contextlib.nullcontext)["val_loss"]
        out[f"job_val_loss_{rule}"] = task.evaluate(model, contextlib.nullcontext)["val_loss"]
    return {**out, "residual_scale": plan.holders_per_unit / plan.workers,
            "val_tokens": big.eval_batches * eval_batch_size * cfg.seq_len,
            "job_val_tokens": task.eval_batches * cfg.batch_size * cfg.seq_len}


@torch.no_grad()
def subnetwork_val_loss(run_dir: Path, cfg: Any, eval_batch_size: int) -> float:
    """Each worker's own subnetwork, from the run's last checkpoint, on the paired evaluation's validation
    batches, averaged over workers: what the assembled model would match if assembly lost nothing."""
    import subnetdp as sd
    from subnetdp.checkpoint import load_checkpoint
    from subnetdp.tasks import make_task

    plan = sd.Plan.from_json((run_dir / "plan.json").read_text())
    task = make_task(dataclasses.replace(cfg, batch_size=eval_batch_size), torch.device("cpu"))
    sim = sd.Simulation(task.model_factory(), plan, lambda ps: torch.optim.SGD(ps, lr=0.0), seed=cfg.seed)
    load_checkpoint(run_dir / "checkpoints", nn.ModuleList(sim.workers), None, plan, restore_rng=False)
    return statistics.fmean(task.evaluate(w, contextlib.nullcontext)["val_loss"] for w in sim.workers)


@torch.no_grad()
def saved_val_loss(run_dir: Path, cfg: Any, eval_batch_size: int) -> float:
    """Validation loss of the run's ``model.safetensors`` (the model the main job ships, evaluation rule applied)
    on the paired evaluation's batches."""
    from safetensors.torch import load_file

    import subnetdp as sd
    from subnetdp.tasks import make_task

    task = make_task(dataclasses.replace(cfg, batch_size=eval_batch_size), torch.device("cpu"))
    model = sd.materialize(task.model_factory(), seed=cfg.seed)
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    return task.evaluate(model, contextlib.nullcontext)["val_loss"]


def evaluate_runs(run_dirs: list[Path], eval_batch_size: int, trusted: str | None) -> list[dict[str, Any]]:
    """``--evaluate``: finished runs of any level, evaluated as the training grid's runs are, without training.
    The model as saved against the workers' subnetworks says how much the assembly costs; at block level
    the unscaled/scaled pair says what the evaluation rule does to it."""
    results = []
    for run_dir in run_dirs:
        if not (run_dir / "summary.json").is_file():
            print(f"{run_dir}: not a finished run (no summary.json): skipped", flush=True)
            continue
        cfg = run_config(run_dir, trusted)
        summary = read_json_object(run_dir / "summary.json")
        try:
            steps, val_loss, rule = summary["steps"], summary["final"]["val_loss"], summary["evaluation"]
        except (KeyError, TypeError) as e:
            raise SystemExit(f"{run_dir / 'summary.json'}: not a summary of a finished text run (no {e})") from None
        r = {"run": run_dir.name, "model": cfg.model, "level": cfg.level, "coverage": cfg.coverage, "seed": cfg.seed,
             "steps": steps, "summary_val_loss": val_loss, "summary_evaluation": rule,
             "val_loss_saved": saved_val_loss(run_dir, cfg, eval_batch_size),
             "subnetwork_val_loss": subnetwork_val_loss(run_dir, cfg, eval_batch_size),
             "train_loss_end": train_loss_end(run_dir)}
        r["saved_minus_subnetworks"] = r["val_loss_saved"] - r["subnetwork_val_loss"]
        if cfg.level == "block":
            r.update(evaluate_both(run_dir, cfg, eval_batch_size))
            r["scaled_minus_unscaled"] = r["val_loss_scaled"] - r["val_loss_unscaled"]
        results.append(r)
        print(f"{run_dir.name}: val loss as saved {r['val_loss_saved']:.4f}, workers' subnetworks "
              f"{r['subnetwork_val_loss']:.4f}", flush=True)
    return results


def evaluated_table(results: list[dict[str, Any]]) -> str:
    """``--evaluate``'s results per (model, level, C, steps): mean ± sample std over the runs found."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["model"], r["level"], r["coverage"], r["steps"]), []).append(r)

    def ms(rs: list[dict[str, Any]], key: str) -> str:
        if key not in rs[0]:
            return "n/a"
        d = mean_std([r[key] for r in rs])
        return f"{d['mean']:.4f} ± {d['std']:.4f}"

    lines = ["| model | level | C | steps | seeds | as saved | unscaled | scaled r/K | scaled − unscaled | "
             "workers' subnetworks | as saved − subnetworks | workers' train loss, last 10% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, level, coverage, steps), rs in sorted(cells.items()):
        lines.append(f"| {model} | {level} | {coverage:g} | {steps} | {', '.join(str(r['seed']) for r in rs)} | "
                     f"{ms(rs, 'val_loss_saved')} | {ms(rs, 'val_loss_unscaled')} | {ms(rs, 'val_loss_scaled')} | "
                     f"{ms(rs, 'scaled_minus_unscaled')} | "
                     f"{ms(rs, 'subnetwork_val_loss')} | {ms(rs, 'saved_minus_subnetworks')} | "
                     f"{ms(rs, 'train_loss_end')} |")
    return "\n".join(lines)


def train_loss_end(run_dir: Path) -> float:
    """Mean training loss (the subnetworks', on their training batches) over the last tenth of the logged steps:
    what the workers reached, to set beside the assembled model's validation loss."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable log ({' '.join(str(e).split())})") from None
    losses = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise SystemExit(f"{path}, line {number}: not a JSON record") from None
        if isinstance(record, dict) and record.get("kind") == "step":
            loss = record.get("loss")
            if isinstance(loss, bool) or not isinstance(loss, (int, float)):
                raise SystemExit(f"{path}, line {number}: a step record without a numeric loss")
            losses.append(float(loss))
    if not losses:
        raise SystemExit(f"{path}: no step records (not a finished run's log)")
    return statistics.fmean(losses[-max(1, len(losses) // 10):])


def one_run(args: argparse.Namespace, family: str, coverage: float, regime: str, seed: int) -> dict[str, Any]:
    """Train one configuration with the main job (unless its result exists) and evaluate it both ways."""
    run_dir = Path(args.runs_dir) / run_name(family, coverage, regime, seed)
    result_file = run_dir / "scaling.json"
    if result_file.exists():
        result = read_json_object(result_file)
        if "subnetwork_val_loss" not in result:  # results written before these were recorded
            cfg = run_config(run_dir, MODEL_FLAGS[family])
            result.update(train_loss_end=train_loss_end(run_dir),
                          subnetwork_val_loss=subnetwork_val_loss(run_dir, cfg, args.eval_batch_size))
            result_file.write_text(json.dumps(result, indent=1) + "\n")
        return result
    argv = train_argv(args, family, coverage, regime, seed, run_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                      os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "subnetdp", "train", *argv], check=True, env=env)
    wall = time.perf_counter() - start
    summary = read_json_object(run_dir / "summary.json")
    cfg = run_config(run_dir, MODEL_FLAGS[family])
    result = {"family": family, "coverage": coverage, "regime": regime, "seed": seed,
              "command": "subnetdp train " + " ".join(argv), "steps": summary["steps"], "wall_s": wall,
              "train_loss_last_epoch": summary["epochs"][-1]["train_loss"], "train_loss_end": train_loss_end(run_dir),
              "subnetwork_val_loss": subnetwork_val_loss(run_dir, cfg, args.eval_batch_size),
              "summary_val_loss": summary["final"]["val_loss"], "summary_evaluation": summary["evaluation"],
              **evaluate_both(run_dir, cfg, args.eval_batch_size)}
    result["scaled_minus_unscaled"] = result["val_loss_scaled"] - result["val_loss_unscaled"]
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (family, C, regime): mean and sample std over seeds of each loss and of the paired difference."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["family"], r["coverage"], r["regime"]), []).append(r)
    out = []
    for (family, coverage, regime), rs in cells.items():
        out.append({"family": family, "coverage": coverage, "regime": regime, "steps": rs[0]["steps"],
                    "seeds": [r["seed"] for r in rs],
                    **{k: mean_std([r[k] for r in rs])
                       for k in ("val_loss_unscaled", "val_loss_scaled", "scaled_minus_unscaled", "train_loss_end",
                                 "subnetwork_val_loss")},
                    "unscaled_better_in": sum(r["scaled_minus_unscaled"] > 0 for r in rs)})
    return out


def markdown_table(cells: list[dict[str, Any]]) -> str:
    """The per-cell summary as the markdown table docs/evaluation.md shows (validation loss, nats per character)."""
    def ms(d: dict[str, float], sign: str = "") -> str:
        return f"{d['mean']:{sign}.4f} ± {d['std']:.4f}"

    lines = ["| model | C | regime | steps | unscaled | scaled r/K | scaled − unscaled | unscaled better in | "
             "workers' subnetworks | workers' train loss, last 10% |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {MODEL_FLAGS[c['family']].split(':')[-1]} | {c['coverage']:g} | {c['regime']} | {c['steps']} | "
                     f"{ms(c['val_loss_unscaled'])} | {ms(c['val_loss_scaled'])} | {ms(c['scaled_minus_unscaled'], '+')} | "
                     f"{c['unscaled_better_in']} of {len(c['seeds'])} | "
                     f"{ms(c['subnetwork_val_loss'])} | {ms(c['train_loss_end'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is not None and not args.evaluate:
        raise SystemExit(f"--model {args.model}: only --evaluate takes it (training runs the --families' own models)")
    if args.evaluate and args.out is None:
        raise SystemExit("--evaluate writes its results to the JSON that --out names: give --out PATH")
    args.out = args.out or "docs/results/transformer_residual_scaling.json"
    out = Path(args.out)
    if args.evaluate:
        results = evaluate_runs(args.evaluate, args.eval_batch_size, args.model)
        table = evaluated_table(results)
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {"evaluate": [str(d) for d in args.evaluate], "model": args.model, "eval_batch_size": args.eval_batch_size,
                    "threads": args.threads, "out": args.out}  # the training grid's settings do not apply
        out.write_text(json.dumps({"settings": settings,
                                   "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                   "runs": results}, indent=1) + "\n")
        print(table)
        return
    results = []
    for regime in args.regimes:  # every family's same-steps runs first: the shorter regime is complete soonest
        for family in args.families:
            for coverage in args.coverages:
                for seed in args.seeds:
                    r = one_run(args, family, coverage, regime, seed)
                    results.append(r)
                    print(f"{run_name(family, coverage, regime, seed)}: val loss unscaled {r['val_loss_unscaled']:.4f}, "
                          f"scaled {r['val_loss_scaled']:.4f} ({r['scaled_minus_unscaled']:+.4f})", flush=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps({"settings": vars(args), "machine": platform.processor() or platform.machine(),
                                               "torch": torch.__version__, "runs": results,
                                               "cells": summarise(results)}, indent=1) + "\n")
    print(markdown_table(summarise(results)))


if __name__ == "__main__":
    main()
