"""One trace where one can serve: Dynamo's own graph, when it is symbolic in the batch dimension.

``torch.compile(..., dynamic=True)`` (or ``torch._dynamo.mark_dynamic`` on the batch dimension of the
inputs) makes the graph the backend receives symbolic in the batch size. Then dynapipe does not trace the
frame again: it rebuilds each node's fake value from Dynamo's symbolic sizes with the batch size at the
microbatch's (:func:`.resized.rebuilt_at`; Dynamo's guards, checked there first, make that sound), running no
Python bytecode and no operation, or where a value cannot be rebuilt so, re-runs the graph's operations
on fake tensors (:func:`_propagate`). It does so only where the result is the
graph a re-trace would give; anything else (a batch size Dynamo fixed or shares with another size, an
assumption Dynamo made that fails at the microbatch size, a one-row microbatch, a higher-order op, a
Python number of the call made dynamic) returns None and the caller re-traces as before. The same re-run
serves one-row microbatches of the re-trace (:func:`at_one_row`): dynapipe traces at two rows, where the
batch checks can read the batch dimension, and re-runs that graph at one row instead of tracing again.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from ..microbatch import is_batched, rows_of
from .frame import FrameCall
from .recorded import Trace
from .resized import bake_float, copy_graph, rebuilt_at

__all__ = ["at_microbatch", "at_one_row"]

_SIZE_SOURCE = re.compile(r"^(.*)\.size\(\)\[(\d+)\]$")
# a Python number among the call's arguments (``L['scale']``, ``L['cfg']['eps']``), not a model's attribute:
# the backend keys its pipelines by such numbers, so a re-trace bakes each value in at the call's value
_ARGUMENT_LEAF = re.compile(r"^L\['[^']+'\](\[[^\]]+\])*$")


def at_microbatch(trace: Trace, frame: FrameCall, batch_size: int, rows: int) -> Trace | None:
    """``trace`` (Dynamo's graph of ``frame`` at ``batch_size``) at ``rows`` rows, or None if it cannot
    serve as the microbatch graph."""
    return _at_rows(trace, frame, batch_size, rows) if rows >= 2 else None


def at_one_row(trace: Trace, frame: FrameCall, batch_size: int) -> Trace | None:
    """dynapipe's own trace of ``frame`` at two rows (the batch size symbolic, so the batch checks can
    read it) at one row, the batch size fixed at 1 as a trace at one row fixes it; None if it cannot
    serve (the caller traces at one row). The graph is the one the full batch runs: a Python branch on
    ``x.shape[0] == 1`` takes the full batch's way, as a trace at one row would not."""
    with warnings.catch_warnings():  # the trace at two rows showed the code's own; this re-run adds none
        warnings.simplefilter("ignore")
        return _at_rows(trace, frame, batch_size, 1)


def _at_rows(trace: Trace, frame: FrameCall, batch_size: int, rows: int) -> Trace | None:
    kinds = _kinds(trace, frame, batch_size)
    if kinds is None or not _holds_at(trace, kinds, rows):
        return None
    if any(isinstance(getattr(trace.gm, str(n.target), None), fx.GraphModule) for n in trace.gm.graph.nodes):
        return None  # a higher-order op's body keeps Dynamo's sizes
    if rows >= 2:
        try:
            return rebuilt_at(trace, kinds, rows)
        except Exception:  # noqa: BLE001 - a value it cannot rebuild (an unbacked size): run the graph instead
            pass
    try:
        return _propagate(trace, frame, kinds, rows)
    except Exception:  # noqa: BLE001 - Dynamo's assumptions do not hold here: the caller re-traces
        return None


def _kinds(trace: Trace, frame: FrameCall, batch_size: int) -> list[str] | None:
    """Each placeholder's kind: ``batched``/``input`` (a tensor argument, cut or not), ``state``, ``size``
    (of an input), ``float`` (a model constant Dynamo passed as a tensor); None if one is anything else."""
    inputs = {s for s, v in trace.placeholders if _is_input(s, v, frame)}
    kinds = []
    for i, (source, value) in enumerate(trace.placeholders):
        match = _SIZE_SOURCE.match(source)
        if source in inputs:
            kinds.append("batched" if is_batched(_value_of(source, frame), batch_size) else "input")
        elif (
            i in trace.as_tensor
            and not _ARGUMENT_LEAF.match(source)
            and all(u.target == "item" for u in _placeholder(trace, i).users)
        ):
            kinds.append("float")
        elif isinstance(value, torch.Tensor) and i not in trace.as_tensor:
            kinds.append("state")
        elif isinstance(value, (torch.SymInt, int)) and match and match.group(1) in inputs:
            kinds.append("size")
        else:
            return None
    return kinds


def _is_input(source: str, value: Any, frame: FrameCall) -> bool:
    """A tensor argument of the call (the same rule the capture uses for its inputs)."""
    state = isinstance(value, torch.nn.Parameter) or "._buffers[" in source or "._parameters[" in source
    arguments = (a for a in frame.arguments if a != frame.self_name)
    return (
        isinstance(value, torch.Tensor)
        and not state
        and any(source.startswith(f"L['{a}']") for a in arguments)
    )


def _value_of(source: str, frame: FrameCall) -> Any:
    return eval(source, {"L": frame.arguments})  # noqa: S307 - Dynamo source names


def _placeholder(trace: Trace, index: int) -> fx.Node:
    return list(trace.gm.graph.find_nodes(op="placeholder"))[index]


