"""Timing this rank's stages as they will run: their own code (compiled, where it is), forward then
backward, on the call's first microbatch, each through the executor's own handlers.

The plan's stage times are sums of operations timed one at a time, each repeated on the same buffers
(warm caches, memory reused). A stage runs them one after another and keeps every activation for its
backward, so its elementwise operations write memory no cache holds: on this 2-core machine a Llama
stage's forward took 30 ms against 23 ms summed. Received tensors are stand-ins of their shapes (zeros
for integers and booleans, so that an index stays in range); the graph's own inputs are the call's.
Nothing is left behind: parameters keep their ``.grad``, buffers their values, the user's random stream
its state, compiled stages their counts of runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..graph import Sizes
from ..schedules import Action, Kind
from .executor import Executor, Step
from .routes import BWD, FWD

__all__ = ["time_stages", "unchanged"]

_BUDGET_S = 0.5  # what timing one stage may take, about, after its first run


def time_stages(
    executor: Executor, inputs: Sequence[Any], sizes: Sizes, stages: Sequence[int], rounds: int
) -> dict[int, tuple[float, float]]:
    """(forward, backward) seconds of each of ``stages`` (this rank's), the median of ``rounds`` after
    one not counted, on the microbatch graph inputs ``inputs``."""
    with unchanged(executor, stages):
        return {s: _time(executor, s, inputs, sizes, rounds) for s in stages}


@contextmanager
def unchanged(executor: Executor, stages: Sequence[int]) -> Iterator[None]:
    """Run the ``stages`` (this rank's) for a measurement and leave them as they were: the parameters'
    ``.grad``, the buffers' values, the user's random stream, the compiled graphs' counts of runs."""
    params = [p for s in stages for p in executor.stages[s].module.parameters()]
    buffers = [b for s in stages for b in executor.stages[s].module.buffers()]
    grads = [p.grad for p in params]
    values = [b.detach().clone() for b in buffers]
    counts = {s: dict(executor.compiled[s].runs) for s in stages if s in executor.compiled}
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            for b, v in zip(buffers, values, strict=True):
                b.copy_(v)
        for s, runs in counts.items():  # what the compiled graphs ran counts the steps' runs only
            executor.compiled[s].runs.clear()
            executor.compiled[s].runs.update(runs)


def _time(
    executor: Executor, stage: int, inputs: Sequence[Any], sizes: Sizes, rounds: int
) -> tuple[float, float]:
    """The stage's median (forward, backward) over up to ``rounds`` runs after one not counted, as many
    as fit in about :data:`_BUDGET_S` (at least one: a big stage is timed once). Each run is a step of
    the stage's forward and backward through the executor's own handlers, so what a step pays per action
    around the stage's code (taking messages, autograd's entry, holding results to send) is timed too."""
    plan = executor.stages[stage]
    forward, backward = Action(stage, Kind.F, 0), Action(stage, Kind.B, 0)
    held: list[Step] = []  # the run before, as a pipeline holds other microbatches' memory

    def run() -> tuple[float, float]:
        step = Step(executor, [list(inputs)], sizes, train=True, on_results=None)
        for b in plan.receives:  # the messages a forward takes, handed over in memory
            step.inbox[(b.name, stage, 0, FWD)] = (_stand_in(b.shape.at(sizes), b.dtype), None, None)
        if stage != executor.last:  # the gradients its backward takes
            for b in plan.sends:
                for c in b.consumers if b.requires_grad else ():
                    step.inbox[(b.name, c, 0, BWD)] = (_stand_in(b.shape.at(sizes), b.dtype), None, None)
        step.run([forward, backward], (), ())
        held[:] = [step]  # freeing it all at once here would hand memory back to the system
        took = {
            action: step.clock.seconds(end) - step.clock.seconds(start) for action, start, end in step.spans
        }
        return took[forward], took[backward]

    warm = run()
    runs = [run() for _ in range(min(rounds, max(int(_BUDGET_S / max(sum(warm), 1e-6)), 1)))]
    return statistics.median(f for f, _ in runs), statistics.median(b for _, b in runs)


def _stand_in(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)
