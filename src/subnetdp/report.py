"""``subnetdp report``: a markdown table and PNG plots across run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from subnetdp.metrics import format_bytes, read_jsonl


def load_run(run_dir: str | Path) -> dict[str, Any]:
    d = Path(run_dir)
    summary = d / "summary.json"
    if not summary.exists():
        raise FileNotFoundError(f"{d} has no summary.json: is it a finished run directory?")
    return {"dir": d, "summary": json.loads(summary.read_text()), "metrics": read_jsonl(d / "metrics.jsonl")}


def _label(s: dict[str, Any]) -> str:
    if s["strategy"] == "sdp":
        return f"SDP {s['level']} C={s['coverage']:g}"
    return {"ddp": "DDP", "fsdp": "FSDP2", "ddp-ckpt": "DDP+ckpt"}.get(s["strategy"], s["strategy"])


def _peak(s: dict[str, Any]) -> int:
    peaks = s["peak_memory_per_process"]
    key = "peak_device_bytes" if "peak_device_bytes" in peaks[0] else "peak_rss_bytes"
    return max(p[key] for p in peaks)


def write_report(run_dirs: list[str], out: str | Path) -> Path:
    """Write ``OUT/report.md``, ``OUT/curves.png`` and ``OUT/accuracy_vs_memory.png``; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = "test_acc" if any("test_acc" in r["summary"]["final"] for r in runs) else "val_loss"
    rows = ["| run | strategy | model | data | workers | final " + metric + " | params/worker | model state/worker "
            "| peak memory/process | comm/step/worker | steps | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        params = s["params_per_worker"]
        comm = [c for c in s["comm_bytes_per_step_per_worker"] if c is not None]
        rows.append("| " + " | ".join([
            r["dir"].name, _label(s), s["model"] + (f" w{s['width']}" if s.get("width") else ""), s["dataset"],
            f"{s['workers']}{' (sim)' if s['simulated'] else ''}",
            f"{s['final'].get(metric, float('nan')):.4f}",
            f"{max(params):,} / {s['full_params']:,}" if params else "full",
            format_bytes(max(s["model_state_bytes_per_worker"])), format_bytes(_peak(s)),
            format_bytes(max(comm)) if comm else "n/a", str(s["steps"]), f"{s['wall_s']:.0f}"]) + " |")
    md = out / "report.md"
    md.write_text("\n".join(rows) + "\n\n![learning curves](curves.png)\n\n![accuracy vs memory](accuracy_vs_memory.png)\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        steps = [m for m in r["metrics"] if m["kind"] == "step"]
        epochs = [m for m in r["metrics"] if m["kind"] == "epoch" and metric in m]
        axes[0].plot([m["step"] for m in steps], [m["loss"] for m in steps], label=_label(r["summary"]))
        axes[1].plot([m["epoch"] for m in epochs], [m[metric] for m in epochs], marker="o", label=_label(r["summary"]))
    axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
    axes[1].set(xlabel="epoch", ylabel=metric, title=f"assembled full model: {metric}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        s = r["summary"]
        ax.scatter(max(s["model_state_bytes_per_worker"]) / 2**20, s["final"].get(metric, float("nan")))
        ax.annotate(_label(s), (max(s["model_state_bytes_per_worker"]) / 2**20, s["final"].get(metric, float("nan"))),
                    fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="model state per worker (MiB: params + grads + optimizer)", ylabel=metric,
           title=f"{metric} vs per-worker memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_memory.png", dpi=120)
    plt.close(fig)
    return md
