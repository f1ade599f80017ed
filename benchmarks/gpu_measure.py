"""Per-worker peak memory and step time of SDP against DDP, DDP + activation checkpointing and FSDP2
(SDP and FSDP2 also with checkpointing),
at full size on one GPU (about 8 minutes on an H200: 2.5 for memory and time, 3 for the alignment
runs), or tiny on a CPU as a smoke test.

Run::

    python benchmarks/gpu_measure.py --out $OUT                 # one GPU, full size
    python benchmarks/gpu_measure.py --device cpu --small --out /tmp/gm   # smoke test, seconds

What it does, per workload (CIFAR ResNet-18 width 64 with SGD-momentum at batches 64..512 per worker;
a LLaMA preset with AdamW) and K = 8 workers:

* SDP at C in {0.875, 0.75, 0.5, 0.25}, block and neuron level: every worker's subnetwork is built
  on the one GPU and trained for a few steps; **measured** per worker: ``torch.cuda.max_memory_allocated``
  over a step (reset before it), the saved-for-backward bytes and model state (``subnetdp.measure.meters``),
  and the step time (forward + backward + optimizer step, timed on separate steps without the
  saved-tensor hooks; compute only: one GPU has no communication);
  the plan's first-principles prediction stands next to it, with the predicted peak (saved bytes,
  model state and the transient: ``predict_worker``'s ``peak_bytes``) against the measured allocator
  peak; plans are made as ``subnetdp train`` makes them (memory balance, its default transitions), and
  block level once more with the old default (transitions kept, parameter balance) unless
  ``--no-old-default``;
* DDP: the full model's step (**measured**; DDP's gradient buckets, one more gradient-sized buffer,
  are not allocated here and are listed as derived);
* DDP + checkpointing: the full model with every block checkpointed (``subnetdp.checkpoint_blocks``,
  as the ``ddp-ckpt`` strategy; **measured**);
* SDP + checkpointing (``SDP+ckpt``): every worker's subnetwork with every block it has checkpointed,
  measured like SDP (``--sdp-checkpointing``: none, blocks or both);
* FSDP2: one GPU cannot shard 8 ways, so its per-worker peak is **derived**: DDP's measured peak
  minus the full model state plus the state sharded 8 ways plus the largest block's parameters
  unsharded (FSDP does not shrink activations). Its step time is not measured here.
  FSDP2 + checkpointing: the same from DDP+ckpt's measured peak.

Per configuration it also lists each worker's gradient traffic per step, derived from the plan's
buckets (the groups the engine all-reduces over; the CPU torchrun runs of ``subnetdp bench`` check that
the engine's counters agree): bytes handed to all-reduces and the implied ring traffic. One GPU has
no collectives to time, so exposed communication is measured by ``subnetdp bench`` under torchrun only.

Then two more phases, each time-boxed:

* **planner**: ``plan_for_budget`` for a budget of ``--budget-fraction`` of the full model's predicted
  peak, per workload, and the chosen plan's worst worker measured on the device (allocator peak and
  state + saved bytes against the prediction);
* **alignment**: ResNet-18 at ``--align-width`` with K simulated workers trained on CIFAR-10 (JPEG,
  found through ``$SUBNETDP_SHARED_DATA``), cosine similarity of each worker's subnetwork gradient with
  the full model's every ``--align-every`` steps (``subnetdp.measure.alignment.track_alignment``), per level
  and coverage, until ``--total-minutes`` is reached.

Writes ``gpu_measure.json`` and ``gpu_measure.md`` into ``--out`` after every workload, so a run cut
short keeps what it measured. Plots are drawn afterwards, wherever the JSON files are (a device run
returns few files)::

    python benchmarks/gpu_measure.py --replot RUN_DIR [RUN_DIR ...] --out docs/img --prefix gpu_h200

draws, per memory workload, the breakdown bars and the allocator peak and step time versus coverage,
and the gradient alignment averaged over the seeds found in the runs.
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

import subnetdp as sd
from subnetdp.measure.alignment import alignment_table, plot_alignment, track_alignment
from subnetdp.measure.bench import memory_part
from subnetdp.measure.meters import measure_choice
from subnetdp.measure.tables import memory_table, plot
from subnetdp.measure.workloads import workload_from_spec
from subnetdp.metrics import format_bytes
from subnetdp.planning import profile_activations
from subnetdp.planning.budget import plan_for_budget, predicted_peak


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_measure.json and gpu_measure.md (or the plots)")
    p.add_argument("--replot", nargs="+", metavar="RUN_DIR", help="draw the plots of earlier runs into --out")
    p.add_argument("--prefix", default="gpu", help="file-name prefix of the plots (--replot)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke test)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--coverages", default="0.875,0.75,0.5,0.25")
    p.add_argument("--levels", default="block,neuron")
    p.add_argument("--sdp-checkpointing", default="both", choices=("none", "blocks", "both"),
                   help="SDP rows without activation checkpointing, with it (SDP+ckpt), or both")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batches", default="64,128,256,512", help="ResNet samples per worker per step")
    p.add_argument("--llama-model", default="llama_125m")
    p.add_argument("--llama-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=4, help="steps per worker (the first allocates optimizer state)")
    p.add_argument("--old-default", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure block level with the old plan defaults (transitions kept, parameter balance)")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--budget-minutes", type=float, default=4.5,
                   help="memory phase: stop starting new workloads after this long (results so far are written)")
    p.add_argument("--budget-fraction", type=float, default=0.6,
                   help="planner phase: the budget as a fraction of the full model's predicted peak")
    p.add_argument("--align-width", type=int, default=64)
    p.add_argument("--align-batch", type=int, default=64)
    p.add_argument("--align-steps", type=int, default=200)
    p.add_argument("--align-every", type=int, default=40)
    p.add_argument("--align-coverages", default="0.75,0.5,0.25")
    p.add_argument("--align-subset", type=int, default=0, help="train on this many images (0: all)")
    p.add_argument("--total-minutes", type=float, default=8.0,
                   help="the alignment phase stops training at this point (rows so far are kept)")
    p.add_argument("--align-seed", type=int, default=0, help="seed of the plan, initialisation and data order")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-planner", action="store_true")
    p.add_argument("--skip-alignment", action="store_true")
    args = p.parse_args(argv)
    if args.small:
        args.workers, args.coverages, args.width, args.batches = 4, "0.75,0.5,0.25", 4, "4"
        args.llama_model, args.llama_batch, args.seq_len, args.vocab_size, args.repeats = "llama_tiny", 2, 16, 65, 2
        args.align_width, args.align_batch, args.align_steps, args.align_every = 4, 8, 4, 2
        args.align_coverages, args.align_subset = "0.5", 256
    return args


def _ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def _non_model_before(m: dict) -> float | None:
    before = m.get("allocated_before_bytes")
    if before is None:
        return None
    before = before["median"] if isinstance(before, dict) else before
    return before - m["param_bytes"] - m["optimizer_bytes"]


def summarise(part: dict, workers: int) -> list[dict]:
    """One row per strategy: worst-worker peak (allocated or, on CPU, state + saved), step time."""
    rows = []
    ddp = next(r for r in part["rows"] if r["strategy"] == "ddp")["workers"][0]
    ddp_ckpt = next(r for r in part["rows"] if r["strategy"] == "ddp-ckpt")["workers"][0]
    cuda = "peak_allocated_bytes" in ddp["measured"]

    def peak(m: dict) -> float:
        return m["peak_allocated_bytes"]["median"] if cuda else m["total_bytes"]

    ddp_peak, ckpt_peak = peak(ddp["measured"]), peak(ddp_ckpt["measured"])
    ckpt_step = ddp_ckpt["measured"]["step_s"]["median"]
    for r in part["rows"]:
        ws = r["workers"]
        if r["strategy"] == "fsdp":  # from DDP's measured peak, or DDP+ckpt's when checkpointed
            base = ddp_ckpt if r.get("checkpointing") else ddp
            m = base["measured"]
            sharded = m["state_bytes"] / workers
            value = peak(m) - m["state_bytes"] + sharded + ws[0]["derived"]["unsharded_block_bytes"]
            rows.append({"name": r["name"], "basis": "derived", "peak_bytes": value, "peak_ratio_to_ddp": value / ddp_peak,
                         "peak_ratio_to_ddp_ckpt": value / ckpt_peak, "predicted_bytes": None, "step_ms": None,
                         "step_ratio_to_ddp": None, "step_ratio_to_ddp_ckpt": None, **ws[0]["comm"]})
            continue
        peaks = [peak(w["measured"]) for w in ws]
        steps = [w["measured"]["step_s"]["median"] for w in ws]
        worst = max(range(len(ws)), key=peaks.__getitem__)
        pred = ws[worst]["predicted"].get("total_bytes")
        pred_peak = ws[worst]["predicted"].get("peak_bytes")
        rows.append({
            "name": r["name"], "basis": "measured", "peak_bytes": peaks[worst], "peak_min_bytes": min(peaks),
            "peak_ratio_to_ddp": peaks[worst] / ddp_peak, "peak_ratio_to_ddp_ckpt": peaks[worst] / ckpt_peak,
            "predicted_bytes": pred,
            "predicted_peak_bytes": pred_peak,
            # the planner's claim: its predicted peak against the measured one (allocator peak on a GPU)
            "measured_over_predicted_peak": peaks[worst] / pred_peak if pred_peak else None,
            "worst_over_predicted_worst": peaks[worst] / max(w["predicted"]["peak_bytes"] for w in ws) if pred_peak else None,
            # what the process held before the step besides the model's parameters and optimizer state (the
            # batch, CUDA library workspaces such as cuBLAS's): outside the prediction, shown so that the step's
            # own peak (measured peak minus it) can be compared with the prediction too
            "non_model_before_bytes": _non_model_before(ws[worst]["measured"]),
            "saved_plus_state_bytes": ws[worst]["measured"]["total_bytes"],
            "step_ms": max(steps) * 1e3, "step_mean_ms": statistics.fmean(steps) * 1e3,
            "step_ratio_to_ddp": max(steps) / ddp["measured"]["step_s"]["median"],
            "step_ratio_to_ddp_ckpt": max(steps) / ckpt_step,
            "collective_bytes": max(w["comm"]["collective_bytes"] for w in ws),
            "ring_bytes": max(w["comm"]["ring_bytes"] for w in ws),
        })
    return rows


def markdown(rows: list[dict], cuda: bool) -> str:
    peak_name = "peak allocated MiB" if cuda else "state + saved MiB"
    head = (f"| configuration | basis | {peak_name} (worst worker) [best] | ratio to DDP | ratio to DDP+ckpt "
            "| predicted state+activations MiB | predicted peak MiB (measured / predicted) "
            "| step ms (slowest worker; mean) | step / DDP | step / DDP+ckpt "
            "| all-reduce MiB/step; ring MiB (largest worker) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        best = f" [{r['peak_min_bytes'] / 2**20:.1f}]" if "peak_min_bytes" in r else ""
        pred = f"{r['predicted_bytes'] / 2**20:.1f}" if r["predicted_bytes"] else "n/a"
        step = f"{r['step_ms']:.1f}; {r['step_mean_ms']:.1f}" if r["step_ms"] is not None else "not measured"
        ratio = f"{r['step_ratio_to_ddp']:.2f}" if r["step_ratio_to_ddp"] is not None else "n/a"
        ratio_ckpt = f"{r['step_ratio_to_ddp_ckpt']:.2f}" if r["step_ratio_to_ddp_ckpt"] is not None else "n/a"
        peak = (f"{r['predicted_peak_bytes'] / 2**20:.1f} ({r['measured_over_predicted_peak']:.3f}"
                if r.get("predicted_peak_bytes") else "n/a")
        if r.get("predicted_peak_bytes"):
            other = r.get("non_model_before_bytes")
            peak += (f"; without the {other / 2**20:.1f} MiB held before the step besides the model: "
                     f"{(r['peak_bytes'] - other) / r['predicted_peak_bytes']:.3f})" if other is not None else ")")
        lines.append(f"| {r['name']} | {r['basis']} | {r['peak_bytes'] / 2**20:.1f}{best} | {r['peak_ratio_to_ddp']:.3f} "
                     f"| {r['peak_ratio_to_ddp_ckpt']:.3f} | {pred} | {peak} | {step} | {ratio} | {ratio_ckpt} "
                     f"| {r['collective_bytes'] / 2**20:.1f}; {r['ring_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def planner_check(spec: dict, workers: int, fraction: float, device: torch.device) -> dict:
    """Plan for ``fraction`` of the full model's predicted peak, then measure the chosen worst worker."""
    w = workload_from_spec(spec)
    opt, bs = spec["optimizer"], spec["batch"]
    profile = profile_activations(w.factory, w.make_batch(2, device, 0), w.loss_fn, 2, device=device)
    full_peak, _ = predicted_peak(sd.plan(w.factory, workers, 1.0, "block"), profile, opt, bs)
    budget = int(fraction * full_peak)
    head = {"workload": w.name, "batch": bs, "optimizer": opt, "full_predicted_bytes": full_peak, "budget_bytes": budget}
    try:
        choice = plan_for_budget(w, workers, budget, optimizer=opt, batch_size=bs, profile=profile, device=device)
    except ValueError as e:  # nothing fits: the planner's own message is the result
        return {**head, "error": str(e)}
    m = measure_choice(choice, w, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**head, "level": choice.plan.level, "coverage": choice.plan.coverage,
            "worker": choice.worker, "predicted_bytes": choice.peak, "measured_bytes": m["measured_bytes"],
            "ratio": m["ratio"], "peak_allocated_bytes": m["measured"].get("peak_allocated_bytes"),
            "peak_ratio": m.get("peak_ratio"), "candidates": choice.candidates}


