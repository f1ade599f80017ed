"""Placement: which slot each unit gets, so that the workers' windows carry balanced costs.

Worker ``k`` holds the slots ``k, k+1, .., k+r-1 (mod K)`` (DESIGN.md section 4), so a unit's slot
fixes its ``r`` holders, and a worker's load is the sum of the costs in its window:

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

The random draws happen in one fixed order (:func:`place`), so a seed gives the same plan everywhere.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Sequence

import numpy as np

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
    """The greedy placement when it is already optimal (an optimal greedy plan does not depend on
    whether the search ran), else the exhaustive optimum, else the greedy placement improved by local search."""
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




def place(costs: Sequence[float], groups: Sequence[tuple[str, list[int]]] | None, workers: int, r: int,
          rng: random.Random) -> list[int]:
    """Each unit's slot: block units (``groups is None``) balanced by :func:`place_blocks`, width slices
    dealt group by group (``(group name, unit indices)``) by :func:`deal_slices`."""
    rank = list(range(workers))
    rng.shuffle(rank)  # seeded tie-break among equally loaded slots
    if groups is None:
        return place_blocks(costs, workers, r, rank, rng)
    return deal_slices(costs, groups, workers, rank, rng)


def place_blocks(costs: Sequence[float], workers: int, r: int, rank: list[int], rng: random.Random) -> list[int]:
    """Longest processing time into slots (a heap: ``O(log K)`` per unit), the slots arranged around the
    cycle, then the exact or local search (:func:`_search`) when a unit has fewer than ``K`` holders."""
    loads = [0.0] * workers
    slots = [0] * len(costs)
    order = list(range(len(costs)))
    rng.shuffle(order)
    order.sort(key=lambda i: -costs[i])
    lightest = [(0.0, rank[s], s) for s in range(workers)]
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
    return slots


def deal_slices(costs: Sequence[float], groups: Sequence[tuple[str, list[int]]], workers: int, rank: list[int],
                rng: random.Random) -> list[int]:
    """Each width group shuffled and dealt round robin from the lightest slot; a group smaller than ``K``
    evenly spaced around the cycle, so that it still reaches every window."""
    loads = [0.0] * workers
    slots = [0] * len(costs)
    for _name, ids in groups:
        ids = list(ids)
        rng.shuffle(ids)
        lightest = sorted(range(workers), key=lambda s: (loads[s], rank[s]))
        for j, i in enumerate(ids):
            s = (lightest[0] + j * workers // len(ids)) % workers if len(ids) < workers else lightest[j % workers]
            slots[i] = s
            loads[s] += costs[i]
    return slots
