"""Plans: which worker holds which unit. Pure data, no tensors.

Assignment (DESIGN.md section 4): every unit gets a *slot* in ``0..K-1``; worker ``k`` holds the
slots ``k, k+1, .., k+r-1 (mod K)``, so a unit in slot ``s`` is held by exactly ``r = C*K`` workers,
``s-r+1 .. s (mod K)``, and there are at most ``K`` distinct holder sets besides the world.

Slots are filled to balance a cost per worker: parameter counts (``balance="params"``), each unit's
predicted memory (model state for the optimizer plus saved activations;
``subnetdp.measure.prediction.memory_cost`` builds that cost from one activation profile), or any user cost:
- block level: the worst worker's load (the largest window sum) is minimised, then the lightest
  worker's raised. First longest-processing-time into slots (ties broken by a seeded shuffle) and
  the slots arranged around the cycle (every arrangement for ``K <= 8``, else 3072 seeded samples
  scored with cyclic prefix sums). When there are few assignments (``K**(n-1) <= 2**21`` for ``n``
  units) every one is scored and the optimum replaces that placement unless it is already optimal
  (the seed choosing among equally good ones); otherwise single-unit moves and pairwise swaps run
  while they lower the worst window (skipped when ``n*K*K`` is too large, so planning stays
  near-linear in ``K``);
- neuron level: each width group is shuffled (seeded) and dealt round robin over the slots, starting
  with the lightest, so every worker holds ``C * size`` units of each group when ``K`` divides it;
  a group smaller than ``K`` is spread evenly, so each worker holds at least ``floor(r*size/K)``.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
from torch import nn

from subnetdp.init import ModelFactory, build_meta
from subnetdp.units import (
    AttrSpec,
    BlockInfo,
    BlockSelector,
    SliceSpec,
    WidthGroup,
    WidthPair,
    candidate_paths,
    find_blocks,
    find_width_groups,
)

LEVELS = ("block", "neuron")
JOB_BALANCES = ("memory", "params")  # what `train` and `plan` can balance ("cost": a caller's own function)
TRANSITIONS = ("keep", "shortcut")
BALANCES = ("params", "memory", "cost")


@dataclass(frozen=True)
class Unit:
    """The smallest thing a plan assigns: a block (``name`` = module path) or one width slice."""

    index: int
    name: str
    numel: int  # parameter elements the unit owns
    group: str | None = None  # neuron level: the width group
    slice: int | None = None  # neuron level: position in the group (channel, head, kv group)


@dataclass(frozen=True)
class Plan:
    """Which of ``workers`` workers holds each unit. Build it with :func:`subnetdp.plan`."""

    workers: int
    coverage: float
    level: str
    seed: int
    units: tuple[Unit, ...]
    slots: tuple[int, ...]
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # every full-model parameter and buffer
    params: tuple[str, ...]  # the names among ``tensors`` that are parameters (tied ones once)
    blocks: tuple[BlockInfo, ...] = ()  # block level: every block found (transitions included)
    groups: tuple[WidthGroup, ...] = ()
    transitions: str = "keep"
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, canonical) for tied parameters
    balance: str = "params"  # what the slots balance: "params", "memory" (bytes) or "cost" (a user cost)
    unit_costs: tuple[float, ...] = ()  # the balanced quantity per unit (empty: parameter counts)
    kept_cost: float = 0.0  # the balanced quantity every worker carries besides its units
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- holders ---------------------------------------------------------------------------------
    @property
    def holders_per_unit(self) -> int:
        return round(self.coverage * self.workers)

    def holders(self, unit: Unit | int) -> tuple[int, ...]:
        """The workers holding ``unit``, ascending."""
        s = self.slots[unit if isinstance(unit, int) else unit.index]
        return tuple(sorted((s - j) % self.workers for j in range(self.holders_per_unit)))

    def holds(self, worker: int, unit: Unit | int) -> bool:
        s = self.slots[unit if isinstance(unit, int) else unit.index]
        return (s - worker) % self.workers < self.holders_per_unit

    def units_of(self, worker: int) -> tuple[Unit, ...]:
        """The units ``worker`` holds, in unit order: those in slots ``worker .. worker+r-1 (mod K)``."""
        self.check_worker(worker)
        if len(self.units) <= self.holders_per_unit:  # few units (blocks): test each
            return tuple(u for u in self.units if self.holds(worker, u))
        held = [i for j in range(self.holders_per_unit) for i in self._by_slot[(worker + j) % self.workers]]
        return tuple(self.units[i] for i in sorted(held))

    def _window(self, per_slot: np.ndarray, worker: int) -> np.ndarray:
        """Sum of ``per_slot`` (slots on axis 0) over ``worker``'s window, from cached cyclic prefix sums."""
        key = ("prefix", id(per_slot))
        if key not in self._cache:
            self._cache[key] = np.concatenate([np.zeros((1, *per_slot.shape[1:]), per_slot.dtype),
                                               np.cumsum(np.concatenate([per_slot, per_slot]), axis=0)])
        prefix = self._cache[key]
        return prefix[worker + self.holders_per_unit] - prefix[worker]

    @cached_property
    def _slot_stats(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Per slot: parameter elements of its units, and its units per width group (neuron level)."""
        names = [g.name for g in self.groups]
        column = {n: i for i, n in enumerate(names)}
        numel = np.zeros(self.workers, dtype=np.int64)
        counts = np.zeros((self.workers, len(names)), dtype=np.int64)
        for u, s in zip(self.units, self.slots):
            numel[s] += u.numel
            if u.group is not None:
                counts[s, column[u.group]] += 1
        return numel, counts, names

    def held_per_group(self, worker: int) -> dict[str, int]:
        """How many units of each width group ``worker`` holds (neuron level), in ``O(groups)``."""
        self.check_worker(worker)
        _, counts, names = self._slot_stats
        return dict(zip(names, self._window(counts, worker).tolist()))

    @cached_property
    def _by_slot(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.workers)]
        for i, s in enumerate(self.slots):
            out[s].append(i)
        return out

    def holder_sets(self) -> list[tuple[int, ...]]:
        """Distinct holder sets of the units (the world set too when something is always kept)."""
        sets = {self.holders(u) for u in self.units}
        if self.always_kept:
            sets.add(tuple(range(self.workers)))
        return sorted(sets)

    def check_worker(self, worker: int) -> None:
        """Raise a ValueError naming ``worker`` unless it is one of this plan's workers."""
        if not isinstance(worker, int) or not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker!r} is out of range: this plan has workers 0..{self.workers - 1}")

    # ---- tensors -----------------------------------------------------------------------------------
    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.tensors)

    @cached_property
    def _block_units(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units} if self.level == "block" else {}

    @cached_property
    def _slicing(self) -> dict[str, tuple[WidthGroup, SliceSpec, dict[int, Unit]]]:
        out = {}
        by_group: dict[str, dict[int, Unit]] = {}
        for u in self.units:
            if u.group is not None:
                by_group.setdefault(u.group, {})[u.slice] = u
        for g in self.groups:
            for s in g.slices:
                out[s.tensor] = (g, s, by_group[g.name])
        return out

    def block_of(self, tensor: str) -> Unit | None:
        """The block unit owning ``tensor`` (block level), or None when it is always kept."""
        for info in self.blocks:
            if tensor.startswith(info.name + "."):
                unit = self._block_units.get(info.name)
                if unit is None:
                    return None
                if info.shortcut and tensor.startswith(f"{info.name}.{info.shortcut}."):
                    return None
                return unit
        return None

    @cached_property
    def always_kept(self) -> tuple[str, ...]:
        """Parameters and buffers every worker holds whole."""
        return tuple(n for n, _ in self.tensors if self.block_of(n) is None and n not in self._slicing)

    def element_holders(self, tensor: str) -> tuple[int | None, list[tuple[int, ...]]]:
        """Holder sets of ``tensor``'s elements: ``(None, [H])`` if whole, else ``(dim, [H per index])``."""
        if tensor in self._slicing:
            g, s, units = self._slicing[tensor]
            n = self.shapes[tensor][s.dim]
            return s.dim, [self.holders(units[g.unit_of(s, i)]) for i in range(n)]
        unit = self.block_of(tensor)
        return None, [self.holders(unit) if unit else tuple(range(self.workers))]

    def tensor_map(self, worker: int) -> dict[str, tuple[int, list[int]] | None]:
        """Where each of ``worker``'s tensors sits in the full model.

        Keys are full-model names (a subnetwork keeps them); ``None`` means the whole tensor, else
        ``(dim, indices)``: the subnetwork tensor is the full one's ``index_select(dim, indices)``.
        Tensors the worker does not hold are absent.
        """
        self.check_worker(worker)
        key = ("tensor_map", worker)
        if key not in self._cache:
            out: dict[str, tuple[int, list[int]] | None] = {}
            for name, _ in self.tensors:
                if name in self._slicing:
                    g, s, units = self._slicing[name]
                    held = [i for i, u in units.items() if self.holds(worker, u)]
                    out[name] = (s.dim, g.indices(held, s))
                else:
                    unit = self.block_of(name)
                    if unit is None or self.holds(worker, unit):
                        out[name] = None
            for alias, canonical in self.aliases:
                if canonical in out:
                    out[alias] = out[canonical]
            self._cache[key] = out
        return self._cache[key]

    def dropped_blocks(self, worker: int) -> list[BlockInfo]:
        """Blocks ``worker`` does not hold (block level): they are skipped or reduced to their shortcut."""
        return [b for b in self.blocks if b.name in self._block_units
                and not self.holds(worker, self._block_units[b.name])]

    def attrs(self, worker: int) -> list[tuple[AttrSpec, int]]:
        """Unit-counting attributes and their values in ``worker``'s subnetwork."""
        out = []
        per_group = self.held_per_group(worker)
        for g in self.groups:
            held = per_group[g.name]
            out += [(a, a.per_unit * held) for a in g.attrs]
        return out

    def consumer_scales(self, worker: int) -> dict[str, float]:
        """``size / held`` per consumer module of each width group: the inverted-scaling factors."""
        out = {}
        per_group = self.held_per_group(worker)
        for g in self.groups:
            held = per_group[g.name]
            for c in g.consumers:
                out[c] = g.size / held if held else 0.0
        return out

    # ---- counts ----------------------------------------------------------------------------------
    @cached_property
    def total_params(self) -> int:
        return sum(_prod(self.shapes[n]) for n in self.params)

    def param_count(self, worker: int) -> int:
        """Exact parameter elements in ``worker``'s subnetwork."""
        self.check_worker(worker)
        return self.kept_params + int(self._window(self._slot_stats[0], worker))

    @cached_property
    def kept_params(self) -> int:
        """Parameter elements every worker holds (the always-kept tensors)."""
        kept = set(self.always_kept)
        return sum(_prod(self.shapes[n]) for n in self.params if n in kept)

    def param_counts(self) -> list[int]:
        return [self.param_count(k) for k in range(self.workers)]

    def param_fractions(self) -> list[float]:
        return [c / self.total_params for c in self.param_counts()]

    def spread(self) -> float:
        """(max - min) / mean of the per-worker parameter counts: 0 is perfect balance."""
        counts = self.param_counts()
        return (max(counts) - min(counts)) / (sum(counts) / len(counts))

    def loads(self) -> list[float]:
        """The balanced quantity per worker: ``kept_cost`` plus the costs of the units it holds.

        For ``balance="memory"`` this is the predicted peak bytes the plan was balanced on; for
        ``balance="params"`` it is the parameter count.
        """
        if not self.unit_costs:
            return [float(c) for c in self.param_counts()]
        key = "slot_costs"
        if key not in self._cache:
            per_slot = np.zeros(self.workers)
            for c, s in zip(self.unit_costs, self.slots):
                per_slot[s] += c
            self._cache[key] = per_slot
        return [self.kept_cost + float(self._window(self._cache[key], k)) for k in range(self.workers)]

    def balance_stats(self) -> dict[str, float]:
        """Worst, mean, worst / mean and spread ((max - min) / mean) of :meth:`loads`."""
        loads = self.loads()
        mean = sum(loads) / len(loads)
        return {"worst": max(loads), "mean": mean, "worst_over_mean": max(loads) / mean if mean else 1.0,
                "spread": (max(loads) - min(loads)) / mean if mean else 0.0}

    def summary(self, state_bytes: Sequence[int] | None = None, state_label: str = "") -> str:
        """A readable table: who holds what, holders per unit, parameters per worker.

        ``state_bytes`` (one per worker, e.g. :func:`subnetdp.measure.prediction.plan_summary`'s model
        state for an optimizer) adds a column ``state MiB (state_label)``: the plan itself knows no optimizer.
        """
        full = self.total_params
        lines = [
            f"SDP plan: level={self.level} workers K={self.workers} coverage C={self.coverage:g} "
            f"holders per unit r={self.holders_per_unit} seed={self.seed}",
            f"units: {len(self.units)} ({'blocks' if self.level == 'block' else 'width slices'}), "
            f"distinct holder sets: {len(self.holder_sets())}, full model: {full:,} parameters",
            f"always kept: {len(self.always_kept)} tensors, "
            f"{self.kept_params:,} parameters",
            "",
            f"{'worker':>6}  {'units':>6}  {'params':>12}  {'fraction':>8}  "
            + (f"{'state MiB (' + state_label + ')':>18}  " if state_bytes is not None else "") + "held",
        ]
        for k in range(self.workers):
            if self.level == "block":
                held = self.units_of(k)
                n_held, text = len(held), ", ".join(u.name for u in held)
            else:
                per_group = {g: n for g, n in self.held_per_group(k).items() if n}
                n_held = sum(per_group.values())
                text = ", ".join(f"{g} x{n}" for g, n in list(per_group.items())[:3])
                text += f", ... ({len(per_group)} groups)" if len(per_group) > 3 else ""
            count = self.param_count(k)
            state = f"{state_bytes[k] / 2**20:>18.2f}  " if state_bytes is not None else ""
            lines.append(f"{k:>6}  {n_held:>6}  {count:>12,}  {count / full:>8.3f}  {state}{text}")
        counts = self.param_counts()
        lines += [
            "",
            f"params per worker: min {min(counts):,}  max {max(counts):,}  spread (max-min)/mean "
            f"{self.spread():.3f}; mean fraction {sum(counts) / len(counts) / full:.3f}",
            f"holders per unit: {sorted({len(self.holders(u)) for u in self.units})}",
        ]
        if self.unit_costs:
            b = self.balance_stats()
            what = "predicted MiB, state + saved activations," if self.balance == "memory" else "cost"
            div = 2**20 if self.balance == "memory" else 1
            lines.append(f"balanced on {self.balance} ({what} per worker): worst {b['worst'] / div:,.2f}  "
                         f"mean {b['mean'] / div:,.2f}  worst/mean {b['worst_over_mean']:.3f}  "
                         f"spread (max-min)/mean {b['spread']:.3f}")
        return "\n".join(lines)

    # ---- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        data.pop("_cache")
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan saved by :meth:`to_json`; anything else raises ``ValueError`` saying what is wrong."""
        try:
            return cls._from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"not a plan: invalid JSON ({e}); give the text written by Plan.to_json "
                             "(subnetdp plan --save FILE)") from e
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a plan: missing or malformed field ({type(e).__name__}: {e}); give the text "
                             "written by Plan.to_json (subnetdp plan --save FILE)") from e

    @classmethod
    def _from_dict(cls, d: dict) -> Plan:
        return cls(
            workers=d["workers"], coverage=d["coverage"], level=d["level"], seed=d["seed"],
            units=tuple(Unit(**u) for u in d["units"]), slots=tuple(d["slots"]),
            tensors=tuple((n, tuple(s)) for n, s in d["tensors"]), params=tuple(d["params"]),
            blocks=tuple(BlockInfo(**b) for b in d["blocks"]),
            groups=tuple(WidthGroup(g["name"], g["size"], tuple(SliceSpec(**s) for s in g["slices"]),
                                    tuple(AttrSpec(**a) for a in g["attrs"]), tuple(g["consumers"]))
                         for g in d["groups"]),
            transitions=d["transitions"], aliases=tuple((a, c) for a, c in d["aliases"]),
            balance=d.get("balance", "params"), unit_costs=tuple(d.get("unit_costs", ())),
            kept_cost=d.get("kept_cost", 0.0),
        )

    def digest(self) -> str:
        """A short hash of the plan, equal on ranks that agree on everything in it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def valid_coverages(workers: int) -> list[float]:
    return [j / workers for j in range(1, workers + 1)]


