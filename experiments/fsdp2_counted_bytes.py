"""Bytes FSDP2 hands to its collectives per step, counted (``measure.meters.counted_fsdp2_collectives``) under
torchrun, for the K=4 timing tables of docs/benchmarks.md whose FSDP2 rows were derived: the timing part with
no SDP configuration (DDP, DDP+ckpt, FSDP2, FSDP2+ckpt; 1 timed step each).

    PYTHONPATH=src python experiments/fsdp2_counted_bytes.py OUT.json
"""
import json
import sys

from subnetdp.measure.timing import time_part

SPECS = {
    "resnet18_w16_b32": {"kind": "image", "model": "resnet18", "width": 16, "batch": 32, "optimizer": "sgd-momentum"},
    "resnet18_w64_b64": {"kind": "image", "model": "resnet18", "width": 64, "batch": 64, "optimizer": "sgd-momentum"},
    "llama_char_small_8x128": {"kind": "text", "model": "llama_char_small", "seq_len": 128, "batch": 8,
                               "optimizer": "adamw"},
}
out = {}
for name, spec in SPECS.items():
    rows = time_part(spec, 4, [], ["block"], steps=1, warmup=0, rounds=1, seed=0, timeout=1800)["rows"]
    out[name] = {r["name"]: {"bytes_per_rank": r["bytes_per_rank"], "derived": r["predicted_bytes_per_rank"],
                             "basis": r["bytes_basis"]} for r in rows}
    print(name, {k: (v["bytes_per_rank"][0] / 2**20, v["derived"][0] / 2**20) for k, v in out[name].items()}, flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
