"""The ``"dynapipe"`` Dynamo backend: Dynamo's side only (the frame, its pipelines, the call's arguments).

Dynamo calls :func:`dynapipe_backend` with the graph it traced at the full batch size. The backend keeps
the Python frame Dynamo compiled and returns a callable; the first time that callable runs (outside
Dynamo's compile, where errors read cleanly) it builds the pipeline (:func:`dynapipe.builder.build_pipeline`:
capture, plan, codegen, tables, state placement). Later calls reuse it at any sizes the capture allows (another sequence length, a smaller
last batch): the stage graphs are symbolic in the sizes, so only the values of the size symbols change.

When Dynamo's graph is already symbolic in the batch size (``torch.compile(..., dynamic=True)``), the
capture is made from it instead of tracing the frame a second time (:mod:`dynapipe.capture.one_trace`).

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
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.source import DictGetItemSource, GetItemSource, LocalSource
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten

from .builder import build_pipeline, input_shapes
from .capture import FrameCall, frame_being_compiled, ignore_logging_in_graphs
from .capture.recorded import Trace, trace_of
from .config import PipelineConfig
from .errors import CaptureError, DynapipeError
from .graph import CaptureShapes, Sizes
from .microbatch import infer_batch_size
from .runtime import Pipeline

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
    pipeline = _LazyPipeline(config, frame, graph_args, shared)
    pipeline.dynamo = trace_of(gm)
    return pipeline


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

    dynamo: Trace | None = None  # Dynamo's graph: the capture's own when it is symbolic in the batch size

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
                found[0].pipeline.agree({"input shapes": input_shapes(inputs)}, "the call's input shapes")
            else:
                if len({e.numbers for e in self.shared.entries} | {numbers}) == 5:
                    warnings.warn(
                        "dynapipe captured and partitioned the model again for new values of Python numbers "
                        "passed to the compiled call (each value is baked into the stage graphs); pass a "
                        "number that changes every step as a 0-dim tensor instead",
                        stacklevel=2,
                    )
                self.shared.captures += 1
                pipeline, shapes = build_pipeline(
                    self.config, self.frame, arguments, number=self.shared.captures, dynamo=self.dynamo
                )
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
        return entry.pipeline.run(values, sizes=sizes, batch_size=batch_size)

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
