"""What a Dynamo trace hands a backend, kept for capture: the graph, its inputs, and the shape assumptions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

__all__ = ["Trace", "trace_of"]


@dataclass
class Trace:
    gm: fx.GraphModule
    placeholders: list[tuple[str, Any]]  # each placeholder's Dynamo source and value
    guards: list[tuple[Any, str]]  # Dynamo's assumptions about symbolic sizes: (sympy expression, where)
    hints: dict  # symbol -> its value in this trace
    ranges: dict  # symbol -> (lowest, highest) value Dynamo let it take
    as_tensor: frozenset[int] = field(default_factory=frozenset)  # placeholders of Python floats (0-dim)


def trace_of(gm: fx.GraphModule) -> Trace:
    """The graph a backend receives with what Dynamo assumed while tracing it; call inside a backend."""
    args, as_tensor = [], set()
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        grapharg = node.meta["grapharg"]
        args.append((grapharg.source.name, grapharg.example))
        if grapharg.pass_arg_as_tensor:
            as_tensor.add(i)
    fake_mode = torch._guards.TracingContext.get().fake_mode
    shape_env = fake_mode.shape_env if fake_mode is not None else None
    guards, hints, ranges = [], {}, {}
    if shape_env is not None:  # symbols Dynamo later found equal are replaced by one of them
        guards = [(shape_env.replace(g.expr), g.sloc.maybe_user_loc or str(g.sloc)) for g in shape_env.guards]
        hints = dict(shape_env.backed_var_to_val)
        ranges = {s: (r.lower, r.upper) for s, r in shape_env.var_to_range.items() if s in hints}
    return Trace(gm, args, guards, hints, ranges, frozenset(as_tensor))
