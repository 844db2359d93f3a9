"""The one planning path: captured graph + options + schedule -> the stage of every compute node.

The backend and :func:`dynapipe.explain` both call :func:`plan_pipeline`, so the table ``explain()``
prints is the partition that runs: ``pipe_split()`` markers, ``split_points``, ``unsplittable``,
``max_stage_memory`` and ``profile`` all act the same way in both.

How many microbatches' activations a stage holds at its peak comes from the schedule itself: its table
is replayed by the simulator (unit costs), which counts, per stage, the forwards whose backward has not
yet finished (1F1B: ``p - i`` on stage ``i``; GPipe: all ``m``; zero-bubble: more, for the deferred
weight work). The partitioner takes the largest of these as every stage's memory budget.

Among the near-balanced splits it considers, the partitioner keeps the one whose simulated step of the
chosen schedule is shortest (:func:`step_time`: per-stage forward, input-gradient and weight-gradient
time, what each action pays beside its operations, the bytes each cut sends over the link; all at the
rates the node costs carry, measured or nominal). :func:`explain` reports that step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch.fx as fx

from .. import schedules
from ..config import PipelineConfig
from ..cost import NOMINAL_RATES, GraphCosts, Rates, graph_costs
from ..errors import ConfigError
from ..graph import CapturedGraph
from ..partition import (
    BALANCE_SLACK,
    StepObjective,
    assign_by_owners,
    assign_by_split_points,
    balanced_partition,
)
from ..schedules import (
    Kind,
    ScheduleError,
    ScheduleSpec,
    StageCost,
    Table,
    Timeline,
    placement_map,
    simulate,
)
from ..schedules.sharing import shared_cores

__all__ = [
    "CostSource",
    "Plan",
    "local_costs",
    "plan_pipeline",
    "predict_step",
    "stage_count",
    "step_time",
]

CostSource = Callable[[CapturedGraph, PipelineConfig], GraphCosts]

# With more than one microbatch the step depends on balance, so by default the step search may take
# splits up to this much slower than the best balance when their step is shorter; one microbatch's step
# is all the work plus the transfers whatever the balance, so the search then keeps the partitioner's
# balance limit. ``PipelineConfig.balance_slack`` replaces both.
STEP_SLACK = 1.0


@dataclass(frozen=True)
class Plan:
    """The stage of each compute node, with what it was chosen on."""

    stage_of: dict[fx.Node, int]
    in_flight: tuple[int, ...]  # per stage: microbatches whose activations the schedule holds at once
    spec: ScheduleSpec  # the schedule the plan is for, on n_ranks ranks
    n_ranks: int
    table: Table  # the schedule's compute-only training table, built once for this plan
    costs: GraphCosts | None  # the node costs the plan was made on (None: split points, none asked for)
    layer_bottleneck_s: float | None = None  # the best split at layer boundaries (automatic only)
    bottleneck_s: float | None = None  # the best balance of any split (automatic only)
    kept_owners: bool = False  # the stages are those that own the tensors (an earlier pipeline's)
    even_stages: tuple[StageCost, ...] = ()  # the even split's stages, for comparison (automatic only)


def local_costs(captured: CapturedGraph, config: PipelineConfig) -> GraphCosts:
    """Node costs at the nominal rates, every operation timed in this process with ``profile``."""
    return graph_costs(captured, optimizer=config.optimizer, profile=config.profile)


def _in_flight(table: Table, spec: ScheduleSpec, *, n_ranks: int, n_stages: int) -> tuple[int, ...]:
    """Peak microbatches whose activations each stage holds under ``table``, counted along each rank's list."""
    rank_of = placement_map(spec.placement, n_ranks=n_ranks, n_stages=n_stages)
    counted = schedules.in_flight_per_stage(table, rank_of)
    return tuple(counted.get(s, 0) for s in range(n_stages))


