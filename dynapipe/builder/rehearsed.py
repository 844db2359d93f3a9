"""The plan's step as this machine runs it: the stages timed as they run, then the step rehearsed on the
ranks, on the call's own microbatches (:mod:`dynapipe.runtime.stage_times`,
:mod:`dynapipe.runtime.rehearsal`).

What they measured is cached beside the rates (:func:`~.rates.cache_path`), keyed by the machine and by
everything the measurement depends on: every stage's code and how it is compiled, the schedule's table,
the sizes and the microbatch's shapes. A restart or a second run of the same script on this machine
measures nothing again; ``profile=True`` measures afresh. A measurement takes about a second, so it
carries the machine's load in that second: the run's first steps check it, and an entry they contradict
is dropped (:func:`drop_if_contradicted`), so that a passing slowdown is not predicted for ever.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..formatting import format_seconds
from ..graph import Sizes
from ..plan import Explanation, Plan
from ..runtime import Pipeline
from ..schedules import StageCost
from .rates import cache_path, read_cache, write_cache, writes_cache

__all__ = ["CHECKED_STEPS", "drop_if_contradicted", "rehearsed"]

_REHEARSAL_S = 1.0  # what rehearsing the plan's step may take, about
_MOST_ROUNDS = 9  # of a short step: 5 rounds of the demo's 45 ms steps spread 39-47 ms
_STAGE_ROUNDS = 5  # timed runs of each stage, after one not counted
CHECKED_STEPS = 10  # the run's training steps, after its first, whose median checks the rehearsal's cache
# A cached rehearsal this far off the median of those steps is dropped: beyond the spread of ten steps
# here (a benchmark row read 1.16x over steps 2-6 and 0.98x over 24), within what a slowdown does (1.5x).
CONTRADICTED = 0.25


def rehearsed(
    explanation: Explanation, plan: Plan, pipeline: Pipeline, microbatches: list[list[Any]], fresh: bool
) -> tuple[Explanation, Path | None]:
    """``explanation`` with its stages' measured times and its step rehearsed on the pipeline's ranks, as
    many rounds as fit in about a second, from 1 to 9, or both as cached by an earlier run (unless
    ``fresh``), and the cache entry that holds them (None: not cached); ``microbatches``: the graph inputs
    of the call's microbatches."""
    key = _key(explanation, plan, pipeline, microbatches[0])
    path = cache_path(key, "rehearsal")
    found = None if fresh else read_cache(path)
    cached = found if found is not None and found.get("key") == key else None
    views = pipeline.comm.gather_objects(cached, "the cached rehearsal")
    if cached is not None and views.count(cached) == len(views):  # every rank holds the same
        times = {int(s): (f, b) for s, (f, b) in cached["stages"].items()}
        return _with(explanation, times, cached["rounds"], f"cached in {path}"), path
    sizes = Sizes(explanation.captured.shapes.hints)
    simulated = explanation.predicted_step_s or 0.0
    # a full collection of what capturing and compiling left (0.2-0.7 s per rank: Llama, 4 ranks on 2 cores)
    # now, not inside the timed runs (two benchmark rows rehearsed at 1.5x); young objects are still
    # collected inside them, as in every step
    gc.collect()
    measured = pipeline.time_stages(microbatches[0], sizes, _STAGE_ROUNDS, explanation.rates.cores)
    fit = int(_REHEARSAL_S / max(simulated, 1e-3))
    rounds = pipeline.rehearse(microbatches, sizes, min(max(fit, 1), _MOST_ROUNDS))
    if isinstance(measured, str):
        warnings.warn(
            f"dynapipe shows no measured stage times beside the plan's: timing a stage failed ({measured})",
            stacklevel=2,
        )
        return _with(explanation, None, rounds, "measured now"), None
    if writes_cache():
        write_cache(path, {"key": key, "stages": measured, "rounds": rounds})
    return _with(explanation, measured, rounds, f"measured now, cached in {path}"), path


def drop_if_contradicted(explanation: Explanation, path: Path, steps: Sequence[float]) -> None:
    """Delete the cached rehearsal at ``path`` (on the rank that wrote it, which says so) where the median
    of the run's training ``steps`` on this rank is off its step by more than :data:`CONTRADICTED`: the
    machine's load changed since it was measured, and the next run rehearses again."""
    predicted, step = explanation.rehearsed_step_s, statistics.median(steps)
    if predicted is None or abs(predicted / step - 1) <= CONTRADICTED:
        return
    if writes_cache() and path.exists():
        path.unlink(missing_ok=True)
        warnings.warn(
            f"dynapipe: the plan's rehearsed step ({format_seconds(predicted)}) is {predicted / step:.2f}x "
            f"the median of this run's steps 2-{len(steps) + 1} ({format_seconds(step)}): the machine's load "
            f"changed since it was rehearsed; dropped {path}, so the next run rehearses again",
            stacklevel=2,
        )


def _with(
    explanation: Explanation,
    times: dict[int, tuple[float, float]] | None,
    rounds: list[float],
    where: str,
) -> Explanation:
    """``explanation`` with the stages' measured ``times`` and the step's rehearsed ``rounds``, which came
    from ``where``."""
    spread = f"{format_seconds(min(rounds))} to {format_seconds(max(rounds))}"
    how = f"the median of {len(rounds)} rounds ({spread})" if len(rounds) > 1 else "one round"
    return dataclasses.replace(
        explanation,
        rehearsed_step_s=statistics.median(rounds),
        measured_stages=None if times is None else tuple(_as_measured(explanation.stages, times)),
        rehearsal_source=f"{where}; {how}",
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
