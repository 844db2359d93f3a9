"""A list scheduler: replay a pipeline in unit time and let every idle rank pick its next action greedily.

Used for ZB-V with fewer microbatches than its V construction needs to fill (:mod:`._zbv`); replaying
the dependencies gives a table for any count that is deadlock-free by construction (it is the order
of one real execution, and blocking receives only change timing, never that order).

Policy, per idle rank, among the actions whose inputs have finished:
1. an input-gradient ``I`` (oldest microbatch first): it is on the critical path of every rank below;
2. a forward ``F`` while the rank holds fewer than ``cap`` activations (later chunks first, since they
   lead to the loss and so to new ``I`` work). Earlier chunks leave one slot per later chunk free, so
   a rank full of early-chunk activations can still run the forward that drains them;
3. a weight-gradient ``W`` (oldest first): it depends on nothing remote, so it fills what would be a bubble.
"""

from __future__ import annotations

from .actions import Action, Kind, ScheduleError, Table
from .placement import StageGraph, inputs_of

__all__ = ["list_schedule"]


def list_schedule(
    *,
    n_ranks: int,
    n_microbatches: int,
    rank_of: dict[int, int],
    graph: StageGraph,
    cap: int,
    durations: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Table:
    """A split-backward (F/I/W) table; ``durations`` are the (F, I, W) times the replay assumes."""
    m = n_microbatches
    local = {r: sorted(s for s, owner in rank_of.items() if owner == r) for r in range(n_ranks)}
    next_mb = {(s, kind): 0 for s in rank_of for kind in (Kind.F, Kind.I, Kind.W)}
    finished: dict[Action, float] = {}
    held = dict.fromkeys(range(n_ranks), 0)  # activations: F started, W not yet finished
    busy_until = dict.fromkeys(range(n_ranks), 0.0)
    running: dict[int, Action] = {}
    table: Table = {r: [] for r in range(n_ranks)}
    cost = dict(zip((Kind.F, Kind.I, Kind.W), durations, strict=True))
    always_i = {(s, k): Kind.I for s in rank_of for k in range(m)}  # every backward here is split

    def pick(rank: int, now: float) -> Action | None:
        candidates = [
            Action(s, kind, next_mb[s, kind]) for s in local[rank] for kind in (Kind.I, Kind.F, Kind.W)
        ]
        ready = [
            a
            for a in candidates
            if a.mb < m
            and all(finished.get(dep, float("inf")) <= now for dep in inputs_of(a, graph, always_i))
        ]
        return _pick(ready, local[rank], held[rank], cap)

    now, total = 0.0, 3 * m * len(rank_of)
    while len(finished) < total:
        for rank in range(n_ranks):
            if rank in running and busy_until[rank] <= now:
                done = running.pop(rank)
                finished[done] = busy_until[rank]
                held[rank] -= done.kind is Kind.W
        for rank in range(n_ranks):
            if rank in running:
                continue
            action = pick(rank, now)
            if action is None:
                continue
            table[rank].append(action)
            next_mb[action.stage, action.kind] += 1
            held[rank] += action.kind is Kind.F
            running[rank] = action
            busy_until[rank] = now + cost[action.kind]
        if not running:
            if len(finished) < total:
                raise ScheduleError(
                    f"list scheduler stalled at t={now} with caps {cap}: {table}; this is a dynapipe bug"
                )
            break
        now = min(busy_until[r] for r in running)
    return table


def _pick(ready: list[Action], stages: list[int], held: int, cap: int) -> Action | None:
    """The policy of the module docstring, among one rank's ``ready`` actions."""
    grads = sorted((a for a in ready if a.kind is Kind.I), key=lambda a: (a.mb, -a.stage))
    if grads:
        return grads[0]
    forwards = sorted((a for a in ready if a.kind is Kind.F), key=lambda a: (-a.stage, a.mb))
    for action in forwards:
        reserve = len(stages) - 1 - stages.index(action.stage)
        if held < cap - reserve:
            return action
    weights = sorted((a for a in ready if a.kind is Kind.W), key=lambda a: (a.mb, a.stage))
    return weights[0] if weights else None
