"""A plan as a table: per-stage costs, the predicted step of its schedule, and the imbalance.

``explain()`` returns one; the backend hands one to ``on_step`` (``StepReport.plan``) for the plan that
runs, built from the same node costs the plan was made on."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..cost import NOMINAL_RATES, Rates, stage_costs
from ..formatting import format_bytes, format_seconds
from ..graph import CapturedGraph
from ..schedules import StageCost, Timeline
from .planner import Plan, predict_step

__all__ = ["Explanation"]


# Above the best balance by this share, the table says why the automatic plan is uneven and how to even it.
UNEVEN = 0.05
# A measured stage this far off its planned compute is named beside the run.
DISAGREE = 0.15


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
    rates: Rates = NOMINAL_RATES  # what the seconds are at
    even_step_s: float | None = None  # the predicted step of the even split, for comparison
    # the plan's step rehearsed on the machine's own ranks (CPU processes at measured rates; see
    # dynapipe.runtime.rehearsal): what the simulation of ``predicted`` leaves out, paid for real
    rehearsed_step_s: float | None = None
    measured_stages: tuple[StageCost, ...] | None = None  # the stages' times as they ran when rehearsed
    # "measured now, cached in PATH", or "cached in PATH" by an earlier run; then the rounds' median, spread
    rehearsal_source: str = ""

    @classmethod
    def of(cls, captured: CapturedGraph, plan: Plan) -> Explanation:
        """The table of ``plan``, costed with the node costs it was made on (``plan.costs``)."""
        if plan.costs is None:
            raise ValueError("plan_pipeline(..., with_costs=True) makes a plan that can be explained")
        mean = sum(c.time_s for c in plan.costs.nodes.values()) / len(plan.in_flight)

        def over_mean(bottleneck: float | None) -> float | None:
            return (
                bottleneck / mean
                if bottleneck is not None and mean > 0 and bottleneck < float("inf")
                else None
            )

        stages = stage_costs(captured, plan.stage_of, plan.costs)
        m = captured.n_microbatches
        lower_bound = m * sum(s.time_s for s in stages) / plan.n_ranks
        return cls(
            plan.stage_of,
            stages,
            captured,
            over_mean(plan.layer_bottleneck_s),
            predict_step(plan, stages),
            lower_bound,
            over_mean(plan.bottleneck_s),
            plan.costs.rates,
            predict_step(plan, plan.even_stages).makespan if plan.even_stages else None,
        )

    @property
    def predicted_step_s(self) -> float | None:
        """The predicted step time of the plan's schedule: rehearsed where it was, else simulated (None
        for a hand-made Explanation)."""
        if self.rehearsed_step_s is not None:
            return self.rehearsed_step_s
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
                    format_seconds(s.time_s),
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
        why = self.why_uneven()
        if why:
            foot += f" ({why})"
        per_mb = (
            f"per microbatch of {self.captured.microbatch_size}; FLOPs and time are forward + backward; "
            f"costed at {self.captured.shapes.representative(self._input_names())} (the same stages run at "
            "every sequence length)"
        )
        return "\n".join([*lines, foot, per_mb, self._capture_line(), *self.step_lines()])

    def why_uneven(self) -> str | None:
        """Why the plan is uneven, in the rates' seconds (None: it is not)."""
        if self.best_imbalance is None or self.imbalance <= self.best_imbalance * (1 + UNEVEN):
            return None
        heavy = max(self.stages, key=lambda s: s.time_s).index
        if self.predicted is None or self.even_step_s is None:
            return f"stage {heavy} heavier for a shorter predicted step; balance_slack=0.03 keeps stages even"
        return (
            f"stage {heavy} heavier: predicted step {format_seconds(self.predicted.makespan)} against "
            f"{format_seconds(self.even_step_s)} for stages within 3% of the best balance (balance_slack=0.03)"
        )

    def _capture_line(self) -> str:
        """Which capture path ran (``captured.one_trace``): Dynamo's own graph, or a second trace."""
        if self.captured.one_trace:
            return "captured from Dynamo's own graph (symbolic in the batch size): the call was traced once"
        return "captured by tracing the call again at the microbatch size (dynamic=True traces it once)"

    def _input_names(self) -> list[str]:
        """The inputs as the user named them in the call (capture records them), else Dynamo's sources."""
        names = self.captured.gm.meta.get("input_names", {})
        return [names.get(s, s) for s in self.captured.input_sources]

    def beside(self, measured: Timeline, step_s: float | None = None) -> str:
        """The predicted step beside a measured one (e.g. the ranks' ``StepReport.timeline`` merged, from
        ``on_step``; ``step_s``: a median of several steps, to compare instead of this one's makespan),
        and every stage whose measured compute differs from the plan's by more than
        :data:`DISAGREE`. Nominal rates predict for a nominal GPU: on another machine only the
        proportions mean something."""
        step = measured.makespan if step_s is None else step_s
        text = f"measured step {format_seconds(step)}, bubble {measured.bubble_fraction:.1%}"
        predicted = self.predicted_step_s
        if self.predicted is None or predicted is None:
            return text
        text = (
            f"predicted step {format_seconds(predicted)}, bubble "
            f"{self.predicted.bubble_fraction:.1%}; {text} ({predicted / step:.2f}x)"
        )
        return "; ".join([text, *self._stages_off(measured)])

    def _stages_off(self, measured: Timeline) -> list[str]:
        """The stages whose measured compute per microbatch is off the plan's by more than DISAGREE."""
        if self.predicted is None:
            return []
        off = []
        for s, (plan_s, run_s) in enumerate(
            zip(_stage_busy(self.predicted), _stage_busy(measured), strict=False)
        ):
            if plan_s > 0 and abs(run_s / plan_s - 1) > DISAGREE:
                off.append(
                    f"stage {s} computes {format_seconds(run_s)} per step against {format_seconds(plan_s)} "
                    f"planned ({run_s / plan_s - 1:+.0%})"
                )
        return off

    def step_lines(self) -> list[str]:
        """The predicted step and the rates it is in."""
        if self.predicted is None or self.lower_bound_s is None:
            return []
        step = self.predicted_step_s or self.predicted.makespan
        ratio = f"{step / self.lower_bound_s:.3f}x" if self.lower_bound_s > 0 else "-"
        how = (
            f"rehearsed on these ranks ({self.rehearsal_source}; the simulation alone: "
            f"{format_seconds(self.predicted.makespan)})"
            if self.rehearsed_step_s is not None
            else "simulated"
        )
        return [
            f"predicted step ({self.captured.n_microbatches} microbatches, {len(self.predicted.ranks)} ranks), "
            f"{how}: {format_seconds(step)}; bubble {self.predicted.bubble_fraction:.1%}; lower bound (all work / "
            f"ranks) {format_seconds(self.lower_bound_s)}, the plan takes {ratio} of it",
            *self._measured_line(),
            self.rates.describe(),
        ]

    def _measured_line(self) -> list[str]:
        """The stages' times as they ran (timed before the rehearsal) against the plan's."""
        if not self.measured_stages:
            return []
        parts = [
            f"{m.index}: {format_seconds(m.time_s)} ({m.time_s / p.time_s - 1:+.0%})"
            for m, p in zip(self.measured_stages, self.stages, strict=True)
            if p.time_s > 0
        ]
        return [
            f"stages timed as they run, forward + backward per microbatch, against the plan: {', '.join(parts)}"
        ]

    def __str__(self) -> str:
        return self.table()


def _stage_busy(timeline: Timeline) -> list[float]:
    """Compute seconds of each stage in one step (forward and backward of every microbatch)."""
    busy: dict[int, float] = {}
    for event in timeline.events:
        action = event.action
        if action is not None and action.kind.is_compute:
            busy[action.stage] = busy.get(action.stage, 0.0) + event.end - event.start
    return [busy.get(s, 0.0) for s in range(max(busy, default=-1) + 1)]
