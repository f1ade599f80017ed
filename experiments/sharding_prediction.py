"""The planner's predicted peaks against the peaks measured by experiments/sharding_timing.py: for each result
file, every configuration's worst-rank peak, predicted (``subnetdp plan``'s predictions: ``predict_worker``,
``predict_sharded_worker``, FSDP2 as the sharded prediction at coverage 1) and measured (allocator), and the
largest per-rank error. Plans are rebuilt as the timing run built them (memory balance on a profile at the
run's batch, transitions kept, seed 0; sharded rows balanced for sharded storage, except in ``*_run1``,
``*_run2`` and ``*_oldplan`` files, measured before that).

    PYTHONPATH=src python experiments/sharding_prediction.py docs/results/sharding_cpu/timing_*.json
"""
import json
import re
import sys

from subnetdp.measure.workloads import workload_from_spec
from subnetdp.planning import plan, predict_sharded_worker, predict_worker
from subnetdp.planning.job import profile_workload, sdp_plan

SPECS = {  # by the result file's name, as experiments/sharding_timing.py writes them
    "resnet18_w64": {"kind": "image", "model": "resnet18", "width": 64, "batch": 64, "optimizer": "sgd-momentum"},
    "resnet18_w16": {"kind": "image", "model": "resnet18", "width": 16, "batch": 32, "optimizer": "sgd-momentum"},
    "llama_char_small": {"kind": "text", "model": "llama_char_small", "seq_len": 128, "batch": 8, "optimizer": "adamw"},
}
MIB = 2**20
OLD_PLANS = re.compile(r"_(run\d|oldplan)\.json$")  # result files whose sharded rows ran plans balanced as unsharded

print("| run | configuration | predicted MiB (worst rank) | measured MiB (worst rank) | predicted / measured "
      "| per-rank predicted / measured [min-max] |")
print("|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    result = json.load(open(path))
    spec = next(spec for key, spec in SPECS.items() if key in path)
    w = workload_from_spec(spec)
    opt, batch, k = spec["optimizer"], spec["batch"], result["ranks"]
    profile = profile_workload(w, seed=0, profile_batch=batch)
    full = plan(w.factory, k, 1.0, "block", 0)
    width = f" w{spec['width']}" if "width" in spec else ""
    run = f"{spec['model']}{width} K={k} C={result['coverages'][0]:g}"
    run += " (old plan, its own run)" if OLD_PLANS.search(path) else ""
    for row in result["rows"]:
        ckpt = row["checkpointing"]
        if row["strategy"] in ("ddp", "ddp-ckpt"):
            pred = [predict_worker(full, 0, opt, profile, batch, activation_checkpointing=ckpt)["peak_bytes"]] * k
        elif row["strategy"] == "fsdp":
            pred = [predict_sharded_worker(full, r, opt, profile, batch, ckpt)["peak_bytes"] for r in range(k)]
        else:
            # sharded rows: the plan balanced for sharded storage, except in the runs made before it existed
            sharding = "holders" if row["strategy"] == "sdp-sharded" and not OLD_PLANS.search(path) else "none"
            p = sdp_plan(w, k, row["coverage"], row["level"], 0, profile, opt, batch, "keep", "memory", ckpt,
                         sharding=sharding)
            if row["strategy"] == "sdp-sharded":
                pred = [predict_sharded_worker(p, r, opt, profile, batch, ckpt)["peak_bytes"] for r in range(k)]
            else:
                pred = [predict_worker(p, r, opt, profile, batch, activation_checkpointing=ckpt)["peak_bytes"]
                        for r in range(k)]
        meas = row["peak_bytes_per_rank"]
        ratios = [a / b for a, b in zip(pred, meas)]
        print(f"| {run} | {row['name']} | {max(pred) / MIB:.1f} | {max(meas) / MIB:.1f} | {max(pred) / max(meas):.3f} "
              f"| {min(ratios):.3f}-{max(ratios):.3f} |")
