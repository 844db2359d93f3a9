"""How many microbatches' activations each stage holds at its peak, read off the table alone.

A stage holds a microbatch's activations from its forward until the work that frees them ends: ``B``,
or ``W`` when the backward is split (``I`` still needs them for ``W``; so zero-bubble schedules hold
more). A rank runs its list in order, so the peak follows from that order; no timing is needed, and
the count equals the simulated one (:meth:`~dynapipe.schedules.Timeline.in_flight_activations`).
"""

from __future__ import annotations

from collections.abc import Mapping

from .actions import Kind, Table

__all__ = ["in_flight_per_stage"]


def in_flight_per_stage(table: Table, rank_of: Mapping[int, int]) -> dict[int, int]:
    """``{stage: peak microbatches in flight}`` for every stage of ``rank_of``, walking each stage's
    rank's list in order."""
    held = dict.fromkeys(rank_of, 0)
    peak = dict.fromkeys(rank_of, 0)
    for rank, actions in table.items():
        for action in actions:
            if action is None or rank_of.get(action.stage) != rank:
                continue
            if action.kind is Kind.F:
                held[action.stage] += 1
                peak[action.stage] = max(peak[action.stage], held[action.stage])
            elif action.kind in (Kind.B, Kind.W):
                held[action.stage] -= 1
    return dict(sorted(peak.items()))
