"""Plan + codegen + tables + state placement -> one rank's runnable :class:`~dynapipe.runtime.Pipeline`.

The steps, in order, every rank the same: start the process group and the pp x dp mesh; agree on the
call; capture the frame at the microbatch size; plan the stages (rank 0's profile shared, if asked);
generate the stage modules; lower and validate the schedule's tables once; agree on the partition; fill
and place the parameters; hand the runtime what it runs. Everything that fails on bad input fails here,
on every rank at once, before a step waits on another rank.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_flatten_with_path

from ..capture import FrameCall, capture_microbatch
from ..codegen import StagePlan, build_stages, partition_digest
from ..compiled_stage import CompiledStage, compile_stages
from ..config import PipelineConfig
from ..cost import Rates, graph_costs
from ..errors import ConfigError, PartitionError
from ..graph import CapturedGraph, CaptureShapes, written_in_place
from ..microbatch import check_divisible, infer_batch_size, split_inputs
from ..plan import CostSource, Explanation, Plan, plan_pipeline, stage_count
from ..runtime import (
    Comm,
    Pipeline,
    PipelineMesh,
    build_mesh,
    ensure_process_group,
    owner_stages,
    place_state,
    record_owners,
    tied_groups,
)
from ..schedules import (
    Action,
    Kind,
    ScheduleSpec,
    StageGraph,
    Table,
    format_schedule,
    get_schedule,
    lower,
    placement_map,
    split_last_backward,
    validate,
)
from .models import check_models, fill_state
from .outputs import loss_index, output_specs
from .rates import plan_rates
from .report import Reporter

__all__ = ["build_pipeline", "input_shapes"]


def build_pipeline(
    config: PipelineConfig, frame: FrameCall, arguments: dict[str, Any], *, number: int, dynamo: Any = None
) -> tuple[Pipeline, CaptureShapes]:
    """Capture ``frame`` on ``arguments`` (its ``number``-th capture; from ``dynamo``, Dynamo's trace, if it
    serves), plan, generate and place its stages; return the pipeline and the sizes its capture holds at."""
    started = time.perf_counter()
    models = check_models(frame, config)  # meta tensors, a bad checkpoint: fail before any wait
    inputs = {n: v for n, v in arguments.items() if n != frame.self_name}
    comm, mesh = _join(config, inputs, batch_size := _batch_size(inputs))
    spec = get_schedule(config.schedule)
    n_stages = stage_count(config, spec, mesh.n_pp)
    n_microbatches = config.microbatches(n_stages)
    check_divisible(batch_size, n_microbatches)
    call = FrameCall(frame.code, frame.globals, frame.closure, arguments)
    captured = _capture(call, n_microbatches, batch_size, dynamo, comm, number)
    pp_of_stage = placement_map(spec.placement, n_ranks=mesh.n_pp, n_stages=n_stages)
    rates = functools.cache(partial(plan_rates, config, captured, comm, mesh, _device(inputs)))
    plan, stages = _plan_stages(
        captured, config, spec, comm, pp_of_stage, rates, with_costs=config.on_step is not None
    )
    train, inference = _tables(plan, stages, pp_of_stage, mesh, n_microbatches, comm.in_issue_order)
    comm.agree(
        {
            "stages start at": _stage_starts(plan.stage_of, n_stages),
            "stage code (hash)": partition_digest(stages)[:16],
            "schedule": format_schedule(train),
        },
        "the partition and schedule",
    )

    local = sorted(s for s, pp in pp_of_stage.items() if pp == mesh.pp_index)
    # before Pipeline: its DDP wrappers broadcast the local stages' parameters, which must hold values
    place_state(stages, local, comm, fill=partial(fill_state, models, config.checkpoint))
    record_owners(stages, tuple(pp_of_stage[s] for s in range(n_stages)))
    compiled, how_compiled = _compile(config, stages, local, inputs, captured.shapes, comm)
    reporter = Reporter(config.on_step, Explanation.of(captured, plan)) if config.on_step else None
    pipeline = Pipeline(
        stages=stages,
        rank_of_stage={s: mesh.global_rank(pp) for s, pp in pp_of_stage.items()},
        actions=train[mesh.pp_index],
        inference_actions=inference[mesh.pp_index],
        comm=comm,
        mesh=mesh,
        input_sources=captured.input_sources,
        n_microbatches=n_microbatches,
        outputs=output_specs(captured),
        loss_index=loss_index(captured),
        loss_reduction=config.loss_reduction,
        tied=tied_groups(stages, pp_of_stage, mesh, config.timeout_s),
        on_step=reporter,
        ddp_comm_hook=config.ddp_comm_hook,
        watchdog_s=config.watchdog_s or 0.0,
        compiled=compiled,
        how_compiled=how_compiled,
    )
    if reporter is not None:
        microbatches = _rehearsal_inputs(config, mesh, captured, arguments, batch_size)
        reporter.finish(plan, pipeline, microbatches, config.profile, started)
    return pipeline, captured.shapes


def _rehearsal_inputs(
    config: PipelineConfig,
    mesh: PipelineMesh,
    captured: CapturedGraph,
    arguments: dict[str, Any],
    batch_size: int,
) -> list[list[Any]] | None:
    """The graph inputs of the call's microbatches, on which the plan's step is rehearsed: a training
    call's (not a pipeline built for inference, as generate() builds), at this machine's rates, on CPU
    processes; else None."""
    values = [eval(source, {"L": arguments}) for source in captured.input_sources]  # noqa: S307 - Dynamo sources
    on_cpu = all(v.device.type == "cpu" for v in values if isinstance(v, torch.Tensor)) and mesh.n_pp > 1
    if config.rates != "measure" or not on_cpu or not torch.is_grad_enabled():
        return None
    return split_inputs(values, captured.n_microbatches, batch_size)


def _batch_size(inputs: dict[str, Any]) -> int:
    batch_size = infer_batch_size(inputs)
    if batch_size is None:
        raise ConfigError(
            "the compiled call has no input tensor with a batch dimension to split into microbatches"
        )
    return batch_size


def _capture(
    call: FrameCall, n_microbatches: int, batch_size: int, dynamo: Any, comm: Comm, number: int
) -> CapturedGraph:
    """The ``number``-th microbatch graph of the call, by one path on every rank: Dynamo's graph serves only
    where it serves on all (ranks with other data or another compile history can decide apart; their stage
    code must match)."""
    captured = capture_microbatch(call, n_microbatches=n_microbatches, batch_size=batch_size, dynamo=dynamo)
    if dynamo is not None and not all(comm.gather_objects(captured.one_trace, "the capture path")):
        if captured.one_trace:
            captured = capture_microbatch(call, n_microbatches=n_microbatches, batch_size=batch_size)
    captured.number = number
    return captured


def _compile(
    config: PipelineConfig,
    stages: list[StagePlan],
    local: list[int],
    inputs: dict[str, Any],
    shapes: CaptureShapes,
    comm: Comm,
) -> tuple[dict[int, CompiledStage], dict[int, str]]:
    """The local stages compiled if ``options["compile_stages"]`` (by default: if they run on CUDA); after
    place_state, as AOTAutograd keeps the parameters it lifts. What inductor assumed about the sizes on
    any rank becomes a guard of the capture on every rank: a call outside it captures (and compiles)
    again on all ranks together, as torch.compile recompiles."""
    wanted = config.compile_stages
    if wanted is None:
        state = [t for s in local for t in stages[s].module.state_dict(keep_vars=True).values()]
        tensors = [t for t in state + tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
        wanted = any(t.device.type == "cuda" for t in tensors)
    compiled, how = compile_stages({s: stages[s].module for s in local}, wanted)
    if not wanted:
        return compiled, how
    local_guards = [g.xreplace(shapes.names) for stage in compiled.values() for g in stage.guards]
    found = {
        str(g): g
        for guards in comm.gather_objects(local_guards, "the compiled stages' size guards")
        for g in guards
    }
    known = {str(g) for g in shapes.guards}
    shapes.guards += [found[k] for k in sorted(found) if k not in known]
    return compiled, how


def _join(config: PipelineConfig, inputs: dict[str, Any], batch_size: int) -> tuple[Comm, PipelineMesh]:
    """The process group (started if the user has not), the pp x dp mesh, and every rank's word that it
    was called the same way."""
    device = _device(inputs)
    ensure_process_group(device, config.timeout_s)
    comm = Comm(timedelta(seconds=config.timeout_s))
    mesh = build_mesh(device, dp_degree=config.dp_degree, mesh=config.mesh, timeout_s=config.timeout_s)
    call = {"batch size": str(batch_size), "input shapes": input_shapes(inputs), **config.summary()}
    comm.agree(call, "the call")
    return comm, mesh


def _device(inputs: dict[str, Any]) -> torch.device:
    """The device the call's tensors are on: the pipeline's."""
    return next(
        (t.device for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)), torch.device("cpu")
    )


def _plan_stages(
    captured: CapturedGraph,
    config: PipelineConfig,
    spec: ScheduleSpec,
    comm: Comm,
    pp_of_stage: dict[int, int],
    rates: Callable[[], Rates],
    *,
    with_costs: bool,
) -> tuple[Plan, list[StagePlan]]:
    """The plan and its stage modules. A later pipeline over the same model keeps each tensor's owning
    stages where it can, so no rank fetches another's weights."""
    n_stages, n_pp = len(pp_of_stage), len(set(pp_of_stage.values()))
    kept = _modules_writing_inputs(captured)  # a PipelineCache's attention layers
    if kept:
        config = dataclasses.replace(config, unsplittable=(*config.unsplittable, *kept))
    stage_ranks = tuple(pp_of_stage[s] for s in range(n_stages))
    owners = owner_stages([*captured.gm.parameters(), *captured.gm.buffers()], stage_ranks)
    plan_for = partial(
        plan_pipeline, captured, config, spec=spec, n_ranks=n_pp, n_stages=n_stages,
        costs=_at_rates(rates), with_costs=with_costs,
    )  # fmt: skip
    plan = plan_for(owners=owners)
    try:
        return plan, build_stages(captured, plan.stage_of, n_stages)
    except PartitionError:
        if not plan.kept_owners or kept:  # cut anew, an input written in place would move ranks
            raise
        # the owners' stages would send a value that cannot cross stages: cut anew, fetch weights
        plan = plan_for()
        return plan, build_stages(captured, plan.stage_of, n_stages)


