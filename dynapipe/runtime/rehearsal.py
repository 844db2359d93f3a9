"""A rehearsal of a step: this rank's table run over the real process group, every compute action
replaced by the CPU time it is predicted to take.

A simulated step knows the actions' times and a model of the link; on CPU processes that share a
machine it misses what the operating system does to them: a message waits until its sender's and its
receiver's communication threads get a core, a woken rank waits for its turn on one, and a rank whose
core is taken stretches its compute. Those delays come and go with the schedule (the same link measured
alone answers in 0.1 ms; in a 4-rank step on 2 cores messages took 1 to 5 ms). A rehearsal pays them
for real: compute is spinning on the thread's own CPU clock, so a rank that loses its core computes
longer, as a real one would, and every message of the table goes out at its size and tag.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import torch

from ..codegen import Boundary
from ..graph import Sizes
from ..schedules import Action, Kind
from .executor import Executor, Step
from .routes import BWD, FWD

__all__ = ["rehearse"]


def rehearse(
    executor: Executor,
    table: Sequence[Action | None],
    sizes: Sizes,
    seconds: Mapping[Action, float],
    rounds: int,
) -> float:
    """The median over ``rounds`` (after one more, not counted, unless ``rounds`` is 1) of the slowest
    rank's step, each round started together: ``table`` with every compute action taking its ``seconds``
    of CPU time. Every rank of the pipeline calls it with its own table."""
    steps = []
    warm = rounds > 1
    for i in range(rounds + warm):
        executor.comm.gather_objects(None, "starting a rehearsal round together")
        start = time.perf_counter()
        _Rehearsal(executor, sizes, seconds).run(table, (), ())
        took = executor.comm.gather_objects(time.perf_counter() - start, "the rehearsed step's time")
        if i or not warm:
            steps.append(max(took))
    return statistics.median(steps)


class _Rehearsal(Step):
    """A step whose compute actions spin for their predicted time and produce empty tensors of the
    boundaries' shapes; its sends and receives are the real step's."""

    def __init__(self, executor: Executor, sizes: Sizes, seconds: Mapping[Action, float]) -> None:
        super().__init__(executor, [], sizes, train=True, on_results=None)
        self.seconds = seconds
        self.buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, boundary: Boundary) -> torch.Tensor:
        """One tensor per boundary, sent as often as the table sends it (its contents do not matter)."""
        if boundary.name not in self.buffers:
            shape = boundary.shape.at(self.sizes)
            self.buffers[boundary.name] = torch.zeros(shape, dtype=boundary.dtype, device=self.device)
        return self.buffers[boundary.name]

    def _spin(self, action: Action) -> None:
        end = time.thread_time() + self.seconds.get(action, 0.0)
        while time.thread_time() < end:
            pass

    def _forward(self, action: Action) -> None:
        stage, mb, ex = action.stage, action.mb, self.ex
        plan = ex.stages[stage]
        for b in plan.receives:
            self._take((b.name, stage), mb, FWD)
        self._spin(action)
        outputs = {b.name: self._buffer(b) for b in plan.sends}
        if self.routes.peers[(Kind.SEND_F, stage)]:
            self._post((stage, mb, FWD), outputs, Kind.SEND_F)
        for b in plan.sends:
            for c in b.consumers:
                if ex.rank_of_stage[c] == ex.rank:
                    self.inbox[(b.name, c, mb, FWD)] = (outputs[b.name], None, None)
        self.in_flight[(stage, mb)] = None  # type: ignore[assignment]

    def _backward(self, action: Action) -> None:
        stage, mb, ex = action.stage, action.mb, self.ex
        plan = ex.stages[stage]
        if stage != ex.last:
            for b in plan.sends:
                if b.requires_grad:
                    for c in b.consumers:
                        self._take((b.name, c), mb, BWD)
        self._spin(action)
        if action.kind is Kind.B:
            del self.in_flight[(stage, mb)]
        to_send = {}
        for b in plan.receives:
            if b.requires_grad:
                if ex.rank_of_stage[b.producer] == ex.rank:
                    self.inbox[(b.name, stage, mb, BWD)] = (self._buffer(b), None, None)
                else:
                    to_send[b.name] = self._buffer(b)
        if to_send:
            self._post((stage, mb, BWD), to_send, Kind.SEND_B)

    def _weight_backward(self, action: Action) -> None:
        self.in_flight.pop((action.stage, action.mb))
        self._spin(action)

    def _arm_reduction(self, action: Action) -> None:
        """Data-parallel reduction is not rehearsed: the pipeline's own step is."""