def plan_pipeline(
    captured: CapturedGraph,
    config: PipelineConfig,
    *,
    spec: ScheduleSpec,
    n_ranks: int,
    n_stages: int,
    costs: CostSource = local_costs,
    owners: Mapping[int, frozenset[int]] | None = None,
    with_costs: bool = False,
) -> Plan:
    """Stage of every compute node: ``pipe_split()`` markers, else ``split_points``, else the stages that
    already own the model's tensors (``owners``, from an earlier pipeline over the same model: a later one
    must not pull other ranks' weights in), else the balanced partition on the node costs ``costs``
    returns (the backend's are at the rates every rank agreed on). The plan carries those costs, and with
    ``with_costs`` it carries them for split points too (to explain the plan)."""
    points = _split_points(captured, config)
    table = spec.build(n_ranks=n_ranks, n_stages=n_stages, n_microbatches=captured.n_microbatches)
    in_flight = _in_flight(table, spec, n_ranks=n_ranks, n_stages=n_stages)
    plan = partial(Plan, in_flight=in_flight, spec=spec, n_ranks=n_ranks, table=table)
    if points or n_stages == 1:
        if len(points) + 1 != n_stages:
            raise ConfigError(
                f"{len(points)} split points make {len(points) + 1} stages, but the pipeline needs {n_stages}; "
                f"give {n_stages - 1} split points"
            )
        given = assign_by_split_points(captured, points)
        return plan(stage_of=given, costs=costs(captured, config) if with_costs else None)
    owned = assign_by_owners(captured, owners) if owners else None
    if owned is not None and set(owned.values()) == set(range(n_stages)):  # else: cut anew, fetch weights
        return plan(stage_of=owned, costs=costs(captured, config) if with_costs else None, kept_owners=True)
    node_costs = costs(captured, config)
    if config.balance_slack is None:
        slack, step_slack = BALANCE_SLACK, STEP_SLACK if captured.n_microbatches > 1 else None
    else:
        slack = step_slack = config.balance_slack
    part = balanced_partition(
        captured,
        n_stages,
        costs=node_costs,
        unsplittable=config.unsplittable,
        max_stage_memory=config.max_stage_memory,
        in_flight=max(in_flight),
        step=step_time(table, spec, n_ranks, node_costs.rates),
        slack=slack,
        step_slack=step_slack,
    )
    return plan(
        stage_of=part.stage_of,
        costs=node_costs,
        layer_bottleneck_s=part.layer_bottleneck_s,
        bottleneck_s=part.bottleneck_s,
        even_stages=part.even_stages,
    )


def _split_points(captured: CapturedGraph, config: PipelineConfig) -> list[str] | list[int]:
    """The stages a person chose: ``pipe_split()`` markers (positions) or ``split_points`` (module names)."""
    markers = captured.split_markers
    if markers and config.split_points:
        raise ConfigError("the model calls pipe_split() and split_points is set too; use one of the two")
    if (markers or config.split_points) and config.balance_slack is not None:
        raise ConfigError(
            "balance_slack shapes the automatic partition, but the stages are given by "
            + ("pipe_split() markers" if markers else "split_points")
            + "; drop balance_slack or the split points"
        )
    return markers or list(config.split_points)


def step_time(table: Table, spec: ScheduleSpec, n_ranks: int, rates: Rates = NOMINAL_RATES) -> StepObjective:
    """The partitioner's objective: one simulated step of ``table`` over a split's per-stage costs (each
    rank on a core of its own: the search tries hundreds of splits, and replaying shared cores takes a
    few replays each; the prediction of the plan chosen charges them)."""
    return lambda costs: _simulate(table, spec, n_ranks, costs, rates, shared=False).makespan


def predict_step(plan: Plan, stages: Sequence[StageCost]) -> Timeline:
    """One simulated training step of ``plan``'s schedule over its per-stage costs, at its costs' rates."""
    rates = plan.costs.rates if plan.costs is not None else NOMINAL_RATES
    return _simulate(plan.table, plan.spec, plan.n_ranks, stages, rates)


