"""Lowering: turn a compute table into the table the runtime executes, with every message in it.

This module is dynapipe's one communication policy; the validator proves its output, the executor runs
it action by action, and the timeline records it. For every stage-graph edge ``producer -> consumer``
whose ends sit on different ranks:

* after ``F`` of the producer, its rank sends the activation: ``pSEND_Fk->c``; the consumer's rank
  posts the receive ``cRECV_Fk<-p`` ahead of the ``F`` that needs it, and that ``F`` waits for it;
* after ``B``/``I`` of the consumer, its rank sends the input-gradient back: ``cSEND_Bk->p``; the
  producer's rank posts ``pRECV_Bk<-c`` ahead of its own ``B``/``I``.

Posting a receive is non-blocking (the message lands in its buffer while the rank computes); waiting is
the compute action's. Where receives go depends on the transport:

* gloo matches a send to its receive by tag whenever both are posted. The runtime posts every receive
  of the step when it starts (``receive_ahead=None``): a message that finds its receive posted skips a
  round trip. (``receive_ahead=k`` posts each ``k`` compute actions before the one that waits.)
* NCCL (``in_issue_order=True``) matches the sends and receives between two ranks in the order they are
  issued, whatever their tags, and runs a rank's groups of them one after another. Every message gets a
  place in one global order (the order a replay of the compute table sends them in), and every rank
  issues its sends and receives in that order: a receive goes in as late as it can, but before the action
  that needs it and before any send that comes after it in the global order. Two ranks then see their
  common messages in the same order, and the runtime issues the sends and receives between two compute
  actions as one group.

Sends leave right after the action that produced them. Several of either are ordered by peer stage, so
every rank derives the same table. Edges within one rank need nothing: the tensors stay in memory.

With data parallelism, ``sREDUCEk`` before the last weight-gradient work of stage ``s`` (``sBk`` or
``sWk``) marks where DDP's bucket all-reduces are armed: they start from autograd hooks inside that action.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .actions import Action, Kind, Table, normalize_table
from .placement import Placement, StageGraph, placement_map
from .placement import stage_graph as _chain_plus
from .replay import replay

__all__ = ["comm_after", "comm_before", "last_weight_work", "lower", "message_of"]


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


def message_of(action: Action) -> tuple[str, int, int, int]:
    """(direction, source stage, destination stage, mb): the key a send and its receive share."""
    assert action.peer is not None  # a communication action (Action checks it has a peer)
    if action.kind in (Kind.SEND_F, Kind.SEND_B):
        return action.kind.value[-1], action.stage, action.peer, action.mb
    return action.kind.value[-1], action.peer, action.stage, action.mb


def last_weight_work(table: Table) -> dict[int, Action]:
    """Each stage's last action that accumulates weight gradients (``B`` or ``W``), as the table orders them."""
    last: dict[int, Action] = {}
    for actions in table.values():
        for action in actions:
            if action is not None and action.kind in (Kind.B, Kind.W):
                last[action.stage] = action
    return last


def lower(
    table: Mapping[int, Sequence[Action | str | None]],
    n_ranks: int,
    n_stages: int,
    placement: Placement,
    edges: Iterable[tuple[int, int]] | None = None,
    *,
    stage_graph: StageGraph | None = None,
    reduce_stages: Iterable[int] = (),
    receive_ahead: int | None = 1,
    in_issue_order: bool = False,
) -> Table:
    """A copy of compute-only ``table`` with SEND/RECV actions inserted (idle slots are kept), and a REDUCE
    before the last weight-gradient work of every stage in ``reduce_stages`` (data parallelism). A table
    that has its own sends and receives already (a schedule loaded from torch's CSV) keeps them as written
    and only gets the REDUCEs. A receive
    is posted ``receive_ahead`` compute actions before the one that waits for it (0: right before it;
    None: every receive of the step at its start); with ``in_issue_order`` (NCCL) in the global order of
    the module docstring instead. Nothing is checked here: :func:`~dynapipe.schedules.validate` proves
    the result.

    The stage graph is ``stage_graph`` if given (the runtime passes the real stage DAG), else the chain
    ``s -> s+1`` plus ``edges``.
    """
    table = normalize_table(table)
    graph = stage_graph if stage_graph is not None else _chain_plus(n_stages, edges)
    rank_of = placement_map(placement, n_ranks=n_ranks, n_stages=n_stages)
    if any(a is not None and a.kind.is_p2p for actions in table.values() for a in actions):
        return _mark_reductions(table, reduce_stages)
    order = _send_order(table, graph, rank_of) if in_issue_order else None
    if order is not None:
        lowered = {r: _in_send_order(actions, order, graph, rank_of) for r, actions in table.items()}
    else:  # gloo, or a table that cannot run at all (validate() names the cycle)
        lowered = {r: _posted_ahead(actions, receive_ahead, graph, rank_of) for r, actions in table.items()}
    return _mark_reductions(lowered, reduce_stages)


