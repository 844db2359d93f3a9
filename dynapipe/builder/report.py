"""What one call did on this rank, handed to ``options["on_step"]``: the runtime's record and the plan."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import Explanation
from ..runtime import StepRecord

__all__ = ["StepReport"]


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
