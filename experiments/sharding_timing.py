"""subnetdp bench's timing part alone (no in-process memory part), with the SDP-sharded rows: ResNet-18
width 64, batch 64 per rank, K=8 ranks under torchrun (gloo, one thread each), SGD with momentum, block
level, every configuration with and without activation checkpointing; each row's peak is the allocator's.

    PYTHONPATH=src python experiments/sharding_timing.py OUT.json 0.5     # coverages, comma-separated
"""
import json
import sys
import time

from subnetdp.measure.timing import time_part

cov = [float(c) for c in sys.argv[2].split(",")]
spec = {"kind": "image", "model": "resnet18", "width": 64, "batch": 64, "optimizer": "sgd-momentum"}
t0 = time.time()
out = time_part(spec, 8, cov, ["block"], steps=2, warmup=1, rounds=1, seed=0, timeout=2400,
                checkpointing=("none", "blocks"), sharding=("none", "holders"))
out["wall_s"] = time.time() - t0
json.dump(out, open(sys.argv[1], "w"), indent=1)
print("done", out["wall_s"])
