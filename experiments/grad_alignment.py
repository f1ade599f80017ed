"""Gradient alignment over training: subnetwork vs full-model gradient, per level and coverage.

Trains a CIFAR ResNet-18 with ``subnetdp.Simulation`` (K workers in one process) on CIFAR-10 (JPEG)
and, every ``--every`` steps, measures for each worker the cosine similarity between its subnetwork
gradient and the full model's gradient on the same batch (``subnetdp.measure.alignment``). Writes JSON and a
PNG plot.

    python experiments/grad_alignment.py --workers 4 --coverages 0.75 0.5 0.25 --steps 60 --every 15
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import subnetdp as sd
from subnetdp.measure.alignment import alignment_table, plot_alignment, track_alignment
from subnetdp.data import TensorImageLoader, get_vision_dataset
from subnetdp.models import resnet18


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def run(level: str, coverage: float, args: argparse.Namespace, train: object) -> list[dict]:
    factory = functools.partial(resnet18, width=args.width)
    plan = sd.plan(factory, args.workers, coverage, level, seed=args.seed)
    sim = sd.Simulation(factory, plan, lambda ps: torch.optim.SGD(ps, lr=args.lr, momentum=0.9, nesterov=True,
                                                                 weight_decay=5e-4), seed=args.seed, device=args.device)
    loaders = [TensorImageLoader.from_dataset(train, args.batch_size, rank=k, world_size=args.workers, seed=args.seed,
                                              device=args.device) for k in range(args.workers)]
    return track_alignment(sim, [ld.forever() for ld in loaders], loss_fn, args.steps, args.every,
                           log=lambda s: print(f"{level:>6} C={coverage:<5g} {s}", flush=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--coverages", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    p.add_argument("--levels", nargs="+", default=["block", "neuron"])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="alignment")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    train = get_vision_dataset("cifar10-jpeg", train=True)
    keep = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(args.seed))[: args.train_subset]
    train.images, train.labels = train.images[keep], train.labels[keep]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    start = time.perf_counter()
    for level in args.levels:
        for c in args.coverages:
            results[f"{level} C={c:g}"] = run(level, c, args, train)
    (out / "alignment.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    plot_alignment(results, str(out / "alignment.png"), f"subnetwork vs full-model gradient, ResNet-18 width "
                   f"{args.width}, K={args.workers}, CIFAR-10 (JPEG)")
    print(alignment_table(results))
    print(f"(cells: cos over held / cos over all; mean over workers) wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
