"""The balance search over a :class:`Chain`: the smallest bottleneck, then the fewest bytes near it.

**Balance.** Binary search the smallest bottleneck B (slowest stage time) that a greedy
farthest-cut sweep reaches in k stages under ``max_stage_memory`` -- exact, as both limits are
monotone in a stage's extent. O(k log n) per probe without a memory limit, O(n) with one.

**Fewest bytes among near-balanced cuts.** A dynamic program picks k-1 allowed positions that
minimise the bytes crossing, every stage within ``B * (1 + slack)`` (slack 25%) but never slower than
the best cut at layer boundaries (the split a person would make), and every stage doing some work.
Then, among the splits sending at most 5% more than that fewest, the best balance (binary search on
the limit, the same DP). The slack is what lets a Llama/GPT-2/OPT/Bloom cut slide from inside
attention or the MLP (q, k, v or the 4h intermediate live: 3-5 hidden states) to the residual stream
(one); with 8 layers per 8 stages that costs up to 25% balance, with 4 layers per stage 5-7%.
Between equal bytes, the outermost module boundary wins (after a whole layer, not after its norm's
first op). O(k n) per DP with a sliding-window minimum.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from ..formatting import format_bytes
from .chain import Chain

__all__ = ["fewest_bytes", "greedy", "memory_error", "min_bottleneck"]

_INF = math.inf


def _reach(chain: Chain, start: int, bound: float, memory: float) -> int:
    """The last position a stage starting at ``start`` can hold within ``bound`` seconds and ``memory``."""
    end = bisect.bisect_right(chain.prefix, chain.prefix[start] + bound, lo=start + 1) - 2
    if memory == _INF or end < start:
        return end
    state: dict[int, None] = {}
    acts: dict[int, None] = {}
    used = 0.0
    for i in range(start, end + 1):
        for j in chain.state[i]:
            if j not in state:
                state[j] = None
                used += chain.state_bytes[j]
        for j in chain.saves[i]:
            if j not in acts:
                acts[j] = None
                used += chain.in_flight * chain.buffer_bytes[j]
        if used > memory:
            return i - 1
    return end


def greedy(chain: Chain, bound: float, memory: float, allowed: list[int]) -> list[int] | None:
    """Fewest cuts (farthest-first) keeping every stage within the limits; None if a node alone exceeds them."""
    n, start = len(chain.nodes), 0
    cuts: list[int] = []
    while True:
        end = _reach(chain, start, bound, memory)
        if end >= n - 1:
            return cuts
        a = bisect.bisect_right(allowed, end) - 1
        p = allowed[a] if a >= 0 else -1
        if p < start:
            return None
        cuts.append(p)
        start = p + 1
        if len(cuts) >= chain.k:  # already too many: stop early
            return cuts


def min_bottleneck(chain: Chain, memory: float, allowed: list[int]) -> float:
    lo, hi = max(chain.weight) * (1 - 1e-12), chain.prefix[-1] * (1 + 1e-12) + 1e-300
    ok = greedy(chain, hi, memory, allowed)
    if ok is None or len(ok) >= chain.k:
        return _INF
    for _ in range(100):
        if hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        cuts = greedy(chain, mid, memory, allowed)
        if cuts is not None and len(cuts) < chain.k:
            hi = mid
        else:
            lo = mid
    return hi


def memory_error(chain: Chain, memory: float) -> str:
    lo, hi = 0, int(sum(chain.state_bytes) + chain.in_flight * sum(chain.buffer_bytes)) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        cuts = greedy(chain, _INF, mid, chain.allowed)
        if cuts is not None and len(cuts) < chain.k:
            hi = mid
        else:
            lo = mid + 1
    return (
        f"max_stage_memory={int(memory)} bytes ({format_bytes(memory)}) is below what any {chain.k}-stage "
        f"split needs (parameters, gradients and optimizer state, plus saved activations of {chain.in_flight} "
        f"microbatches in flight); the smallest feasible value is {lo} bytes ({format_bytes(lo)}). Raise "
        "the limit, use more stages, or fewer microbatches in flight"
    )


def fewest_bytes(
    chain: Chain, bound: float, memory: float, *, busy: bool = True
) -> tuple[float, list[int]] | None:
    """The fewest bytes crossing k-1 allowed cut positions with every stage within the limits, and the
    positions; None if no such split exists. ``busy``: every stage must compute (hold a node with FLOPs;
    without it, a stage holding only ``input_ids.view()`` would win by sending token ids instead of a
    hidden state)."""
    allowed, k, n = chain.allowed, chain.k, len(chain.nodes)
    # A stage after a cut at q and up to a cut at allowed[a] needs lo[a] <= q <= up[a] (q = -1: the start)
    lo = [bisect.bisect_left(chain.prefix, chain.prefix[p + 1] - bound) - 1 for p in allowed]
    if memory < _INF:
        lo = [max(a, b) for a, b in zip(lo, _memory_window(chain, allowed, memory), strict=True)]
    up = [chain.last_busy[p] - 1 if busy else p - 1 for p in allowed]
    last_ok = [
        _fits_last(chain, p + 1, bound, memory) and (not busy or chain.last_busy[n - 1] > p) for p in allowed
    ]
    best = [chain.score[p] if lo[a] <= -1 <= up[a] else _INF for a, p in enumerate(allowed)]
    back: list[list[int]] = []
    for _ in range(2, k):  # best[a]: fewest bytes of j cuts, the last at allowed[a]
        new, arg, right = [_INF] * len(allowed), [-1] * len(allowed), 0
        window: deque[int] = deque()
        for a, p in enumerate(allowed):
            while right < len(allowed) and allowed[right] <= up[a]:  # sliding-window minimum of best
                if best[right] < _INF:
                    while window and best[window[-1]] > best[right]:
                        window.pop()
                    window.append(right)
                right += 1
            while window and allowed[window[0]] < lo[a]:
                window.popleft()
            if window:
                new[a], arg[a] = best[window[0]] + chain.score[p], window[0]
        back.append(arg)
        best = new
    finals = [(best[a], a) for a in range(len(allowed)) if last_ok[a] and best[a] < _INF]
    if not finals:
        return None
    sent, a = min(finals)
    cuts = [allowed[a]]
    for arg in reversed(back):
        a = arg[a]
        cuts.append(allowed[a])
    return sent, cuts[::-1]


def _fits_last(chain: Chain, first: int, bound: float, memory: float) -> bool:
    return chain.prefix[-1] - chain.prefix[first] <= bound and chain.suffix_memory[first] <= memory


def _memory_window(chain: Chain, allowed: list[int], memory: float) -> list[int]:
    """Per allowed position p, the smallest q such that positions q+1..p fit in ``memory``."""
    count: dict[tuple[str, int], int] = {}
    used, left, out, a = 0.0, 0, [], 0

    def add(i: int, sign: int) -> float:
        delta = 0.0
        for kind, ids, size in (
            ("s", chain.state[i], chain.state_bytes),
            ("a", chain.saves[i], chain.buffer_bytes),
        ):
            scale = 1 if kind == "s" else chain.in_flight
            for j in ids:
                key = (kind, j)
                before = count.get(key, 0)
                count[key] = before + sign
                if (before == 0 and sign > 0) or (before == 1 and sign < 0):
                    delta += sign * scale * size[j]
        return delta

    for p in range(len(chain.nodes)):
        used += add(p, 1)
        while used > memory and left <= p:
            used += add(left, -1)
            left += 1
        while a < len(allowed) and allowed[a] == p:
            out.append(left - 1 if used <= memory else p)
            a += 1
    return out
