"""A rehearsal of a step: this rank's training table run for real on the call's own microbatches, once the
pipeline is built and before its first step, leaving nothing behind.

A simulated step knows the actions' times and a model of the link; on CPU processes that share a
machine it misses what the operating system does to them: a message waits until its sender's and its
receiver's threads get a core, a woken rank waits for its turn on one, a rank whose core is taken
stretches its compute, and ranks that take turns on a core find its caches cold (the demo's stages
computed 15-25% longer inside a step than timed alone). A rehearsal pays all of it: the stages' own code
on the call's data, every message at its size, the step's own handlers. Replacing compute by spinning
for its timed length paid the cores but not the caches, and predicted the demo's step at 0.64-0.93x.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
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
) -> float:
    """The median over ``rounds`` (after one more, not counted, unless ``rounds`` is 1) of the slowest
    rank's step, each round started together: ``table`` run on the microbatches ``inputs`` with the
    step's own ``epilogue`` (an all-reduce of shared gradients), as a step starts, with no gradients held.
    Every rank of the pipeline calls it with its own table."""
    local = sorted(executor.params)
    params = [p for s in local for p in executor.params[s]]
    steps = []
    warm = rounds > 1
    with unchanged(executor, local):
        for i in range(rounds + warm):
            for p in params:
                p.grad = None
            executor.comm.gather_objects(None, "starting a rehearsal round together")
            start = time.perf_counter()
            executor.run(table, inputs, sizes, train=True, epilogue=epilogue)
            took = executor.comm.gather_objects(time.perf_counter() - start, "the rehearsed step's time")
            if i or not warm:
                steps.append(max(took))
    return statistics.median(steps)
