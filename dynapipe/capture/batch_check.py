"""Refuse a microbatch graph that would compute something other than the full batch does.

dynapipe traces the step on one microbatch with the batch dimension symbolic, then runs that graph on
every microbatch. Three kinds of code make that silently differ from calling the model on the whole batch,
and each is found here from what the trace recorded:

* **a branch on the batch size** (``if x.shape[0] >= 4``): Dynamo guards the symbol (``s0 < 4``); a guard
  that is false at the full batch size means the full batch takes the other path;
* **slicing along the batch dimension** (``x[: x.shape[0] // 2]``, ``x[0]``, ``narrow``/``split``/``chunk``
  on dim 0): each microbatch would keep its own rows, not the batch's;
* **a microbatch of one row**: ``squeeze()`` drops its batch dimension (found in a trace at two rows,
  where the batch dimension is symbolic). A Python branch on ``x.shape[0] == 1`` is not found: Dynamo
  decides it without a guard.

Reductions over examples that the README documents as per-microbatch (BatchNorm statistics, a mean loss
over tokens) are not refused: they are what every pipeline library computes.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import sympy
import torch
import torch.fx as fx

from ..errors import CaptureError

__all__ = ["batch_symbols", "check_guards", "check_no_batch_slicing", "check_no_batch_squeeze"]

_SELECT_ON_DIM = {  # ops that pick rows along a dimension, and where their dim argument is (default 0)
    torch.narrow: 1,
    torch.select: 1,
    torch.split: 2,
    torch.chunk: 2,
    torch.tensor_split: 2,
    torch.unbind: 1,
    "narrow": 1,
    "select": 1,
    "split": 2,
    "chunk": 2,
    "tensor_split": 2,
    "unbind": 1,
}


def batch_symbols(gm: fx.GraphModule) -> set[sympy.Symbol]:
    """The symbols of the batch dimension: the capture marks only the microbatched inputs' dim 0 dynamic."""
    symbols: set[sympy.Symbol] = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and value.dim() and isinstance(value.shape[0], torch.SymInt):
            symbols |= value.shape[0].node.expr.free_symbols
    return symbols


def _user_line(node: fx.Node) -> str:
    """The last frame of the node's user stack: ``file:line`` and the code, as Dynamo recorded it."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    if not frames:
        return f"(node {node.name})"
    file, line, code = frames[-1]
    return f"{file}:{line}: {code.strip()}"


def check_guards(
    guards: list[tuple[Any, str]], symbols: set[sympy.Symbol], hints: dict, *, microbatch: int, batch: int
) -> None:
    """Every assumption Dynamo made about the microbatch size must hold at the full batch size too."""
    if not symbols:
        return
    for expr, where in guards:
        if not expr.free_symbols & symbols:
            continue
        at_batch = expr.xreplace({s: sympy.Integer(batch) for s in symbols})
        at_batch = at_batch.xreplace(
            {s: sympy.Integer(v) for s, v in hints.items() if s in at_batch.free_symbols}
        )
        if at_batch.free_symbols or bool(at_batch):
            continue
        raise CaptureError(
            f"the step takes a different path at the full batch of {batch} rows than at the microbatch of "
            f"{microbatch} rows that dynapipe runs, so pipelining would silently change the result: Dynamo "
            f"assumed {expr} (the batch size is {', '.join(sorted(map(str, symbols)))}) at\n  {where.strip()}"
            "\nFix: make this code independent of "
            "the batch size (pass the size as an argument, or move the branch out of the compiled call)."
        )


def check_no_batch_slicing(gm: fx.GraphModule, symbols: set[sympy.Symbol]) -> None:
    """No op picks rows of a tensor along its batch dimension (each microbatch would pick its own)."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or not node.args:
            continue
        source = node.args[0]
        value = source.meta.get("example_value") if isinstance(source, fx.Node) else None
        if not isinstance(value, torch.Tensor) or not value.dim() or not _has_batch(value.shape[0], symbols):
            continue
        if _selects_dim0(node) and _changes_dim0(node, value.shape[0]):
            raise CaptureError(
                "the step slices along the batch dimension, and dynapipe runs it one microbatch at a time, "
                "so each microbatch would keep its own rows instead of the batch's:\n  "
                f"{_user_line(node)}\nFix: index another dimension, or do this slicing outside the compiled "
                "call (on the inputs or the outputs)."
            )


def _has_batch(size: Any, symbols: set[sympy.Symbol]) -> bool:
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols & symbols)


def _selects_dim0(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        index = node.args[1]
        first = index[0] if isinstance(index, tuple) and index else index
        if isinstance(first, slice):
            return first != slice(None, None, None)
        return isinstance(first, int) or (
            isinstance(first, fx.Node) and isinstance(first.meta.get("example_value"), (int, torch.SymInt))
        )
    position = _SELECT_ON_DIM.get(node.target)
    if position is None:
        return False
    dim = node.kwargs.get("dim", node.args[position] if len(node.args) > position else 0)
    return bool(dim == 0)


def _changes_dim0(node: fx.Node, size: int | torch.SymInt) -> bool:
    out = node.meta.get("example_value")
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for t in outs:
        if not isinstance(t, torch.Tensor) or not t.dim():
            return True
        if not isinstance(t.shape[0], torch.SymInt) or t.shape[0].node.expr != size.node.expr:
            return True
    return False


def check_no_batch_squeeze(gm: fx.GraphModule, symbols: set[sympy.Symbol]) -> None:
    """With one row per microbatch, ``squeeze()`` would drop the batch dimension that the full batch keeps.
    ``gm`` is traced at two rows, where the batch dimension is symbolic and can be recognised."""
    for node in gm.graph.nodes:
        if node.target not in (torch.squeeze, "squeeze") or not node.args:
            continue
        value = node.args[0].meta.get("example_value") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(value, torch.Tensor) or not value.dim() or not _has_batch(value.shape[0], symbols):
            continue
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        if dim is None or any(d in (0, -value.dim()) for d in dims):
            raise CaptureError(
                "with one row per microbatch this squeeze() drops the batch dimension, which the full batch "
                f"keeps:\n  {_user_line(node)}\nFix: name the dimension to squeeze (squeeze(-1)), or use "
                "n_microbatches so that each microbatch has at least 2 rows."
            )
