"""The ``"dynapipe"`` Dynamo backend: capture -> partition -> codegen -> runtime, on the first call.

Dynamo calls :func:`dynapipe_backend` with the graph it traced at the full batch size. The backend keeps
the Python frame Dynamo compiled and returns a callable; the first time that callable runs (outside
Dynamo's compile, where errors read cleanly) it re-captures the frame at the microbatch size, cuts it into
stages, checks that every rank cut the same way, fills the parameters its own stages read if no rank holds
them yet (a model built under ``dynapipe.empty_init()``), frees those of other ranks' stages and builds
the pipeline. Later calls reuse it at any sizes the capture allows (another sequence length, a smaller
last batch): the stage graphs are symbolic in the sizes, so only the values of the size symbols change.

Dynamo compiles the frame again when a size first changes (its automatic dynamic shapes) or a guard of
its own fails; each compile calls the backend again. Those calls share one :class:`_FramePipelines` when
they compile the same work (same code, closure, model tensors, options, global modes and graph
structure), so a recompile for a new length reuses the pipeline instead of capturing again.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._dynamo.source import DictGetItemSource, GetItemSource, LocalSource
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten

from .batch_check import batch_symbols
from .capture import (
    CapturedGraph,
    FrameCall,
    capture_microbatch,
    frame_being_compiled,
    ignore_logging_in_graphs,
)
from .codegen import StagePlan, build_stages, partition_digest, written_in_place
from .config import PipelineConfig
from .cost import GraphCosts, graph_costs
from .errors import CaptureError, ConfigError, DynapipeError, PartitionError
from .explain import Explanation
from .init import is_empty
from .microbatch import check_divisible, infer_batch_size
from .plan import CostSource, local_costs, plan_pipeline
from .runtime.checkpoint import check_models, fill_state
from .runtime.comm import Comm, ensure_process_group
from .runtime.layout import build_layout, tied_groups
from .runtime.pipeline import OutputSpec, Pipeline
from .runtime.state import allocate_read_inputs, owner_stages, place_state, record_owners
from .schedules import (
    Action,
    Kind,
    ScheduleError,
    ScheduleSpec,
    StageGraph,
    Table,
    format_schedule,
    get_schedule,
    placement_map,
    split_last_backward,
    validate,
)
from .shapes import CaptureShapes, Sizes

__all__ = ["dynapipe_backend"]

ignore_logging_in_graphs()  # this module is imported when torch.compile looks the backend up, before tracing


def dynapipe_backend(gm: fx.GraphModule, example_inputs: list[Any], *, options: dict | None = None) -> Any:
    """Entry point registered as ``torch_dynamo_backends: dynapipe``.

    Errors found here are raised when the returned callable runs (at once), so that they reach the user
    as themselves rather than wrapped in Dynamo's BackendCompilerFailed.
    """
    try:
        config = PipelineConfig.from_options(options)
        frame = frame_being_compiled()
    except DynapipeError as err:
        return _Raise(err)
    graph_args = [n.meta["grapharg"] for n in gm.graph.find_nodes(op="placeholder")]
    key = _frame_key(gm, graph_args, frame, config)
    shared = _SHARED.get(key)
    if shared is None:
        shared = _SHARED[key] = _FramePipelines()
    return _LazyPipeline(config, frame, graph_args, shared)


@dataclass
class _Entry:
    """One built pipeline, with what its capture assumed: it serves every call whose sizes satisfy
    ``shapes`` and whose Python numbers are ``numbers`` (they are baked into the stage graphs)."""

    pipeline: Pipeline
    readers: list[Any]  # compiled Dynamo sources of the graph inputs
    shapes: CaptureShapes
    numbers: tuple


@dataclass
class _FramePipelines:
    """The pipelines of one compiled frame, shared by every backend call Dynamo makes for it."""

    entries: list[_Entry] = field(default_factory=list)
    captures: int = 0  # how many times dynapipe captured this frame (StepReport.plan.captured.number)

    def find(
        self, arguments: dict[str, Any], numbers: tuple, self_name: str | None
    ) -> tuple[_Entry, Sizes, int] | None:
        """The pipeline that serves a call on ``arguments``, the sizes there, and the batch size."""
        batch_size = infer_batch_size({n: v for n, v in arguments.items() if n != self_name})
        for entry in self.entries:
            if entry.numbers != numbers or batch_size is None:
                continue
            values = [eval(reader, {"L": arguments}) for reader in entry.readers]  # noqa: S307 - Dynamo sources
            sizes = entry.shapes.sizes_at(values, batch_size, entry.pipeline.n_microbatches)
            if sizes is not None:
                return entry, sizes, batch_size
        return None


# Dynamo keeps no per-frame state for a backend, so the frames' pipelines live here, each as long as one
# of Dynamo's compiled entries for its frame (a _LazyPipeline) holds it.
_SHARED: weakref.WeakValueDictionary[tuple, _FramePipelines] = weakref.WeakValueDictionary()


def _frame_key(gm: fx.GraphModule, graph_args: list[Any], frame: FrameCall, config: PipelineConfig) -> tuple:
    """What two of Dynamo's compiles of a frame must share for one pipeline to serve both: the code, the
    objects it reaches (closure, argument objects, the model tensors the graph reads), the options, the
    global modes Dynamo guards, and the graph's structure with sizes left out (``model.eval()`` or a
    changed flag changes the ops or their constants; a new length changes only sizes)."""
    data = _data_ids(frame.arguments)
    state = tuple(
        id(g.example) for g in graph_args if isinstance(g.example, torch.Tensor) and id(g.example) not in data
    )
    closure = tuple(id(c.cell_contents) for c in frame.closure or ())
    objects = tuple(
        id(leaf)
        for leaf in tree_flatten(frame.arguments)[0]
        if not isinstance(leaf, (torch.Tensor, int, float, bool, str, type(None)))
        or isinstance(leaf, torch.nn.Parameter)
    )
    options = tuple(
        (f.name, repr(v) if isinstance(v, (bool, int, float, str, tuple, type(None))) else id(v))
        for f in dataclasses.fields(config)
        for v in [getattr(config, f.name)]
    )
    modes = (torch.is_grad_enabled(), torch.get_default_dtype(), torch.is_autocast_enabled())
    return (frame.code, id(frame.globals), closure, objects, state, options, modes, _structure(gm))


def _data_ids(arguments: dict[str, Any]) -> set[int]:
    return {
        id(leaf)
        for leaf in tree_flatten(arguments)[0]
        if isinstance(leaf, torch.Tensor) and not isinstance(leaf, torch.nn.Parameter)
    }


def _structure(gm: fx.GraphModule) -> tuple:
    """The graph's ops and constants with every size left out: a node that computes a size, and an int
    argument (a size at one length, a symbol's node at another), read the same."""

    def is_size(value: Any) -> bool:
        return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, torch.Size)) or (
            isinstance(value, (tuple, list)) and all(is_size(v) for v in value)
        )

    def norm(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return "#" if is_size(arg.meta.get("example_value")) else "t"
        if isinstance(arg, (tuple, list)):
            return tuple(norm(a) for a in arg)
        if isinstance(arg, dict):
            return tuple((k, norm(v)) for k, v in arg.items())
        if isinstance(arg, int) and not isinstance(arg, bool):
            return "#"
        return repr(arg)

    return tuple(
        (n.op, str(n.target), norm(n.args), norm(n.kwargs))
        for n in gm.graph.nodes
        if n.op not in ("placeholder", "output") and not is_size(n.meta.get("example_value"))
    )


class _Raise:
    def __init__(self, err: Exception) -> None:
        self.err = err

    def __call__(self, *args: Any) -> Any:
        raise self.err


class _LazyPipeline:
    """What the backend returns: builds (and caches) the pipeline on first use.

    Dynamo calls it with the full-batch graph's flat arguments. Each tensor is matched, by identity at
    compile time, to a leaf of the frame's arguments, so every call can rebuild those arguments (aliased
    inputs included: Dynamo passes one tensor for ``f(x, x)``) and read the microbatch graph's inputs from
    them by their Dynamo source names. Python numbers that Dynamo made dynamic (an int as a SymInt, a
    float wrapped in a 0-dim tensor) are matched by their source path instead; the microbatch capture
    bakes them into the stage graphs, so the cache is keyed by their values as well as by input shapes.
    """

    def __init__(
        self, config: PipelineConfig, frame: FrameCall, graph_args: list[Any], shared: _FramePipelines
    ) -> None:
        self.config, self.frame, self.shared = config, frame, shared
        by_id = {id(g.example): i for i, g in enumerate(graph_args) if isinstance(g.example, torch.Tensor)}
        self.numbers = [i for i, g in enumerate(graph_args) if _is_number_arg(g)]
        by_path = {_argument_path(graph_args[i].source): i for i in self.numbers}
        self.leaf_positions = {}
        for name, value in frame.arguments.items():
            self.leaf_positions[name] = [
                by_path.get((name, tuple(_key(k) for k in path)))
                if isinstance(leaf, (int, float)) and not isinstance(leaf, bool)
                else by_id.get(id(leaf))
                for path, leaf in tree_flatten_with_path(value)[0]
            ]
        self.calls: dict[
            tuple, tuple[_Entry, Sizes, int]
        ] = {}  # input shapes and numbers -> what serves them

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        arguments = self._arguments_now(args)
        key = (
            tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args),
            tuple(_number(args[i]) for i in self.numbers),
        )
        if key not in self.calls:
            numbers = _numbers_in(arguments)
            found = self.shared.find(arguments, numbers, self.frame.self_name)
            if found is not None:  # new sizes for a built pipeline: once per shape, never per step
                inputs = {n: v for n, v in arguments.items() if n != self.frame.self_name}
                found[0].pipeline.comm.agree({"input shapes": _shapes(inputs)}, "the call's input shapes")
            else:
                if len({e.numbers for e in self.shared.entries} | {numbers}) == 5:
                    warnings.warn(
                        "dynapipe captured and partitioned the model again for new values of Python numbers "
                        "passed to the compiled call (each value is baked into the stage graphs); pass a "
                        "number that changes every step as a 0-dim tensor instead",
                        stacklevel=2,
                    )
                self.shared.captures += 1
                pipeline, shapes = self._build(arguments, self.shared.captures)
                readers = [compile(source, "<dynamo source>", "eval") for source in pipeline.input_sources]
                self.shared.entries.append(_Entry(pipeline, readers, shapes, numbers))
                found = self.shared.find(arguments, numbers, self.frame.self_name)
                if found is None:
                    raise CaptureError(
                        "dynapipe captured the step but the capture does not hold at the sizes it was made at "
                        f"({shapes.representative(pipeline.input_sources)}); please report this"
                    )
            self.calls[key] = found
        entry, sizes, batch_size = self.calls[key]
        values = [eval(reader, {"L": arguments}) for reader in entry.readers]  # noqa: S307 - Dynamo source names
        pipeline = entry.pipeline
        pipeline.batch_size = batch_size  # the runtime cuts the inputs into microbatches by it
        pipeline.executor.sizes = sizes  # receive and output buffers take their shapes at these sizes
        allocate_read_inputs(pipeline.plans, pipeline.local_stages, values)  # a PipelineCache's own layers
        return pipeline(*values)

    def _arguments_now(self, args: tuple) -> dict[str, Any]:
        """The frame's arguments with each tensor and number Dynamo passed swapped in for its compile-time twin."""
        arguments = {}
        for name, value in self.frame.arguments.items():
            leaves, spec = tree_flatten(value)
            positions = self.leaf_positions[name]
            arguments[name] = tree_unflatten(
                [
                    leaf if i is None else type(leaf)(_number(args[i])) if i in self.numbers else args[i]
                    for leaf, i in zip(leaves, positions, strict=True)
                ],
                spec,
            )
        return arguments

    def _build(self, arguments: dict[str, Any], number: int) -> tuple[Pipeline, CaptureShapes]:
        """Capture (the ``number``-th time for this frame), partition and build a pipeline."""
        config = self.config
        models = check_models(self.frame, config)  # meta tensors, a bad checkpoint: fail before any wait
        inputs = {n: v for n, v in arguments.items() if n != self.frame.self_name}
        batch_size = next(
            (
                int(t.shape[0])
                for t in tree_flatten(inputs)[0]
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and t.dim() >= 1
            ),
            None,
        )
        if batch_size is None:
            raise ConfigError(
                "the compiled call has no input tensor with a batch dimension to split into microbatches"
            )
        device = next(
            (t.device for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)), torch.device("cpu")
        )
        ensure_process_group(device, config.timeout_s)
        comm = Comm(timedelta(seconds=config.timeout_s))
        layout = build_layout(
            device, dp_degree=config.dp_degree, mesh=config.mesh, timeout_s=config.timeout_s
        )
        comm.agree(
            {"batch size": str(batch_size), "input shapes": _shapes(inputs), **config.summary()}, "the call"
        )
        n_pp = layout.n_pp
        spec = get_schedule(config.schedule)
        n_stages = _stage_count(config, spec, n_pp)
        n_microbatches = config.microbatches(n_stages)
        check_divisible(batch_size, n_microbatches)

        captured = capture_microbatch(
            FrameCall(self.frame.code, self.frame.globals, self.frame.closure, arguments),
            n_microbatches=n_microbatches,
            batch_size=batch_size,
        )
        captured.number = number
        shared = _shared_costs(comm)
        kept = _modules_writing_inputs(captured)  # a PipelineCache's attention layers
        if kept:
            config = dataclasses.replace(config, unsplittable=(*config.unsplittable, *kept))
        pp_of_stage = placement_map(spec.placement, n_ranks=n_pp, n_stages=n_stages)
        stage_layout = tuple(pp_of_stage[s] for s in range(n_stages))
        owners = owner_stages([*captured.gm.parameters(), *captured.gm.buffers()], stage_layout)
        planned = plan_pipeline(
            captured, config, spec=spec, n_ranks=n_pp, n_stages=n_stages, costs=shared, owners=owners
        )
        try:
            plans = build_stages(captured, planned.stage_of, n_stages)
        except PartitionError:
            if not planned.kept_owners or kept:  # cut anew, an input written in place would move ranks
                raise
            # the owners' stages would send a value that cannot cross stages: cut anew, fetch weights
            planned = plan_pipeline(
                captured, config, spec=spec, n_ranks=n_pp, n_stages=n_stages, costs=shared
            )
            plans = build_stages(captured, planned.stage_of, n_stages)
        stage_of = planned.stage_of
        plan = None
        if config.on_step is not None:  # the table of the plan that runs, for whoever watches the steps
            plan = Explanation.of(captured, planned, config, shared)
        train_table, inference_table = _tables(
            spec, plans, pp_of_stage, n_pp, n_microbatches, layout.dp_degree, comm.in_issue_order
        )
        comm.agree(
            {
                "stages start at": _stage_starts(stage_of, n_stages),
                "stage code (hash)": partition_digest(plans)[:16],
                "schedule": format_schedule(train_table),
            },
            "the partition and schedule",
        )

        local = sorted(s for s, pp in pp_of_stage.items() if pp == layout.pp_index)
        # before Pipeline: its DDP wrappers broadcast the local stages' parameters, which must hold values
        place_state(plans, local, comm, fill=partial(fill_state, models, config.checkpoint))
        record_owners(plans, stage_layout)
        pipeline = Pipeline(
            plans=plans,
            rank_of_stage={s: layout.global_rank(pp) for s, pp in pp_of_stage.items()},
            actions=train_table[layout.pp_index],
            inference_actions=inference_table[layout.pp_index],
            comm=comm,
            layout=layout,
            input_sources=captured.input_sources,
            batch_size=batch_size,
            n_microbatches=n_microbatches,
            outputs=_output_specs(captured),
            loss_index=_loss_index(captured),
            loss_reduction=config.loss_reduction,
            tied=tied_groups(plans, pp_of_stage, layout, config.timeout_s),
            on_step=config.on_step,
            plan=plan,
            ddp_comm_hook=config.ddp_comm_hook,
        )
        return pipeline, captured.shapes


