"""``subnetdp bench``'s tables (markdown) and plots (PNG), from the JSON its two parts return."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from subnetdp.config import TrainConfig
from subnetdp.metrics import pyplot

DEFAULT_TRANSITIONS = TrainConfig.transitions  # the main job's default, measured as "SDP" by the benchmark
MEMORY_KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes")


def sdp_name(checkpointing: bool) -> str:
    """The row label of SDP without or with activation checkpointing."""
    return "SDP+ckpt" if checkpointing else "SDP"


def mib(b: float) -> str:
    """Bytes as MiB with two decimals (the tables' unit)."""
    return f"{b / 2**20:.2f}"


def span(values: list[float], fmt: Callable[[float], str]) -> str:
    """One value when all format alike, else ``median [min-max]``."""
    lo, hi = min(values), max(values)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(statistics.median(values))} [{fmt(lo)}-{fmt(hi)}]"


def worst_worker(row: dict[str, Any]) -> dict[str, Any]:
    """The worker of a memory row with the largest measured total."""
    return max(row["workers"], key=lambda r: r["measured"]["total_bytes"])


def memory_table(part: dict[str, Any]) -> str:
    """Markdown of the memory part: one row per configuration, its worst worker, predicted beside measured."""
    head = ("| configuration | basis | params | grads | optimizer | activations | total (worst worker) "
            "| predicted total | measured / predicted: state; activations (all workers) | compute ms/step in-process "
            "| RSS growth in step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in part["rows"]:
        wk = worst_worker(row)
        m = wk["measured"]
        basis = "derived" if row["strategy"] == "fsdp" else "measured"
        cells = [mib(m[k]) for k in MEMORY_KEYS]
        if len(row["workers"]) > 1:  # worst worker, then [min-max over workers]
            cells = [f"{c} [{mib(min(r['measured'][k] for r in row['workers']))}-"
                     f"{mib(max(r['measured'][k] for r in row['workers']))}]" for c, k in zip(cells, MEMORY_KEYS)]
        pred = mib(wk["predicted"]["total_bytes"]) if wk["predicted"].get("total_bytes") else "n/a"
        ratios = "n/a"
        if wk["ratio"]:
            st = [r["ratio"]["state_bytes"] for r in row["workers"]]
            ac = [r["ratio"]["activation_bytes"] for r in row["workers"]]
            ratios = f"{span(st, lambda v: f'{v:.3f}')}; {span(ac, lambda v: f'{v:.3f}')}"
        step = "n/a"
        if isinstance(m.get("step_s"), dict):
            step = span([r["measured"]["step_s"]["median"] for r in row["workers"]], lambda v: f"{v * 1e3:.0f}")
        rss = m.get("step_rss_growth_bytes", {}).get("median") if isinstance(m.get("step_rss_growth_bytes"), dict) else None
        total = mib(m["total_bytes"])
        if row["strategy"] in ("ddp", "ddp-ckpt"):
            total += f" (+{mib(wk['derived']['ddp_bucket_bytes'])} buckets)"
        elif row["strategy"] == "fsdp":
            total += f" (incl. {mib(wk['derived']['unsharded_block_bytes'])} unsharded block)"
        lines.append(f"| {row['name']} | {basis} | {' | '.join(cells)} | {total} | {pred} | {ratios} | {step} | "
                     f"{mib(rss) if rss is not None else 'n/a'} |")
    return "\n".join(lines)


def time_table(part: dict[str, Any]) -> str:
    """Markdown of the timing part: traffic, step, compute and exposed communication per configuration."""
    head = ("| configuration | peak MiB (worst rank) | bytes/rank/step MiB | ring traffic/rank MiB | step ms median [min-max] "
            "| compute ms (no comm) | exposed comm ms | SDP sync wait ms | samples/s/rank | step / DDP | step / DDP+ckpt |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in part["rows"]:
        measured = [b for b in r["bytes_per_rank"] if b is not None]
        derived = r.get("bytes_basis", "").startswith("derived")  # FSDP2 rows of runs before the calls were counted
        byt = span(r["predicted_bytes_per_rank"], mib) + " (derived)" if derived else span(measured, mib)
        peak = f"{max(r['peak_bytes_per_rank']) / 2**20:.1f}" if r.get("peak_bytes_per_rank") else "n/a"
        s = r["step_s"]
        compute = (f"{r['compute_s']['median'] * 1e3:.0f}" if r["compute_s"]
                   else f"= {'DDP+ckpt' if r['checkpointing'] else 'DDP'}'s")
        wait = f"{r['wait_s']['median'] * 1e3:.1f}" if r["strategy"] == "sdp" else "n/a"
        lines.append(f"| {r['name']} | {peak} | {byt} | {span(r['ring_bytes_per_rank'], mib)} | {s['median'] * 1e3:.0f} "
                     f"[{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}] | {compute} | {r['exposed_comm_s'] * 1e3:.0f} | "
                     f"{wait} | {r['samples_per_s_per_rank']:.1f} | {r['step_ratio_to_ddp']:.2f} | "
                     f"{r['step_ratio_to_ddp_ckpt']:.2f} |")
    return "\n".join(lines)


def plot(part: dict[str, Any], timing: dict[str, Any] | None, out: Path, stem: str) -> list[Path]:
    """Memory breakdown bars per strategy (worst worker), and memory and step time versus coverage."""
    plt = pyplot()

    paths = []
    rows = part["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 3.6), dpi=90)
    bottom = [0.0] * len(rows)
    for key, color in zip(MEMORY_KEYS, ("#4c72b0", "#dd8452", "#55a868", "#c44e52")):
        vals = [worst_worker(r)["measured"][key] / 2**20 for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=key.replace("_bytes", ""), color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rows)), [r["name"].replace("SDP ", "") for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("MiB (worst worker)")
    ax.set_title(f"{part['workload']}: memory per worker", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / f"{stem}_memory.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2 if timing else 1, figsize=(9 if timing else 5, 3.4), dpi=90, squeeze=False)
    ax = axes[0][0]
    sdp_lines = sorted({(r["strategy"], r["level"], r.get("checkpointing", False), r.get("old_default", False))
                        for r in rows if r["level"]})
    for strategy, level, ckpt, old in sdp_lines:
        mine = [r for r in rows if (r["strategy"], r["level"], r.get("checkpointing", False),
                                    r.get("old_default", False)) == (strategy, level, ckpt, old)]
        pts = sorted((r["coverage"], worst_worker(r)["measured"]["total_bytes"] / 2**20,
                      worst_worker(r)["predicted"].get("total_bytes", 0) / 2**20) for r in mine)
        name = ("SDP backward" if strategy == "sdp-backward" else sdp_name(ckpt)) + f" {level}" + (" (old default)" if old else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "s-" if (ckpt or strategy != "sdp") else ("^-" if old else "o-"),
                label=f"{name} (measured)")
        if all(p[2] for p in pts):
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=ax.lines[-1].get_color(), alpha=0.6,
                    label=f"{name} (predicted)")
    for r in rows:
        if r["strategy"] not in ("sdp", "sdp-backward"):
            ax.axhline(worst_worker(r)["measured"]["total_bytes"] / 2**20, color="k" if not r.get("checkpointing") else "C7",
                       lw=1, linestyle={"ddp": "-", "ddp-ckpt": ":", "fsdp": "-."}[r["strategy"]],
                       label=r["name"] + (" (derived)" if r["strategy"] == "fsdp" else ""))
    ax.set_xlabel("coverage C")
    ax.set_ylabel("MiB, worst worker")
    ax.legend(fontsize=6)
    ax.set_title("memory vs coverage", fontsize=9)
    if timing:
        ax = axes[0][1]
        trows = timing["rows"]
        for strategy, level, ckpt in sorted({(r["strategy"], r["level"], r.get("checkpointing", False))
                                             for r in trows if r["level"]}):
            pts = sorted((r["coverage"], r["step_s"]["median"] * 1e3) for r in trows
                         if (r["strategy"], r["level"], r.get("checkpointing", False)) == (strategy, level, ckpt))
            name = sdp_name(ckpt).replace("SDP", "SDP-sharded") if strategy == "sdp-sharded" else sdp_name(ckpt)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ("o-" if not ckpt else "s-") if strategy == "sdp"
                    else ("^--" if not ckpt else "v--"), label=f"{name} {level}")
        for r in trows:
            if not r["level"]:
                ax.axhline(r["step_s"]["median"] * 1e3, color="k" if not r.get("checkpointing") else "C7", lw=1,
                           linestyle={"ddp": "-", "ddp-ckpt": ":", "fsdp": "-."}[r["strategy"]], label=r["name"])
        ax.set_xlabel("coverage C")
        ax.set_ylabel(f"step ms (median, {timing['ranks']} ranks)")
        ax.legend(fontsize=6)
        ax.set_title("step time vs coverage", fontsize=9)
    fig.tight_layout()
    paths.append(out / f"{stem}_vs_coverage.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths

