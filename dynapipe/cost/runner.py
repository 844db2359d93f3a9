"""Running one graph node on stand-in tensors: fake ones to count, real random ones to time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from ..graph import CapturedGraph
from .sizes import hint

__all__ = ["Runner", "backward_to", "call_node", "differentiable", "output_grads"]


def call_node(node: fx.Node, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    return cast(Callable[..., Any], node.target)(*args, **kwargs)


class Runner:
    """Re-runs single nodes on stand-in tensors (fake for counting, real for profiling)."""

    def __init__(
        self,
        captured: CapturedGraph,
        make: Callable[[torch.Tensor, bool], torch.Tensor],
        state: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.gm, self.make, self.state = captured.gm, make, state

    def inputs(self, node: fx.Node) -> tuple[tuple, dict, dict[fx.Node, Any], list[torch.Tensor]]:
        """Stand-in args/kwargs for ``node``, the stand-in of each input node, and the parameter stand-ins."""
        values: dict[fx.Node, Any] = {}
        params: list[torch.Tensor] = []
        for src in node.all_input_nodes:
            if src.op == "get_attr":
                attr = getattr(self.gm, str(src.target))
                values[src] = self.state(attr) if isinstance(attr, torch.Tensor) else attr
                if isinstance(attr, torch.Tensor) and values[src].requires_grad:
                    params.append(values[src])
            else:
                values[src] = tree_map(
                    lambda v: self.make(v, True) if isinstance(v, torch.Tensor) else hint(v),
                    src.meta.get("example_value"),
                )
        args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n: values[n])
        return args, kwargs, values, params


def differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and (t.is_floating_point() or t.is_complex())


def backward_to(
    outputs: Any, wrt: list[torch.Tensor], retain: bool, grads: list[torch.Tensor] | None = None
) -> None:
    """Gradients of ``outputs`` to ``wrt``; ``grads``: the outputs' gradients (:func:`output_grads`, made
    once where a backward is timed: a stage's gradients come from the operations after it), else ones."""
    outs = _starts(outputs)
    wrt = [w for w in wrt if differentiable(w)]
    if outs and wrt:
        torch.autograd.grad(
            outs, wrt, grads or [torch.ones_like(o) for o in outs], retain_graph=retain, allow_unused=True
        )


def output_grads(outputs: Any) -> list[torch.Tensor]:
    """A gradient of ones for each output a backward starts from."""
    return [torch.ones_like(o) for o in _starts(outputs)]


def _starts(outputs: Any) -> list[torch.Tensor]:
    return [o for o in tree_flatten(outputs)[0] if differentiable(o) and o.grad_fn is not None]
