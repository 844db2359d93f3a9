"""The split with the shortest simulated step, searched from the balance search's candidates.

The balance search (:mod:`.balance`) proposes splits: the fewest bytes at a few balance limits, from
the best balance up to ``limit`` (the caller's: with one microbatch a step does not depend on balance
at all, so :func:`dynapipe.plan.plan_pipeline` then keeps the partitioner's balance limit). From the
one with the shortest step, a best-first local search moves one cut at a time to an allowed position
(1, 2, 4, ... positions away, and a grid between its neighbours) while the step does not lengthen
(walking plateaus of equal steps), within ``limit``: the fewest bytes is not the shortest step, as
what a stage sends delays its neighbour only by what does not overlap. The split kept is the shortest step of all
those tried, except that steps within :data:`STEP_TOLERANCE` of it count as equal and the better
balanced wins.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Sequence

from ..schedules import StageCost
from .bottleneck import fewest_bytes
from .chain import Chain

__all__ = ["STEP_TOLERANCE", "StepObjective", "shortest_step"]

# A split's step time in seconds, from the per-stage costs of its stages.
StepObjective = Callable[[list[StageCost]], float]
# Simulated steps this close count as equal and the better balanced split wins: the step is an estimate
# (FLOPs at a nominal rate, a nominal link), not precise to a percent, while balance also bounds the
# step with more microbatches and the spread of measured stage times.
STEP_TOLERANCE = 0.01
# Balance limits (above the best) at which the fewest-bytes split is a candidate.
_STEP_LIMITS = (0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
_MAX_EXPANSIONS = 50
# Evenly spaced positions between a cut's neighbours that the local search tries.
_GRID = 32
# Steps this close are the same step (sums of the same times in another order).
_SAME = 1e-9


def shortest_step(
    chain: Chain, cuts: list[int], step: StepObjective, bound: float, limit: float, memory: float, busy: bool
) -> list[int]:
    """The split of shortest step (balance breaking near-ties) among ``cuts``, the fewest-bytes splits
    at the limits above ``bound`` and their neighbours (see the module docstring)."""
    tried: dict[tuple[int, ...], tuple[float, float]] = {}

    def score(split: Sequence[int]) -> float:
        key = tuple(split)
        if key not in tried:
            stages = chain.stage_costs(list(key))
            tried[key] = (step(stages), max(c.forward + c.backward_input + c.backward_weight for c in stages))
        return tried[key][0]

    if _valid(chain, cuts, limit, memory, busy):
        score(cuts)
    for share in _STEP_LIMITS:
        if bound * (1 + share) > limit:
            break
        found = fewest_bytes(chain, bound * (1 + share) * (1 + 1e-12), memory, busy=busy)
        if found is not None:
            score(found[1])
    # Best-first from the shortest: expand a split (try every move of every cut) and queue the moves
    # that do not lengthen the step, plateaus too (up to rounding: two splits of one step can differ in
    # the last bit), so that a walk along equal steps reaches the move that shortens it.
    start = min(tried, key=score)
    queue = [(score(start), start)]
    expanded: set[tuple[int, ...]] = set()
    while queue and len(expanded) < _MAX_EXPANSIONS:
        seconds, split = heapq.heappop(queue)
        if split in expanded:
            continue
        expanded.add(split)
        shortest = min(seconds for seconds, _ in tried.values())
        for j in range(len(split)):
            for move in _moves(chain, list(split), j, limit, memory, busy):
                key = tuple(move)
                if key not in expanded and score(key) <= shortest * (1 + _SAME):
                    heapq.heappush(queue, (score(key), key))
    shortest = min(seconds for seconds, _ in tried.values())
    near = [
        (slowest, seconds, key)
        for key, (seconds, slowest) in tried.items()
        if seconds <= shortest * (1 + STEP_TOLERANCE)
    ]
    return list(min(near)[2])


def _moves(chain: Chain, cuts: list[int], j: int, limit: float, memory: float, busy: bool) -> list[list[int]]:
    """``cuts`` with cut ``j`` moved to allowed positions between its neighbours: 1, 2, 4, ... positions
    away, and :data:`_GRID` evenly spaced ones (a step is not convex in one cut), every stage valid."""
    allowed = chain.allowed
    a = bisect.bisect_left(allowed, cuts[j])
    first = bisect.bisect_right(allowed, cuts[j - 1] if j > 0 else -1)
    last = bisect.bisect_left(allowed, cuts[j + 1] if j + 1 < len(cuts) else len(chain.nodes) - 1) - 1
    targets = {a + d * 2**e for e in range(int(math.log2(max(len(allowed), 1))) + 1) for d in (-1, 1)}
    span = last - first + 1
    targets |= {first + span * g // _GRID for g in range(_GRID)}
    out = []
    for b in sorted(targets - {a}):
        if first <= b <= last:
            split = [*cuts[:j], allowed[b], *cuts[j + 1 :]]
            if _valid(chain, split, limit, memory, busy):
                out.append(split)
    return out


def _valid(chain: Chain, cuts: list[int], limit: float, memory: float, busy: bool) -> bool:
    starts = [0, *(c + 1 for c in cuts)]
    ends = [*cuts, len(chain.nodes) - 1]
    for start, end in zip(starts, ends, strict=True):
        if chain.prefix[end + 1] - chain.prefix[start] > limit * (1 + 1e-12):
            return False
        if busy and chain.last_busy[end] < start:
            return False
        if memory < math.inf and chain.set_memory(set(range(start, end + 1))) > memory:
            return False
    return True
