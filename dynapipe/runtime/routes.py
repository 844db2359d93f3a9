"""Which boundary tensors each send or receive action carries, with their tags and peers: worked out once
per pipeline, so a step does no per-action planning."""

from __future__ import annotations

from dataclasses import dataclass

from ..codegen import Boundary, StagePlan
from ..schedules import Action, Kind

__all__ = ["BWD", "FWD", "Message", "Route", "Routes"]

FWD, BWD = 0, 1  # a message's direction: an activation forward, a gradient back


@dataclass(frozen=True)
class Route:
    """One boundary tensor that a send or receive action carries."""

    boundary: Boundary
    key: tuple[str, int]  # (boundary name, consumer stage): with microbatch and direction, names a message
    tag: int  # the message's tag for microbatch 0; microbatch k adds 2 k
    peer_rank: int


@dataclass(frozen=True)
class Message:
    """Names a message in an error: formatted only if one happens, not on every send."""

    action: Action | None
    boundary: str
    mb: int
    direction: int

    def __str__(self) -> str:
        what = "activation" if self.direction == FWD else "gradient"
        return f"the {what} {self.boundary} of microbatch {self.mb} ({self.action})"


class Routes:
    """The routes of every send and receive between stages on different ranks, and how many send actions
    each stage's result goes out in (one per peer stage on another rank)."""

    def __init__(self, stages: list[StagePlan], rank_of_stage: dict[int, int], n_microbatches: int) -> None:
        n = len(stages)
        self.rank_of_stage = rank_of_stage
        tags: dict[tuple[str, int], int] = {}
        for k, b in enumerate(b for p in stages for b in p.sends):
            for c in b.consumers:
                tags[(b.name, c)] = k * n + c
        # the first tag no transfer between stages uses (outputs of the step go out above it)
        self.free_tag = (max(tags.values(), default=-1) + 1) * n_microbatches * 2
        self.by_action: dict[tuple[Kind, int, int], list[Route]] = {}
        for plan in stages:
            s = plan.index
            for b in plan.receives:  # forward messages into s, gradients back out of s
                base = tags[(b.name, s)] * n_microbatches * 2
                self._add(Kind.RECV_F, Kind.SEND_B, s, b.producer, b, (b.name, s), base)
            for b in plan.sends:  # forward messages out of s, gradients back into s
                for c in b.consumers:
                    base = tags[(b.name, c)] * n_microbatches * 2
                    self._add(Kind.SEND_F, Kind.RECV_B, s, c, b, (b.name, c), base)
        self.peers = {(kind, plan.index): 0 for kind in (Kind.SEND_F, Kind.SEND_B) for plan in stages}
        for kind, stage, _ in self.by_action:
            if kind in (Kind.SEND_F, Kind.SEND_B):
                self.peers[(kind, stage)] += 1

    def _add(
        self,
        forward: Kind,
        backward: Kind,
        stage: int,
        peer: int,
        b: Boundary,
        key: tuple[str, int],
        base: int,
    ) -> None:
        if self.rank_of_stage[stage] == self.rank_of_stage[peer]:
            return  # stages on one rank hand tensors over in memory
        rank = self.rank_of_stage[peer]
        self.by_action.setdefault((forward, stage, peer), []).append(Route(b, key, base + FWD, rank))
        if b.requires_grad:
            self.by_action.setdefault((backward, stage, peer), []).append(Route(b, key, base + BWD, rank))

    def of(self, action: Action) -> list[Route]:
        """The routes ``action`` (a send or receive) carries: none where the stage graph's edge carries
        no tensor, or none with a gradient."""
        assert action.peer is not None  # a send or receive names its peer stage
        return self.by_action.get((action.kind, action.stage, action.peer), [])
