"""Lowering: add the point-to-point communication that a compute table implies.

For every stage-graph edge ``producer -> consumer`` whose ends sit on different ranks:

* after ``F`` of the producer, its rank sends the activation: ``pSEND_Fk->c``; the consumer's rank
  receives it just before the ``F`` that needs it: ``cRECV_Fk<-p``;
* after ``B``/``I`` of the consumer, its rank sends the input-gradient back: ``cSEND_Bk->p``; the
  producer's rank receives it just before its own ``B``/``I``: ``pRECV_Bk<-c``.

Receives sit as late as possible (so a blocking receive never holds up unrelated work) and sends as
early as possible; several of either are ordered by peer stage, so every rank derives the same table.
Edges within one rank need nothing: the tensors stay in memory.
"""

from __future__ import annotations

from collections.abc import Iterable

from .actions import Action, Kind, ScheduleError, Table
from .placement import Placement, StageGraph, placement_map
from .placement import stage_graph as _chain_plus

__all__ = ["comm_after", "comm_before", "lower"]


def comm_before(action: Action, graph: StageGraph, rank_of: dict[int, int]) -> list[Action]:
    """The receives ``action`` needs on its rank, in peer-stage order."""
    stage, mb = action.stage, action.mb
    if action.kind is Kind.F:
        return [
            Action(stage, Kind.RECV_F, mb, p) for p in graph.producers[stage] if rank_of[p] != rank_of[stage]
        ]
    if action.kind.is_backward:
        return [
            Action(stage, Kind.RECV_B, mb, c) for c in graph.consumers[stage] if rank_of[c] != rank_of[stage]
        ]
    return []


def comm_after(action: Action, graph: StageGraph, rank_of: dict[int, int]) -> list[Action]:
    """The sends that publish ``action``'s result to other ranks, in peer-stage order."""
    stage, mb = action.stage, action.mb
    if action.kind is Kind.F:
        return [
            Action(stage, Kind.SEND_F, mb, c) for c in graph.consumers[stage] if rank_of[c] != rank_of[stage]
        ]
    if action.kind.is_backward:
        return [
            Action(stage, Kind.SEND_B, mb, p) for p in graph.producers[stage] if rank_of[p] != rank_of[stage]
        ]
    return []


def lower(
    table: Table,
    n_ranks: int,
    n_stages: int,
    placement: Placement,
    stage_graph: StageGraph | None = None,
    *,
    edges: Iterable[tuple[int, int]] | None = None,
) -> Table:
    """A copy of compute-only ``table`` with SEND/RECV actions inserted (idle slots are kept).

    The stage graph is ``stage_graph`` if given (the runtime passes the real stage DAG), else the chain
    ``s -> s+1`` plus ``edges``.
    """
    graph = stage_graph if stage_graph is not None else _chain_plus(n_stages, edges)
    rank_of = placement_map(placement, n_ranks=n_ranks, n_stages=n_stages)
    lowered: Table = {}
    for rank, actions in sorted(table.items()):
        out: list[Action | None] = []
        for action in actions:
            if action is not None and not action.kind.is_compute:
                raise ScheduleError(
                    f"{action} on rank {rank}: the table is already lowered; pass the compute-only table"
                )
            if action is None:
                out.append(None)
                continue
            out += [*comm_before(action, graph, rank_of), action, *comm_after(action, graph, rank_of)]
        lowered[rank] = out
    return lowered
