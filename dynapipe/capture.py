"""Dynamo graph in -> one captured, batch-symbolic FX graph of a single microbatch.

Dynamo hands the backend a graph traced at the full batch size, with that size baked into views and
reshapes. Pipelining runs the graph on microbatches, so dynapipe re-traces the same Python frame (same
code object, globals, closure and arguments) with its batched inputs cut to one microbatch and their batch
dimension marked dynamic, under ``fullgraph=True`` so that a graph break becomes an error naming its cause.

The result, :class:`CapturedGraph`, is the contract with the rest of dynapipe:

* placeholders are the microbatched inputs, each tagged with its Dynamo source (``L['x']``);
* parameters, buffers and other tensors the code reads become ``get_attr`` nodes whose attributes are the
  user's own tensor objects (so gradients land where the user's optimizer looks);
* sizes stay symbolic: the batch dimension and every other dimension of the microbatched inputs are
  marked dynamic, each size the graph uses is computed from the inputs (``s27 = l_ids_.size(1)``; a
  *size node*, :func:`is_size_node`, which every stage that reads it computes itself), and
  ``shapes`` (:class:`~dynapipe.shapes.CaptureShapes`) says at which sizes the graph holds; each node's
  ``meta["example_value"]`` keeps its symbolic shape (sympy) for the cost model;
* ``meta["module_path"]`` is the dotted name of the innermost user module that produced the node, and
  ``state_names`` the names of parameters and buffers: the user's own names, found by identity
  (:mod:`dynapipe.names`).
"""

from __future__ import annotations

import inspect
import operator
import os
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._dynamo.symbolic_convert import InstructionTranslator
from torch.fx.experimental import _config as fx_config

from .batch_check import batch_symbols, check_guards, check_no_batch_slicing, check_no_batch_squeeze
from .errors import CaptureError, GraphBreakError
from .markers import is_split_marker
from .microbatch import is_batched, rows_of
from .names import ModelNames, reachable_modules
from .shapes import CaptureShapes, dims_of

__all__ = [
    "FrameCall",
    "CapturedGraph",
    "frame_being_compiled",
    "capture_microbatch",
    "compute_nodes",
    "is_size_node",
    "unpacked_by",
    "ignore_logging_in_graphs",
    "settle_getitems",
]

_COMPUTE_OPS = ("call_function", "call_method", "call_module")

_LOGGER_METHODS = ("debug", "info", "warning", "warn", "error", "exception", "critical", "log")


def ignore_logging_in_graphs() -> None:
    """Let Dynamo drop ``logger.warning(...)``-style calls instead of breaking the graph on them.

    Libraries log inside forward (HuggingFace's ``logger.warning_once``); on one device a graph break
    there costs little, but a pipeline needs one graph, so such calls are skipped while tracing.
    """
    import logging

    names = [n for n in dir(logging.Logger) if n in _LOGGER_METHODS or n.endswith("_once")]
    torch._dynamo.config.ignore_logging_functions.update(getattr(logging.Logger, n) for n in names)


