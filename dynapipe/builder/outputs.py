"""How the step's outputs come back: which output is the loss, and how each merges over microbatches."""

from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx as fx

from ..capture.batch_check import batch_symbols
from ..errors import ConfigError
from ..graph import CapturedGraph, written_in_place
from ..runtime import OutputSpec

__all__ = ["loss_index", "output_specs"]


def _output_nodes(captured: CapturedGraph) -> list[Any]:
    out = captured.gm.graph.find_nodes(op="output")[0].args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def output_specs(captured: CapturedGraph) -> list[OutputSpec]:
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


def loss_index(captured: CapturedGraph) -> int | None:
    for i, node in enumerate(_output_nodes(captured)):
        value = node.meta.get("example_value")
        if value.dim() == 0 and value.is_floating_point() and value.requires_grad:
            return i
    return None