def _holds_at(trace: Trace, kinds: list[str], rows: int) -> bool:
    """Whether Dynamo's graph is symbolic in the batch size alone and its assumptions hold at ``rows``."""
    batch: set[sympy.Symbol] = set()
    other: set[sympy.Symbol] = set()
    for node, kind in zip(trace.gm.graph.find_nodes(op="placeholder"), kinds, strict=True):
        value = node.meta["example_value"]  # the fake tensor Dynamo traced with (its sizes symbolic or not)
        if kind in ("batched", "input", "state"):
            dims = [d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d) for d in value.shape]
            if kind == "batched":
                if not dims[0].is_Symbol:
                    return False  # the batch size is fixed (the default torch.compile call)
                batch.add(dims[0])
                dims = dims[1:]
            other |= set().union(*(d.free_symbols for d in dims))
    if not batch or batch & other:
        return False  # a size equal to the batch size by chance shares its symbol
    for symbol in batch:
        low, high = trace.ranges.get(symbol, (2, None))
        if max(rows, 2) < low or (high is not None and rows > high):  # 1: fixed, as Dynamo fixes it
            return False
    values = {
        **{s: sympy.sympify(v) for s, v in trace.hints.items()},
        **{s: sympy.Integer(rows) for s in batch},
    }
    at_rows = [expr.xreplace(values) for expr, _ in trace.guards if expr.free_symbols & batch]
    return all(not e.free_symbols and bool(e) for e in at_rows)  # a guard it cannot decide counts as failed


def _propagate(trace: Trace, frame: FrameCall, kinds: list[str], rows: int) -> Trace:
    """Dynamo's graph with every node's fake value recomputed at ``rows`` rows, in a fresh shape
    environment whose symbols, hints, ranges and guards are the microbatch's."""
    gm, graph = copy_graph(trace)
    shape_env = ShapeEnv(duck_shape=False)  # a size equal to another by chance keeps its own symbol
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    args, placeholders = _arguments(graph, trace, frame, kinds, mode, rows)
    gm.recompile()
    grad = torch.is_grad_enabled()  # the graph sets and resets grad mode; a failure halfway must not leak
    try:
        with mode, enable_python_dispatcher():  # as Dynamo runs ops: decompositions keep sizes symbolic
            _Propagate(gm).run(*args)
    finally:
        torch.set_grad_enabled(grad)
    guards = [(shape_env.replace(g.expr), str(g.sloc)) for g in shape_env.guards]
    hints = dict(shape_env.backed_var_to_val)
    ranges = {s: (r.lower, r.upper) for s, r in shape_env.var_to_range.items() if s in hints}
    return Trace(gm, placeholders, guards, hints, ranges)


def _arguments(
    graph: fx.Graph,
    trace: Trace,
    frame: FrameCall,
    kinds: list[str],
    mode: FakeTensorMode,
    rows: int,
) -> tuple[list[Any], list[tuple[str, Any]]]:
    """The fake arguments to run ``graph`` (a copy of ``trace.gm``'s) on at ``rows`` rows, and its
    placeholders' sources and values for the capture; a model's float constant is baked in, as a trace at
    fixed sizes does."""
    nodes = list(graph.find_nodes(op="placeholder"))
    inputs = {
        source: (node.meta["example_value"], kind == "batched")
        for node, (source, _), kind in zip(nodes, trace.placeholders, kinds, strict=True)
        if kind in ("batched", "input")
    }
    fakes = {s: _fake_input(mode, s, example, frame, rows, cut) for s, (example, cut) in inputs.items()}
    _same_symbols({s: example for s, (example, _) in inputs.items()}, fakes)
    args, placeholders = [], []
    for node, (source, value), kind in zip(nodes, trace.placeholders, kinds, strict=True):
        if kind == "float":
            bake_float(graph, node, value)
            continue
        if kind in ("batched", "input"):
            value = fakes[source]
        elif kind == "size":
            match = _SIZE_SOURCE.match(source)
            assert match is not None  # noqa: S101 - _kinds matched it
            value = fakes[match.group(1)].size(int(match.group(2)))
        args.append(value if kind != "state" else mode.from_tensor(value, static_shapes=True))
        placeholders.append((source, value))
    return args, placeholders


def _same_symbols(examples: dict[str, Any], fakes: dict[str, Any]) -> None:
    """Sizes that share a symbol in Dynamo's graph (``labels`` sized like ``ids``: Dynamo assumed it and
    guards it) share one at the microbatch too, so the graph's ops on both need no other assumption."""
    first: dict[Any, Any] = {}
    for source, example in examples.items():
        for old, new in zip(example.shape, fakes[source].shape, strict=True):
            if isinstance(old, torch.SymInt) and isinstance(new, torch.SymInt):
                same = first.setdefault(old.node.expr, new)
                if same is not new:
                    torch._check(new == same)


def _fake_input(
    mode: FakeTensorMode,
    source: str,
    example: Any,
    frame: FrameCall,
    rows: int,
    batched: bool,
) -> Any:
    """The input at ``source`` as a fake tensor: cut to ``rows`` rows with the dims Dynamo made symbolic
    symbolic, or (not batched) at fixed sizes, as the re-trace leaves it."""
    value = _value_of(source, frame)
    if not batched:
        return mode.from_tensor(value, static_shapes=True)
    dynamic = [
        DimDynamic.DYNAMIC if isinstance(d, torch.SymInt) else DimDynamic.STATIC for d in example.shape
    ]
    context: Any = StatelessSymbolicContext(dynamic_sizes=dynamic)  # type: ignore[arg-type]
    return mode.from_tensor(rows_of(value, 0, rows), source=ConstantSource(source), symbolic_context=context)


class _Propagate(fx.Interpreter):
    """Runs the graph on fake tensors and keeps each node's value, as Dynamo's trace does."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["example_value"] = result
        return result