def _tables(
    plan: Plan,
    stages: list[StagePlan],
    pp_of_stage: dict[int, int],
    mesh: PipelineMesh,
    n_mb: int,
    in_issue_order: bool,
) -> tuple[Table, Table]:
    """The lowered training and forward-only tables every rank runs, lowered and validated once, on the
    stage graph the stages really have (a send or receive for every tensor that crosses ranks)."""
    n_stages, n_pp = len(stages), plan.n_ranks
    graph = StageGraph(
        n_stages,
        tuple(tuple(sorted({b.producer for b in p.receives})) for p in stages),
        tuple(tuple(sorted({c for b in p.sends for c in b.consumers})) for p in stages),
    )
    train, reduce_stages = plan.table, []
    if mesh.dp_degree > 1:
        # the last backward of each stage runs DDP's all-reduce; as I then W, the input gradient is
        # sent before the all-reduce waits, so the all-reduces do not add up along the critical path
        train = split_last_backward(train)
        reduce_stages = [
            s for s, p in enumerate(stages) if any(t.requires_grad for t in p.module.parameters())
        ]
    inference = {
        r: [Action(s, Kind.F, mb) for s in range(n_stages) if pp_of_stage[s] == r for mb in range(n_mb)]
        for r in range(n_pp)
    }
    # gloo: every receive posted when the step starts (a message that finds its receive posted skips a
    # round trip); NCCL matches a pair's sends and receives in the order issued: one global order
    lowered = {
        "train": lower(
            train, n_pp, n_stages, pp_of_stage, stage_graph=graph, reduce_stages=reduce_stages,
            receive_ahead=None, in_issue_order=in_issue_order,
        ),
        "inference": lower(
            inference, n_pp, n_stages, pp_of_stage, stage_graph=graph, receive_ahead=None,
            in_issue_order=in_issue_order,
        ),
    }  # fmt: skip
    for name, table in lowered.items():
        validate(
            table, n_pp, n_stages, n_mb, pp_of_stage, stage_graph=graph, forward_only=name == "inference",
            in_issue_order=in_issue_order,
        )  # fmt: skip
    return lowered["train"], lowered["inference"]