def planner_table(rows: list[dict]) -> str:
    lines = ["| workload | budget | chosen | predicted peak | measured state + saved (ratio) | allocator peak (ratio) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']}, batch {r['batch']}, {r['optimizer']} | {format_bytes(r['budget_bytes'])} "
                         f"| none fits: {r['error']} | | | |")
            continue
        peak = (f"{format_bytes(r['peak_allocated_bytes'])} ({r['peak_ratio']:.3f})"
                if r["peak_allocated_bytes"] is not None else "n/a (CPU)")
        lines.append(f"| {r['workload']}, batch {r['batch']}, {r['optimizer']} | {format_bytes(r['budget_bytes'])} "
                     f"({r['budget_bytes'] / r['full_predicted_bytes']:.2f} of the full model's) | {r['level']} "
                     f"C={r['coverage']:g} (worker {r['worker']}) | {format_bytes(r['predicted_bytes'])} | "
                     f"{format_bytes(r['measured_bytes'])} ({r['ratio']:.3f}) | {peak} |")
    return "\n".join(lines)


def alignment_phase(args: argparse.Namespace, device: torch.device, deadline: float, log) -> dict:
    """Gradient alignment over training, ResNet-18 on CIFAR-10 (JPEG), runs interleaved by level."""
    from subnetdp.data import TensorImageLoader, get_vision_dataset
    from subnetdp.measure.workloads import image_workload

    train = get_vision_dataset("cifar10-jpeg", train=True)
    if args.align_subset:
        keep = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(args.align_seed))
        keep = keep[: args.align_subset]
        train.images, train.labels = train.images[keep], train.labels[keep]
    train.images = train.images.to(device)
    train.labels = train.labels.to(device)
    w = image_workload("resnet18", width=args.align_width)  # the model and its cross-entropy loss
    factory = w.factory
    coverages = [float(c) for c in args.align_coverages.split(",")]
    runs = [(lv, c) for c in coverages for lv in ("block", "neuron")]
    results, walls = {}, {}
    for i, (level, c) in enumerate(runs):
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        t0 = time.perf_counter()
        seed = args.align_seed
        plan = sd.plan(factory, args.workers, c, level, seed=seed)
        sim = sd.Simulation(factory, plan, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                                     weight_decay=5e-4), seed=seed, device=device)
        loaders = [TensorImageLoader.from_dataset(train, args.align_batch, rank=k, world_size=args.workers, seed=seed)
                   for k in range(args.workers)]
        key = f"{level} C={c:g}"
        results[key] = track_alignment(sim, [ld.forever() for ld in loaders], w.loss_fn, args.align_steps,
                                       args.align_every, deadline=t0 + left / (len(runs) - i),
                                       log=lambda m, key=key: log(f"  {key}: {m}"))
        walls[key] = time.perf_counter() - t0
        del sim
    return {"model": f"resnet18(width={args.align_width})", "workers": args.workers, "batch": args.align_batch,
            "seed": args.align_seed,
            "train_images": len(train.labels), "steps": args.align_steps, "every": args.align_every,
            "optimizer": "SGD lr 0.05, Nesterov momentum 0.9, weight decay 5e-4", "results": results, "wall_s": walls}


