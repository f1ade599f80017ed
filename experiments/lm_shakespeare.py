"""Character-level language modelling on Tiny Shakespeare: DDP-equivalent vs SDP block vs SDP neuron.

K workers are simulated in one process (:class:`subnetdp.Simulation`: the same math as K ranks of
``SubnetDataParallel``). Every run trains the same LLaMA-style model for the same number of steps,
with the same per-worker batches; only the plan differs:

- ``ddp``: coverage 1 (every worker holds everything: data parallelism's math, DESIGN.md invariant 4);
- ``block`` / ``neuron`` at each coverage in ``--coverages``.

It reports the validation loss of the assembled full model (fixed validation windows) and, per
worker, the bytes of parameters and of optimizer state that exist on it (measured from the tensors,
mean and max over workers). Results go to stdout as a Markdown table and to ``--out`` as JSON.

2-core CPU (the numbers in docs/language_models.md)::

    python experiments/lm_shakespeare.py --out runs/lm_shakespeare.json

A GPU run with a larger model::

    python experiments/lm_shakespeare.py --device cuda --dim 384 --layers 8 --heads 8 --kv-heads 4 \\
        --seq-len 256 --batch-size 32 --steps 3000 --lr 1e-3 --out runs/lm_shakespeare_gpu.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import subnetdp as sd
from subnetdp.data import TokenBatches, load_text, train_val_split
from subnetdp.data.text import get_tokenizer
from subnetdp.models import llama_char_small


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="text file (default: Tiny Shakespeare from ../shared/data)")
    p.add_argument("--tokenizer", default="char", help="char, byte, tiktoken:NAME or tokenizers:PATH")
    p.add_argument("--workers", type=int, default=4, help="K simulated workers")
    p.add_argument("--coverages", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--levels", nargs="+", default=["block", "neuron"])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per worker per step")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1 is fastest on a busy 2-core machine; 0: PyTorch's default)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    out = model(x)
    logits = getattr(out, "logits", out)  # Hugging Face models return a ModelOutput
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, val: np.ndarray, args: argparse.Namespace) -> float:
    model.eval()
    batches = TokenBatches(val, args.batch_size, args.seq_len, seed=12345, device=args.device)
    total = sum(float(lm_loss(model, batches.batch(i))) for i in range(args.eval_batches))
    model.train()
    return total / args.eval_batches


def state_bytes(sim: sd.Simulation) -> dict[str, float]:
    """Measured bytes per worker: parameters, and optimizer state (AdamW's two moments)."""
    params = [sum(p.numel() * p.element_size() for p in w.parameters()) for w in sim.workers]
    optim = [sum(s.numel() * s.element_size() for st in o.state.values() for k, s in st.items() if k != "step")
             for o in sim.optimizers]
    return {"param_bytes_mean": sum(params) / len(params), "param_bytes_max": max(params),
            "optim_bytes_mean": sum(optim) / len(optim), "optim_bytes_max": max(optim)}


def run(name: str, level: str, coverage: float, factory, train: np.ndarray, val: np.ndarray,
        args: argparse.Namespace) -> dict:
    plan = sd.plan(factory, args.workers, coverage, level, seed=args.seed)
    sim = sd.Simulation(factory, plan, lambda ps: torch.optim.AdamW(
        ps, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay), seed=args.seed, device=args.device)
    warm = max(1, int(args.warmup * args.steps))

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in sim.optimizers]
    loaders = [TokenBatches(train, args.batch_size, args.seq_len, seed=args.seed, rank=k, device=args.device)
               for k in range(args.workers)]
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        losses.append(sum(sim.step([ld.batch(step) for ld in loaders], lm_loss)) / args.workers)
        for s in schedules:
            s.step()
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"  {name} step {step + 1}/{args.steps} train loss {np.mean(losses[-20:]):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    full = factory().to(args.device)
    full.load_state_dict(sim.full_state_dict())
    return {
        "run": name, "level": level if coverage < 1 else "-", "coverage": coverage, "steps": args.steps,
        "param_fraction_mean": sum(plan.param_fractions()) / args.workers,
        "val_loss": validation_loss(full, val, args),
        "train_loss_last": float(np.mean(losses[-20:])),
        "seconds": seconds, **state_bytes(sim),
    }


def table(rows: list[dict]) -> str:
    lines = ["| run | level | C | params/worker (fraction) | param bytes/worker (mean, max) | "
             "AdamW state bytes/worker (mean, max) | train loss (last 20) | val loss | time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['level']} | {r['coverage']:g} | {r['param_fraction_mean']:.3f} | "
            f"{r['param_bytes_mean'] / 2**20:.2f} MiB, {r['param_bytes_max'] / 2**20:.2f} MiB | "
            f"{r['optim_bytes_mean'] / 2**20:.2f} MiB, {r['optim_bytes_max'] / 2**20:.2f} MiB | "
            f"{r['train_loss_last']:.3f} | {r['val_loss']:.3f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    text = load_text(args.data)
    tokenizer = get_tokenizer(args.tokenizer, text)
    train, val = train_val_split(tokenizer.encode(text))
    factory = functools.partial(llama_char_small, vocab_size=tokenizer.vocab_size, dim=args.dim,
                                n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                                max_seq_len=args.seq_len)
    total = sum(p.numel() for p in sd.materialize(factory).parameters())
    print(f"model: {total:,} parameters; K={args.workers}, {args.steps} steps of {args.batch_size}x{args.seq_len} "
          f"tokens per worker on {args.device}", flush=True)
    runs = [("ddp (C=1)", "block", 1.0)] + [
        (f"sdp {level} C={c:g}", level, c) for level in args.levels for c in args.coverages]
    rows = []
    for name, level, coverage in runs:
        rows.append(run(name, level, coverage, factory, train, val, args))
        print(f"{name}: val loss {rows[-1]['val_loss']:.4f}", flush=True)
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "parameters": total, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
