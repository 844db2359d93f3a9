"""Sizes of traced values: symbolic (sympy, in the batch symbol) and at the microbatch size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

__all__ = ["bytes_expr", "concrete", "evaluate", "has_tensor", "hint", "shape_values"]


def _numel_expr(value: torch.Tensor) -> sympy.Expr:
    dims = [d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d)) for d in value.shape]
    return sympy.Mul(*dims) if dims else sympy.Integer(1)


def hint(x: Any) -> Any:
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint if x.node.hint is not None else x.node.require_hint()
    return x


def bytes_expr(value: Any) -> sympy.Expr:
    leaves = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return sympy.Add(*[_numel_expr(t) * t.element_size() for t in leaves]) if leaves else sympy.Integer(0)


def shape_values(graph: fx.Graph) -> dict[sympy.Symbol, sympy.Integer]:
    """Value of every size symbol at the microbatch size (from the graph's ShapeEnv)."""
    for node in graph.nodes:
        for leaf in tree_flatten(node.meta.get("example_value"))[0]:
            if isinstance(leaf, torch.Tensor):
                for d in leaf.shape:
                    if isinstance(d, torch.SymInt):
                        env = d.node.shape_env
                        return dict(getattr(env, "backed_var_to_val", None) or env.var_to_val)
    return {}


def evaluate(expr: sympy.Expr, values: Mapping[sympy.Symbol, sympy.Integer]) -> int:
    return int(expr.xreplace(values)) if expr.free_symbols else int(expr)


def concrete(value: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(int(hint(d)) for d in value.shape), tuple(int(hint(s)) for s in value.stride())


def has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in tree_flatten(value)[0])