def _tables(
    spec: ScheduleSpec,
    plans: list[StagePlan],
    pp_of_stage: dict[int, int],
    n_pp: int,
    n_microbatches: int,
    dp_degree: int,
    in_issue_order: bool,
) -> tuple[Table, Table]:
    """The lowered training and forward-only tables every rank runs, each proved by ``validate`` on the
    stage graph the plans really have (a send or receive for every tensor that crosses ranks, nothing
    more)."""
    n_stages = len(plans)
    graph = StageGraph(
        n_stages,
        tuple(tuple(sorted({b.producer for b in p.receives})) for p in plans),
        tuple(tuple(sorted({c for b in p.sends for c in b.consumers})) for p in plans),
    )
    train = spec.build(n_ranks=n_pp, n_stages=n_stages, n_microbatches=n_microbatches)
    reduce_stages: list[int] = []
    if dp_degree > 1:
        # the last backward of each stage runs DDP's all-reduce; as I then W, the input gradient is
        # sent before the all-reduce waits, so the all-reduces do not add up along the critical path
        train = split_last_backward(train)
        reduce_stages = [
            s for s, p in enumerate(plans) if any(t.requires_grad for t in p.module.parameters())
        ]
    inference = {
        r: [
            Action(s, Kind.F, mb)
            for s in range(n_stages)
            if pp_of_stage[s] == r
            for mb in range(n_microbatches)
        ]
        for r in range(n_pp)
    }
    # gloo: every receive posted when the step starts (a message that finds its receive posted skips a
    # round trip); NCCL matches a pair's sends and receives in the order issued: one global order
    lowered = validate(
        train,
        n_pp,
        n_stages,
        n_microbatches,
        pp_of_stage,
        stage_graph=graph,
        reduce_stages=reduce_stages,
        receive_ahead=None,
        in_issue_order=in_issue_order,
    )
    lowered_inference = validate(
        inference,
        n_pp,
        n_stages,
        n_microbatches,
        pp_of_stage,
        stage_graph=graph,
        forward_only=True,
        receive_ahead=None,
        in_issue_order=in_issue_order,
    )
    return lowered, lowered_inference


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


