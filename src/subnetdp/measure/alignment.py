"""Gradient alignment: how well each worker's subnetwork gradient points where the full model's does.

The method's explanation of why block level beats neuron level is that subnetworks that keep skip
connections have gradients better aligned with the full model's. This measures it: on one batch,
the gradient of worker ``k``'s subnetwork (its own forward and backward, before any sync) against
the gradient of the full model assembled from the same state, by cosine similarity

- ``held``: over the elements the worker holds (does its step point the right way where it acts?),
- ``full``: over all elements, the worker's gradient counted as zero where it holds nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from subnetdp.init import materialize
from subnetdp.metrics import pyplot
from subnetdp.simulate import Simulation

LossFn = Callable[[nn.Module, object], torch.Tensor]


def _full_coordinates(sim: Simulation, k: int, grads: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Worker ``k``'s gradients scattered into full shapes, with masks of the held elements."""
    tmap = sim.plan.tensor_map(k)
    values, masks = {}, {}
    for name, g in grads.items():
        shape = sim.plan.shapes[name]
        full, mask = torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
        where = tmap[name]
        if where is None:
            full.copy_(g)
            mask.fill_(True)
        else:
            idx = torch.tensor(where[1], dtype=torch.long)
            full.index_copy_(where[0], idx, g)
            mask.index_fill_(where[0], idx, True)
        values[name], masks[name] = full, mask
    return values, masks


def gradient_alignment(sim: Simulation, batches: Sequence[object], loss_fn: LossFn) -> list[dict[str, float]]:
    """Per worker: cosine similarity of its subnetwork gradient with the full model's, on its batch.

    Does not change the simulation's parameters; gradients are left cleared. BatchNorm layers run
    in training mode in both models (batch statistics), as in a training step.
    """
    state = sim.full_state_dict()
    device = next(sim.workers[0].parameters()).device
    full = materialize(sim.structure, device=device)  # structure only; values loaded next
    full.load_state_dict(state)
    full.train()
    out = []
    for k, (worker, batch) in enumerate(zip(sim.workers, batches)):
        worker.zero_grad(set_to_none=True)
        loss_fn(worker, batch).backward()
        sub = {n: p.grad.detach().cpu() for n, p in worker.named_parameters() if p.grad is not None}
        worker.zero_grad(set_to_none=True)
        full.zero_grad(set_to_none=True)
        loss_fn(full, batch).backward()
        ref = {n: p.grad.detach().cpu() for n, p in full.named_parameters() if p.grad is not None}
        values, masks = _full_coordinates(sim, k, sub)
        names = [n for n in ref if n in values]
        a = torch.cat([values[n].reshape(-1) for n in names])
        m = torch.cat([masks[n].reshape(-1) for n in names])
        b_held = torch.cat([ref[n].reshape(-1) for n in names])
        b_all = torch.cat([g.reshape(-1) for g in ref.values()])
        a_all = torch.cat([values[n].reshape(-1) if n in values else torch.zeros(ref[n].numel()) for n in ref])
        out.append({
            "worker": k,
            "held": float(nn.functional.cosine_similarity(a[m], b_held[m], dim=0)),
            "full": float(nn.functional.cosine_similarity(a_all, b_all, dim=0)),
            "held_fraction": float(m.sum()) / b_all.numel(),
        })
    full.zero_grad(set_to_none=True)
    return out


def track_alignment(sim: Simulation, streams: Sequence[Iterator[object]], loss_fn: LossFn, steps: int, every: int,
                    *, max_grad_norm: float | None = None, deadline: float | None = None,
                    log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Train ``sim`` for ``steps`` steps on the workers' batch streams, measuring alignment on the way.

    Alignment is measured at step 0 and every ``every`` steps, on the batches the workers are about
    to train on. Returns one row per measurement: the mean, min and max over workers of ``held`` and
    the mean of ``full``. ``deadline`` (a ``time.perf_counter()`` value) ends training early and
    keeps the rows so far, so a time-boxed run still reports what it measured.
    """
    if every < 1 or steps < 0:
        raise ValueError(f"every={every}, steps={steps}: need every >= 1 and steps >= 0")
    if len(streams) != len(sim.workers):
        raise ValueError(f"{len(streams)} batch streams for {len(sim.workers)} workers: give one per worker")
    rows: list[dict[str, float]] = []
    for step in range(steps + 1):
        batches = [next(s) for s in streams]
        if step % every == 0:
            per = gradient_alignment(sim, batches, loss_fn)
            rows.append({"step": step, "held": statistics.fmean(r["held"] for r in per),
                         "full": statistics.fmean(r["full"] for r in per),
                         "held_min": min(r["held"] for r in per), "held_max": max(r["held"] for r in per)})
            if log is not None:
                log(f"step {step:>5}: cos(held) {rows[-1]['held']:.3f} cos(all) {rows[-1]['full']:.3f}")
        if deadline is not None and time.perf_counter() > deadline:
            break
        if step < steps:
            sim.step(batches, loss_fn, max_grad_norm=max_grad_norm)
    return rows


def plot_alignment(results: dict[str, list[dict[str, float]]], path: str, title: str) -> None:
    """Two panels (cosine over held elements; over all elements) of :func:`track_alignment` rows per run.

    ``results`` maps a run's label (``"block C=0.5"``: one colour per coverage, block level solid, neuron dashed)
    to its rows.
    """
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors: dict[str, str] = {}  # one colour per coverage: block solid, neuron dashed
    for key, rows in results.items():
        style = "-" if key.startswith("block") else "--"
        color = colors.setdefault(key.split(" ", 1)[-1], f"C{len(colors)}")
        for ax, metric in zip(axes, ("held", "full")):
            ax.plot([r["step"] for r in rows], [r[metric] for r in rows], style, color=color, marker="o", label=key)
    axes[0].set(title="cosine over the held parameters", xlabel="step", ylabel="cosine similarity")
    axes[1].set(title="cosine over all parameters (unheld = 0)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def alignment_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: one row per run, one column per measured step, cells ``cos held / cos all``."""
    steps = sorted({r["step"] for rows in results.values() for r in rows})
    lines = ["| run | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for key, rows in results.items():
        by_step = {r["step"]: r for r in rows}
        cells = [f"{by_step[s]['held']:.3f} / {by_step[s]['full']:.3f}" if s in by_step else "-" for s in steps]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
