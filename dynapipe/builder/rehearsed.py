"""The plan's step as this machine runs it: the stages timed as they run, then the step rehearsed on the
ranks with those times (:mod:`dynapipe.runtime.stage_times`, :mod:`dynapipe.runtime.rehearsal`)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from ..graph import Sizes
from ..plan import Explanation, Plan, action_seconds
from ..runtime import Pipeline
from ..schedules import StageCost

__all__ = ["rehearsed"]

_REHEARSAL_S = 1.0  # what rehearsing the plan's step may take, about
_STAGE_ROUNDS = 5  # timed runs of each stage, after one not counted


def rehearsed(
    explanation: Explanation, plan: Plan, pipeline: Pipeline, microbatch: Sequence[Any]
) -> Explanation:
    """``explanation`` with its stages' measured times and its step rehearsed on the pipeline's ranks, as
    many rounds as fit in about a second, from 1 to 5; ``microbatch``: the graph inputs of the call's
    first microbatch."""
    sizes = Sizes(explanation.captured.shapes.hints)
    measured = pipeline.time_stages(microbatch, sizes, _STAGE_ROUNDS, explanation.rates.cores)
    stages = explanation.stages
    if isinstance(measured, str):
        warnings.warn(
            f"dynapipe rehearsed the step with the planned stage times: timing a stage failed ({measured})",
            stacklevel=2,
        )
    else:
        stages = [_as_measured(c, *measured[c.index]) for c in stages]
    simulated = explanation.predicted_step_s or 0.0
    rounds = min(max(int(_REHEARSAL_S / max(simulated, 1e-3)), 1), 5)  # a long step: once
    step = pipeline.rehearse(sizes, action_seconds(plan, stages), rounds)
    return dataclasses.replace(
        explanation,
        rehearsed_step_s=step,
        measured_stages=None if isinstance(measured, str) else tuple(stages),
    )


def _as_measured(cost: StageCost, forward: float, backward: float) -> StageCost:
    """``cost`` with its measured times; the backward splits into input and weight gradients as planned."""
    planned = cost.backward_input + cost.backward_weight
    share = cost.backward_input / planned if planned > 0 else 1.0
    return dataclasses.replace(
        cost, forward=forward, backward_input=backward * share, backward_weight=backward * (1 - share)
    )
