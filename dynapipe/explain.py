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

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .capture import CapturedGraph, FrameCall, capture_microbatch
from .config import Optimizer, PipelineConfig
from .cost import stage_costs
from .errors import ConfigError
from .microbatch import check_divisible, infer_batch_size
from .plan import LINK_BANDWIDTH, LINK_LATENCY_S, CostSource, Plan, local_costs, plan_pipeline, predict_step
from .schedules import StageCost, Timeline, get_schedule
from .units import format_bytes

__all__ = ["Explanation", "capture", "explain"]


def _frame(fn: Any, args: tuple, kwargs: dict) -> FrameCall:
    """The frame ``torch.compile(fn)(*args, **kwargs)`` hands to a backend, built without tracing."""
    if isinstance(fn, torch.nn.Module):
        fn = fn.forward
    if inspect.ismethod(fn):
        fn, args = fn.__func__, (fn.__self__, *args)
    if not inspect.isfunction(fn):
        raise ConfigError(f"explain needs an nn.Module or a Python function, got {type(fn).__name__}")
    bound = inspect.signature(fn, follow_wrapped=False).bind(*args, **kwargs)
    bound.apply_defaults()
    return FrameCall(fn.__code__, fn.__globals__, fn.__closure__, dict(bound.arguments))


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
    return capture_microbatch(_frame(fn, args, kwargs), n_microbatches=n_microbatches, batch_size=batch_size)


# Above the best balance by this share, the table says why the automatic plan is uneven and how to even it.
UNEVEN = 0.05


@dataclass(frozen=True)
class Explanation:
    """A partition and its per-stage costs; ``str()`` is the table."""

    stage_of: dict[fx.Node, int]
    stages: list[StageCost]
    captured: CapturedGraph
    layer_imbalance: float | None = None  # the best split at layer boundaries, for comparison
    predicted: Timeline | None = None  # one simulated step of the plan's schedule
    lower_bound_s: float | None = None  # all the step's work spread evenly over the ranks
    best_imbalance: float | None = None  # the best balance any split reaches, for comparison

    @classmethod
    def of(
        cls, captured: CapturedGraph, plan: Plan, config: PipelineConfig, costs: CostSource = local_costs
    ) -> Explanation:
        """The table of ``plan``, costed with the node costs it was made on (``costs`` for split points)."""
        node_costs = plan.costs or costs(captured, config)
        mean = sum(c.time_s for c in node_costs.nodes.values()) / len(plan.in_flight)

        def over_mean(bottleneck: float | None) -> float | None:
            return (
                bottleneck / mean
                if bottleneck is not None and mean > 0 and bottleneck < float("inf")
                else None
            )

        stages = stage_costs(captured, plan.stage_of, costs=node_costs)
        m = captured.n_microbatches
        lower_bound = m * sum(s.time_s for s in stages) / plan.n_ranks
        predicted = predict_step(plan, stages, m)
        return cls(
            plan.stage_of,
            stages,
            captured,
            over_mean(plan.layer_bottleneck_s),
            predicted,
            lower_bound,
            over_mean(plan.bottleneck_s),
        )

    @property
    def predicted_step_s(self) -> float | None:
        """The simulated step time of the plan's schedule (None for a hand-made Explanation)."""
        return self.predicted.makespan if self.predicted is not None else None

    @property
    def imbalance(self) -> float:
        """Slowest stage time over mean stage time (1.0 is perfect balance)."""
        times = [s.time_s for s in self.stages]
        mean = sum(times) / len(times)
        return max(times) / mean if mean > 0 else 1.0

    def table(self) -> str:
        head = ("stage", "FLOPs", "time", "params", "activations", "sends next", "modules")
        rows = [head]
        for s in self.stages:
            rows.append(
                (
                    str(s.index),
                    f"{s.flops:.3e}",
                    _seconds(s.time_s),
                    format_bytes(s.param_bytes),
                    format_bytes(s.activation_bytes),
                    format_bytes(s.next_bytes),
                    ", ".join(s.modules),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = [
            "  ".join(c.rjust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        foot = f"imbalance (slowest / mean stage time): {self.imbalance:.3f}"
        if self.best_imbalance is not None:
            foot += f"; best possible: {self.best_imbalance:.3f}"
        if self.layer_imbalance is not None:
            foot += f"; best split at layer boundaries: {self.layer_imbalance:.3f}"
        if self.best_imbalance is not None and self.imbalance > self.best_imbalance * (1 + UNEVEN):
            foot += " (uneven for a shorter predicted step; balance_slack=0.03 keeps stages even)"
        per_mb = (
            f"per microbatch of {self.captured.microbatch_size}; FLOPs and time are forward + backward; "
            f"costed at {self.captured.shapes.representative(self.captured.input_sources)} (the same stages "
            "run at every sequence length)"
        )
        return "\n".join([*lines, foot, per_mb, *self._step_lines()])

    def beside(self, measured: Timeline) -> str:
        """The predicted step beside a measured one (e.g. the ranks' ``StepReport.timeline`` merged, from
        ``on_step``). Times from FLOPs assume the nominal FLOP rate: compare shapes and bubbles, or
        plan with ``profile=True`` to compare seconds."""
        if self.predicted is None:
            return f"measured step {_seconds(measured.makespan)}, bubble {measured.bubble_fraction:.1%}"
        return (
            f"predicted step {_seconds(self.predicted.makespan)}, bubble {self.predicted.bubble_fraction:.1%}; "
            f"measured {_seconds(measured.makespan)}, bubble {measured.bubble_fraction:.1%}"
        )

    def _step_lines(self) -> list[str]:
        if self.predicted is None or self.lower_bound_s is None:
            return []
        step = self.predicted.makespan
        ratio = f"{step / self.lower_bound_s:.3f}x" if self.lower_bound_s > 0 else "-"
        return [
            f"predicted step ({self.captured.n_microbatches} microbatches, {len(self.predicted.ranks)} ranks, "
            f"link {LINK_LATENCY_S * 1e6:.0f} us + bytes / {LINK_BANDWIDTH / 1e9:.0f} GB/s): {_seconds(step)}; "
            f"bubble {self.predicted.bubble_fraction:.1%}; lower bound (all work / ranks) "
            f"{_seconds(self.lower_bound_s)}, the plan takes {ratio} of it"
        ]

    def __str__(self) -> str:
        return self.table()


def _seconds(t: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            return f"{t / scale:.3g} {unit}"
    return f"{t / 1e-9:.3g} ns"


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
) -> Explanation:
    """Partition ``model`` called on ``example_inputs`` into ``n_stages`` and return the per-stage table.

    The options are the backend's (:class:`dynapipe.PipelineConfig`) and the plan is the backend's
    (:func:`dynapipe.plan.plan_pipeline`): what this shows is what ``torch.compile`` would run. Like the
    backend, it plans for ``n_microbatches`` or, by default, one microbatch per stage
    (:meth:`PipelineConfig.microbatches`): the step the partitioner shortens depends on it.
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
    captured = capture(model, example_inputs, n_microbatches=config.microbatches(n_stages))
    plan = plan_pipeline(captured, config, spec=spec, n_ranks=n_stages // per_rank, n_stages=n_stages)
    return Explanation.of(captured, plan, config)