def plot_peak_and_time(part: dict, machine: str, path: Path) -> None:
    """Allocator peak (worst worker; state + saved dashed) and step time versus coverage, per level."""
    from subnetdp.metrics import pyplot

    plt = pyplot()

    fig, (mem, tim) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=90)
    rows = {r["name"]: r for r in part["summary"]}
    peak = "allocator peak" if "peak_allocated_bytes" in part["rows"][0]["workers"][0]["measured"] else "state + saved"
    for ckpt in (False, True):
        for level in ("block", "neuron"):
            pts = sorted((r["coverage"], rows[r["name"]]) for r in part["rows"]
                         if r["level"] == level and r.get("checkpointing", False) == ckpt)
            if not pts:
                continue
            cs = [c for c, _ in pts]
            name = f"{'SDP+ckpt' if ckpt else 'SDP'} {level}"
            line, = mem.plot(cs, [r["peak_bytes"] / 2**20 for _, r in pts], "s-" if ckpt else "o-", label=f"{name}: {peak}")
            mem.plot(cs, [r["saved_plus_state_bytes"] / 2**20 for _, r in pts], "x--", color=line.get_color(), alpha=0.6,
                     label=f"{name}: state + saved")
            tim.plot(cs, [r["step_ms"] for _, r in pts], "s-" if ckpt else "o-", label=name)
    for name, style in (("DDP", "-"), ("DDP+ckpt", ":")):
        if name in rows:
            mem.axhline(rows[name]["peak_bytes"] / 2**20, color="k", lw=1, linestyle=style, label=name)
            tim.axhline(rows[name]["step_ms"], color="k", lw=1, linestyle=style, label=name)
    for fsdp in (r for n, r in rows.items() if n.startswith("FSDP2")):
        mem.axhline(fsdp["peak_bytes"] / 2**20, color="k" if "+ckpt" not in fsdp["name"] else "C7", lw=1,
                    linestyle="-.", label=f"{fsdp['name']} (derived)")
    mem.set(xlabel="coverage C", ylabel="MiB, worst worker", title="peak memory vs coverage")
    tim.set(xlabel="coverage C", ylabel="ms per step, slowest worker", title="step time vs coverage (compute)")
    for ax in (mem, tim):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{part['workload']}, batch {part['spec']['batch']}, {part['spec']['optimizer']}: {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def replot(run_dirs: list[str], out: Path, prefix: str) -> list[Path]:
    """The plots of earlier runs: per memory workload, and the alignment averaged over seeds."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seeds: dict[str, list[list[dict]]] = {}
    meta = None
    for d in run_dirs:
        data = json.loads((Path(d) / "gpu_measure.json").read_text())
        meta = data["meta"]
        for part in data["workloads"]:
            spec = part["spec"]
            stem = f"{prefix}_{spec['model']}" + (f"_w{spec['width']}" if spec["kind"] == "image" else "") + f"_b{spec['batch']}"
            paths += plot(part, None, out, stem)
            paths.append(out / f"{stem}_peak_time.png")
            plot_peak_and_time(part, meta["device"], paths[-1])
        a = data.get("alignment", {})
        for key, rows in a.get("results", {}).items():
            seeds.setdefault(key, []).append(rows)
    if seeds:
        mean = {}
        for key, runs in seeds.items():
            n = min(len(r) for r in runs)  # a time-boxed run may have fewer points
            mean[key] = [{"step": runs[0][i]["step"], "held": statistics.fmean(r[i]["held"] for r in runs),
                          "full": statistics.fmean(r[i]["full"] for r in runs)} for i in range(n)]
        paths.append(out / f"{prefix}_grad_alignment.png")
        counts = sorted({len(r) for r in seeds.values()})
        plot_alignment(mean, str(paths[-1]), f"subnetwork vs full-model gradient, ResNet-18 width 64, K={meta['workers']}, "
                       f"CIFAR-10 (JPEG), mean of {counts[-1]} seeds: {meta['device']}")
    return paths


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.replot:
        for path in replot(args.replot, Path(args.out), args.prefix):
            print(path)
        return {}
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
    ckpt_modes = ("none", "blocks") if args.sdp_checkpointing == "both" else (args.sdp_checkpointing,)
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

    def save() -> None:
        (out / "gpu_measure.json").write_text(json.dumps(result, indent=1, default=float))
        (out / "gpu_measure.md").write_text("\n".join(md) + "\n")

    start = time.perf_counter()
    for spec in [] if args.skip_memory else specs:
        if time.perf_counter() - start > args.budget_minutes * 60:
            result["skipped"].append(spec)
            print(f"skipped (over {args.budget_minutes} min): {spec}", flush=True)
            continue
        t0 = time.perf_counter()
        part = memory_part(spec, args.workers, coverages, levels, args.repeats, device,
                           log=lambda s: print(s, flush=True), checkpointing=ckpt_modes,
                           old_default=args.old_default)
        rows = summarise(part, args.workers)
        part["summary"], part["wall_s"] = rows, time.perf_counter() - t0
        result["workloads"].append(part)
        md += [f"\n## {part['workload']}, batch {spec['batch']} per worker, {spec['optimizer']} "
               f"({part['wall_s']:.0f} s)\n", markdown(rows, device.type == "cuda"),
               "\n<details><summary>breakdown per worker (MiB)</summary>\n", memory_table(part), "\n</details>"]
        print(md[-4], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()  # partial results survive a cut
    if not args.skip_planner:
        planned = [s for s in specs if s not in result["skipped"]]  # with --skip-memory: every workload
        planned = [next(s for s in reversed(planned) if s["kind"] == "image")] + [s for s in planned if s["kind"] == "text"]
        result["planner"] = [planner_check(s, args.workers, args.budget_fraction, device) for s in planned]
        md += [f"\n## Memory-budget planner ({args.budget_fraction:g} of the full model's predicted peak)\n",
               planner_table(result["planner"])]
        print(md[-1], flush=True)
        save()
    if not args.skip_alignment:
        try:
            result["alignment"] = alignment_phase(args, device, start + args.total_minutes * 60,
                                                  lambda s: print(s, flush=True))
        except FileNotFoundError as e:  # no CIFAR-10 copy on this machine
            result["alignment"] = {"skipped": str(e)}
            print(f"alignment skipped: {e}", flush=True)
        else:
            a = result["alignment"]
            md += [f"\n## Gradient alignment: {a['model']}, K = {a['workers']}, batch {a['batch']} per worker, "
                   f"{a['train_images']} CIFAR-10 (JPEG) images, {a['optimizer']}, seed {a['seed']}\n",
                   alignment_table(a["results"]), "\n(cells: cosine over held elements / over all; mean over workers)"]
            print(md[-2], flush=True)
        save()
    result["meta"]["wall_s"] = time.perf_counter() - start
    md.append(f"\nTotal {result['meta']['wall_s']:.0f} s. Skipped: {result['skipped'] or 'none'}")
    save()
    return result


if __name__ == "__main__":
    main()
