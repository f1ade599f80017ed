"""subnetdp bench's timing part alone (no in-process memory part), with the SDP-sharded rows, K=8 ranks
under torchrun (gloo, one thread each), block level, every configuration with and without activation
checkpointing; each row's peak is the allocator's.

- ``resnet18``: ResNet-18 width 64, batch 64 per rank, SGD with momentum (the default);
- ``resnet18_w16``: ResNet-18 width 16, batch 32 per rank, SGD with momentum (docs/benchmarks.md's smaller table);
- ``llama_char_small``: 8 sequences of 128 tokens per rank, AdamW.

    PYTHONPATH=src python experiments/sharding_timing.py OUT.json 0.5 [resnet18|resnet18_w16|llama_char_small]
"""
import json
import sys
import time

from subnetdp.measure.timing import time_part

cov = [float(c) for c in sys.argv[2].split(",")]
model = sys.argv[3] if len(sys.argv) > 3 else "resnet18"
specs = {
    "resnet18": {"kind": "image", "model": "resnet18", "width": 64, "batch": 64, "optimizer": "sgd-momentum"},
    "resnet18_w16": {"kind": "image", "model": "resnet18", "width": 16, "batch": 32, "optimizer": "sgd-momentum"},
    "llama_char_small": {"kind": "text", "model": "llama_char_small", "seq_len": 128, "batch": 8, "optimizer": "adamw"},
}
if model not in specs:
    sys.exit(f"model {model!r} unknown; choose among {', '.join(specs)}")
t0 = time.time()
out = time_part(specs[model], 8, cov, ["block"], steps=2, warmup=1, rounds=1, seed=0, timeout=2400,
                checkpointing=("none", "blocks"), sharding=("none", "holders"))
out["wall_s"] = time.time() - t0
json.dump(out, open(sys.argv[1], "w"), indent=1)
print("done", out["wall_s"])