def _check_args(workers: int, coverage: float, level: str, transitions: str) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: need a positive integer number of workers")
    if level not in LEVELS:
        raise ValueError(f"level={level!r}: choose one of {LEVELS}")
    if transitions not in TRANSITIONS:
        raise ValueError(f"transitions={transitions!r}: choose one of {TRANSITIONS}")
    check_coverage(coverage, workers)
    return round(coverage * workers)


def check_coverage(coverage: float, workers: int | None, name: str = "coverage=") -> None:
    """Reject a coverage outside (0, 1], or (given ``workers``) one whose holders per unit ``C*K`` are not
    whole, so no uniform plan exists. The one check of a coverage, for the API and the command line alike
    (``name`` is how the caller spells the setting: ``"--coverage "`` there); the message lists the
    coverages that work."""
    ok = ", ".join(f"{c:g}" for c in valid_coverages(workers)) if workers else ""
    if not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
        listed = f"; coverages that work with {workers} workers: {ok}" if workers else ""
        raise ValueError(f"{name}{coverage!r} is outside (0, 1]{listed}")
    if workers is None:
        return
    r = coverage * workers
    if abs(r - round(r)) > 1e-9:
        raise ValueError(f"{name}{coverage:g} with {workers} workers gives {r:g} holders per unit; it must be "
                         f"whole. Coverages that work with {workers} workers: {ok}")