def _posted_ahead(
    actions: list[Action | None], receive_ahead: int | None, graph: StageGraph, rank_of: dict[int, int]
) -> list[Action | None]:
    """One rank's lowered list with each receive ``receive_ahead`` compute actions early (None: at the start)."""
    posts: dict[int, list[Action]] = {}  # compute index -> receives posted right before it
    for k, compute in enumerate(a for a in actions if a is not None):
        at = 0 if receive_ahead is None else max(k - receive_ahead, 0)
        posts.setdefault(at, []).extend(comm_before(compute, graph, rank_of))
    out: list[Action | None] = []
    k = 0
    for action in actions:
        if action is None:
            out.append(None)
            continue
        out += [*posts.get(k, []), action, *comm_after(action, graph, rank_of)]
        k += 1
    return out


def _send_order(table: Table, graph: StageGraph, rank_of: dict[int, int]) -> dict[tuple, int] | None:
    """Each message's place in the order a replay of the compute table sends them (every rank runs its
    actions in turn, as far as the messages sent so far allow); None if the replay gets stuck."""
    order: dict[tuple, int] = {}

    def advance(rank: int, action: Action) -> bool:
        if any(message_of(r) not in order for r in comm_before(action, graph, rank_of)):
            return False
        for send in comm_after(action, graph, rank_of):
            order[message_of(send)] = len(order)
        return True

    compute = {r: [a for a in acts if a is not None] for r, acts in table.items()}
    return None if replay(compute, advance) else order


def _in_send_order(
    actions: list[Action | None], order: dict[tuple, int], graph: StageGraph, rank_of: dict[int, int]
) -> list[Action | None]:
    """One rank's lowered list whose sends and receives follow the global ``order`` (module docstring)."""
    receives = sorted(
        (r for a in actions if a is not None for r in comm_before(a, graph, rank_of)),
        key=lambda r: order[message_of(r)],
    )
    out: list[Action | None] = []
    k = 0  # receives[:k] are in out

    def receive_until(place: float) -> None:
        nonlocal k
        while k < len(receives) and order[message_of(receives[k])] <= place:
            out.append(receives[k])
            k += 1

    for action in actions:
        if action is None:
            out.append(None)
            continue
        receive_until(max((order[message_of(r)] for r in comm_before(action, graph, rank_of)), default=-1))
        out.append(action)
        sends = comm_after(action, graph, rank_of)
        if sends:
            receive_until(order[message_of(sends[0])] - 0.5)
        out += sends
    return out


def _mark_reductions(table: Table, stages: Iterable[int]) -> Table:
    """``table`` with ``sREDUCEk`` right before the last weight-gradient work ``sBk``/``sWk`` of every stage
    in ``stages`` (a table that places its own REDUCEs keeps them as written)."""
    if any(a is not None and a.kind is Kind.REDUCE for actions in table.values() for a in actions):
        return table
    before = {a for s, a in last_weight_work(table).items() if s in set(stages)}
    if not before:
        return table
    return {
        rank: [
            item
            for a in actions
            for item in ([Action(a.stage, Kind.REDUCE, a.mb), a] if a in before else [a])
        ]
        for rank, actions in table.items()
    }
