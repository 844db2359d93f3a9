"""Dynamo graph in -> one captured, batch-symbolic FX graph of a single microbatch.

Dynamo hands the backend a graph traced at the full batch size, with that size baked into views and
reshapes. Pipelining runs the graph on microbatches, so dynapipe re-traces the same Python frame (same
code object, globals, closure and arguments) with its batched inputs cut to one microbatch and their batch
dimension (and every other dimension of them) marked dynamic, under ``fullgraph=True`` so that a graph
break becomes an error naming its cause. The result is a :class:`~dynapipe.graph.CapturedGraph`. When
Dynamo's own graph is already symbolic in the batch size, that graph serves instead (:mod:`.one_trace`).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental import _config as fx_config

from ..errors import CaptureError, GraphBreakError
from ..graph import CapturedGraph, CaptureShapes, compute_nodes, dims_of, is_size_node
from ..microbatch import is_batched, rows_of
from .batch_check import batch_symbols, check_guards, check_no_batch_slicing, check_no_batch_squeeze
from .frame import FrameCall, ignore_logging_in_graphs
from .inputs import check_no_foreign_cache, input_names
from .markers import is_split_marker
from .names import ModelNames, reachable_modules
from .one_trace import at_microbatch, at_one_row
from .recorded import Trace, trace_of
from .sizes import rewrite_sizes

__all__ = ["capture_microbatch"]


class _Recorded(Exception):
    """Raised by the recording backend to stop Dynamo once it has handed over the graph."""


def _node_module_path(gm: fx.GraphModule, node: fx.Node, names: ModelNames) -> str:
    """The user's name of the innermost module a node runs in (Dynamo keys its module stack by ``id()``).
    A higher-order op whose body runs deeper than its caller (``checkpoint(block, h)`` in a loop over
    blocks) takes the module its body runs in."""
    path = ""
    for key in reversed(list(node.meta.get("nn_module_stack") or {})):
        module_id = str(key).split("@")[0]
        if module_id.isdigit() and int(module_id) in names.modules:
            path = names.modules[int(module_id)]
            break
    body = node.args[0] if node.op == "call_function" and node.args else None
    if isinstance(body, fx.Node) and body.op == "get_attr":
        sub = getattr(gm, str(body.target), None)
        if isinstance(sub, fx.GraphModule):
            paths = [_node_module_path(sub, n, names) for n in sub.graph.nodes if n.op == "call_function"]
            inner = ".".join(os.path.commonprefix([p.split(".") for p in paths])) if paths else ""
            if not path or inner == path or inner.startswith(path + "."):
                return inner
    return path


def _attr_name(qualified: str, taken: set[str]) -> str:
    name = re.sub(r"\W", "_", qualified) or "state"
    if name[0].isdigit():
        name = f"_{name}"
    base, i = name, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _record(frame: FrameCall, arguments: dict[str, Any]) -> Trace:
    """Trace ``frame`` on ``arguments`` with Dynamo."""
    box: dict[str, Any] = {}

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        box["graph"] = trace_of(gm)
        raise _Recorded

    try:
        args, kwargs = frame.bind(arguments)
        # a size equal to another by chance (16 rows and 16 tokens) keeps its own symbol
        with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]  # installed at import
            torch.compile(frame.function(), backend=recorder, fullgraph=True)(*args, **kwargs)
    except Exception as err:  # Dynamo wraps backend exceptions; find ours or report the break
        if "graph" in box:
            return box["graph"]
        if isinstance(err, torch._dynamo.exc.Unsupported):
            raise GraphBreakError(
                "dynapipe needs the whole step as one graph, but Dynamo cannot trace it:\n"
                f"{err}\nFix: rewrite the line shown above (or move it out of the compiled call); "
                "torch.compile(..., fullgraph=True, backend='eager') reproduces the break in one process."
            ) from err
        raise CaptureError(
            f"dynapipe could not capture the step at the microbatch size: {err}\nEvery input tensor whose "
            "first dimension equals the batch size was cut into microbatches. If one of them is not per-example "
            "data (a class-weight vector, a lookup table that happens to have that length), make it a buffer "
            "of the model instead of an argument."
        ) from err
    raise CaptureError("Dynamo produced no graph for the step: the compiled call performs no tensor work")


def capture_microbatch(
    frame: FrameCall, *, n_microbatches: int, batch_size: int, dynamo: Trace | None = None
) -> CapturedGraph:
    """``frame`` on microbatch 0 of its own arguments as a :class:`CapturedGraph`, refusing code that would
    compute something else on a microbatch than on the full batch. Dynamo's own graph serves when the
    backend passes it (``dynamo``) and it is symbolic in the batch size (:mod:`.one_trace`); otherwise the
    frame is re-traced."""
    ignore_logging_in_graphs()
    check_no_foreign_cache(frame)
    size = batch_size // n_microbatches
    trace = at_microbatch(dynamo, frame, batch_size, size) if dynamo is not None else None
    one_trace = trace is not None
    trace, general = (trace, trace) if trace is not None else _retrace(frame, batch_size, size)
    symbols = batch_symbols(general.gm)
    check_guards(general.guards, symbols, general.hints, microbatch=max(size, 2), batch=batch_size)
    check_no_batch_slicing(general.gm, symbols)
    captured = _to_captured(trace, frame, batch_size, n_microbatches)
    captured.one_trace = one_trace
    return captured


def _retrace(frame: FrameCall, batch_size: int, size: int) -> tuple[Trace, Trace]:
    """The trace at ``size`` rows and the one the batch checks read: for one-row microbatches, the frame is
    traced at two rows, where the batch dimension is symbolic and can be recognised, and that graph is
    re-run at one row (traced again at one row only where it cannot be)."""
    rows = 2 if size == 1 and batch_size >= 2 else size
    general, every_dim = _trace_dims(frame, batch_size, rows, every_dim=True)
    if rows == size:
        return general, general
    check_no_batch_squeeze(general.gm, batch_symbols(general.gm))  # before the graph runs at one row
    trace = at_one_row(general, frame, batch_size)
    if trace is None:
        trace, _ = _trace_dims(frame, batch_size, size, every_dim=every_dim)
    return trace, general


def _trace_dims(frame: FrameCall, batch_size: int, rows: int, *, every_dim: bool) -> tuple[Trace, bool]:
    """The trace at ``rows`` rows, with every dimension of the batched inputs dynamic if ``every_dim`` and
    Dynamo can trace the code so, and whether it did."""
    if every_dim:
        try:
            return _trace_rows(frame, batch_size, rows, every_dim=True), True
        except (CaptureError, GraphBreakError):
            pass  # code Dynamo cannot trace with symbolic lengths: fixed lengths (each new one captures again)
    return _trace_rows(frame, batch_size, rows, every_dim=False), False


def _trace_rows(frame: FrameCall, batch_size: int, rows: int, *, every_dim: bool) -> Trace:
    """Trace ``frame`` on the first ``rows`` rows of its batched arguments, the batch dimension dynamic and,
    with ``every_dim``, every other dimension of them too (Dynamo fixes a size it must, such as features
    a weight multiplies; and 0 and 1 always)."""

    def cut(x: Any) -> Any:
        if not is_batched(x, batch_size):
            return x
        rows_of_x = rows_of(x, 0, rows)
        for dim in range(0 if rows > 1 else 1, x.dim() if every_dim else 1):
            torch._dynamo.maybe_mark_dynamic(rows_of_x, dim)
        return rows_of_x

    return _record(frame, torch.utils._pytree.tree_map(cut, frame.arguments))


def _to_captured(trace: Trace, frame: FrameCall, batch_size: int, n_mb: int) -> CapturedGraph:
    gm, placeholders = trace.gm, trace.placeholders
    graph = gm.graph
    self_name = frame.self_name
    state_values = [v for _, v in placeholders if isinstance(v, torch.Tensor)]
    names = ModelNames.build(
        reachable_modules(frame.arguments, frame.code, frame.closure, frame.globals), state_values
    )
    state_names: dict[str, str] = {}
    input_sources: list[str] = []
    inputs: dict[str, fx.Node] = {}
    sizes: list[tuple[fx.Node, str, Any]] = []  # size placeholders (``s27``: ``L['ids'].size()[1]``)
    taken = {n.target for n in graph.nodes if n.op == "get_attr"}
    for node, (source, value) in zip(list(graph.find_nodes(op="placeholder")), placeholders, strict=True):
        is_state = (
            isinstance(value, torch.nn.Parameter) or "._buffers[" in source or "._parameters[" in source
        )
        from_argument = any(source.startswith(f"L['{a}']") for a in frame.arguments if a != self_name)
        if isinstance(value, torch.Tensor) and not is_state and from_argument:
            node.meta.pop("grapharg", None)
            input_sources.append(source)
            inputs[source] = node
            continue
        if isinstance(value, torch.Tensor):  # parameter, buffer, or a tensor constant the code reads
            # a tensor no reachable module owns (a global, a closure's tensor) keeps its source, made readable
            qualified = names.tensors.get(id(value)) or re.sub(r"\W+", "_", source).strip("_")
            name = _attr_name(qualified, taken)
            state_names[name] = qualified
            if isinstance(value, torch.nn.Parameter):
                gm.register_parameter(name, value)
            else:
                gm.register_buffer(name, value, persistent=False)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
        else:
            sizes.append((node, source, value))
    rewrite_sizes(graph, sizes, inputs)
    for node in graph.nodes:
        node.meta["module_path"] = _node_module_path(gm, node, names)
    markers = _remove_split_markers(graph)
    for node in reversed(graph.nodes):
        if is_size_node(node) and not node.users:  # a size only a removed node read
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    gm.meta["input_names"] = input_names(frame, input_sources)  # for tables: ``ids``, not ``L['ids']``
    cut = [is_batched(eval(s, {"L": frame.arguments}), batch_size) for s in input_sources]  # noqa: S307 - Dynamo source names
    shapes = _capture_shapes(trace, input_sources, [inputs[s] for s in input_sources], cut)
    return CapturedGraph(gm, input_sources, state_names, batch_size, n_mb, shapes, markers)


def _capture_shapes(
    trace: Trace, sources: list[str], input_nodes: list[fx.Node], cut: list[bool]
) -> CaptureShapes:
    dims = [
        dims_of(n.meta["example_value"]) if isinstance(n.meta.get("example_value"), torch.Tensor) else None
        for n in input_nodes
    ]
    return CaptureShapes.named(
        sources,
        dims,
        batched=cut,
        guards=[g for g, _ in trace.guards],
        ranges=dict(trace.ranges),
        hints={s: int(v) for s, v in trace.hints.items()},
    )


def _remove_split_markers(graph: fx.Graph) -> list[int]:
    """Positions (in compute-node order, markers left out) of ``pipe_split()`` calls, which are removed:
    a marker is a boundary, not work."""
    positions, index = [], 0
    for node in compute_nodes(graph):
        if is_split_marker(node):
            positions.append(index)
            graph.erase_node(node)
        else:
            index += 1
    return positions