def _arrange(loads: list[float], workers: int, r: int, rng: random.Random) -> list[int]:
    """Place slot bins on the cycle so window sums (worker loads) spread least. Returns bin -> slot.

    Every arrangement is tried for ``K <= 8``; above, 3072 seeded permutations, each scored in
    ``O(K)`` with cyclic prefix sums (vectorised), so a plan for thousands of workers takes seconds.
    """
    if r == workers or len(set(loads)) == 1:
        return list(range(workers))
    if workers <= 8:
        every = np.array([(0, *p) for p in itertools.permutations(range(1, workers))], dtype=np.int64)
        chunks = (every[i:i + 256] for i in range(0, len(every), 256))
    else:
        gen = np.random.default_rng(rng.getrandbits(63))
        chunks = (np.argsort(gen.random((256, workers)), axis=1) for _ in range(0, 3000, 256))
    weights = np.asarray(loads, dtype=np.float64)
    best, best_spread = None, np.inf
    for chunk in chunks:
        w = weights[chunk]  # (n, K): the load at each cycle position
        prefix = np.concatenate([np.zeros((len(w), 1)), np.cumsum(np.concatenate([w, w[:, :r]], axis=1), axis=1)],
                                axis=1)
        sums = prefix[:, r:r + workers] - prefix[:, :workers]  # window k covers positions k..k+r-1
        spreads = sums.max(axis=1) - sums.min(axis=1)
        i = int(np.argmin(spreads))  # the first minimum: the same choice on every rank
        if spreads[i] < best_spread:
            best, best_spread = chunk[i], spreads[i]
    slot_of_bin = [0] * workers
    for pos, b in enumerate(best.tolist()):
        slot_of_bin[b] = pos
    return slot_of_bin


