"""The plan: which worker holds which unit, as pure data (no tensors).

A :class:`Plan` gives every unit a *slot* in ``0..K-1``; worker ``k`` holds the slots ``k, k+1, ..,
k+r-1 (mod K)``, so a unit in slot ``s`` is held by exactly ``r = C*K`` workers, ``s-r+1 .. s (mod K)``,
and there are at most ``K`` distinct holder sets besides the world (DESIGN.md section 4). From the
slots it answers who holds what: per unit, per tensor element (:meth:`Plan.element_holders`), per
worker (:meth:`Plan.tensor_map`), and the counts and loads that say how balanced it is. The slots
themselves are chosen in :mod:`subnetdp.planning.placement`, from the costs that
:func:`subnetdp.plan` is given (parameter counts, or :func:`subnetdp.planning.memory.memory_cost`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

from subnetdp.planning.text import summary as _summary
from subnetdp.units import AttrSpec, BlockInfo, SliceSpec, WidthGroup

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

    def _window(self, prefix: np.ndarray, worker: int) -> np.ndarray:
        """Sum over ``worker``'s window of a per-slot quantity, from its cyclic prefix sums (``_cyclic_prefix``)."""
        return prefix[worker + self.holders_per_unit] - prefix[worker]

    @cached_property
    def _prefix_numel(self) -> np.ndarray:
        return _cyclic_prefix(self._slot_stats[0])

    @cached_property
    def _prefix_counts(self) -> np.ndarray:
        return _cyclic_prefix(self._slot_stats[1])

    @cached_property
    def _prefix_costs(self) -> np.ndarray:
        per_slot = np.zeros(self.workers)
        for c, s in zip(self.unit_costs, self.slots):
            per_slot[s] += c
        return _cyclic_prefix(per_slot)

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
        return dict(zip(self._slot_stats[2], self._window(self._prefix_counts, worker).tolist()))

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
        if worker not in self._tensor_maps:
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
            self._tensor_maps[worker] = out
        return self._tensor_maps[worker]

    @cached_property
    def _tensor_maps(self) -> dict[int, dict[str, tuple[int, list[int]] | None]]:
        """:meth:`tensor_map` per worker, filled as workers are asked for."""
        return {}

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
        return sum(math.prod(self.shapes[n]) for n in self.params)

    def param_count(self, worker: int) -> int:
        """Exact parameter elements in ``worker``'s subnetwork."""
        self.check_worker(worker)
        return self.kept_params + int(self._window(self._prefix_numel, worker))

    @cached_property
    def kept_params(self) -> int:
        """Parameter elements every worker holds (the always-kept tensors)."""
        kept = set(self.always_kept)
        return sum(math.prod(self.shapes[n]) for n in self.params if n in kept)

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
        return [self.kept_cost + float(self._window(self._prefix_costs, k)) for k in range(self.workers)]

    def balance_stats(self) -> dict[str, float]:
        """Worst, mean, worst / mean and spread ((max - min) / mean) of :meth:`loads`."""
        loads = self.loads()
        mean = sum(loads) / len(loads)
        return {"worst": max(loads), "mean": mean, "worst_over_mean": max(loads) / mean if mean else 1.0,
                "spread": (max(loads) - min(loads)) / mean if mean else 0.0}

    def summary(self, state_bytes: Sequence[int] | None = None, state_label: str = "") -> str:
        """A readable table: who holds what, holders per unit, parameters per worker.

        ``state_bytes`` (one per worker, e.g. :func:`subnetdp.planning.memory.plan_summary`'s model
        state for an optimizer) adds a column ``state MiB (state_label)``: the plan itself knows no optimizer.
        """
        return _summary(self, state_bytes, state_label)

    # ---- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
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



def valid_coverages(workers: int) -> list[float]:
    return [j / workers for j in range(1, workers + 1)]



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


def _cyclic_prefix(per_slot: np.ndarray) -> np.ndarray:
    """Prefix sums over slots ``0..2K-1`` (the slots twice), so any window of the cycle is one difference."""
    return np.concatenate([np.zeros((1, *per_slot.shape[1:]), per_slot.dtype),
                           np.cumsum(np.concatenate([per_slot, per_slot]), axis=0)])
