"""Sizes in a traced graph: each size the graph uses becomes a node computed from the inputs' sizes (a
*size node*), so it reads no data and never crosses stages; sizes fixed in this capture become constants."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.fx as fx

from ..graph.nodes import is_size_node

__all__ = ["hint", "rewrite_sizes"]


def hint(value: Any) -> Any:
    """Concrete value of a size-derived SymInt/SymFloat/SymBool at the microbatch size (None if the
    value depends on tensor data, like ``x.item()``: that is computed at run time instead)."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.hint
    return value


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
            node.replace_all_uses_with(hint(value))
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
            concrete = tuple(hint(v) for v in value) if isinstance(value, (tuple, list)) else hint(value)
            if concrete is None or (isinstance(concrete, tuple) and None in concrete):
                continue  # data-dependent: stays a node of the graph
            if isinstance(value, list):
                concrete = list(concrete)
            node.replace_all_uses_with(concrete)
            graph.erase_node(node)


def rewrite_sizes(graph: fx.Graph, sizes: list[tuple[fx.Node, str, Any]], inputs: dict[str, fx.Node]) -> None:
    """Size placeholders (``s27``: ``L['ids'].size()[1]``) become size nodes read off the inputs, sizes
    fixed in this capture become constants, and sizes read off intermediates are rebuilt from the inputs'."""
    symbols = _sizes_from_inputs(graph, sizes, inputs)
    _specialise_sizes(graph, set(symbols))
    _sizes_of_intermediates(graph, symbols)
    _mark_size_nodes(graph)