_EXACT_LIMIT = 2**21  # assignments scored one by one (vectorised) when there are at most this many
_LOCAL_LIMIT = 2 * 10**7  # n * K * K above which the local search is skipped


def _window_matrix(workers: int, r: int) -> np.ndarray:
    """``M[s, k] = 1`` when worker ``k`` (window ``k .. k+r-1``) holds slot ``s``."""
    s = np.arange(workers)[:, None]
    k = np.arange(workers)[None, :]
    return (((s - k) % workers) < r).astype(np.float64)


def _eps(costs: np.ndarray) -> float:
    """Loads closer than this are equal (float sums in different orders)."""
    return 1e-9 * max(float(costs.sum()), 1.0)


def _key(costs: np.ndarray, slots: Sequence[int], window: np.ndarray) -> tuple[float, float]:
    """(worst, lightest) worker load of a placement."""
    loads = np.bincount(np.asarray(slots, dtype=np.int64), weights=costs, minlength=len(window)) @ window
    return float(loads.max()), float(loads.min())


def _digits(index: np.ndarray, workers: int, n: int) -> np.ndarray:
    """Assignment number -> slots of units 1..n-1 (mixed-radix digits; unit 0 stays in slot 0)."""
    index = index.copy()
    assign = np.zeros((len(index), n), dtype=np.int64)
    for j in range(n - 1, 0, -1):
        assign[:, j] = index % workers
        index //= workers
    return assign


