"""``subnetdp report``: a markdown table and PNG plots across run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from subnetdp.files import atomic_write
from subnetdp.metrics import format_bytes, pyplot, read_jsonl


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's summary and metrics, checked: a malformed file is named in one line, not a traceback.

    The summary must hold every figure the table and plots read (it is tried on them here); metrics
    records that are not objects with numeric fields are left out of the curves.
    """
    d = Path(run_dir)
    summary = d / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{d} has no summary.json: is it a finished run directory?")
    try:
        run = {"dir": d, "summary": json.loads(summary.read_text(encoding="utf-8"))}
        _row(run)
        if _metric(run):
            float(run["summary"]["final"][_metric(run)])
        worst_worker_peak(run["summary"])
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise ValueError(f"{summary}: malformed run summary ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                         "give the summary.json that subnetdp train wrote, or leave this run out") from None
    run["metrics"] = [m for m in read_jsonl(d / "metrics.jsonl") if isinstance(m, dict) and m.get("kind") in
                      ("step", "epoch") and all(isinstance(v, (int, float)) for k, v in m.items() if k != "kind")]
    return run


def _strategy(s: dict[str, Any]) -> str:
    if s["strategy"] == "sdp":
        return f"SDP {s['level']} C={s['coverage']:g}"
    return {"ddp": "DDP", "fsdp": "FSDP2", "ddp-ckpt": "DDP+ckpt"}.get(s["strategy"], s["strategy"])


def _label(r: dict[str, Any]) -> str:
    """Legend and scatter label: the run's name (its folder), then its strategy."""
    return f"{r['dir'].name}: {_strategy(r['summary'])}"


def _metric(r: dict[str, Any]) -> str | None:
    """The run's headline metric: test accuracy for images, validation loss for text."""
    final = r["summary"]["final"]
    return next((m for m in ("test_acc", "val_loss") if m in final), None)


def worst_worker_peak(s: dict[str, Any]) -> tuple[int, str]:
    """``(bytes, basis)``: the worst worker's peak memory (state + activations). ``basis`` is
    ``"measured"`` (the process's peak, when each worker had its own process), ``"predicted"`` (a run
    simulated in one process: the planner's predicted peak of its worst worker, state + saved
    activations + transient) or ``"state"`` (older runs without a prediction: model state only)."""
    if not s.get("simulated"):
        return _peak(s), "measured"
    if s.get("predicted_peak_bytes_per_worker"):
        return max(s["predicted_peak_bytes_per_worker"]), "predicted"
    return max(s["model_state_bytes_per_worker"]), "state"


def _peak(s: dict[str, Any]) -> int:
    peaks = s["peak_memory_per_process"]
    key = "peak_device_bytes" if "peak_device_bytes" in peaks[0] else "peak_rss_bytes"
    return max(p[key] for p in peaks)


def _row(r: dict[str, Any]) -> str:
    """The run's row of the markdown table."""
    s = r["summary"]
    params = s["params_per_worker"]
    comm = [c for c in s["comm_bytes_per_step_per_worker"] if c is not None]
    return "| " + " | ".join([
        r["dir"].name, _strategy(s), s["model"] + (f" w{s['width']}" if s.get("width") else ""), s["dataset"],
        f"{s['workers']}{' (sim)' if s['simulated'] else ''}",
        f"{_metric(r)} {s['final'][_metric(r)]:.4f}" if _metric(r) else "n/a",
        f"{max(params):,} / {s['full_params']:,}" if params else "full",
        format_bytes(max(s["model_state_bytes_per_worker"])), format_bytes(_peak(s)),
        format_bytes(max(comm)) if comm else "n/a", str(s["steps"]), f"{s['wall_s']:.0f}"]) + " |"


def write_report(run_dirs: list[str], out: str | Path) -> Path:
    """Write ``OUT/report.md``, ``OUT/curves.png`` and ``OUT/accuracy_vs_memory.png``; returns the markdown path."""
    plt = pyplot()

    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["| run | strategy | model | data | workers | final metric | params/worker | model state/worker "
            "| peak memory/process | comm/step/worker | steps | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows += [_row(r) for r in runs]
    md = out / "report.md"
    # as every run file: a new file renamed into place, never written through a link planted under the name
    atomic_write(md, "\n".join(rows) + "\n\n![learning curves](curves.png)\n\n![accuracy vs memory](accuracy_vs_memory.png)\n")

    metrics = sorted({m for r in runs if (m := _metric(r))}, key=["test_acc", "val_loss"].index)
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5.5 * (1 + len(metrics)), 4), squeeze=False)
    axes = axes[0]
    for r in runs:
        steps = [m for m in r["metrics"] if m["kind"] == "step"]
        axes[0].plot([m["step"] for m in steps], [m["loss"] for m in steps], label=_label(r))
        if _metric(r):  # each metric on its own axes: accuracy and loss never share one
            ax = axes[1 + metrics.index(_metric(r))]
            epochs = [m for m in r["metrics"] if m["kind"] == "epoch" and _metric(r) in m]
            ax.plot([m["epoch"] for m in epochs], [m[_metric(r)] for m in epochs], marker="o", label=_label(r))
    axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
    for i, metric in enumerate(metrics):
        axes[1 + i].set(xlabel="epoch", ylabel=metric, title=f"assembled full model: {metric}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out / "curves.png", lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)

    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(6 * max(1, len(metrics)), 4 + 0.2 * len(runs)),
                             squeeze=False)
    axes = axes[0]
    for r in runs:
        if not _metric(r):
            continue
        ax = axes[metrics.index(_metric(r))]
        peak, basis = worst_worker_peak(r["summary"])
        x, y = peak / 2**20, r["summary"]["final"][_metric(r)]
        note = {"measured": "", "predicted": " (simulated: predicted peak)", "state": " (simulated: state only)"}[basis]
        # a legend, not text beside each point: long names stay inside the figure, and runs that land
        # on the same point (a resumed run and its uninterrupted twin) are both listed
        ax.scatter(x, y, marker={"measured": "o", "predicted": "^", "state": "s"}[basis], s=45, alpha=0.8,
                   label=_label(r) + note)
    for i, metric in enumerate(metrics):
        axes[i].set(xlabel="worst worker's peak memory (MiB)", ylabel=metric,
                    title=f"{metric} vs per-worker peak memory")
        axes[i].grid(alpha=0.3)
        axes[i].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.tight_layout()
    atomic_write(out / "accuracy_vs_memory.png", lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return md


def conventions_text(ev: dict[str, Any]) -> str:
    """The evaluation conventions of a summary's ``evaluation`` entry in words, with the residual-scaling rule
    that decided them, so that a reader of the summary or of ``subnetdp evaluate`` knows what was applied."""
    done = []
    if ev.get("residual_scaling"):
        done.append(f"residual branches scaled by r/K={ev['residual_scale']:g} (in {ev['scaled_layers']} layers' weights)")
    if ev.get("bn_recalibrate"):
        done.append(f"BatchNorm statistics re-estimated on {ev['bn_recalibrate']} training batches")
    text = "; ".join(done) if done else "the assembled model as trained (no conventions)"
    rule = ev.get("residual_scaling_rule")
    return f"{text} [residual scaling: {rule}]" if rule else text


def summary_text(s: dict[str, Any], out: Path) -> str:
    lines = ["", "=" * 72, f"summary: {s['strategy']}" + (f" level={s['level']} C={s['coverage']:g}" if s["level"] else "")
             + f", {s['workers']} workers, {s['model']} on {s['dataset']}"]
    for k, v in s["final"].items():
        lines.append(f"  {k:<28} {v:.4f}")
    if s["params_per_worker"]:
        lines.append(f"  {'params per worker':<28} {min(s['params_per_worker']):,} - {max(s['params_per_worker']):,}"
                     f" of {s['full_params']:,}")
    st = s["model_state_bytes_per_worker"]
    lines.append(f"  {'model state per worker':<28} {format_bytes(min(st))} - {format_bytes(max(st))}"
                 " (params + grads + optimizer)")
    peaks = s["peak_memory_per_process"]
    key = "peak_device_bytes" if "peak_device_bytes" in peaks[0] else "peak_rss_bytes"
    lines.append(f"  {'peak memory per process':<28} {format_bytes(max(p[key] for p in peaks))} ({key.replace('_bytes', '')})")
    comm = [c for c in s["comm_bytes_per_step_per_worker"] if c is not None]
    if comm:
        lines.append(f"  {'communication per step':<28} {format_bytes(min(comm))} - {format_bytes(max(comm))} per worker")
    lines.append(f"  {'wall time':<28} {s['wall_s']:.1f} s ({s['steps']} steps, {s['samples_per_s']:.0f} samples/s)")
    lines.append(f"  {'evaluated with':<28} {conventions_text(s['evaluation'])}")
    lines.append(f"  outputs: {out}/ (metrics.jsonl, summary.json, checkpoints/, model.safetensors: the evaluated "
                 "model, loads into the plain architecture; model_raw.safetensors: as assembled)")
    lines.append("=" * 72)
    return "\n".join(lines)
