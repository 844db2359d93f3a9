"""A stage's backward in two halves, for zero-bubble schedules: input gradients now, weight gradients later.

Both halves are plain autograd on the stage's own graph. The *frontier* is the set of autograd nodes that
lie on a path to a received input and also feed a path that reaches only parameters (for a linear layer:
the ``AddmmBackward`` node, whose input-gradient half is needed now and whose weight-gradient half can
wait). The input half runs ``autograd.grad`` towards the received inputs, so the engine computes only
what they need, and a pre-hook keeps the gradient arriving at each frontier node. The weight half later
runs ``autograd.backward`` from those frontier edges (plus any output that never reaches an input) into
the parameters, so every weight-gradient matmul runs once, in W. Parameters accumulate into ``.grad`` as
in an ordinary backward (DDP's hooks see them), and the sum is exactly the full backward's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = ["WeightWork", "backward_input", "backward_weight"]


@dataclass
class WeightWork:
    """What ``backward_weight`` needs: outputs that never reach an input (with their gradients), and per
    frontier node the gradients that arrived at it and the edges to its weight-only children."""

    roots: list[torch.Tensor]
    grads: list[torch.Tensor]
    frontier: list[tuple[list[GradientEdge], list[torch.Tensor], list[GradientEdge]]]


def _reaches(roots: list[Node], targets: set[Node]) -> dict[Node, bool]:
    """For every node reachable from ``roots``: whether it has a path to a node in ``targets``."""
    order, seen, stack = [], set(), [(r, False) for r in roots]
    while stack:  # iterative post-order: stage graphs are deep
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend(
            (child, False) for child, _ in node.next_functions if child is not None and child not in seen
        )
    reaches: dict[Node, bool] = {}
    for node in order:  # children come before parents
        reaches[node] = node in targets or any(
            reaches.get(child, False) for child, _ in node.next_functions if child is not None
        )
    return reaches


def backward_input(
    outputs: list[torch.Tensor], grads: list[torch.Tensor], leaves: list[torch.Tensor]
) -> tuple[list[torch.Tensor | None], WeightWork]:
    """Gradients of ``leaves`` (the received inputs), and the deferred weight work."""
    if not leaves:
        return [], WeightWork(list(outputs), list(grads), [])
    roots = [o.grad_fn for o in outputs if o.grad_fn is not None]
    reaches = _reaches(roots, {get_gradient_edge(leaf).node for leaf in leaves})
    frontier = [
        node
        for node, on_path in reaches.items()
        if on_path and any(child is not None and not reaches[child] for child, _ in node.next_functions)
    ]
    arriving: dict[Node, tuple] = {}
    handles = [
        n.register_prehook(lambda grad_outputs, n=n: arriving.__setitem__(n, grad_outputs)) for n in frontier
    ]
    try:
        leaf_grads = list(torch.autograd.grad(outputs, leaves, grads, retain_graph=True, allow_unused=True))
    finally:
        for handle in handles:
            handle.remove()
    work = WeightWork([], [], [])
    for out, grad in zip(outputs, grads, strict=True):
        if out.grad_fn is not None and not reaches[out.grad_fn]:  # an output that never touches an input
            work.roots.append(out)
            work.grads.append(grad)
    for node in frontier:
        arrived = [(GradientEdge(node, i), g) for i, g in enumerate(arriving.get(node, ())) if g is not None]
        children = [GradientEdge(c, nr) for c, nr in node.next_functions if c is not None and not reaches[c]]
        if arrived:
            work.frontier.append(([e for e, _ in arrived], [g for _, g in arrived], children))
    return leaf_grads, work


def backward_weight(work: WeightWork, params: list[torch.nn.Parameter]) -> None:
    """Accumulate the parameters' gradients into ``.grad`` from what ``backward_input`` kept.

    Each frontier node is re-entered on its own, asking only for its weight-only children: started
    together, the engine would also push gradients down the input path into other frontier nodes and
    count them twice.
    """
    roots, grads = list(work.roots), list(work.grads)
    for edges, arrived, children in work.frontier:
        for child, grad in zip(
            children, torch.autograd.grad(edges, children, arrived, allow_unused=True), strict=True
        ):
            if grad is not None:
                roots.append(child)
                grads.append(grad)
    if roots and params:
        torch.autograd.backward(roots, grads, inputs=params)