def _better(a: tuple[float, float], b: tuple[float, float], eps: float) -> bool:
    """Is (worst, lightest) ``a`` better than ``b``: a lower worst window, then a heavier lightest."""
    return a[0] < b[0] - eps or (abs(a[0] - b[0]) <= eps and a[1] > b[1] + eps)


def _place_exact(costs: np.ndarray, workers: int, r: int, rng: random.Random) -> list[int] | None:
    """Score every assignment of units to slots (the largest unit fixed in slot 0: rotations are
    equivalent); return the best, the seed choosing among ties, or None when there are too many."""
    n = len(costs)
    if workers ** (n - 1) > _EXACT_LIMIT:
        return None
    order = np.argsort(-costs, kind="stable")  # largest first; it is pinned to slot 0
    c = costs[order]
    window = _window_matrix(workers, r)
    eps = _eps(costs)
    best: tuple[float, float] = (np.inf, -np.inf)
    ties: list[np.ndarray] = []  # assignment numbers of the best placements so far, in order
    total = workers ** (n - 1)
    step = 1 << 16
    for start in range(0, total, step):
        assign = _digits(np.arange(start, min(start + step, total), dtype=np.int64), workers, n)
        bins = np.zeros((len(assign), workers))
        for j in range(n):
            bins[np.arange(len(assign)), assign[:, j]] += c[j]
        loads = bins @ window  # (m, K): each worker's load
        worst, light = loads.max(axis=1), loads.min(axis=1)
        w_best = float(worst.min())
        cand = np.flatnonzero(worst <= w_best + eps)
        l_best = float(light[cand].max())
        cand = cand[light[cand] >= l_best - eps]
        key = (w_best, l_best)
        if _better(key, best, eps):
            best, ties = key, [cand + start]
        elif not _better(best, key, eps):
            ties.append(cand + start)
    numbers = np.concatenate(ties)
    chosen = _digits(numbers[rng.randrange(len(numbers))][None], workers, n)[0]
    rotation = rng.randrange(workers)
    slots = [0] * n
    for j, unit in enumerate(order.tolist()):
        slots[unit] = int((chosen[j] + rotation) % workers)
    return slots


