"""A step when the ranks share fewer cores than there are of them (CPU processes on one machine).

:func:`~.simulate.simulate` gives every rank its own processor. Where ``n`` ranks share ``c < n`` cores,
an action runs slower while more than ``c`` ranks compute at once: with ``k`` busy ranks each gets
``c / k`` of a core (what the kernel's fair scheduler gives processes of one thread). The pipeline's
bubbles are when the others are idle, so a stage's time depends on the schedule around it. This replays
the step, stretches each action by the mean number of busy ranks over its span divided by ``c`` (never
below its own time), and replays again until the step settles.

Not modelled: a message that arrives while every core computes also waits for its sender's and its
receiver's threads to get one (microseconds on an idle machine, 1 to 5 ms in the demo's step here). The
plan that runs is rehearsed on its ranks for that (:mod:`dynapipe.runtime.rehearsal`); the partitioner's
search, which tries hundreds of splits, uses this model alone.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from typing import TypeGuard

from .actions import Action
from .simulate import Timeline

__all__ = ["shared_cores"]

_ROUNDS = 8


def shared_cores(replay: Callable[[Mapping[Action, float] | None], Timeline], cores: float) -> Timeline:
    """The step ``replay`` simulates (given per-action durations, or None for its own), with the ranks
    sharing ``cores`` cores."""
    timeline = replay(None)
    base = {e.action: e.end - e.start for e in timeline.events if _computes(e.action)}
    stretch = dict.fromkeys(base, 1.0)
    for _ in range(_ROUNDS):
        busy = _mean_busy(timeline)
        # halfway to the new stretch: a full step can overshoot and oscillate between two timelines
        stretch = {a: (stretch[a] + max(1.0, busy.get(a, 1.0) / cores)) / 2 for a in base}
        timeline = replay({a: base[a] * stretch[a] for a in base})
    return timeline


def _computes(action: Action | None) -> TypeGuard[Action]:
    return action is not None and action.kind.is_compute


def _mean_busy(timeline: Timeline) -> dict[Action, float]:
    """Per compute action, the mean number of ranks computing over its span (itself included)."""
    spans = [(e.start, e.end, e.action) for e in timeline.events if _computes(e.action)]
    changes: dict[float, int] = {}
    for start, end, _ in spans:
        changes[start] = changes.get(start, 0) + 1
        changes[end] = changes.get(end, 0) - 1
    times = sorted(changes)
    area = [0.0]  # integral of the busy count from the first time to times[i]
    count = 0
    for i in range(1, len(times)):
        count += changes[times[i - 1]]
        area.append(area[-1] + count * (times[i] - times[i - 1]))

    def integral(t: float) -> float:
        return area[bisect.bisect_left(times, t)]  # every span starts and ends at a change

    return {
        action: (integral(end) - integral(start)) / (end - start) if end > start else 1.0
        for start, end, action in spans
    }