def _stage_count(config: PipelineConfig, spec: ScheduleSpec, world: int) -> int:
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


def _shared_costs(comm: Comm) -> CostSource:
    """Node costs every rank agrees on: with ``profile``, rank 0's measurements (ranks that cannot run
    the graph, having freed other stages' parameters, send None), so every rank cuts the same way."""

    def costs(captured: CapturedGraph, config: PipelineConfig) -> GraphCosts:
        estimate = graph_costs(captured, optimizer=config.optimizer)
        if not config.profile:
            return estimate
        can_profile = not any(is_empty(t) for t in [*captured.gm.parameters(), *captured.gm.buffers()])
        mine = local_costs(captured, config).times() if can_profile else None
        times = comm.gather_objects(mine, "profiled node times")[0]  # rank 0's measurements for everyone
        return estimate if times is None else estimate.with_times(times)

    return costs


def _shapes(inputs: dict[str, Any]) -> str:
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


def _is_number_arg(graph_arg: Any) -> bool:
    """A Python number Dynamo passes as a graph input: an int as a SymInt, a float as a 0-dim tensor."""
    return graph_arg.pass_arg_as_tensor or isinstance(graph_arg.example, (torch.SymInt, torch.SymFloat))


def _numbers_in(arguments: dict[str, Any]) -> tuple:
    """The Python numbers among the arguments' leaves: the capture bakes them into the stage graphs."""
    return tuple(
        leaf
        for leaf in tree_flatten(arguments)[0]
        if isinstance(leaf, (int, float)) and not isinstance(leaf, bool)
    )


