"""The cost of SubnetDataParallel's holder check against a training step, to choose ``check_every``.

Run under torchrun (gloo on the CPU, one thread per rank)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/holder_check_cost.py \\
        --width 16 --batch 64 --level block --out /tmp/check.json

Each rank trains ResNet-18 (CIFAR, ``--width``) at C=0.5 with SGD-momentum, ``check_every=0``, and
times ``--steps`` training steps (forward, backward with its all-reduces, optimizer step) and as many
``check_holders()`` calls (one checksum pass over the rank's shared parameters and one all-gather),
alternating, so both see the same machine load. Rank 0 writes the medians and their ratio: the
check's cost per step at ``check_every=N`` is ``ratio / N``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import subnetdp
from subnetdp.models import resnet18


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--level", choices=["block", "neuron"], default="block")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    factory = lambda: resnet18(width=args.width)  # noqa: E731
    plan = subnetdp.plan(factory, workers=world, coverage=0.5, level=args.level, seed=0)
    sdp = subnetdp.SubnetDataParallel(factory, plan, seed=0, check_every=0)
    opt = torch.optim.SGD(sdp.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    steps, checks = [], []
    for i in range(args.steps + 2):  # two warm-up rounds
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(sdp(x), y).backward()
        opt.step()
        t1 = time.perf_counter()
        sdp.check_holders()
        t2 = time.perf_counter()
        if i >= 2:
            steps.append(t1 - t0)
            checks.append(t2 - t1)
    shared = sum(s.entry.tensor.numel() if s.entry.dim is None else
                 s.entry.tensor.numel() // s.entry.tensor.shape[s.entry.dim] * len(s.entry.index)
                 for s in sdp._param_slots if s.entry is not None)
    result = {"width": args.width, "batch": args.batch, "level": args.level, "world": world,
              "threads": torch.get_num_threads(), "slots": len(sdp._param_slots), "checked_elements_rank0": shared,
              "step_s_median": statistics.median(steps), "check_s_median": statistics.median(checks)}
    result["check_over_step"] = result["check_s_median"] / result["step_s_median"]
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
