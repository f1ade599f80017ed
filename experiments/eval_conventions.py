"""How to evaluate the assembled full model after SDP training: a measurement on CIFAR-10 (JPEG).

At test time every unit is present, while in training each of the K workers ran only its
subnetwork. This script trains a reduced-width CIFAR ResNet-18 with :class:`subnetdp.Simulation`
(K workers in one process, each on its own disjoint data shard) and reports the test accuracy of
the assembled full model under each evaluation convention:

- ``block``        block level, C=--coverage: plain; residual branches scaled by the holder
                   fraction r/K (:func:`subnetdp.scale_residual_branches`); each of the two also
                   with BatchNorm statistics re-estimated (:func:`subnetdp.recalibrate_batchnorm`);
- ``neuron-inverted``, ``neuron-none``
                   neuron level trained with ``neuron_scaling="inverted"`` (the default) or
                   ``"none"``; each evaluated plain and with BatchNorm re-estimation;
- ``dp``           the reference: C=1 (every worker holds the whole model: plain data
                   parallelism), same steps, same data, same recipe.

For context it also reports each worker's subnetwork evaluated alone (eval mode, its own
BatchNorm statistics). Results go to ``--out`` (JSON, rewritten after every run) and a markdown
table on stdout.

Examples (the runs docs/evaluation.md reports)::

    python experiments/eval_conventions.py --width 16 --epochs 1 --warmup-epochs 0.25 --out cpu.json
    python experiments/eval_conventions.py --device cuda --width 16 --epochs 6 --seed 0 1 2 --out gpu.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import subnetdp as sd
from subnetdp.data import TensorImageLoader, get_vision_dataset
from subnetdp.models import resnet18

RUNS = ("block", "neuron-inverted", "neuron-none", "dp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a reduced-width ResNet-18 on CIFAR-10 (JPEG) with simulated SDP "
                    "(K workers in one process) and compare the test accuracy of the assembled "
                    "full model under each evaluation convention (residual-branch scaling, "
                    "neuron-level inverted scaling, BatchNorm re-estimation) against C=1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                   help="training runs to do (each is one full training)")
    p.add_argument("--workers", "-K", type=int, default=4, help="simulated workers K")
    p.add_argument("--coverage", "-C", type=float, default=0.5,
                   help="coverage C of the SDP runs (the dp run always uses C=1)")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 base width (64 = standard)")
    p.add_argument("--epochs", type=float, default=4,
                   help="training epochs (each epoch every worker sees its 1/K shard once; "
                        "a fraction stops early within the last epoch)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size per worker")
    p.add_argument("--lr", type=float, default=0.2,
                   help="peak learning rate (SGD, momentum 0.9, Nesterov)")
    p.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up from 0 to --lr, then cosine decay to 0")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.1,
                   help="label smoothing of the cross-entropy loss (0 = none)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="train on N images of the 50,000 (a fixed random subset); "
                        "None = all")
    p.add_argument("--bn-batches", type=int, default=20,
                   help="training batches (of --batch-size, augmented) for BatchNorm re-estimation")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="seed(s): model init, plan, data order and augmentation; several seeds "
                        "repeat every run and report mean and standard deviation")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--data-dir", default=None,
                   help="folder (or file) holding cifar10_jpeg.npz; default: the shared data folder")
    p.add_argument("--out", type=Path, default=Path("results.json"), help="JSON results file")
    args = p.parse_args(argv)
    if args.epochs <= 0:
        p.error("--epochs must be positive")
    return args


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def accuracy(model: nn.Module, loader: TensorImageLoader) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode over the whole ``loader``."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def bn_batches(train, args, seed: int, device) -> list[torch.Tensor]:
    """``--bn-batches`` augmented training batches (a fixed draw, the same for every convention)."""
    loader = TensorImageLoader.from_dataset(train, args.batch_size, seed=seed + 10_000,
                                            device=device)
    out = []
    for x, _ in loader:
        if len(out) == args.bn_batches:
            break
        out.append(x)
    return out


def evaluate_conventions(full: nn.Module, plan: sd.Plan, test: TensorImageLoader,
                         bn: list[torch.Tensor]) -> dict[str, float]:
    """Test accuracy of the assembled model under each convention that applies to ``plan``."""
    out = {}
    scalings = [("plain", False)]
    if plan.level == "block" and plan.coverage < 1:
        scalings.append(("scaled", True))
    for label, scale in scalings:
        model = copy.deepcopy(full)
        if scale:
            sd.scale_residual_branches(model, plan)
        out[label] = accuracy(model, test)
        sd.recalibrate_batchnorm(model, bn)  # with the scaling applied (folded into the weights), if any
        out[f"{label}+bn"] = accuracy(model, test)
    return out


# --------------------------------------------------------------------------- one training run

def cosine_with_warmup(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def train_run(name: str, args: argparse.Namespace, seed: int, train, test_loader,
              device: torch.device) -> dict:
    level = "neuron" if name.startswith("neuron") else "block"
    coverage = 1.0 if name == "dp" else args.coverage
    scaling = "none" if name == "neuron-none" else "inverted"
    factory = functools.partial(resnet18, num_classes=train.num_classes, width=args.width)
    plan = sd.plan(factory, args.workers, coverage, level, seed=seed)

    def make_optimizer(params):
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay)

    sim = sd.Simulation(factory, plan, make_optimizer, seed=seed, device=device,
                        neuron_scaling=scaling)
    loaders = [TensorImageLoader.from_dataset(train, args.batch_size, rank=k,
                                              world_size=args.workers, seed=seed, device=device)
               for k in range(args.workers)]
    steps_per_epoch = len(loaders[0])
    total = max(1, round(args.epochs * steps_per_epoch))
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing)

    fractions = plan.param_fractions()
    print(f"[{name} seed={seed}] level={level} K={args.workers} C={coverage:g} "
          f"neuron_scaling={scaling if level == 'neuron' else '-'}; params per worker "
          f"{min(fractions):.3f}-{max(fractions):.3f} of {plan.total_params:,}; "
          f"{steps_per_epoch} steps/epoch, {total} steps", flush=True)
    start = time.perf_counter()
    sim.train()
    step = 0
    for epoch in range(math.ceil(total / steps_per_epoch)):
        for loader in loaders:
            loader.set_epoch(epoch)
        losses = []
        for batches in zip(*loaders):
            if step == total:
                break
            lr = cosine_with_warmup(step, total, warmup, args.lr)
            for opt in sim.optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            losses.append(sum(sim.step(batches, loss_fn)) / args.workers)
            step += 1
        print(f"[{name} seed={seed}] epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f} "
              f"lr {lr:.4f} elapsed {time.perf_counter() - start:.0f}s", flush=True)
    train_s = time.perf_counter() - start

    # subnetworks alone, with their own BatchNorm statistics (before assembly averages them);
    # with C=1 each worker is the full model, so there is nothing separate to measure
    sim.train(False)
    sub = [accuracy(w, test_loader) for w in sim.workers] if coverage < 1 else []
    full = resnet18(num_classes=train.num_classes, width=args.width)
    full.load_state_dict(sim.full_state_dict())
    full.to(device)
    result = evaluate_conventions(full, plan, test_loader, bn_batches(train, args, seed, device))
    print(f"[{name} seed={seed}] full model: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result.items())
          + f"; subnetworks {', '.join(f'{a:.2f}' for a in sub) or '-'}; "
          f"train {train_s:.0f}s, total {time.perf_counter() - start:.0f}s", flush=True)
    return {
        "run": name, "seed": seed, "level": level, "coverage": coverage,
        "neuron_scaling": scaling if level == "neuron" else None,
        "param_fractions": fractions, "steps": total, "final_train_loss": losses[-1] if losses else None,
        "full": result, "subnetworks": sub, "subnetwork_mean": sum(sub) / len(sub) if sub else None,
        "train_seconds": train_s, "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- report

def _mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.2f}"
    sd_ = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.2f} ± {sd_:.2f}"


def markdown_table(results: list[dict]) -> str:
    labels = {
        "block": "block level (B-SDP)",
        "neuron-inverted": 'neuron level (N-SDP), trained with `neuron_scaling="inverted"`',
        "neuron-none": 'neuron level (N-SDP), trained with `neuron_scaling="none"`',
        "dp": "C=1 reference (plain data parallelism)",
    }
    conventions = [("plain", "plain"), ("plain+bn", "plain + BN re-est."),
                   ("scaled", "branches scaled r/K"), ("scaled+bn", "scaled + BN re-est.")]
    rows = ["| run | C | " + " | ".join(c[1] for c in conventions) + " | mean subnetwork |",
            "| --- | --- |" + " --- |" * (len(conventions) + 1)]
    for name in RUNS:
        runs = [r for r in results if r["run"] == name]
        if not runs:
            continue
        cells = []
        for key, _ in conventions:
            vals = [r["full"][key] for r in runs if key in r["full"]]
            cells.append(_mean_std(vals) if vals else "n/a")
        subs = [r["subnetwork_mean"] for r in runs if r["subnetwork_mean"] is not None]
        cells.append(_mean_std(subs) if subs else "n/a (= full model)")
        rows.append(f"| {labels[name]} | {runs[0]['coverage']:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    train = get_vision_dataset("cifar10-jpeg", args.data_dir, train=True)
    test = get_vision_dataset("cifar10-jpeg", args.data_dir, train=False)
    if args.train_limit is not None and args.train_limit < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))[:args.train_limit]
        train.images, train.labels = train.images[keep], train.labels[keep]
    test_loader = TensorImageLoader.from_dataset(test, 1000, augment=False, shuffle=False,
                                                 drop_last=False, device=device)
    meta = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "data": "CIFAR-10 (JPEG)", "train_images": len(train), "test_images": len(test),
        "model": f"resnet18(width={args.width})", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    results: list[dict] = []
    for seed in args.seed:
        for name in args.runs:
            results.append(train_run(name, args, seed, train, test_loader, device))
            meta["wall_seconds"] = time.perf_counter() - wall
            args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nCIFAR-10 (JPEG), resnet18(width={args.width}), K={args.workers}, "
          f"{args.epochs:g} epochs, seeds {args.seed}, device {device}; test accuracy (%) on "
          f"{len(test):,} images; wall {meta['wall_seconds'] / 60:.1f} min\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