def _modules_writing_inputs(captured: CapturedGraph) -> list[str]:
    """Modules that write a call's input in place (a ``PipelineCache`` layer's keys, values and counter,
    in attention): kept inside one stage, so that every pipeline over the same model (prefill, decode, a
    new prompt length), whose later ones follow the parameters' owners, writes and reads that input on
    the rank that owns the module's parameters."""
    modules = {
        str(node.meta.get("module_path"))
        for node in captured.gm.graph.nodes
        if node.meta.get("module_path") and any(w.op == "placeholder" for w in written_in_place(node))
    }
    return sorted(modules)


def _at_rates(rates: Callable[[], Rates]) -> CostSource:
    """Node costs at the rates every rank agreed on, so every rank cuts the same way. The rates are
    measured (or read) only when a plan needs costs: every rank's plan asks at the same point, or none
    does (a later pipeline that keeps the earlier one's stages, split points without a report)."""
    return lambda captured, config: graph_costs(captured, optimizer=config.optimizer, rates=rates())


def input_shapes(inputs: dict[str, Any]) -> str:
    """``x: (8, 16), y: (8,)``: every input tensor's shape by its place in the call's arguments."""
    leaves = tree_flatten_with_path(inputs)[0]
    return ", ".join(
        f"{''.join(str(k) for k in path).lstrip('.')}: {tuple(leaf.shape)}"
        for path, leaf in leaves
        if isinstance(leaf, torch.Tensor)
    )


def _stage_starts(stage_of: dict[fx.Node, int], n_stages: int) -> str:
    """The first node of every stage after the first, with the module it runs in."""
    first: dict[int, fx.Node] = {}
    for node, stage in stage_of.items():
        first.setdefault(stage, node)
    return ", ".join(
        f"{first[s].name} ({first[s].meta.get('module_path') or 'top level'})"
        for s in range(1, n_stages)
        if s in first
    )
