"""The one planning path: captured graph + options + schedule -> the plan that runs, and its table.

The backend and :func:`dynapipe.explain` both call :func:`plan_pipeline` (and :func:`stage_count`), so
what ``explain()`` prints is the partition that runs."""

from .explanation import Explanation
from .planner import (
    CostSource,
    Plan,
    local_costs,
    plan_pipeline,
    predict_step,
    stage_count,
    step_time,
)

__all__ = [
    "CostSource",
    "Explanation",
    "Plan",
    "local_costs",
    "plan_pipeline",
    "predict_step",
    "stage_count",
    "step_time",
]
