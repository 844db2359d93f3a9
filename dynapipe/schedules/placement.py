"""Which rank holds which stage, and which stage feeds which.

Two placement styles cover the builtin schedules:

* ``"loop"``: round-robin, rank ``r`` holds stages ``r, r+p, r+2p, ...`` (GPipe, 1F1B, interleaved 1F1B).
* ``"v"``: zig-zag, chunk ``c`` of every rank runs down the ranks when ``c`` is even and back up when it
  is odd; with 2 chunks rank ``r`` holds stages ``r`` and ``2p-1-r`` (ZB-V). The first and the last stage
  then sit on rank 0, so the loss gradient starts where the input entered.

A placement is either a style name or an explicit ``{stage: rank}`` mapping (a partitioner may pick one
that is neither). The stage graph is a chain ``s -> s+1`` plus optional extra producer -> consumer edges
(skip connections), numbered in topological order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .actions import Action, Kind, ScheduleError, Table

__all__ = [
    "Placement",
    "StageGraph",
    "backward_kinds",
    "infer_placement",
    "inputs_of",
    "placement_map",
    "stage_graph",
    "stage_to_rank",
]

Placement = str | Mapping[int, int]
"""A style name (``"loop"`` or ``"v"``) or an explicit ``{stage: rank}`` mapping."""

_STYLES = ("loop", "v")


def stage_to_rank(stage: int, n_ranks: int, n_stages: int, style: str = "loop") -> int:
    """The rank that holds ``stage`` under placement ``style`` (see the module docstring)."""
    if n_ranks < 1 or n_stages < n_ranks:
        raise ScheduleError(
            f"n_stages ({n_stages}) must be at least n_ranks ({n_ranks}) >= 1: every rank needs a stage"
        )
    if not 0 <= stage < n_stages:
        raise ScheduleError(f"stage {stage} is outside 0..{n_stages - 1} (n_stages={n_stages})")
    if style == "loop":
        return stage % n_ranks
    if style == "v":
        if n_stages % n_ranks:
            raise ScheduleError(
                f"'v' placement needs n_stages ({n_stages}) to be a multiple of n_ranks ({n_ranks}); "
                f"use {n_ranks * max(1, n_stages // n_ranks)} or {n_ranks * (n_stages // n_ranks + 1)} stages"
            )
        chunk, offset = divmod(stage, n_ranks)
        return offset if chunk % 2 == 0 else n_ranks - 1 - offset
    raise ScheduleError(f"unknown placement style {style!r}; use one of {_STYLES} or a {{stage: rank}} dict")


def placement_map(placement: Placement, *, n_ranks: int, n_stages: int) -> dict[int, int]:
    """Resolve a style name or mapping into ``{stage: rank}`` for every stage, checking the mapping once."""
    if isinstance(placement, str):
        return {s: stage_to_rank(s, n_ranks, n_stages, placement) for s in range(n_stages)}
    mapping = {int(s): int(r) for s, r in placement.items()}
    missing = sorted(set(range(n_stages)) - set(mapping))
    if missing:
        raise ScheduleError(f"placement has no rank for stages {missing}; map every stage 0..{n_stages - 1}")
    bad = {s: r for s, r in mapping.items() if not 0 <= r < n_ranks or not 0 <= s < n_stages}
    if bad:
        raise ScheduleError(
            f"placement {bad} names stages outside 0..{n_stages - 1} or ranks outside 0..{n_ranks - 1}"
        )
    return dict(sorted(mapping.items()))


def infer_placement(table: Table) -> dict[int, int]:
    """``{stage: rank}`` as a table uses it: the first rank each stage's compute appears on."""
    mapping: dict[int, int] = {}
    for rank, actions in sorted(table.items()):
        for action in actions:
            if action is not None:
                mapping.setdefault(action.stage, rank)
    return dict(sorted(mapping.items()))


@dataclass(frozen=True)
class StageGraph:
    """Producers and consumers of every stage; the chain ``s -> s+1`` is always present."""

    n_stages: int
    producers: tuple[tuple[int, ...], ...]
    consumers: tuple[tuple[int, ...], ...]


def stage_graph(n_stages: int, edges: Iterable[tuple[int, int]] | None = None) -> StageGraph:
    """The chain over ``n_stages`` plus extra ``(producer, consumer)`` edges such as skip connections."""
    pairs = {(s, s + 1) for s in range(n_stages - 1)}
    for edge in edges or ():
        src, dst = (int(x) for x in edge)
        if not (0 <= src < dst < n_stages):
            raise ScheduleError(
                f"edge {tuple(edge)} must satisfy 0 <= producer < consumer < n_stages ({n_stages}): "
                "number stages in topological order so data only flows to higher stages"
            )
        pairs.add((src, dst))
    producers = tuple(tuple(sorted(p for p, c in pairs if c == s)) for s in range(n_stages))
    consumers = tuple(tuple(sorted(c for p, c in pairs if p == s)) for s in range(n_stages))
    return StageGraph(n_stages=n_stages, producers=producers, consumers=consumers)


def backward_kinds(table: Mapping[int, Sequence[Action | None]]) -> dict[tuple[int, int], Kind]:
    """``{(stage, mb): Kind.B or Kind.I}``: which action produces each input gradient in this table."""
    kinds: dict[tuple[int, int], Kind] = {}
    for actions in table.values():
        for action in actions:
            if action is not None and action.kind.is_backward:
                kinds.setdefault((action.stage, action.mb), action.kind)
    return kinds


def inputs_of(
    action: Action, graph: StageGraph, backward_kind: Mapping[tuple[int, int], Kind]
) -> list[Action]:
    """The compute actions whose results ``action`` consumes -- the one dependency rule that lowering, the
    validator, the simulator and the builtin generators share.

    F(s) needs F of every producer of s; B/I(s) needs F(s) and the input-gradient (B or I, as
    ``backward_kind`` says; B when unknown) of every consumer of s; W(s) needs I(s).
    """
    stage, mb = action.stage, action.mb
    if action.kind is Kind.F:
        return [Action(p, Kind.F, mb) for p in graph.producers[stage]]
    if action.kind.is_backward:
        grads = [Action(c, backward_kind.get((c, mb), Kind.B), mb) for c in graph.consumers[stage]]
        return [Action(stage, Kind.F, mb), *grads]
    if action.kind is Kind.W:
        return [Action(stage, Kind.I, mb)]
    raise ScheduleError(f"{action} is a communication action; only compute actions have inputs")
