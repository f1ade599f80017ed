"""``plan()``: a model's units found, costed and placed, as a :class:`~subnetdp.planning.data.Plan`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from torch import nn

from subnetdp.init import ModelFactory, build_meta
from subnetdp.planning.data import BALANCES, LEVELS, TRANSITIONS, Plan, Unit, check_coverage
from subnetdp.planning.placement import place
from subnetdp.units import (
    BlockInfo,
    BlockSelector,
    WidthGroup,
    WidthPair,
    candidate_paths,
    find_blocks,
    find_width_groups,
)


def plan(
    model: nn.Module | ModelFactory,
    workers: int,
    coverage: float,
    level: str = "block",
    seed: int = 0,
    *,
    blocks: BlockSelector = None,
    width_pairs: Sequence[WidthPair] | None = None,
    transitions: str = "keep",
    cost: Callable[[Unit], float] | None = None,
    example_input: object = None,
    balance: str | None = None,
    kept_cost: float = 0.0,
) -> Plan:
    """Assign ``model``'s units to ``workers`` workers, each holding a fraction ``coverage`` of them.

    ``model`` is a module (real or on the meta device) or a factory (built on the meta device).
    ``level`` is ``"block"`` (residual blocks) or ``"neuron"`` (inner widths). ``blocks`` names
    the blocks instead of discovering them; ``width_pairs`` adds neuron-level ``(producer,
    consumer)`` or ``(producer, norm, consumer)`` paths. ``transitions="shortcut"`` lets blocks
    whose shapes change be reduced to their shortcut path instead of always kept. ``cost(unit)``
    replaces the parameter count as the quantity balanced across workers; ``balance`` names it in the
    plan (``"cost"`` by default, ``"memory"`` from :func:`subnetdp.planning.memory.memory_plan`) and
    ``kept_cost`` is its always-kept part, so that :meth:`Plan.balance_stats` reports whole workers.

    Without ``cost`` this balances parameter counts. ``subnetdp train`` and ``subnetdp plan`` balance
    predicted memory by default (``--balance memory``); :func:`subnetdp.memory_balanced_plan` returns
    their plan from a sample batch.
    """
    r = _check_args(workers, coverage, level, transitions)
    balance = _check_balance(balance, cost)
    module = model if isinstance(model, nn.Module) else build_meta(model)
    named_params = dict(module.named_parameters())
    found_blocks = find_blocks(module, blocks, example_input)
    if level == "block":
        units, groups = _block_units(found_blocks, named_params, transitions), []
    else:
        groups = find_width_groups(module, pairs=width_pairs)
        units = _slice_units(groups, named_params)
    if not units:
        what = "residual blocks with unchanged shapes" if level == "block" else "inner widths"
        raise ValueError(
            f"{type(module).__name__} has no maskable units at level {level!r} (no {what} found). "
            f"Name them: blocks=[...] (module paths) or width_pairs=[(producer, consumer)]. "
            f"Candidate module paths: {candidate_paths(module)[:30]}"
        )
    rng = random.Random(seed)
    costs = [float(cost(u)) if cost else float(u.numel) for u in units]
    by_group = None if level == "block" else [(g.name, [u.index for u in units if u.group == g.name]) for g in groups]
    slots = place(costs, by_group, workers, r, rng)
    tensors, aliases = _tensors(module, named_params)
    return Plan(
        workers=workers, coverage=float(coverage), level=level, seed=seed, units=tuple(units),
        slots=tuple(slots), tensors=tensors, params=tuple(named_params), blocks=tuple(found_blocks),
        groups=tuple(groups), transitions=transitions, aliases=aliases, balance=balance,
        unit_costs=tuple(costs) if cost else (), kept_cost=float(kept_cost) if cost else 0.0,
    )


def _check_args(workers: int, coverage: float, level: str, transitions: str) -> int:
    """The holders per unit ``r = C*K``, after rejecting settings no plan has."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: need a positive integer number of workers")
    if level not in LEVELS:
        raise ValueError(f"level={level!r}: choose one of {LEVELS}")
    if transitions not in TRANSITIONS:
        raise ValueError(f"transitions={transitions!r}: choose one of {TRANSITIONS}")
    check_coverage(coverage, workers)
    return round(coverage * workers)


def _check_balance(balance: str | None, cost: Callable[[Unit], float] | None) -> str:
    """What the plan says it balances: parameter counts exactly when no cost function is given."""
    balance = balance or ("cost" if cost else "params")
    if balance not in BALANCES:
        raise ValueError(f"balance={balance!r}: choose one of {BALANCES}")
    if (balance == "params") != (cost is None):
        raise ValueError(f"balance={balance!r} needs {'no cost function' if cost else 'a cost function'}: "
                         "balance='params' balances parameter counts; for memory use "
                         "subnetdp.memory_balanced_plan")
    return balance


def _tensors(module: nn.Module, named_params: dict[str, nn.Parameter]
             ) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[tuple[str, str], ...]]:
    """Every parameter and buffer's shape, and ``(alias, canonical)`` for tied parameters."""
    canonical = {id(t): n for n, t in named_params.items()}
    aliases = tuple((n, canonical[id(t)]) for n, t in module.named_parameters(remove_duplicate=False)
                    if canonical[id(t)] != n)
    tensors = tuple((n, tuple(t.shape)) for n, t in list(named_params.items()) + list(module.named_buffers()))
    return tensors, aliases


def _block_units(found: Sequence[BlockInfo], named_params: dict[str, nn.Parameter], transitions: str) -> list[Unit]:
    """One unit per block; a transition block only when it may be reduced to its shortcut, which it keeps."""
    units: list[Unit] = []
    for b in found:
        if b.transition and (transitions == "keep" or b.shortcut is None):
            continue
        skip = f"{b.name}.{b.shortcut}." if b.transition else None
        numel = sum(t.numel() for n, t in named_params.items()
                    if n.startswith(b.name + ".") and not (skip and n.startswith(skip)))
        units.append(Unit(len(units), b.name, numel))
    return units


def _slice_units(groups: Sequence[WidthGroup], named_params: dict[str, nn.Parameter]) -> list[Unit]:
    """One unit per slice of each width group, owning its share of every sliced parameter."""
    units: list[Unit] = []
    for g in groups:
        per_unit = 0
        for s in g.slices:
            if s.tensor in named_params:
                t = named_params[s.tensor]
                per_unit += t.numel() // t.shape[s.dim] * s.chunks * s.group
        first = len(units)
        units += [Unit(first + i, f"{g.name}#{i}", per_unit, g.name, i) for i in range(g.size)]
    return units