@dataclass(frozen=True)
class FrameCall:
    """The Python call that Dynamo compiled: enough to call the same code again on other arguments."""

    code: types.CodeType
    globals: dict[str, Any]
    closure: tuple[Any, ...] | None
    arguments: dict[str, Any]

    def function(self) -> types.FunctionType:
        return types.FunctionType(self.code, self.globals, self.code.co_name, None, self.closure)

    def bind(self, arguments: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments that reproduce the frame's locals ``arguments``."""
        n_pos = self.code.co_argcount
        names = self.code.co_varnames
        args = [arguments[n] for n in names[:n_pos]]
        kwargs = {n: arguments[n] for n in names[n_pos : n_pos + self.code.co_kwonlyargcount]}
        extra = n_pos + self.code.co_kwonlyargcount
        if self.code.co_flags & inspect.CO_VARARGS:
            args += list(arguments[names[extra]])
            extra += 1
        if self.code.co_flags & inspect.CO_VARKEYWORDS:
            kwargs.update(arguments[names[extra]])
        return args, kwargs

    @property
    def self_name(self) -> str | None:
        """The name of the frame's first argument when it is an nn.Module (``self`` of forward)."""
        if self.code.co_argcount and isinstance(
            self.arguments.get(self.code.co_varnames[0]), torch.nn.Module
        ):
            return self.code.co_varnames[0]
        return None


def frame_being_compiled() -> FrameCall:
    """Read the frame Dynamo is compiling; call only from inside a Dynamo backend."""
    tx = InstructionTranslator.current_tx()
    if tx.f_code.co_name.startswith("torch_dynamo_resume_in_"):
        raise GraphBreakError(
            f"Dynamo broke the graph of {tx.f_code.co_name.split('_in_')[-1]}() before this point, so dynapipe "
            "sees only part of the step. Run the step once with torch.compile(..., fullgraph=True, "
            "backend='eager') to see the break and its source line, then remove it."
        )
    outer = _eager_caller()
    if outer is not None:
        raise GraphBreakError(
            f"Dynamo could not capture {outer.f_code.co_name}() ({outer.f_code.co_filename}:{outer.f_lineno}) as "
            f"one graph and compiled the {tx.f_code.co_name}() it calls on its own, so dynapipe would see only "
            "part of the step. Run the step once with torch.compile(..., fullgraph=True, backend='eager') to see "
            "the break and its source line, then remove it."
        )
    n_args = tx.f_code.co_argcount + tx.f_code.co_kwonlyargcount
    n_args += bool(tx.f_code.co_flags & inspect.CO_VARARGS) + bool(
        tx.f_code.co_flags & inspect.CO_VARKEYWORDS
    )
    names = tx.f_code.co_varnames[:n_args]
    # copies of the argument containers: the call goes on to run and may change its own ``**kwargs``
    # (HuggingFace's wrappers pop ``return_dict``), which are the values every later call is matched against
    arguments = {n: torch.utils._pytree.tree_map(lambda v: v, tx.f_locals[n]) for n in names}
    return FrameCall(tx.f_code, tx.f_globals, tx.closure, arguments)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _eager_caller() -> types.FrameType | None:
    """A frame of code outside torch between ``torch.compile``'s entry and the frame being compiled.

    Dynamo compiles a frame called from code that runs eagerly only when it gave up on that caller (a
    graph break); such a graph is a piece of the step, not the step.
    """
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((_TORCH_DIR + "_dynamo", _OWN_DIR)):
        frame = frame.f_back  # dynapipe's backend, then Dynamo's own compile machinery
    eager = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.endswith(os.path.join("_dynamo", "eval_frame.py")):
            return eager  # torch.compile's entry
        if eager is None and not filename.startswith(_TORCH_DIR):
            eager = frame
        frame = frame.f_back
    return None


@dataclass
class CapturedGraph:
    """One microbatch of the step as a flat FX graph (see the module docstring for the contract)."""

    gm: fx.GraphModule
    input_sources: list[str]  # Dynamo source name of each placeholder, in placeholder order
    state_names: dict[str, str]  # get_attr target -> qualified name in the user's model ("layers.0.weight")
    batch_size: int
    n_microbatches: int
    shapes: CaptureShapes
    output_is_tensor: list[bool] = field(default_factory=list)
    split_markers: list[int] = field(default_factory=list)  # compute-node positions of pipe_split() calls
    number: int = 1  # 1 for the first capture of a compiled call, 2 for the one after it, ...

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.n_microbatches


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


def _hint(value: Any) -> Any:
    """Concrete value of a size-derived SymInt/SymFloat/SymBool at the microbatch size (None if the
    value depends on tensor data, like ``x.item()``: that is computed at run time instead)."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.hint
    return value


def _attr_name(qualified: str, taken: set[str]) -> str:
    name = re.sub(r"\W", "_", qualified) or "state"
    if name[0].isdigit():
        name = f"_{name}"
    base, i = name, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


@dataclass
class _Trace:
    gm: fx.GraphModule
    placeholders: list[tuple[str, Any]]  # each placeholder's Dynamo source and value
    guards: list[tuple[Any, str]]  # Dynamo's assumptions about symbolic sizes: (sympy expression, where)
    hints: dict  # symbol -> its value in this trace
    ranges: dict  # symbol -> (lowest, highest) value Dynamo let it take


def _record(frame: FrameCall, arguments: dict[str, Any]) -> _Trace:
    """Trace ``frame`` on ``arguments`` with Dynamo."""
    box: dict[str, Any] = {}

    def recorder(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        args = []
        for node in gm.graph.find_nodes(op="placeholder"):
            grapharg = node.meta["grapharg"]
            args.append((grapharg.source.name, grapharg.example))
        fake_mode = torch._guards.TracingContext.get().fake_mode
        shape_env = fake_mode.shape_env if fake_mode is not None else None
        guards, hints, ranges = [], {}, {}
        if shape_env is not None:  # symbols Dynamo later found equal are replaced by one of them
            guards = [
                (shape_env.replace(g.expr), g.sloc.maybe_user_loc or str(g.sloc)) for g in shape_env.guards
            ]
            hints = dict(shape_env.backed_var_to_val)
            ranges = {s: (r.lower, r.upper) for s, r in shape_env.var_to_range.items() if s in hints}
        box["graph"] = _Trace(gm, args, guards, hints, ranges)
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


def capture_microbatch(frame: FrameCall, *, n_microbatches: int, batch_size: int) -> CapturedGraph:
    """Re-trace ``frame`` on microbatch 0 of its own arguments and turn it into a :class:`CapturedGraph`,
    refusing code that would compute something else on a microbatch than on the full batch."""
    ignore_logging_in_graphs()
    size = batch_size // n_microbatches
    every_dim = True
    try:
        trace = _trace_rows(frame, batch_size, size, every_dim=every_dim)
    except (CaptureError, GraphBreakError):
        # code Dynamo cannot trace with symbolic lengths: fixed lengths (each new one is captured again)
        every_dim = False
        trace = _trace_rows(frame, batch_size, size, every_dim=every_dim)
    general = (
        _trace_rows(frame, batch_size, 2, every_dim=every_dim) if size == 1 and batch_size >= 2 else trace
    )
    symbols = batch_symbols(general.gm)
    if general is not trace:
        check_no_batch_squeeze(general.gm, symbols)
    check_guards(general.guards, symbols, general.hints, microbatch=max(size, 2), batch=batch_size)
    check_no_batch_slicing(general.gm, symbols)
    return _to_captured(trace, frame, batch_size, n_microbatches)


def _trace_rows(frame: FrameCall, batch_size: int, rows: int, *, every_dim: bool) -> _Trace:
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


def _to_captured(trace: _Trace, frame: FrameCall, batch_size: int, n_mb: int) -> CapturedGraph:
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
    symbols = _sizes_from_inputs(graph, sizes, inputs)
    _specialise_sizes(graph, set(symbols))
    _sizes_of_intermediates(graph, symbols)
    _mark_size_nodes(graph)
    for node in graph.nodes:
        node.meta["module_path"] = _node_module_path(gm, node, names)
    markers = _remove_split_markers(graph)
    for node in reversed(graph.nodes):
        if is_size_node(node) and not node.users:  # a size only a removed node read
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    outputs = graph.find_nodes(op="output")[0].args[0]
    flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    is_tensor = [
        isinstance(o, fx.Node) and isinstance(o.meta.get("example_value"), torch.Tensor) for o in flat
    ]
    cut = [is_batched(eval(s, {"L": frame.arguments}), batch_size) for s in input_sources]  # noqa: S307 - Dynamo source names
    shapes = _capture_shapes(trace, input_sources, [inputs[s] for s in input_sources], cut)
    return CapturedGraph(gm, input_sources, state_names, batch_size, n_mb, shapes, is_tensor, markers)


_SIZE_SOURCE = re.compile(r"^(.*)\.size\(\)\[(\d+)\]$")


def _sizes_from_inputs(
    graph: fx.Graph, sizes: list[tuple[fx.Node, str, Any]], inputs: dict[str, fx.Node]
) -> dict[Any, fx.Node]:
    """Dynamo passes each size symbol as a graph input (``s27``, from ``L['ids'].size()[1]``); a size of a
    microbatched input becomes ``s27 = l_ids_.size(1)``, computed by the stages that read it. Any other
    (a Python number Dynamo made dynamic) is fixed at its value in this capture. Returns symbol -> node."""
    symbols: dict[Any, fx.Node] = {}
    first = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    for node, source, value in sizes:
        match = _SIZE_SOURCE.match(source)
        if match and match.group(1) in inputs and isinstance(value, torch.SymInt):
            with graph.inserting_before(first):
                size = graph.call_method("size", (inputs[match.group(1)], int(match.group(2))))
            size.meta = {"example_value": value}
            node.replace_all_uses_with(size)
            size.name = node.name
            symbols[value.node.expr] = size
        else:  # a Python scalar: fixed for every microbatch of this graph
            node.replace_all_uses_with(_hint(value))
        graph.erase_node(node)
    return symbols


def _is_size_value(value: Any) -> bool:
    if isinstance(value, (tuple, list, torch.Size)):
        return bool(value) and all(_is_size_value(v) for v in value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.hint is not None  # not data-dependent (``x.item()``)
    return isinstance(value, (int, float, bool))


def _mark_size_nodes(graph: fx.Graph) -> None:
    """Mark the nodes that compute sizes from the inputs' sizes alone (``s27 * 8``): they read no data,
    so every stage that needs one computes it itself instead of receiving it."""
    for node in graph.nodes:
        if (
            node.op in ("call_function", "call_method")
            and node.all_input_nodes
            and _is_size_value(node.meta.get("example_value"))
            and all(
                is_size_node(a) or (a.op == "placeholder" and node.target in _READS_SIZE)
                for a in node.all_input_nodes
            )
        ):
            node.meta["dynapipe.size"] = True


_READS_SIZE = (
    "size",
    "dim",
    "numel",
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.numel,
)


def is_size_node(node: fx.Node) -> bool:
    """Whether ``node`` computes a size from the graph inputs' sizes (see :func:`_mark_size_nodes`)."""
    return bool(node.meta.get("dynapipe.size"))


_SIZE_OPS = {
    "Add": operator.add,
    "Mul": operator.mul,
    "FloorDiv": operator.floordiv,
    "PythonMod": operator.mod,
    "Mod": operator.mod,
    "Max": torch.sym_max,
    "Min": torch.sym_min,
}


def _sizes_of_intermediates(graph: fx.Graph, symbols: dict[Any, fx.Node]) -> None:
    """Rewrite a size read off an intermediate tensor (``h.size(1)``, ``h.shape[1]``) as its expression in
    the inputs' size symbols, so that it too reads no data and never has to cross stages."""
    for node in list(graph.nodes):
        value = node.meta.get("example_value")
        if (
            node.op not in ("call_function", "call_method")
            or not isinstance(value, torch.SymInt)
            or value.node.hint is None
            or all(a.op == "placeholder" or a.meta.get("dynapipe.size") for a in node.all_input_nodes)
        ):
            continue
        with graph.inserting_before(node):
            rebuilt = _emit(graph, value.node.expr, symbols)
        if isinstance(rebuilt, fx.Node):
            if rebuilt not in symbols.values():
                rebuilt.meta = dict(node.meta)
            node.replace_all_uses_with(rebuilt)


def _emit(graph: fx.Graph, expr: Any, symbols: dict[Any, fx.Node]) -> fx.Node | int | None:
    """FX nodes computing the sympy size expression ``expr`` from ``symbols``' nodes (None: cannot)."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return symbols.get(expr)
    op: Callable[..., Any] | None = _SIZE_OPS.get(type(expr).__name__)
    if op is None and isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
        op = operator.pow
    if op is None:
        return None
    parts = [_emit(graph, a, symbols) for a in expr.args]
    if any(p is None for p in parts):
        return None
    result = parts[0]
    for part in parts[1:]:
        result = graph.call_function(op, (result, part))
        result.meta = {"example_value": None, "dynapipe.size": True}
    return result


def _capture_shapes(
    trace: _Trace, sources: list[str], input_nodes: list[fx.Node], cut: list[bool]
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


def compute_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The nodes that stages are made of, in graph order (placeholders, get_attr and size nodes are copied
    into every stage that reads them instead)."""
    return [n for n in graph.nodes if n.op in _COMPUTE_OPS and not is_size_node(n)]


def unpacked_by(node: fx.Node) -> fx.Node | None:
    """The node whose value ``node`` takes apart (``out[0]``, a ``getitem``), or None. The rule, written
    once: a getitem goes with its source, so a tuple (which cannot cross stages) never has to."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def settle_getitems(graph: fx.Graph, stage_of: Mapping[fx.Node, int]) -> dict[fx.Node, int]:
    """A copy of ``stage_of`` (compute node -> stage) with each getitem of a non-tensor in its source's
    stage: only tensors cross stages. The stages codegen builds, and the stages the cost model counts."""
    out = dict(stage_of)
    for node in graph.nodes:
        source = unpacked_by(node)
        if source in out and not isinstance(source.meta.get("example_value"), torch.Tensor):
            out[node] = out[source]
    return out


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


def grad_modes(graph: fx.Graph) -> dict[fx.Node, bool]:
    """Grad mode in force at each node: Dynamo records ``with torch.no_grad()`` as mode-setting calls."""
    mode, modes = torch.is_grad_enabled(), {}
    for node in graph.nodes:
        modes[node] = mode
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            mode = bool(node.args[0])
    return modes


def is_autocast_node(node: fx.Node) -> bool:
    """Whether ``node`` opens or closes a ``torch.autocast`` region: Dynamo records ``with torch.autocast()``
    as an ``_enter_autocast(...)`` call whose result (the context, not a tensor) only the matching
    ``_exit_autocast(ctx)`` reads. Such nodes set state; they compute nothing a stage could send."""
    return node.op == "call_function" and node.target in (
        torch.amp.autocast_mode._enter_autocast,
        torch.amp.autocast_mode._exit_autocast,
    )


def autocast_regions(graph: fx.Graph) -> dict[fx.Node, tuple[fx.Node, ...]]:
    """The ``_enter_autocast`` nodes in force at each node, outermost first (regions nest)."""
    entered: tuple[fx.Node, ...] = ()
    regions = {}
    for node in graph.nodes:
        regions[node] = entered
        if node.op == "call_function" and node.target is torch.amp.autocast_mode._enter_autocast:
            entered = (*entered, node)
        elif node.op == "call_function" and node.target is torch.amp.autocast_mode._exit_autocast:
            entered = tuple(e for e in entered if e is not node.args[0])
    return regions


def _depends_on_sizes(value: Any, size_symbols: set) -> bool:
    """Whether a value varies with the inputs' size symbols (``s27 * 8``) rather than being fixed (``8``,
    or a Python number's symbol, which the capture bakes in)."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    return any(
        isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))
        and bool(v.node.expr.free_symbols & size_symbols)
        for v in values
    )


def _specialise_sizes(graph: fx.Graph, size_symbols: set) -> None:
    """Replace nodes whose value is fixed in this capture (``w.size(0)``, ``16 * 4``, a Python number
    Dynamo passed as a tensor) with that value; sizes that vary with the inputs' size symbols stay nodes,
    computed at every call."""
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        value = node.meta.get("example_value")
        if (
            isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))
            or (
                isinstance(value, (tuple, list, torch.Size))
                and value
                and all(isinstance(v, (torch.SymInt, int)) for v in value)
            )
        ) and not _depends_on_sizes(value, size_symbols):
            concrete = tuple(_hint(v) for v in value) if isinstance(value, (tuple, list)) else _hint(value)
            if concrete is None or (isinstance(concrete, tuple) and None in concrete):
                continue  # data-dependent: stays a node of the graph
            if isinstance(value, list):
                concrete = list(concrete)
            node.replace_all_uses_with(concrete)
            graph.erase_node(node)
