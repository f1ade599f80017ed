"""Planning time against the number of workers K (issue 11: near-linear, K=4096 in under 5 s).

Run::

    python benchmarks/plan_speed.py                      # ResNet-18 width 64, C=0.5
    python benchmarks/plan_speed.py --workers 8 64 512 4096 --coverage 0.25

Times ``subnetdp.plan`` (units, slot filling, the arrangement of the slots on the cycle) per level and
transitions setting, and separately ``plan.summary()`` (which lists every worker), median of
``--repeats`` runs. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

import subnetdp as sd
from subnetdp.models import get_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[8, 64, 512, 1000, 4096])
    p.add_argument("--coverage", type=float, default=0.5)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    factory = functools.partial(get_model, "resnet18", num_classes=10, width=args.width)
    print(f"ResNet-18 width {args.width}, C={args.coverage:g}, median of {args.repeats} runs, seconds\n")
    print("| K | level | transitions | plan() s | summary() s | holders per unit |")
    print("|---|---|---|---|---|---|")
    for k in args.workers:
        for level, transitions in (("block", "keep"), ("block", "shortcut"), ("neuron", "keep")):
            times, plan = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                plan = sd.plan(factory, k, args.coverage, level, transitions=transitions)
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plan.summary()
            summary_s = time.perf_counter() - t0
            holders = sorted({len(plan.holders(u)) for u in plan.units})
            print(f"| {k} | {level} | {transitions} | {statistics.median(times):.3f} | {summary_s:.2f} | {holders} |",
                  flush=True)


if __name__ == "__main__":
    main()
