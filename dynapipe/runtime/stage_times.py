"""Timing this rank's stages as they will run: their own code (compiled, where it is), forward then
backward, on the call's first microbatch.

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
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..graph import Sizes
from .executor import Executor

__all__ = ["time_stages"]

_BUDGET_S = 0.5  # what timing one stage may take, about, after its first run


def time_stages(
    executor: Executor, inputs: Sequence[Any], sizes: Sizes, stages: Sequence[int], rounds: int
) -> dict[int, tuple[float, float]]:
    """(forward, backward) seconds of each of ``stages`` (this rank's), the median of ``rounds`` after
    one not counted, on the microbatch graph inputs ``inputs``."""
    params = [p for s in stages for p in executor.stages[s].module.parameters()]
    buffers = [b for s in stages for b in executor.stages[s].module.buffers()]
    grads = [p.grad for p in params]
    values = [b.detach().clone() for b in buffers]
    counts = {s: dict(executor.compiled[s].runs) for s in stages if s in executor.compiled}
    try:
        with torch.random.fork_rng(devices=[]):
            return {s: _time(executor, s, inputs, sizes, rounds) for s in stages}
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
    as fit in about :data:`_BUDGET_S` (at least one: a big stage is timed once)."""
    plan = executor.stages[stage]
    module = executor.compiled.get(stage, plan.module)
    received = [_stand_in(b.shape.at(sizes), b.dtype, b.requires_grad) for b in plan.receives]

    held: list[Any] = []  # the run before's outputs, as a pipeline holds other microbatches' memory

    def run() -> tuple[float, float]:
        start = time.perf_counter()
        outputs = module(*[inputs[k] for k in plan.inputs], *received)
        middle = time.perf_counter()
        if stage == executor.last:
            loss = outputs[executor.loss_index] if executor.loss_index is not None else None
            targets = [loss] if loss is not None and loss.requires_grad else []
        else:
            targets = [
                o for o, b in zip(outputs, plan.sends, strict=True) if b.requires_grad and o.requires_grad
            ]
        grads = [torch.ones_like(t) for t in targets]
        after = time.perf_counter()
        if targets:
            torch.autograd.backward(targets, grads)
        end = time.perf_counter()
        held[:] = [outputs, grads]  # freeing it all at once here would hand memory back to the system
        return middle - start, end - after

    warm = run()
    runs = [run() for _ in range(min(rounds, max(int(_BUDGET_S / max(sum(warm), 1e-6)), 1)))]
    return statistics.median(f for f, _ in runs), statistics.median(b for _, b in runs)


def _stand_in(shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)
    return torch.zeros(shape, dtype=dtype)
