"""The plan's step as this machine runs it: the stages timed as they run, then the step rehearsed on the
ranks, on the call's own microbatches (:mod:`dynapipe.runtime.stage_times`,
:mod:`dynapipe.runtime.rehearsal`).

What they measured is cached beside the rates (:func:`~.rates.cache_path`), keyed by the machine and by
everything the measurement depends on: every stage's code and how it is compiled, the schedule's table,
the sizes and the microbatch's shapes. A restart or a second run of the same script on this machine
measures nothing again; ``profile=True`` measures afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..graph import Sizes
from ..plan import Explanation, Plan
from ..runtime import Pipeline
from ..schedules import StageCost
from .rates import cache_path, read_cache, write_cache

__all__ = ["rehearsed"]

_REHEARSAL_S = 1.0  # what rehearsing the plan's step may take, about
_STAGE_ROUNDS = 5  # timed runs of each stage, after one not counted


def rehearsed(
    explanation: Explanation, plan: Plan, pipeline: Pipeline, microbatches: list[list[Any]], fresh: bool
) -> Explanation:
    """``explanation`` with its stages' measured times and its step rehearsed on the pipeline's ranks, as
    many rounds as fit in about a second, from 1 to 5, or both as cached by an earlier run (unless
    ``fresh``); ``microbatches``: the graph inputs of the call's microbatches."""
    key = _key(explanation, plan, pipeline, microbatches[0])
    path = cache_path(key, "rehearsal")
    found = None if fresh else read_cache(path)
    cached = found if found is not None and found.get("key") == key else None
    views = pipeline.comm.gather_objects(cached, "the cached rehearsal")
    if cached is not None and views.count(cached) == len(views):  # every rank holds the same
        times, step = {int(s): (f, b) for s, (f, b) in cached["stages"].items()}, cached["step_s"]
        return _with(explanation, times, step, f"cached in {path}")
    sizes = Sizes(explanation.captured.shapes.hints)
    measured = pipeline.time_stages(microbatches[0], sizes, _STAGE_ROUNDS, explanation.rates.cores)
    if isinstance(measured, str):
        warnings.warn(
            f"dynapipe shows no measured stage times beside the plan's: timing a stage failed ({measured})",
            stacklevel=2,
        )
    simulated = explanation.predicted_step_s or 0.0
    rounds = min(max(int(_REHEARSAL_S / max(simulated, 1e-3)), 1), 5)  # a long step: once
    step = pipeline.rehearse(microbatches, sizes, rounds)
    if isinstance(measured, str):
        return dataclasses.replace(explanation, rehearsed_step_s=step, rehearsal_source="measured now")
    if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        write_cache(path, {"key": key, "stages": measured, "step_s": step})
    return _with(explanation, measured, step, f"measured now, cached in {path}")


def _with(
    explanation: Explanation, times: dict[int, tuple[float, float]], step: float, source: str
) -> Explanation:
    return dataclasses.replace(
        explanation,
        rehearsed_step_s=step,
        measured_stages=tuple(_as_measured(explanation.stages, times)),
        rehearsal_source=source,
    )


def _as_measured(stages: Sequence[StageCost], times: dict[int, tuple[float, float]]) -> list[StageCost]:
    """``stages`` with their measured (forward, backward) times; each backward splits into input and weight
    gradients as planned."""
    out = []
    for cost in stages:
        forward, backward = times[cost.index]
        planned = cost.backward_input + cost.backward_weight
        share = cost.backward_input / planned if planned > 0 else 1.0
        out.append(
            dataclasses.replace(
                cost, forward=forward, backward_input=backward * share, backward_weight=backward * (1 - share)
            )
        )
    return out


def _key(
    explanation: Explanation, plan: Plan, pipeline: Pipeline, microbatch: Sequence[Any]
) -> dict[str, str]:
    """The machine, and a digest of what the stages' times and the step depend on (the same on every
    rank: how each rank compiled its stages is exchanged)."""
    compiled = pipeline.comm.gather_objects(sorted(pipeline.how_compiled.items()), "how the stages compiled")
    what = {
        "stages": [stage.module.code for stage in pipeline.stages],
        "compiled": compiled,
        "table": {rank: [str(a) for a in actions] for rank, actions in sorted(plan.table.items())},
        "sizes": sorted((str(k), v) for k, v in explanation.captured.shapes.hints.items()),
        "inputs": [
            [list(v.shape), str(v.dtype)] if isinstance(v, torch.Tensor) else type(v).__name__
            for v in microbatch
        ],
        "cores": explanation.rates.cores,
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return {**explanation.rates.machine, "plan": digest}
