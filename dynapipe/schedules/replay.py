"""The one "run every rank until all finish or none can move" loop.

Lowering (the order messages are sent in), the simulator (when each action runs) and the validator (that
a lowered table completes, over gloo and over NCCL) all replay per-rank lists the same way and differ
only in when an item may run and what running it does: that is the ``advance`` callback. Each lane (a
rank, or one stream of a rank) runs its items in order; the loop sweeps the lanes in key order and moves
each as far as it can, until a whole sweep moves nothing. Every caller's rule is monotone (an item that
may run stays runnable), so where the loop stops does not depend on the sweep order; only the order
of the effects does, and lowering relies on it being this one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

__all__ = ["replay"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def replay(lanes: Mapping[K, Sequence[T]], advance: Callable[[K, T], bool]) -> dict[K, int]:
    """Run ``lanes`` to a fixed point; ``advance(lane, item)`` runs ``item`` and returns True, or returns
    False to leave it waiting. Returns the position of each lane that did not finish (empty: all did)."""
    pos = dict.fromkeys(lanes, 0)
    moved = True
    while moved:
        moved = False
        for lane, items in lanes.items():
            while pos[lane] < len(items) and advance(lane, items[pos[lane]]):
                pos[lane] += 1
                moved = True
    return {lane: at for lane, at in pos.items() if at < len(lanes[lane])}
