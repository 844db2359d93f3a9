"""How dynapipe would cut a model into pipeline stages, in one process and without a process group.

    python -c "import dynapipe, torch, transformers as t; \\
        m = t.LlamaForCausalLM(t.LlamaConfig(num_hidden_layers=8, hidden_size=256, intermediate_size=512, \\
        num_attention_heads=4, vocab_size=8000)); ids = torch.randint(0, 8000, (4, 64)); \\
        print(dynapipe.explain(m, dict(input_ids=ids, labels=ids), n_stages=4))"

:func:`explain` captures the call the way the ``"dynapipe"`` backend does (one microbatch, batch size
symbolic), costs it, partitions it (automatically, or at ``split_points``) and returns the per-stage
table: FLOPs, time estimate, parameter and activation bytes, bytes sent to the next stage, the modules
each stage covers, and the imbalance (slowest stage / mean).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .capture import capture_microbatch, frame_of_call
from .config import Optimizer, PipelineConfig
from .cost import NOMINAL_RATES, Rates, graph_costs
from .errors import ConfigError
from .graph import CapturedGraph
from .microbatch import check_divisible, infer_batch_size
from .plan import Explanation, plan_pipeline, stage_count
from .schedules import get_schedule

__all__ = ["Explanation", "capture", "explain"]


def capture(fn: Any, example_inputs: Any, *, n_microbatches: int = 1) -> CapturedGraph:
    """Capture ``fn(*example_inputs)`` (a tuple of arguments, a dict of keyword arguments, or one tensor)
    as the backend would: one microbatch of ``n_microbatches``, batch size symbolic."""
    args: tuple[Any, ...]
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    batch_size = infer_batch_size((args, kwargs))
    if batch_size is None:
        raise ConfigError("example_inputs hold no tensor with a batch dimension to split into microbatches")
    check_divisible(batch_size, n_microbatches)
    return capture_microbatch(
        frame_of_call(fn, args, kwargs), n_microbatches=n_microbatches, batch_size=batch_size
    )


def explain(
    model: Any,
    example_inputs: Any,
    *,
    n_stages: int,
    n_microbatches: int | None = None,
    schedule: Any = "1f1b",
    virtual_stages: int | None = None,
    split_points: Sequence[str] = (),
    unsplittable: Sequence[str] = (),
    max_stage_memory: int | None = None,
    balance_slack: float | None = None,
    profile: bool = False,
    optimizer: Optimizer = "adamw",
    rates: str | os.PathLike | Rates = "nominal",
) -> Explanation:
    """Partition ``model`` called on ``example_inputs`` into ``n_stages`` and return the per-stage table.

    The options are the backend's (:class:`dynapipe.PipelineConfig`) and the plan is the backend's
    (:func:`dynapipe.plan.plan_pipeline`): what this shows is what ``torch.compile`` would run. Like the
    backend, it plans for ``n_microbatches`` or, by default, one microbatch per stage
    (:meth:`PipelineConfig.microbatches`): the step the partitioner shortens depends on it.

    ``rates``: the machine to plan for, and the table says which: "nominal" (a nominal GPU and link), a
    saved set (a :class:`dynapipe.cost.Rates`, or the path of one: ``Rates.save``, or the cache file a run
    on the target machine wrote, whose path its plan prints). It never takes this machine's rates
    unasked; ``profile=True`` times the graph's operations here (the link stays as ``rates`` says).
    """
    config = PipelineConfig(
        n_stages=n_stages,
        n_microbatches=n_microbatches,
        schedule=schedule,
        virtual_stages=virtual_stages,
        split_points=tuple(split_points),
        unsplittable=tuple(unsplittable),
        max_stage_memory=max_stage_memory,
        balance_slack=balance_slack,
        profile=profile,
        optimizer=optimizer,
    )
    spec = get_schedule(schedule)
    per_rank = spec.stages_per_rank or virtual_stages or spec.default_stages_per_rank
    if n_stages % per_rank:
        raise ConfigError(
            f"schedule {spec.name!r} runs {per_rank} stages per rank, which does not divide n_stages "
            f"({n_stages}); use n_stages={per_rank * max(n_stages // per_rank, 1)} or another schedule"
        )
    n_ranks = n_stages // per_rank  # the ranks the backend would need; it checks them by the same rule:
    stage_count(config, spec, n_ranks)
    captured = capture(model, example_inputs, n_microbatches=config.microbatches(n_stages))
    machine = _rates(rates)
    costs = lambda c, cfg: graph_costs(c, optimizer=cfg.optimizer, rates=machine, profile=cfg.profile)  # noqa: E731
    plan = plan_pipeline(
        captured, config, spec=spec, n_ranks=n_ranks, n_stages=n_stages, costs=costs, with_costs=True
    )
    return Explanation.of(captured, plan)


def _rates(rates: str | os.PathLike | Rates) -> Rates:
    if isinstance(rates, Rates):
        return rates
    if rates == "nominal":
        return NOMINAL_RATES
    if rates == "measure":
        raise ConfigError(
            "explain() plans without a process group, so it cannot measure the link: run the pipeline once on "
            "the target machine and pass the rates file its plan names, or profile=True to time operations here"
        )
    try:
        return Rates.load(rates)
    except ValueError as err:
        raise ConfigError(f"rates: {err}; give 'nominal', a Rates or the path of a saved set") from None
