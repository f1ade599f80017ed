"""How much one step's CPU allocator peak varies: FSDP2 with activation checkpointing, ResNet-18 width 32,
batch 32 per rank, SGD with momentum, the same step measured 12 times per rank (3 at a time, Python's garbage
collector on, off, on, off), printing each rank's step deltas in MiB (``allocator_peak``'s
``step_delta_bytes``: the highest running sum of the profiler's allocation events).

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m torch.distributed.run --standalone --nproc-per-node 4 \
        experiments/peak_repeatability.py
"""
import gc
import json

import torch
import torch.distributed as dist

from subnetdp.baselines import wrap_baseline
from subnetdp.init import materialize
from subnetdp.measure.meters import allocator_peak
from subnetdp.measure.workloads import workload_from_spec
from subnetdp.optimizers import make_optimizer

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
w = workload_from_spec({"kind": "image", "model": "resnet18", "width": 32, "batch": 32})
batch = w.make_batch(32, torch.device("cpu"), 1000 + rank)
model = wrap_baseline(materialize(w.factory, 0), "fsdp", checkpointing=True)
opt = make_optimizer("sgd-momentum", model.parameters())


def step() -> None:
    opt.zero_grad(set_to_none=True)
    w.loss_fn(model, batch).backward()
    opt.step()


step()  # warm-up
out: dict[str, list[float]] = {}
for mode in ("gc-on", "gc-off", "gc-on", "gc-off"):
    for _ in range(3):
        gc.collect()
        if mode == "gc-off":
            gc.disable()
        dist.barrier()
        out.setdefault(mode, []).append(round(allocator_peak(step, 0)["step_delta_bytes"] / 2**20, 2))
        gc.enable()
ranks = [None] * dist.get_world_size()
dist.all_gather_object(ranks, out)
if rank == 0:
    print(json.dumps(ranks))
dist.barrier()
dist.destroy_process_group()
