"""What one call did on this rank, handed to ``options["on_step"]``: the runtime's record and the plan."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..plan import Explanation, Plan
from ..runtime import Pipeline, StepRecord
from .rehearsed import CHECKED_STEPS, drop_if_contradicted, rehearsed

__all__ = ["Reporter", "StepReport"]


@dataclass(frozen=True)
class StepReport(StepRecord):
    """``timeline`` holds every action this rank ran and the step's named work (``event.kind`` says
    which); ``stages[i].module.code`` is readable; ``plan`` is the partition that runs (print it)."""

    plan: Explanation | None = None
    # seconds this rank took to build the pipeline that ran the step (capture, plan, codegen, tables, state
    # placement; Dynamo's own trace before it is not included): the same for every step that pipeline runs
    build_s: float = 0.0

    @property
    def peak_inflight(self) -> dict[int, int]:
        """``peak_in_flight`` by its earlier name."""
        return self.peak_in_flight


@dataclass
class Reporter:
    """``on_step`` fed with the runtime's record of each step, the plan that runs (rehearsed once the
    pipeline exists) and the pipeline's build time; the rehearsal's cache entry checked against the
    run's first training steps."""

    on_step: Callable[[StepReport], None]
    plan: Explanation
    build_s: float = 0.0
    cache: Path | None = None  # where the rehearsal is cached, until the run's steps have confirmed it
    steps: list[float] = field(default_factory=list)  # the training steps' times on this rank, so far

    def finish(
        self,
        plan: Plan,
        pipeline: Pipeline,
        microbatches: list[list[Any]] | None,
        fresh: bool,
        started: float,
    ) -> None:
        """Once the pipeline is built: its plan's step rehearsed on the graph inputs of the call's
        ``microbatches`` (None: not rehearsed; ``fresh``: not taken from the cache), and the build's time
        since ``started`` (``time.perf_counter()``), the rehearsal's included."""
        if microbatches is not None:
            self.plan, self.cache = rehearsed(self.plan, plan, pipeline, microbatches, fresh)
        self.build_s = time.perf_counter() - started

    def __call__(self, record: StepRecord) -> None:
        if self.cache is not None and record.train:
            self.steps.append(record.timeline.makespan)
            if len(self.steps) > CHECKED_STEPS:  # the first step pays for warming up: not counted
                drop_if_contradicted(self.plan, self.cache, self.steps[1:])
                self.cache = None
        fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
        self.on_step(StepReport(**fields, plan=self.plan, build_s=self.build_s))
