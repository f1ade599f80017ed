"""sharding="holders" against the simulation, and its state and traffic against the replicated engine.

Trains a CIFAR ResNet-18 of ``--width`` on random 32x32 images, K=``--workers`` gloo processes on
this machine, block level, for each optimizer, coverage and checkpointing given; each run is repeated
with ``sharding="none"``. Prints, per run, how far any rank's parameters are from
:class:`subnetdp.Simulation`: over the whole parameter vector (``||x - sim|| / ||sim||``, 2-norms) and per
tensor (``max |x - sim| / max |sim|``, with the tensor), and per rank the local
bytes of parameters, gradients and optimizer state and the bytes handed to collectives per step of
both storages. docs/sharding.md quotes its output::

    python experiments/sharded_equality.py --steps 4 --width 4
    python experiments/sharded_equality.py --steps 20 --width 4 --dtype float64
    python experiments/sharded_equality.py --steps 20 --width 8 --batch 16 --labels learnable --lr-scale 0.01
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

import subnetdp as sd
from subnetdp.models import resnet18
from subnetdp.planning.counting import state_bytes

OPTIMIZERS = {
    "sgd": lambda ps, lr_scale=1.0: torch.optim.SGD(ps, lr=0.05 * lr_scale, momentum=0.9, weight_decay=1e-4),
    "adamw": lambda ps, lr_scale=1.0: torch.optim.AdamW(ps, lr=1e-3 * lr_scale, weight_decay=0.01, eps=1e-5),
}


def batch(step: int, worker: int, size: int = 4, labels: str = "random") -> tuple[torch.Tensor, torch.Tensor]:
    """Random images; labels drawn at random (``"random"``: nothing to learn, so the tiny model's
    activations keep crossing ReLU kinks) or a fixed function of the image (``"learnable"``: the class of
    its mean colour under a fixed random map, which the model can fit)."""
    g = torch.Generator().manual_seed(1000 * step + worker)
    x = torch.randn(size, 3, 32, 32, generator=g)
    if labels == "random":
        return x, torch.randint(0, 10, (size,), generator=g)
    colour_to_class = torch.randn(3, 10, generator=torch.Generator().manual_seed(12345))
    return x, (x.mean(dim=(2, 3)) @ colour_to_class).argmax(dim=1)


def loss_of(model: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(b[0]), b[1])


def rank_main(rank: int, world: int, store: str, out: str, runs: list[dict], steps: int, width: int,
              dtype: str, data: dict) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, dtype))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    factory = functools.partial(resnet18, width=width)
    results = []
    for run in runs:
        plan = sd.plan(factory, world, run["coverage"], "block")
        for sharding in ("holders", "none"):
            sdp = sd.SubnetDataParallel(factory, plan, seed=7, sharding=sharding, checkpointing=run["checkpointing"])
            opt = OPTIMIZERS[run["optimizer"]](sdp.parameters(), run["lr_scale"])
            for step in range(steps):
                opt.zero_grad()
                loss_of(sdp, batch(step, rank, **data)).backward()
                opt.step()
            params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                      for n, p in sdp.named_parameters()}
            results.append({**run, "sharding": sharding, "params": params, "state": state_bytes(sdp, opt),
                            "traffic": sdp.predicted_bytes_per_sync()})
    torch.save(results, f"{out}/rank-{rank}.pt")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--coverage", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--optimizer", nargs="+", default=["sgd", "adamw"], choices=sorted(OPTIMIZERS))
    ap.add_argument("--checkpointing", nargs="+", default=["none", "blocks"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                    help="float64 keeps the ranks' rounding differences (summation order) far from ReLU kinks over long runs")
    ap.add_argument("--batch", type=int, default=4, help="images per worker per step")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="multiplies both optimizers' learning rates")
    ap.add_argument("--labels", default="random", choices=["random", "learnable"],
                    help="learnable: labels are a fixed function of the image (see batch())")
    args = ap.parse_args()
    data = {"size": args.batch, "labels": args.labels}
    runs = [{"coverage": c, "optimizer": o, "checkpointing": k, "lr_scale": args.lr_scale}
            for c in args.coverage for o in args.optimizer for k in args.checkpointing]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(rank_main, args=(args.workers, os.path.join(tmp, "store"), tmp, runs, args.steps, args.width,
                                                  args.dtype, data),
                           nprocs=args.workers, start_method="spawn")
        ranks = [torch.load(f"{tmp}/rank-{r}.pt", weights_only=False) for r in range(args.workers)]
    factory = functools.partial(resnet18, width=args.width)
    torch.set_num_threads(1)  # as every rank: CPU kernels split their sums by thread count
    torch.set_default_dtype(getattr(torch, args.dtype))
    print("| C | optimizer | checkpointing | storage | whole model: max over ranks of |x - sim| / |sim| "
          "| per tensor: max |x - sim| / max |sim| | that tensor | largest |x - sim| |")
    print("|---|---|---|---|---|---|---|---|")
    for i, res in enumerate(ranks[0]):
        plan = sd.plan(factory, args.workers, res["coverage"], "block")
        make_opt = functools.partial(OPTIMIZERS[res["optimizer"]], lr_scale=res["lr_scale"])
        sim = sd.Simulation(factory, plan, make_opt, seed=7, checkpointing=res["checkpointing"])
        for step in range(args.steps):
            sim.step([batch(step, k, **data) for k in range(args.workers)], loss_of)
        worst, where, whole, absolute = 0.0, "", 0.0, 0.0
        for k in range(args.workers):
            expected = dict(sim.workers[k].named_parameters())
            got = ranks[k][i]["params"]
            for n, t in got.items():
                e = expected[n].detach()
                absolute = max(absolute, float((t - e).abs().max()))
                diff = float((t - e).abs().max() / e.abs().max().clamp_min(1e-12))
                if diff > worst:
                    worst, where = diff, f"rank {k} {n}"
            flat = torch.cat([got[n].flatten() for n in got])
            ref = torch.cat([expected[n].detach().flatten() for n in got])
            whole = max(whole, float((flat - ref).norm() / ref.norm()))
        print(f"| {res['coverage']} | {res['optimizer']} | {res['checkpointing']} | {res['sharding']} | {whole:.1e} "
              f"| {worst:.1e} | {where} | {absolute:.1e} |")
    print("\n| C | optimizer | rank | storage | params | grads | optimizer state | handed to collectives per step |")
    print("|---|---|---|---|---|---|---|---|")
    for i, res in enumerate(ranks[0]):
        if res["checkpointing"] != args.checkpointing[0]:
            continue
        for k in range(args.workers):
            r = ranks[k][i]
            s = r["state"]
            print(f"| {r['coverage']} | {r['optimizer']} | {k} | {r['sharding']} | {s['param_bytes']} | {s['grad_bytes']} "
                  f"| {s['optimizer_bytes']} | {r['traffic']} |")


if __name__ == "__main__":
    main()
