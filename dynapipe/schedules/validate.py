"""Prove a lowered schedule complete and deadlock-free before anything runs; it is checked as given,
never changed (:func:`~dynapipe.schedules.lower` makes it).

Checks, in order, each stopping at the first offence and naming the action and its rank:

1. every rank ``0..n_ranks-1`` has a list, and every action names a real stage, microbatch and peer;
2. every action sits on the rank that holds its stage, and runs once;
3. same-rank order: F after its producers' F, B/I after its own F and its consumers' B/I, W after its I;
4. completeness: each (stage, microbatch) has one F and one B, or one I and one W (F only when
   ``forward_only``); a REDUCE, if any, sits right before its stage's last weight-gradient work;
5. the table is lowered (it has sends and receives wherever a stage feeds one on another rank);
6. deadlock freedom: replay the table as the runtime runs it (:mod:`.replay`). Over gloo (tags match a send to
   its receive whenever both are posted) a receive is posted where the table says and waited for by the
   compute action that needs it, and sends never block. With ``in_issue_order`` (NCCL) the sends and
   receives between two compute actions are one group on the rank's communication stream, which runs
   its groups one after another; a pair of ranks matches its sends and receives in the order issued,
   whatever their tags, so each rank must receive from a peer in the order that peer sends; a group ends
   once every peer has reached the group holding the other side of each of its operations, a compute
   action starts once the groups with its receives have ended, and a group once the compute actions
   before it have. If no rank can move, report where each waits.

Dependencies between ranks are only checked by the replay: a rank that runs an action "too early"
simply waits, and the wait is harmless unless it closes a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .actions import Action, Kind, ScheduleError, Table, normalize_table
from .lowering import comm_before, last_weight_work, message_of
from .placement import Placement, StageGraph, backward_kinds, inputs_of, placement_map
from .placement import stage_graph as _chain_plus
from .replay import replay

__all__ = ["ScheduleError", "validate"]

_SENDS = (Kind.SEND_F, Kind.SEND_B)


def validate(
    lowered: Mapping[int, Sequence[Action | str | None]],
    n_ranks: int,
    n_stages: int,
    n_microbatches: int,
    placement: Placement,
    edges: Iterable[tuple[int, int]] | None = None,
    *,
    stage_graph: StageGraph | None = None,
    forward_only: bool = False,
    in_issue_order: bool = False,
) -> None:
    """Raise :class:`ScheduleError` unless ``lowered`` runs to completion as written.

    ``lowered`` is what the runtime executes: the output of :func:`~dynapipe.schedules.lower` or a
    hand-lowered table (its sends, receives and REDUCEs are replayed as they stand). A table whose
    stages talk across ranks but that has no sends or receives is refused: ``lower()`` it first.
    ``forward_only`` accepts inference tables, which have no backward. ``in_issue_order`` replays it as
    NCCL runs it (see the module docstring) rather than as gloo does.
    """
    table = normalize_table(lowered)
    graph = stage_graph if stage_graph is not None else _chain_plus(n_stages, edges)
    rank_of = placement_map(placement, n_ranks=n_ranks, n_stages=n_stages)
    where = f"placement {placement!r}" if isinstance(placement, str) else "the given placement"
    _check_ranks(table, n_ranks)
    _check_actions(table, n_stages, n_microbatches, graph, rank_of, where, forward_only)
    compute = {r: [a for a in acts if a is not None and a.kind.is_compute] for r, acts in table.items()}
    _check_local_order(compute, graph, rank_of)
    _check_complete(compute, n_stages, n_microbatches, rank_of, forward_only)
    _check_lowered(table, graph, rank_of)
    _check_reduce(table)
    _replay(table, graph, rank_of, backward_kinds(table))
    if in_issue_order:
        _check_issue_order(table, rank_of)
        _replay_in_issue_order(table, graph, rank_of)


def _check_ranks(table: Table, n_ranks: int) -> None:
    missing = [r for r in range(n_ranks) if r not in table]
    extra = [r for r in table if not 0 <= r < n_ranks]
    if missing or extra:
        fix = " and ".join(
            f"{verb} ranks {ranks}" for verb, ranks in (("add", missing), ("remove", extra)) if ranks
        )
        raise ScheduleError(f"schedule has lists for ranks {sorted(table)} but n_ranks is {n_ranks}: {fix}")


def _check_lowered(table: Table, graph: StageGraph, rank_of: dict[int, int]) -> None:
    """A compute-only table whose stages exchange tensors across ranks cannot run: it was not lowered."""
    if any(a is not None and a.kind.is_p2p for acts in table.values() for a in acts):
        return
    crossing = [(p, c) for c in range(graph.n_stages) for p in graph.producers[c] if rank_of[p] != rank_of[c]]
    if crossing:
        p, c = crossing[0]
        raise ScheduleError(
            f"the table has no sends or receives, but stage {p} (rank {rank_of[p]}) feeds stage {c} "
            f"(rank {rank_of[c]}); validate the table lower() returns for it, not the compute-only one"
        )


def _check_actions(table, n_stages, n_mb, graph, rank_of, where, forward_only) -> None:
    seen: dict[Action, int] = {}
    for rank, actions in table.items():
        for action in actions:
            if action is None:
                continue
            at = f"{action} on rank {rank}"
            if not 0 <= action.stage < n_stages:
                raise ScheduleError(
                    f"{at}: stage {action.stage} is outside 0..{n_stages - 1} (n_stages={n_stages})"
                )
            if not 0 <= action.mb < n_mb:
                raise ScheduleError(
                    f"{at}: microbatch {action.mb} is outside 0..{n_mb - 1} (n_microbatches={n_mb})"
                )
            owner = rank_of[action.stage]
            if owner != rank:
                raise ScheduleError(
                    f"{at}: stage {action.stage} lives on rank {owner} under {where}; "
                    f"move {action} to rank {owner}'s list"
                )
            backward = (Kind.B, Kind.I, Kind.W, Kind.SEND_B, Kind.RECV_B, Kind.REDUCE)
            if forward_only and action.kind in backward:
                raise ScheduleError(f"{at}: a forward-only schedule has no backward actions; remove it")
            if action.kind.is_p2p:
                outgoing = action.kind in (Kind.SEND_F, Kind.RECV_B)
                neighbours = graph.consumers[action.stage] if outgoing else graph.producers[action.stage]
                if action.peer not in neighbours or rank_of[action.peer] == rank:
                    raise ScheduleError(
                        f"{at}: stage {action.peer} is not a stage-graph neighbour of stage {action.stage} on "
                        f"another rank (neighbours: {list(neighbours)}); fix the peer or let lower() add comms"
                    )
            if action in seen:
                raise ScheduleError(f"{at} appears twice; run each action once")
            seen[action] = rank
            if action.kind in (Kind.B, Kind.I, Kind.W):
                clash = [Action(action.stage, k, action.mb) for k in (Kind.B, Kind.I, Kind.W)]
                clash = [a for a in clash if a in seen and (a.kind is Kind.B) != (action.kind is Kind.B)]
                if clash:
                    raise ScheduleError(
                        f"{at}: microbatch {action.mb} of stage {action.stage} already has {clash[0]}; "
                        "use either B or both I and W, not both forms"
                    )


def _check_local_order(compute: dict[int, list[Action]], graph: StageGraph, rank_of: dict[int, int]) -> None:
    everywhere = {a for acts in compute.values() for a in acts}
    kinds = backward_kinds(compute)
    for rank, actions in compute.items():
        done: set[Action] = set()
        for action in actions:
            for need in inputs_of(action, graph, kinds):
                if rank_of[need.stage] != rank or need in done or need not in everywhere:
                    continue  # other ranks: the replay decides; absent: the completeness check says so
                if need.stage == action.stage:
                    why = f"its own {need}"
                elif action.kind is Kind.F:
                    why = f"{need}, the forward of its producer stage {need.stage}"
                else:
                    why = f"{need}, the backward of its consumer stage {need.stage}"
                raise ScheduleError(f"{action} on rank {rank} runs before {why}; move it after {need}")
            done.add(action)


def _check_complete(compute: dict[int, list[Action]], n_stages, n_mb, rank_of, forward_only) -> None:
    present = {a for acts in compute.values() for a in acts}
    for stage in range(n_stages):
        rank = rank_of[stage]
        for mb in range(n_mb):
            f, b, i, w = (Action(stage, kind, mb) for kind in (Kind.F, Kind.B, Kind.I, Kind.W))
            if f not in present:
                raise ScheduleError(
                    f"stage {stage} has no forward of microbatch {mb}: add {f} to rank {rank}'s list"
                )
            if forward_only or b in present or (i in present and w in present):
                continue
            if i in present:
                raise ScheduleError(f"{i} on rank {rank} has no {w}: add {w} after it")
            if w in present:
                raise ScheduleError(f"{w} on rank {rank} has no {i}: add {i} before it")
            raise ScheduleError(f"{f} on rank {rank} has no backward: add {b} (or {i} and {w}) after it")


def _check_reduce(lowered: Table) -> None:
    """A REDUCE arms DDP for the one autograd call that finishes its stage's gradients: it must come
    right before (among its stage's actions) that stage's last weight-gradient work, and only once."""
    last = last_weight_work(lowered)
    for rank, actions in lowered.items():
        for i, action in enumerate(actions):
            if action is None or action.kind is not Kind.REDUCE:
                continue
            after = next(
                (
                    a
                    for a in actions[i + 1 :]
                    if a is not None and a.stage == action.stage and a.kind.is_compute
                ),
                None,
            )
            want = last.get(action.stage)
            if after is None or after != want or want.mb != action.mb:
                raise ScheduleError(
                    f"{action} on rank {rank} must come right before stage {action.stage}'s last "
                    f"weight-gradient work ({want if want is not None else 'none in this table'}), which "
                    "finishes its gradients; move it there"
                )


def _replay(lowered: Table, graph: StageGraph, rank_of: dict[int, int], kinds) -> None:
    """Run every rank until all finish or none can move: a compute action waits for the messages it
    needs, whose receives must be posted before it; sends never block."""
    sent: set[tuple] = set()
    posted: dict[int, set[tuple]] = {r: set() for r in lowered}
    done: set[Action] = set()

    def advance(rank: int, action: Action | None) -> bool:
        if action is None or action.kind is Kind.REDUCE:
            return True
        if action.kind in _SENDS:
            kind = Kind.F if action.kind is Kind.SEND_F else kinds.get((action.stage, action.mb), Kind.B)
            source = Action(action.stage, kind, action.mb)
            if source not in done:
                raise ScheduleError(f"{action} on rank {rank} sends before {source} has run; move it after")
            sent.add(message_of(action))
            return True
        if action.kind.is_p2p:
            posted[rank].add(message_of(action))
            return True
        receives = comm_before(action, graph, rank_of)
        for recv in receives:
            if message_of(recv) not in posted[rank]:
                raise ScheduleError(f"{action} on rank {rank} needs {recv} before it; add it or use lower()")
        if not all(message_of(recv) in sent for recv in receives):
            return False  # a message not sent yet: this rank waits
        done.add(action)
        return True

    stuck = replay(lowered, advance)
    if stuck:
        raise ScheduleError(_deadlock_report(lowered, stuck, rank_of, kinds, graph, sent))


def _deadlock_report(
    lowered: Table, stuck: dict[int, int], rank_of: dict[int, int], kinds, graph: StageGraph, sent: set
) -> str:
    def waiting(rank: int) -> tuple[Action, Action, Action, int]:
        """(the receive not yet satisfied, the action that sends it, the action waiting, its sender)."""
        needed_by = lowered[rank][stuck[rank]]
        assert needed_by is not None and needed_by.kind.is_compute  # the replay stops only at computes
        recv = next(r for r in comm_before(needed_by, graph, rank_of) if message_of(r) not in sent)
        assert recv.peer is not None
        kind = Kind.F if recv.kind is Kind.RECV_F else kinds.get((recv.peer, recv.mb), Kind.B)
        return recv, Action(recv.peer, kind, recv.mb), needed_by, rank_of[recv.peer]

    def line(rank: int) -> str:
        recv, source, needed_by, sender = waiting(rank)
        return f"{needed_by} on rank {rank} waits at {recv} for {source} from rank {sender}"

    start = min(stuck)
    chain = [start]
    while True:
        sender = waiting(chain[-1])[3]
        if sender not in stuck:
            recv, source = waiting(chain[-1])[:2]
            send = Action(
                source.stage, Kind.SEND_F if recv.kind is Kind.RECV_F else Kind.SEND_B, recv.mb, recv.stage
            )
            steps = "; ".join(line(r) for r in chain)
            return (
                f"deadlock: {steps}, but rank {sender} finished without sending it; add {send} after {source}"
            )
        if sender in chain:
            cycle = chain[chain.index(sender) :]
            steps = "; ".join(line(r) for r in cycle)
            return (
                f"deadlock: {steps} -- a cycle of ranks {cycle + [sender]}; reorder so that on some rank "
                "the awaited action comes before the wait"
            )
        chain.append(sender)


def _check_issue_order(lowered: Table, rank_of: dict[int, int]) -> None:
    """Between two ranks NCCL hands the k-th send to the k-th receive: each rank must receive from a
    peer in exactly the order that peer sends to it."""
    sends: dict[tuple[int, int], list[Action]] = {}
    receives: dict[tuple[int, int], list[Action]] = {}
    for rank, actions in lowered.items():
        for a in actions:
            if a is not None and a.kind.is_p2p:
                assert a.peer is not None  # a communication action names its peer
                sending = a.kind in (Kind.SEND_F, Kind.SEND_B)
                pair = (rank, rank_of[a.peer]) if sending else (rank_of[a.peer], rank)
                (sends if sending else receives).setdefault(pair, []).append(a)
    for (src, dst), sent in sorted(sends.items()):
        got = receives.get((src, dst), [])
        for k, (send, recv) in enumerate(
            zip(sent, got, strict=True)
        ):  # the replay above matched every message
            if message_of(send) != message_of(recv):
                raise ScheduleError(
                    f"over NCCL, rank {src}'s send #{k + 1} to rank {dst} is {send}, but rank {dst}'s receive "
                    f"#{k + 1} from rank {src} is {recv}: NCCL matches them in the order issued, so {recv} "
                    f"would get {send}'s tensor; post rank {dst}'s receives from rank {src} in the order "
                    "they are sent"
                )


def _streams(
    lowered: Table,
) -> tuple[dict[int, list[Action]], dict[int, list[tuple[int, tuple[Action, ...]]]]]:
    """Per rank, its compute actions and its groups as the runtime issues them: the sends and receives
    between two compute actions (or a REDUCE), each with the number of compute actions before it."""
    computes: dict[int, list[Action]] = {}
    groups: dict[int, list[tuple[int, tuple[Action, ...]]]] = {}
    for rank, actions in lowered.items():
        computes[rank], groups[rank] = [], []
        held: list[Action] = []
        for a in [*actions, None]:
            if a is not None and a.kind.is_p2p:
                held.append(a)
                continue
            if held and (a is None or a.kind is Kind.REDUCE or a.kind.is_compute):
                groups[rank].append((len(computes[rank]), tuple(held)))
                held = []
            if a is not None and a.kind.is_compute:
                computes[rank].append(a)
    return computes, groups


def _replay_in_issue_order(lowered: Table, graph: StageGraph, rank_of: dict[int, int]) -> None:
    """Replay ``lowered`` on NCCL's two streams per rank, each a lane of the one replay loop: compute
    actions in order on one; on the other, each group starts once the compute actions before it are done
    and ends once the group with the other side of each of its operations has started."""
    computes, groups = _streams(lowered)
    group_of = {  # (side, message) -> (rank, index of its group)
        ("send" if a.kind in _SENDS else "recv", message_of(a)): (rank, k)
        for rank, its in groups.items()
        for k, (_, group) in enumerate(its)
        for a in group
    }
    done = dict.fromkeys(computes, 0)  # per rank: compute actions finished
    started: set[tuple[int, int]] = set()  # (rank, group index)
    ended: set[tuple[int, int]] = set()
    lanes: dict[tuple[int, int], list] = {}
    for rank in lowered:
        lanes[rank, 0] = computes[rank]
        lanes[rank, 1] = [(step, k) for k in range(len(groups[rank])) for step in ("start", "end")]

    def advance(lane: tuple[int, int], item) -> bool:
        rank, stream = lane
        if stream == 0:
            needs = [group_of.get(("recv", message_of(r))) for r in comm_before(item, graph, rank_of)]
            ready = all(n in ended for n in needs)
            done[rank] += ready
            return ready
        step, k = item
        before, group = groups[rank][k]
        if step == "start":
            ready = done[rank] >= before
        else:
            other_side = (("recv" if a.kind in _SENDS else "send", message_of(a)) for a in group)
            ready = all(group_of.get(side) in started for side in other_side)
        if ready:
            (started if step == "start" else ended).add((rank, k))
        return ready

    stuck = replay(lanes, advance)
    lines = []
    for (rank, stream), at in sorted(stuck.items()):
        if stream == 0:
            lines.append(f"rank {rank} waits to compute {computes[rank][at]}")
        else:
            group = groups[rank][lanes[rank, 1][at][1]][1]
            lines.append(f"rank {rank}'s sends and receives wait at [{' '.join(map(str, group))}]")
    if lines:
        raise ScheduleError(
            "deadlock over NCCL (one group of sends and receives at a time per rank, each matched in the "
            f"order issued): {'; '.join(lines)}. Post each receive right before the action that needs it "
            "(lower(..., receive_ahead=0))"
        )
