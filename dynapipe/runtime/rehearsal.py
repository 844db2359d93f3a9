"""A rehearsal of a step: this rank's training table run for real on the call's own microbatches, once the
pipeline is built and before its first step, leaving nothing behind.

A simulated step knows the actions' times and a model of the link; on CPU processes that share a
machine it misses what the operating system does to them: a message waits until its sender's and its
receiver's threads get a core, a woken rank waits for its turn on one, a rank whose core is taken
stretches its compute, and ranks that take turns on a core find its caches cold (the demo's stages
computed 15-25% longer inside a step than timed alone). A rehearsal pays all of it: the stages' own code
on the call's data, every message at its size, the step's own handlers. Replacing compute by spinning
for its timed length paid the cores but not the caches, and predicted the demo's step at 0.64-0.93x.

The rounds run back to back, as a training loop runs its steps: a rank that finishes a round early
starts the next and waits there, so one step's drain overlaps the next one's fill, and the step is the
time between one round's end and the next's. Rounds each started together from a gather ran 15% shorter
than the demo's steps (35.8 ms against 41.7-43.0 ms); back to back they read 0.93-1.13x in 4 runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from ..graph import Sizes
from ..schedules import Action
from .executor import Executor, NamedWork
from .stage_times import unchanged

__all__ = ["rehearse"]


def rehearse(
    executor: Executor,
    table: Sequence[Action | None],
    inputs: list[list[Any]],
    sizes: Sizes,
    rounds: int,
    epilogue: NamedWork,
) -> list[float]:
    """The slowest rank's step in each of ``rounds`` (after one more, not counted, unless ``rounds`` is 1),
    the rounds run back to back from a start together: ``table`` run on the microbatches ``inputs`` with
    the step's own ``epilogue`` (an all-reduce of shared gradients), as a step starts, with no gradients
    held. Every rank of the pipeline calls it with its own table."""
    local = sorted(executor.params)
    params = [p for s in local for p in executor.params[s]]
    ends = []
    warm = rounds > 1
    with unchanged(executor, local):
        executor.comm.gather_objects(None, "starting the rehearsal together")
        start = time.perf_counter()
        for _ in range(rounds + warm):
            for p in params:
                p.grad = None
            executor.run(table, inputs, sizes, train=True, epilogue=epilogue)
            ends.append(time.perf_counter())
    periods = [b - a for a, b in pairwise([start, *ends])][warm:]
    every = executor.comm.gather_objects(periods, "the rehearsed steps' times")
    return [max(ranks) for ranks in zip(*every, strict=True)]