def _simulate(
    table: Table,
    spec: ScheduleSpec,
    n_ranks: int,
    costs: Sequence[StageCost],
    rates: Rates,
    shared: bool = True,
) -> Timeline:
    """The step at ``rates``, with every edge the stages send over (skips too): the same for the
    partitioner's objective and for explain()'s prediction. Every backward action also pays the autograd
    engine's entry, and every action the CPU of the messages it sends and receives (measured on CPU
    processes); ranks that share cores slow one another down where they compute at once
    (:mod:`dynapipe.schedules.sharing`)."""
    edges = sorted({(s, d) for s, cost in enumerate(costs) for d in cost.sends})
    split = any(a.kind is Kind.W for actions in table.values() for a in actions if a is not None)
    entry = rates.backward_entry_s
    forward_messages, backward_messages = _messages(
        costs, placement_map(spec.placement, n_ranks=n_ranks, n_stages=len(costs))
    )
    paid = [
        dataclasses.replace(
            c,
            forward=c.forward + rates.message_s * forward_messages[s],
            backward_input=c.backward_input + entry + rates.message_s * backward_messages[s],
            backward_weight=c.backward_weight + (entry if split else 0.0),
        )
        for s, c in enumerate(costs)
    ]
    replay = partial(
        simulate,
        table,
        paid,
        n_ranks=n_ranks,
        n_stages=len(costs),
        placement=spec.placement,
        link_latency=rates.link_latency_s,
        link_bandwidth=rates.link_bandwidth,
        edges=edges,
    )
    if shared and 0 < rates.cores < n_ranks:
        return shared_cores(lambda durations: replay(durations=durations), rates.cores)
    return replay()


def _messages(costs: Sequence[StageCost], rank_of: Mapping[int, int]) -> tuple[list[int], list[int]]:
    """Per stage, the messages its forward and its backward send and receive between ranks (each of the
    tensors of :attr:`StageCost.messages`, and of those the gradients coming back)."""
    forward, backward = [0] * len(costs), [0] * len(costs)
    for s, cost in enumerate(costs):
        for d, n in cost.messages.items():
            if rank_of[d] != rank_of[s]:  # stages on one rank hand tensors over in memory
                grads = cost.grad_messages.get(d, 0)
                forward[s], forward[d] = forward[s] + n, forward[d] + n
                backward[s], backward[d] = backward[s] + grads, backward[d] + grads
    return forward, backward


def stage_count(config: PipelineConfig, spec: ScheduleSpec, world: int) -> int:
    """Stages to cut; ``world`` is the number of pipeline ranks (world size / dp_degree)."""
    n_stages = config.n_stages or (len(config.split_points) + 1 if config.split_points else None)
    v = config.virtual_stages
    if n_stages is None:
        try:
            return spec.n_stages(world, stages_per_rank=v)
        except ScheduleError as err:
            raise ConfigError(f"virtual_stages={v}: {err}") from err
    if v is not None and n_stages != v * world:
        given = (
            f"n_stages={config.n_stages}" if config.n_stages else f"{len(config.split_points)} split_points"
        )
        raise ConfigError(
            f"virtual_stages={v} on {world} pipeline ranks makes {v * world} stages, but {given} make "
            f"{n_stages}; drop virtual_stages (it is then inferred as stages / ranks) or give "
            f"{v * world - 1} split_points"
        )
    if n_stages % world and world % n_stages:
        raise ConfigError(
            f"world size ({world}) is not a multiple of the stage count ({n_stages}); launch "
            f"{n_stages} processes (one per stage) or set n_stages / split_points for {world} stages"
        )
    if n_stages < world:
        raise ConfigError(
            f"the pipeline has {world} ranks (world size / dp_degree), {world // n_stages} x the stage count "
            f"({n_stages}); set dp_degree={world // n_stages} for data parallelism, launch fewer processes, or "
            f"make {world} stages (n_stages={world} or {world - 1} split_points)"
        )
    if n_stages > world and spec.stages_per_rank not in (None, n_stages // world):
        raise ConfigError(
            f"{n_stages} stages on {world} pipeline ranks means {n_stages // world} stages per rank, but schedule "
            f"{spec.name!r} runs {spec.stages_per_rank}; use schedule='interleaved-1f1b' (any number per rank)"
            f"{' or zbv (2 per rank)' if n_stages == 2 * world else ''}, or make {world} stages"
        )
    return n_stages