def _search(costs: np.ndarray, greedy: list[int], workers: int, r: int, rng: random.Random) -> list[int]:
    """The greedy placement when it is already optimal (so plans that were optimal before stay
    the same), else the exhaustive optimum, else the greedy placement improved by local search."""
    exact = _place_exact(costs, workers, r, rng)
    if exact is None:
        return _improve(costs, greedy, workers, r)
    window = _window_matrix(workers, r)
    return exact if _better(_key(costs, exact, window), _key(costs, greedy, window), _eps(costs)) else greedy


def _improve(costs: np.ndarray, slots: list[int], workers: int, r: int) -> list[int]:
    """Single-unit moves and pairwise swaps, best first, while they lower the worst window (then
    raise the lightest). Deterministic: the first best candidate wins."""
    n = len(costs)
    if n * workers * workers > _LOCAL_LIMIT:
        return slots
    window = _window_matrix(workers, r)
    eps = _eps(costs)
    s = np.asarray(slots, dtype=np.int64)
    for _ in range(4 * n * workers):
        loads = np.bincount(s, weights=costs, minlength=workers) @ window
        best, move = (float(loads.max()), float(loads.min())), None
        for i in range(n):  # move unit i to slot b: loads - c_i M[s_i] + c_i M[b]
            cand = loads[None, :] - costs[i] * window[s[i]][None, :] + costs[i] * window
            worst, light = cand.max(axis=1), cand.min(axis=1)
            for b in np.flatnonzero(worst <= worst.min() + eps).tolist():
                if _better((float(worst[b]), float(light[b])), best, eps):
                    best, move = (float(worst[b]), float(light[b])), ("move", i, b)
        for i in range(n):  # swap units i and j: loads + (c_j - c_i) (M[s_i] - M[s_j])
            for j in range(i + 1, n):
                if s[i] == s[j] or costs[i] == costs[j]:
                    continue
                cand = loads + (costs[j] - costs[i]) * (window[s[i]] - window[s[j]])
                key = (float(cand.max()), float(cand.min()))
                if _better(key, best, eps):
                    best, move = key, ("swap", i, j)
        if move is None:
            break
        if move[0] == "move":
            s[move[1]] = move[2]
        else:
            s[move[1]], s[move[2]] = s[move[2]], s[move[1]]
    return s.tolist()


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
    plan (``"cost"`` by default, ``"memory"`` from :func:`subnetdp.measure.prediction.memory_plan`) and
    ``kept_cost`` is its always-kept part, so that :meth:`Plan.balance_stats` reports whole workers.

    Without ``cost`` this balances parameter counts. ``subnetdp train`` and ``subnetdp plan`` balance
    predicted memory by default (``--balance memory``); :func:`subnetdp.memory_balanced_plan` returns
    their plan from a sample batch.
    """
    r = _check_args(workers, coverage, level, transitions)
    balance = balance or ("cost" if cost else "params")
    if balance not in BALANCES:
        raise ValueError(f"balance={balance!r}: choose one of {BALANCES}")
    if (balance == "params") != (cost is None):
        raise ValueError(f"balance={balance!r} needs {'no cost function' if cost else 'a cost function'}: "
                         "balance='params' balances parameter counts; for memory use "
                         "subnetdp.memory_balanced_plan")
    module = model if isinstance(model, nn.Module) else build_meta(model)
    named_params = dict(module.named_parameters())
    canonical = {id(t): n for n, t in named_params.items()}
    aliases = tuple((n, canonical[id(t)]) for n, t in module.named_parameters(remove_duplicate=False)
                    if canonical[id(t)] != n)
    tensors = tuple((n, tuple(t.shape)) for n, t in list(named_params.items()) + list(module.named_buffers()))
    found_blocks = find_blocks(module, blocks, example_input)
    units: list[Unit] = []
    groups: list[WidthGroup] = []
    if level == "block":
        for b in found_blocks:
            if b.transition and (transitions == "keep" or b.shortcut is None):
                continue
            skip = f"{b.name}.{b.shortcut}." if b.transition else None
            numel = sum(t.numel() for n, t in named_params.items()
                        if n.startswith(b.name + ".") and not (skip and n.startswith(skip)))
            units.append(Unit(len(units), b.name, numel))
    else:
        groups = find_width_groups(module, pairs=width_pairs)
        for g in groups:
            per_unit = 0
            for s in g.slices:
                if s.tensor in named_params:
                    t = named_params[s.tensor]
                    per_unit += t.numel() // t.shape[s.dim] * s.chunks * s.group
            for i in range(g.size):
                units.append(Unit(len(units), f"{g.name}#{i}", per_unit, g.name, i))
    if not units:
        what = "residual blocks with unchanged shapes" if level == "block" else "inner widths"
        raise ValueError(
            f"{type(module).__name__} has no maskable units at level {level!r} (no {what} found). "
            f"Name them: blocks=[...] (module paths) or width_pairs=[(producer, consumer)]. "
            f"Candidate module paths: {candidate_paths(module)[:30]}"
        )

    rng = random.Random(seed)
    costs = [float(cost(u)) if cost else float(u.numel) for u in units]
    rank = list(range(workers))
    rng.shuffle(rank)  # seeded tie-break among equally loaded slots
    loads = [0.0] * workers
    slots = [0] * len(units)
    if level == "block":
        order = list(range(len(units)))
        rng.shuffle(order)
        order.sort(key=lambda i: -costs[i])
        lightest = [(0.0, rank[s], s) for s in range(workers)]  # a heap: O(log K) per unit
        heapq.heapify(lightest)
        for i in order:
            _, tie, b = heapq.heappop(lightest)
            slots[i] = b
            loads[b] += costs[i]
            heapq.heappush(lightest, (loads[b], tie, b))
        slot_of_bin = _arrange(loads, workers, r, rng)
        slots = [slot_of_bin[b] for b in slots]
        if r < workers:
            slots = _search(np.asarray(costs), slots, workers, r, rng)
    else:
        for g in groups:
            ids = [u.index for u in units if u.group == g.name]
            rng.shuffle(ids)
            lightest = sorted(range(workers), key=lambda s: (loads[s], rank[s]))
            for j, i in enumerate(ids):
                # evenly spaced around the cycle, so a group smaller than K still reaches every window
                s = (lightest[0] + j * workers // len(ids)) % workers if len(ids) < workers else lightest[j % workers]
                slots[i] = s
                loads[s] += costs[i]
    return Plan(
        workers=workers, coverage=float(coverage), level=level, seed=seed, units=tuple(units),
        slots=tuple(slots), tensors=tensors, params=tuple(named_params), blocks=tuple(found_blocks),
        groups=tuple(groups), transitions=transitions, aliases=aliases, balance=balance,
        unit_costs=tuple(costs) if cost else (), kept_cost=float(kept_cost) if cost else 0.0,
    )
