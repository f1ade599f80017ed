"""Per-worker peak memory and step time of SDP against DDP, DDP + activation checkpointing and FSDP2,
at full size on one GPU (about 10 minutes on an H100/H200), or tiny on a CPU as a smoke test.

Run::

    python benchmarks/gpu_measure.py --out $OUT                 # one GPU, full size
    python benchmarks/gpu_measure.py --device cpu --small --out /tmp/gm   # smoke test, seconds

What it does, per workload (CIFAR ResNet-18 width 64 with SGD-momentum at batches 64..512 per worker;
a LLaMA preset with AdamW) and K = 8 workers:

* SDP at C in {0.875, 0.75, 0.5, 0.25}, block and neuron level: every worker's subnetwork is built
  on the one GPU and trained for a few steps; **measured** per worker: ``torch.cuda.max_memory_allocated``
  over a step (reset before it), the saved-for-backward bytes and model state (``subnetdp.memory``),
  and the step time (forward + backward + optimizer step, compute only: one GPU has no communication);
  the plan's first-principles prediction stands next to it;
* DDP: the full model's step (**measured**; DDP's gradient buckets, one more gradient-sized buffer,
  are not allocated here and are listed as derived);
* DDP + checkpointing: the full model with ``checkpoint_wrapper`` on every block (**measured**);
* FSDP2: one GPU cannot shard 8 ways, so its per-worker peak is **derived**: DDP's measured peak
  minus the full model state plus the state sharded 8 ways plus the largest block's parameters
  unsharded (FSDP does not shrink activations). Its step time is not measured here.

Writes ``gpu_measure.json`` and ``gpu_measure.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from subnetdp.bench import memory_part, memory_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_measure.json and gpu_measure.md")
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke test)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--coverages", default="0.875,0.75,0.5,0.25")
    p.add_argument("--levels", default="block,neuron")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batches", default="64,128,256,512", help="ResNet samples per worker per step")
    p.add_argument("--llama-model", default="llama_125m")
    p.add_argument("--llama-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=4, help="steps per worker (the first allocates optimizer state)")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--budget-minutes", type=float, default=9.0,
                   help="stop starting new workloads after this long (results so far are written)")
    args = p.parse_args(argv)
    if args.small:
        args.workers, args.coverages, args.width, args.batches = 4, "0.75,0.5,0.25", 4, "4"
        args.llama_model, args.llama_batch, args.seq_len, args.vocab_size, args.repeats = "llama_tiny", 2, 16, 65, 2
    return args


def _ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def summarise(part: dict, workers: int) -> list[dict]:
    """One row per strategy: worst-worker peak (allocated or, on CPU, state + saved), step time."""
    rows = []
    ddp = next(r for r in part["rows"] if r["strategy"] == "ddp")["workers"][0]
    cuda = "peak_allocated_bytes" in ddp["measured"]

    def peak(m: dict) -> float:
        return m["peak_allocated_bytes"]["median"] if cuda else m["total_bytes"]

    ddp_peak = peak(ddp["measured"])
    for r in part["rows"]:
        ws = r["workers"]
        if r["strategy"] == "fsdp":
            m = ddp["measured"]
            sharded = m["state_bytes"] / workers
            value = ddp_peak - m["state_bytes"] + sharded + ws[0]["derived"]["unsharded_block_bytes"]
            rows.append({"name": r["name"], "basis": "derived", "peak_bytes": value, "peak_ratio_to_ddp": value / ddp_peak,
                         "predicted_bytes": None, "step_ms": None, "step_ratio_to_ddp": None})
            continue
        peaks = [peak(w["measured"]) for w in ws]
        steps = [w["measured"]["step_s"]["median"] for w in ws]
        worst = max(range(len(ws)), key=peaks.__getitem__)
        pred = ws[worst]["predicted"].get("total_bytes")
        rows.append({
            "name": r["name"], "basis": "measured", "peak_bytes": peaks[worst], "peak_min_bytes": min(peaks),
            "peak_ratio_to_ddp": peaks[worst] / ddp_peak, "predicted_bytes": pred,
            "saved_plus_state_bytes": ws[worst]["measured"]["total_bytes"],
            "step_ms": max(steps) * 1e3, "step_mean_ms": statistics.fmean(steps) * 1e3,
            "step_ratio_to_ddp": max(steps) / ddp["measured"]["step_s"]["median"],
        })
    return rows


def markdown(rows: list[dict], cuda: bool) -> str:
    peak_name = "peak allocated MiB" if cuda else "state + saved MiB"
    head = (f"| configuration | basis | {peak_name} (worst worker) [best] | ratio to DDP | predicted state+activations MiB "
            "| step ms (slowest worker; mean) | step / DDP |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        best = f" [{r['peak_min_bytes'] / 2**20:.1f}]" if "peak_min_bytes" in r else ""
        pred = f"{r['predicted_bytes'] / 2**20:.1f}" if r["predicted_bytes"] else "n/a"
        step = f"{r['step_ms']:.1f}; {r['step_mean_ms']:.1f}" if r["step_ms"] is not None else "not measured"
        ratio = f"{r['step_ratio_to_ddp']:.2f}" if r["step_ratio_to_ddp"] is not None else "n/a"
        lines.append(f"| {r['name']} | {r['basis']} | {r['peak_bytes'] / 2**20:.1f}{best} | {r['peak_ratio_to_ddp']:.3f} "
                     f"| {pred} | {step} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False  # autotuning trials would enter the allocator's peak
    else:
        torch.set_num_threads(1)  # a shared CPU: several threads spin against other processes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    coverages = [float(c) for c in args.coverages.split(",")]
    coverages = [c for c in coverages if abs(c * args.workers - round(c * args.workers)) < 1e-9]
    levels = args.levels.split(",")
    specs = [{"kind": "image", "model": "resnet18", "width": args.width, "batch": int(b), "optimizer": "sgd-momentum"}
             for b in args.batches.split(",")]
    if not args.skip_llama:  # second, so that both models are covered if the time budget cuts the larger batches
        specs.insert(1, {"kind": "text", "model": args.llama_model, "seq_len": args.seq_len, "batch": args.llama_batch,
                         "optimizer": "adamw", "overrides": {"vocab_size": args.vocab_size}})
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    result = {"meta": {"command": " ".join([sys.executable, *sys.argv]) if argv is None else f"gpu_measure.py {' '.join(argv)}",
                       "device": machine, "torch": torch.__version__, "python": platform.python_version(),
                       "workers": args.workers, "coverages": coverages, "levels": levels, "precision": "fp32 (TF32 matmuls on CUDA)"},
              "workloads": [], "skipped": []}
    md = [f"# gpu_measure: {machine}, K = {args.workers}, torch {torch.__version__}\n"]
    start = time.perf_counter()
    for spec in specs:
        if time.perf_counter() - start > args.budget_minutes * 60:
            result["skipped"].append(spec)
            print(f"skipped (over {args.budget_minutes} min): {spec}", flush=True)
            continue
        t0 = time.perf_counter()
        part = memory_part(spec, args.workers, coverages, levels, args.repeats, device,
                           log=lambda s: print(s, flush=True))
        rows = summarise(part, args.workers)
        part["summary"], part["wall_s"] = rows, time.perf_counter() - t0
        result["workloads"].append(part)
        md += [f"\n## {part['workload']}, batch {spec['batch']} per worker, {spec['optimizer']} "
               f"({part['wall_s']:.0f} s)\n", markdown(rows, device.type == "cuda"),
               "\n<details><summary>breakdown per worker (MiB)</summary>\n", memory_table(part), "\n</details>"]
        print(md[-4], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (out / "gpu_measure.json").write_text(json.dumps(result, indent=1, default=float))  # partial results survive
        (out / "gpu_measure.md").write_text("\n".join(md) + "\n")
    result["meta"]["wall_s"] = time.perf_counter() - start
    md.append(f"\nTotal {result['meta']['wall_s']:.0f} s. Skipped: {result['skipped'] or 'none'}")
    (out / "gpu_measure.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "gpu_measure.md").write_text("\n".join(md) + "\n")
    return result


if __name__ == "__main__":
    main()
