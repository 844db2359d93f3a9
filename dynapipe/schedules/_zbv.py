"""ZB-V's order: the V construction of Qi et al., or a list schedule where that is faster.

The V construction (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"; the same
order as torch.distributed.pipelining's ``ScheduleZBVZeroBubble``) runs each rank in five phases. With
``d`` = the rank's chunk on the way down (stage ``r``) and ``u`` = its chunk on the way up (stage
``2p-1-r``):

1. ``2(p-r) - 1`` forwards of ``d``: the first microbatches fill the way down;
2. ``r`` pairs ``F(u) F(d)``: the first microbatch turns at rank ``p-1`` and comes back up;
3. ``p-r`` triples ``F(u) I(u) W(u)``: the loss end starts its backward;
4. the steady state, ``F(d) I(d) W(d) F(u) I(u) W(u)`` until every forward ran;
5. the drain: ``r`` pairs ``I(d) I(u)``, ``p-r`` pairs ``I(d) W(d)``, then the weight gradients left.

Each rank holds at most ``2p`` chunk activations, and with F = I = W the bubble is nearly zero once
``m >= 2p - 1``. Its slack also absorbs link latency well (a W sits between every I and the next F). With
fewer microbatches the V runs as if it had ``2p - 1`` and idles in their place; the list schedule of
:mod:`._greedy` then does better, so :func:`zbv_order` tries both and keeps the list schedule only where
the simulator finds it no slower in every one of :data:`SCENARIOS`.
"""

from __future__ import annotations

from ._greedy import list_schedule
from .actions import Action, Kind, Table
from .placement import placement_map, stage_graph
from .simulate import StageCost, simulate

__all__ = ["SCENARIOS", "v_shape", "zbv_order"]

SCENARIOS: tuple[tuple[float, float], ...] = tuple(
    (latency, first_input_grad) for latency in (0.0, 0.1, 0.3) for first_input_grad in (1.0, 0.0)
)
"""(link latency, I of stage 0), in units of one chunk's F (= I = W): a free link and hops of a tenth and
of a third of a forward; stage 0's input gradient as dear as the others', or free (token embeddings,
whose input needs no gradient)."""


def v_shape(n_ranks: int, n_microbatches: int) -> Table:
    """The V construction described in the module docstring, for ``2 * n_ranks`` stages."""
    p, m = n_ranks, n_microbatches
    virtual = max(m, 2 * p - 1)  # the V needs this many to fill; actions of the others are dropped
    table: Table = {}
    for r in range(p):
        down, up = r, 2 * p - 1 - r
        done = {(s, k): 0 for s in (down, up) for k in (Kind.F, Kind.I, Kind.W)}
        ops: list[Action] = []

        def run(*steps: tuple[int, Kind]) -> None:
            for stage, kind in steps:
                ops.append(Action(stage, kind, done[stage, kind]))
                done[stage, kind] += 1

        run(*[(down, Kind.F)] * (2 * (p - r) - 1))
        run(*[(up, Kind.F), (down, Kind.F)] * r)
        run(*[(up, Kind.F), (up, Kind.I), (up, Kind.W)] * (p - r))
        while done[down, Kind.F] < virtual or done[up, Kind.F] < done[down, Kind.F]:
            if done[down, Kind.F] < virtual:
                run((down, Kind.F))
            run((down, Kind.I), (down, Kind.W), (up, Kind.F), (up, Kind.I), (up, Kind.W))
        run(*[(down, Kind.I), (up, Kind.I)] * r)
        run(*[(down, Kind.I), (down, Kind.W)] * (p - r))
        run(*[(up, Kind.W)] * (done[up, Kind.I] - done[up, Kind.W]))
        run(*[(down, Kind.W)] * (done[down, Kind.I] - done[down, Kind.W]))
        table[r] = [a for a in ops if a.mb < m]
    return table


def _makespans(table: Table, n_ranks: int) -> list[float]:
    n = 2 * n_ranks
    return [
        simulate(
            table,
            [StageCost(1.0, first_input_grad if s == 0 else 1.0, 1.0) for s in range(n)],
            n_ranks=n_ranks,
            n_stages=n,
            placement="v",
            link_latency=latency,
        ).makespan
        for latency, first_input_grad in SCENARIOS
    ]


def zbv_order(n_ranks: int, n_microbatches: int) -> Table:
    """The V; for ``m < 2p``, the list schedule instead where it is no slower in every scenario."""
    v = v_shape(n_ranks, n_microbatches)
    if n_microbatches >= 2 * n_ranks:
        return v
    greedy = list_schedule(
        n_ranks=n_ranks,
        n_microbatches=n_microbatches,
        rank_of=placement_map("v", n_ranks=n_ranks, n_stages=2 * n_ranks),
        graph=stage_graph(2 * n_ranks),
        cap=2 * n_ranks,
    )
    pairs = list(zip(_makespans(greedy, n_ranks), _makespans(v, n_ranks), strict=True))
    no_slower = all(g <= b + 1e-9 for g, b in pairs)
    return greedy if no_slower and sum(g for g, _ in pairs) < sum(b for _, b in pairs) else v
