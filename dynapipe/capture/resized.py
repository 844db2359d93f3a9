"""Dynamo's graph at other sizes, rebuilt from its symbolic sizes instead of running it again.

Where Dynamo's guards hold at the microbatch size (:func:`dynapipe.capture.one_trace._holds_at` checks),
every size in its graph is Dynamo's own expression evaluated there: each node's fake value is made anew
in a fresh shape environment, the batch symbol at the microbatch's value, views kept views of one
storage. No Python bytecode and no operation runs again.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.utils._sympy.value_ranges import ValueRanges

from ..graph import dims_of
from .recorded import Trace

__all__ = ["bake_float", "copy_graph", "rebuilt_at"]


def rebuilt_at(trace: Trace, kinds: list[str], rows: int) -> Trace:
    """Dynamo's graph with every node's fake value rebuilt at ``rows`` rows (``kinds``: each placeholder's,
    as :mod:`.one_trace` reads them). A size that only an input not cut into microbatches has is fixed at
    its value, as a re-trace fixes it; a value it cannot rebuild (an unbacked size) raises."""
    gm, graph = copy_graph(trace)
    nodes = list(graph.find_nodes(op="placeholder"))
    batch, fixed = set(), set()
    for node, kind in zip(nodes, kinds, strict=True):
        dims = dims_of(node.meta["example_value"]) if kind in ("batched", "input") else ()
        if kind == "batched":
            batch.add(dims[0])  # a symbol (one_trace._holds_at checked)
        else:
            fixed |= set().union(*(getattr(d, "free_symbols", set()) for d in dims))
    sizes = _Sizes(trace, batch, fixed, rows)
    for node, (_, value), kind in zip(nodes, trace.placeholders, kinds, strict=True):
        if kind == "float":
            bake_float(graph, node, value)
    memo: dict[int, Any] = {}
    for node in graph.nodes:
        if "example_value" in node.meta:
            node.meta["example_value"] = sizes.value(node.meta["example_value"], memo)
    placeholders = [
        (source, node.meta["example_value"] if kind != "state" else value)
        for node, (source, value), kind in zip(nodes, trace.placeholders, kinds, strict=True)
        if kind != "float"
    ]
    gm.recompile()
    return Trace(gm, placeholders, sizes.guards(trace.guards), *sizes.hints_and_ranges())


class _Sizes:
    """Dynamo's sizes at the microbatch: each of its symbols becomes one of a fresh shape environment
    (``rows`` for the batch size, Dynamo's value for the others), or a number where it is fixed."""

    def __init__(self, trace: Trace, batch: set, fixed: set, rows: int) -> None:
        self.dynamo = _shape_env(trace)
        self.trace, self.rows = trace, rows
        self.batch = {self.dynamo.replace(b) for b in batch}
        self.fixed = {self.dynamo.replace(f) for f in fixed} - self.batch
        self.env = ShapeEnv(duck_shape=False)
        self.mode = FakeTensorMode(shape_env=self.env, allow_non_fake_inputs=True)
        self.symbols: dict[sympy.Symbol, sympy.Expr] = {}
        self.storages: dict[int, torch.Tensor] = {}  # Dynamo's storage -> the first new tensor in its place

    def expr(self, expr: Any) -> Any:
        """``expr`` (in Dynamo's symbols, as Dynamo last simplified them) in the new ones."""
        old = self.dynamo.replace(sympy.sympify(expr))
        for symbol in old.free_symbols - self.symbols.keys():
            self.symbols[symbol] = self._symbol(symbol)
        return old.xreplace(self.symbols)

    def _symbol(self, symbol: sympy.Symbol) -> sympy.Expr:
        if symbol not in self.trace.hints:
            raise ValueError(f"{symbol} is a size Dynamo gave no value (an unbacked size)")
        hint = self.trace.hints[symbol]
        if not hint.is_Integer:  # a model's float constant Dynamo made a symbol: baked in (bake_float)
            return hint
        value = self.rows if symbol in self.batch else int(hint)
        if symbol in self.fixed:
            return sympy.Integer(value)
        source = (self.dynamo.var_to_sources.get(symbol) or [ConstantSource(str(symbol))])[0]
        new = self.env.create_symbol(value, source, dynamic_dim=DimDynamic.DYNAMIC)
        if new.is_Symbol and symbol in self.trace.ranges:  # Dynamo's range, narrower than a new symbol's
            self.env._update_var_to_range(new, ValueRanges(*self.trace.ranges[symbol]))
        return new

    def value(self, value: Any, memo: dict[int, Any]) -> Any:
        """``value`` (one of Dynamo's example values) at the microbatch's sizes."""
        if id(value) in memo:  # a tensor two nodes share (held by their meta, so its id stays its own)
            return memo[id(value)]
        new: Any
        if isinstance(value, torch.SymInt):
            expr = self.expr(value.node.expr)
            hint = int(expr.xreplace(self.env.backed_var_to_val))
            new = hint if expr.is_number else self.env.create_symintnode(expr, hint=hint)
        elif isinstance(value, torch.SymFloat):  # a size made a float (``x.size(-1) ** -0.5``)
            expr = self.expr(value.node.expr)
            hint_f = float(expr.xreplace(self.env.backed_var_to_val))
            new = hint_f if expr.is_number else self.env.create_symfloatnode(expr, hint=hint_f)
        elif isinstance(value, torch.Tensor):
            new = self._tensor(value, memo)
        elif isinstance(value, (list, tuple)):
            items = [self.value(v, memo) for v in value]
            new = type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        elif value is None or isinstance(value, _PLAIN):
            return value
        else:
            raise TypeError(f"an example value of type {type(value).__name__}")
        if isinstance(value, torch.Tensor):
            memo[id(value)] = new
        return new

    def _tensor(self, value: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
        """A fake tensor like ``value`` at the new sizes; views of one storage stay views of one storage
        (codegen reads aliasing from the example values)."""
        shape, stride = ([self.value(d, memo) for d in dims] for dims in (value.shape, value.stride()))
        storage = value.untyped_storage()._cdata
        with self.mode:
            base = self.storages.get(storage)
            if base is None:
                new = torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device)
                self.storages[storage] = new
            else:  # a leaf, its grad flag set below, as Dynamo's example values are leaves
                new = base.detach().as_strided(shape, stride, self.value(value.storage_offset(), memo))
        return new.requires_grad_() if value.requires_grad else new

    def guards(self, guards: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
        """Dynamo's guards in the new symbols; one a fixed size decides is dropped, or fails the path."""
        out = []
        for expr, where in guards:
            new = self.expr(expr)
            if new == sympy.false:
                raise ValueError(f"a guard fails at the fixed sizes: {expr}")
            if new != sympy.true:
                out.append((new, where))
        return out

    def hints_and_ranges(self) -> tuple[dict, dict]:
        hints = dict(self.env.backed_var_to_val)
        return hints, {s: (r.lower, r.upper) for s, r in self.env.var_to_range.items() if s in hints}


_PLAIN = (bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _shape_env(trace: Trace) -> ShapeEnv:
    for node in trace.gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        for d in value.shape if isinstance(value, torch.Tensor) else [value]:
            if isinstance(d, torch.SymInt):
                return d.node.shape_env
    raise ValueError("no symbolic size in Dynamo's graph")


def copy_graph(trace: Trace) -> tuple[fx.GraphModule, fx.Graph]:
    """A copy of Dynamo's graph to rewrite (its nodes' meta copied, so Dynamo's own values stay as they are)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(trace.gm.graph, {}))
    return fx.GraphModule(trace.gm, graph), graph


def bake_float(graph: fx.Graph, node: fx.Node, value: Any) -> None:
    """A model's float constant Dynamo passed as a tensor, baked in as a trace at fixed sizes does."""
    for user in list(node.users):
        user.replace_all_uses_with(float(value.item()))  # type: ignore[arg-type]  # a constant argument
        graph.erase_node(user)
    graph.erase_node(node)