def _number(value: Any) -> int | float:
    return value.item() if isinstance(value, torch.Tensor) else value


def _argument_path(source: Any) -> tuple[str, tuple] | None:
    """(frame argument name, keys into it) of a Dynamo source such as ``L['cfg']['scale']``; None if the
    value does not live in the frame's arguments as a pytree leaf (an attribute, a global, a size)."""
    keys = []
    while isinstance(source, (GetItemSource, DictGetItemSource)):
        keys.append(source.index)
        source = source.base
    if not isinstance(source, LocalSource):
        return None
    return source.local_name, tuple(reversed(keys))


def _key(entry: Any) -> Any:
    """The raw key of one pytree path entry (dict key, sequence index or attribute name)."""
    for name in ("key", "idx", "name"):
        if hasattr(entry, name):
            return getattr(entry, name)
    return entry


def _output_nodes(captured: CapturedGraph) -> list[Any]:
    out = captured.gm.graph.find_nodes(op="output")[0].args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _output_specs(captured: CapturedGraph) -> list[OutputSpec]:
    specs = []
    rows = {captured.shapes.names.get(s, s) for s in batch_symbols(captured.gm)}
    for node in _output_nodes(captured):
        value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"output {node} of the compiled call is not a tensor; return tensors (or pytrees of them)"
            )
        shape = captured.shapes.shape_of(value)
        # the capture marks the batch dimension dynamic, so a batched output's dim 0 is in the batch symbol
        # (a microbatch of one row cannot be marked: then a leading dimension of 1 counts as the batch)
        first = shape.dims[0] if shape.dims else None
        batched = (isinstance(first, sympy.Expr) and bool(first.free_symbols & rows)) or (
            first == captured.microbatch_size == 1
        )
        if batched:
            shape = shape.scaled(captured.n_microbatches)
        merge = "cat" if batched else "last" if _updates_state_in_place(node) else "reduce"
        specs.append(OutputSpec(shape, value.dtype, merge, value.requires_grad))
    return specs


def _updates_state_in_place(node: fx.Node) -> bool:
    """Whether an output is a buffer or parameter itself, after in-place updates (``self.count += 1``:
    Dynamo returns it so as to assign it back)."""
    while node.op != "get_attr":
        if not (node.args and isinstance(node.args[0], fx.Node) and node.args[0] in written_in_place(node)):
            return False
        node = node.args[0]
    return True


def _loss_index(captured: CapturedGraph) -> int | None:
    for i, node in enumerate(_output_nodes(captured)):
        value = node.meta.get("example_value")
        if value.dim() == 0 and value.is_floating_point() and value.requires_grad:
            return i
    return None
