"""Prove a schedule complete and deadlock-free before anything runs.

Checks, in order, each stopping at the first offence and naming the action and its rank:

1. every rank ``0..n_ranks-1`` has a list, and every action names a real stage, microbatch and peer;
2. every action sits on the rank that holds its stage, and runs once;
3. same-rank order: F after its producers' F, B/I after its own F and its consumers' B/I, W after its I;
4. completeness: each (stage, microbatch) has one F and one B, or one I and one W (F only when
   ``forward_only``); a REDUCE, if any, sits right before its stage's last weight-gradient work;
5. deadlock freedom: replay the lowered table as the runtime runs it. Over gloo (tags match a send to
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
from .lowering import comm_before, last_weight_work, lower, mark_reductions, message_of
from .placement import Placement, StageGraph, backward_kinds, inputs_of, placement_map
from .placement import stage_graph as _chain_plus

__all__ = ["ScheduleError", "validate"]


def validate(
    table: Mapping[int, Sequence[Action | str | None]],
    n_ranks: int,
    n_stages: int,
    n_microbatches: int,
    placement: Placement,
    edges: Iterable[tuple[int, int]] | None = None,
    *,
    stage_graph: StageGraph | None = None,
    forward_only: bool = False,
    reduce_stages: Iterable[int] = (),
    receive_ahead: int | None = 1,
    in_issue_order: bool = False,
) -> Table:
    """Raise :class:`ScheduleError` unless ``table`` runs to completion; return its lowered form, the
    table the runtime executes.

    ``table`` may be compute-only (it is lowered here, with a REDUCE for each of ``reduce_stages`` and
    receives posted ``receive_ahead`` compute actions early: see :func:`~dynapipe.schedules.lower`) or
    already lowered (its own sends, receives and REDUCEs are replayed as written). ``forward_only``
    accepts inference tables, which have no backward. ``in_issue_order`` replays it as NCCL runs it
    (see the module docstring) rather than as gloo does.
    """
    table = normalize_table(table)
    graph = stage_graph if stage_graph is not None else _chain_plus(n_stages, edges)
    rank_of = placement_map(placement, n_ranks=n_ranks, n_stages=n_stages)
    where = f"placement {placement!r}" if isinstance(placement, str) else "the given placement"

    missing = [r for r in range(n_ranks) if r not in table]
    extra = [r for r in table if not 0 <= r < n_ranks]
    if missing or extra:
        fix = " and ".join(
            f"{verb} ranks {ranks}" for verb, ranks in (("add", missing), ("remove", extra)) if ranks
        )
        raise ScheduleError(f"schedule has lists for ranks {sorted(table)} but n_ranks is {n_ranks}: {fix}")

    _check_actions(table, n_stages, n_microbatches, graph, rank_of, where, forward_only)
    compute = {r: [a for a in acts if a is not None and a.kind.is_compute] for r, acts in table.items()}
    _check_local_order(compute, graph, rank_of)
    _check_complete(compute, n_stages, n_microbatches, rank_of, forward_only)

    lowered_given = any(a is not None and not a.kind.is_compute for acts in table.values() for a in acts)
    if lowered_given:
        lowered = mark_reductions(table, reduce_stages)
    else:
        lowered = lower(
            table,
            n_ranks,
            n_stages,
            rank_of,
            graph,
            reduce_stages=reduce_stages,
            receive_ahead=receive_ahead,
            in_issue_order=in_issue_order,
        )
    _check_reduce(lowered)
    _replay(lowered, graph, rank_of, backward_kinds(table))
    if in_issue_order:
        _check_issue_order(lowered, rank_of)
        _replay_in_issue_order(lowered, graph, rank_of)
    return lowered


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
    pos = dict.fromkeys(lowered, 0)
    sent: set[tuple] = set()
    posted: dict[int, set[tuple]] = {r: set() for r in lowered}
    done: set[Action] = set()
    moved = True
    while moved:
        moved = False
        for rank, actions in lowered.items():
            while pos[rank] < len(actions):
                action = actions[pos[rank]]
                if action is None or action.kind is Kind.REDUCE:
                    pass
                elif action.kind.is_compute:
                    needs = [message_of(recv) for recv in comm_before(action, graph, rank_of)]
                    for recv, message in zip(comm_before(action, graph, rank_of), needs, strict=True):
                        if message not in posted[rank]:
                            raise ScheduleError(
                                f"{action} on rank {rank} needs {recv} before it; add it or use lower()"
                            )
                    if not all(message in sent for message in needs):
                        break  # a message not sent yet: this rank waits
                    done.add(action)
                elif action.kind in (Kind.SEND_F, Kind.SEND_B):
                    kind = (
                        Kind.F if action.kind is Kind.SEND_F else kinds.get((action.stage, action.mb), Kind.B)
                    )
                    source = Action(action.stage, kind, action.mb)
                    if source not in done:
                        raise ScheduleError(
                            f"{action} on rank {rank} sends before {source} has run; move it after"
                        )
                    sent.add(message_of(action))
                else:
                    posted[rank].add(message_of(action))
                pos[rank] += 1
                moved = True
    if all(pos[r] == len(acts) for r, acts in lowered.items()):
        return
    raise ScheduleError(_deadlock_report(lowered, pos, rank_of, kinds, graph, sent))


def _deadlock_report(
    lowered: Table, pos: dict[int, int], rank_of: dict[int, int], kinds, graph: StageGraph, sent: set
) -> str:
    def waiting(rank: int) -> tuple[Action, Action, Action, int]:
        """(the receive not yet satisfied, the action that sends it, the action waiting, its sender)."""
        needed_by = lowered[rank][pos[rank]]
        assert needed_by is not None and needed_by.kind.is_compute  # the replay stops only at computes
        recv = next(r for r in comm_before(needed_by, graph, rank_of) if message_of(r) not in sent)
        assert recv.peer is not None
        kind = Kind.F if recv.kind is Kind.RECV_F else kinds.get((recv.peer, recv.mb), Kind.B)
        return recv, Action(recv.peer, kind, recv.mb), needed_by, rank_of[recv.peer]

    def line(rank: int) -> str:
        recv, source, needed_by, sender = waiting(rank)
        return f"{needed_by} on rank {rank} waits at {recv} for {source} from rank {sender}"

    start = min(r for r, acts in lowered.items() if pos[r] < len(acts))
    chain = [start]
    while True:
        sender = waiting(chain[-1])[3]
        if pos[sender] == len(lowered[sender]):
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


def _replay_in_issue_order(lowered: Table, graph: StageGraph, rank_of: dict[int, int]) -> None:
    """Replay ``lowered`` on NCCL's two streams per rank: compute actions in order on one, groups (the
    sends and receives between two compute actions, as the runtime issues them) in order on the other."""
    items: dict[int, list[Action | tuple[Action, ...]]] = {}  # per rank: compute actions and groups
    for rank, actions in lowered.items():
        out: list[Action | tuple[Action, ...]] = []
        held: list[Action] = []
        for a in [*actions, None]:
            if a is not None and a.kind.is_p2p:
                held.append(a)
                continue
            if held and (a is None or a.kind is Kind.REDUCE or a.kind.is_compute):
                out.append(tuple(held))  # the runtime issues a group at the next non-p2p action
                held = []
            if a is not None and a.kind.is_compute:
                out.append(a)
        items[rank] = out
    group_of: dict[tuple, tuple[int, int]] = {}  # (side, message) -> (rank, item index of its group)
    for rank, its in items.items():
        for k, item in enumerate(its):
            for a in item if isinstance(item, tuple) else ():
                sending = a.kind in (Kind.SEND_F, Kind.SEND_B)
                group_of[("send" if sending else "recv", message_of(a))] = (rank, k)
    compute_at = dict.fromkeys(items, 0)  # per rank: index of the next compute action (or past the end)
    group_at = dict.fromkeys(items, 0)  # per rank: index of the next group not yet ended
    started = dict.fromkeys(items, -1)  # per rank: the furthest group its stream has reached

    def skip(rank: int, pos: int, to_group: bool) -> int:
        its = items[rank]
        while pos < len(its) and isinstance(its[pos], tuple) != to_group:
            pos += 1
        return pos

    moved = True
    while moved:
        moved = False
        for rank, its in items.items():
            k = group_at[rank] = skip(rank, group_at[rank], True)
            compute_at[rank] = skip(rank, compute_at[rank], False)
            if k < len(its) and started[rank] < k and compute_at[rank] > k:  # computes before it are done
                started[rank], moved = k, True
            if k < len(its) and started[rank] == k:
                group = its[k]
                assert isinstance(group, tuple)
                others = [
                    group_of.get(("recv" if a.kind in (Kind.SEND_F, Kind.SEND_B) else "send", message_of(a)))
                    for a in group
                ]
                if all(o is not None and started[o[0]] >= o[1] for o in others):
                    group_at[rank], moved = k + 1, True
            c = compute_at[rank]
            if c < len(its):
                action = its[c]
                assert isinstance(action, Action)
                needs = [group_of.get(("recv", message_of(r))) for r in comm_before(action, graph, rank_of)]
                if all(n is not None and skip(n[0], group_at[n[0]], True) > n[1] for n in needs):
                    compute_at[rank], moved = c + 1, True
    lines = []
    for rank, its in sorted(items.items()):
        if compute_at[rank] < len(its):
            lines.append(f"rank {rank} waits to compute {its[compute_at[rank]]}")
        if group_at[rank] < len(its):
            group = its[group_at[rank]]
            assert isinstance(group, tuple)
            lines.append(f"rank {rank}'s sends and receives wait at [{' '.join(map(str, group))}]")
    if lines:
        raise ScheduleError(
            "deadlock over NCCL (one group of sends and receives at a time per rank, each matched in the "
            f"order issued): {'; '.join(lines)}. Post each receive right before the action that needs it "
            "(lower(..., receive_ahead=0))"
        )
