"""A plan as text: the table ``subnetdp plan`` prints and a run folder's ``plan.txt`` holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from subnetdp.planning.data import Plan


def summary(plan: Plan, state_bytes: Sequence[int] | None = None, state_label: str = "") -> str:
    """Who holds what, holders per unit, parameters per worker, and the balanced quantity's spread.

    ``state_bytes`` (one per worker) adds a column ``state MiB (state_label)``: the plan knows no optimizer.
    """
    full = plan.total_params
    lines = [
        f"SDP plan: level={plan.level} workers K={plan.workers} coverage C={plan.coverage:g} "
        f"holders per unit r={plan.holders_per_unit} seed={plan.seed}",
        f"units: {len(plan.units)} ({'blocks' if plan.level == 'block' else 'width slices'}), "
        f"distinct holder sets: {len(plan.holder_sets())}, full model: {full:,} parameters",
        f"always kept: {len(plan.always_kept)} tensors, "
        f"{plan.kept_params:,} parameters",
        "",
        f"{'worker':>6}  {'units':>6}  {'params':>12}  {'fraction':>8}  "
        + (f"{'state MiB (' + state_label + ')':>18}  " if state_bytes is not None else "") + "held",
    ]
    for k in range(plan.workers):
        if plan.level == "block":
            held = plan.units_of(k)
            n_held, text = len(held), ", ".join(u.name for u in held)
        else:
            per_group = {g: n for g, n in plan.held_per_group(k).items() if n}
            n_held = sum(per_group.values())
            text = ", ".join(f"{g} x{n}" for g, n in list(per_group.items())[:3])
            text += f", ... ({len(per_group)} groups)" if len(per_group) > 3 else ""
        count = plan.param_count(k)
        state = f"{state_bytes[k] / 2**20:>18.2f}  " if state_bytes is not None else ""
        lines.append(f"{k:>6}  {n_held:>6}  {count:>12,}  {count / full:>8.3f}  {state}{text}")
    counts = plan.param_counts()
    lines += [
        "",
        f"params per worker: min {min(counts):,}  max {max(counts):,}  spread (max-min)/mean "
        f"{plan.spread():.3f}; mean fraction {sum(counts) / len(counts) / full:.3f}",
        f"holders per unit: {sorted({len(plan.holders(u)) for u in plan.units})}",
    ]
    if plan.unit_costs:
        b = plan.balance_stats()
        what = "predicted MiB, state + saved activations," if plan.balance == "memory" else "cost"
        div = 2**20 if plan.balance == "memory" else 1
        lines.append(f"balanced on {plan.balance} ({what} per worker): worst {b['worst'] / div:,.2f}  "
                     f"mean {b['mean'] / div:,.2f}  worst/mean {b['worst_over_mean']:.3f}  "
                     f"spread (max-min)/mean {b['spread']:.3f}")
    return "\n".join(lines)
