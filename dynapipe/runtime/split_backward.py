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

    roots: list[torch.Tensor | GradientEdge]
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


def _weight_regions(entries: dict[object, list[Node]], reaches: dict[Node, bool]) -> dict[object, set]:
    """Group the owners of weight-only entry nodes (frontier nodes, or outputs that never touch an input)
    so that owners whose weight-only subgraphs share any node (a parameter used in several places) are
    in one group: such a group's parameters must get their gradient in one go, or parts count twice."""
    owner_of: dict[Node, object] = {}
    parent: dict[object, object] = {owner: owner for owner in entries}

    def find(x: object) -> object:
        while parent[x] is not x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for owner, starts in entries.items():
        stack = list(starts)
        while stack:
            node = stack.pop()
            if node in owner_of:
                if find(owner_of[node]) is not find(owner):
                    parent[find(owner)] = find(owner_of[node])
                continue
            owner_of[node] = owner
            stack.extend(c for c, _ in node.next_functions if c is not None and not reaches.get(c, False))
    groups: dict[object, set] = {}
    for owner in entries:
        groups.setdefault(find(owner), set()).add(owner)
    return {owner: groups[find(owner)] for owner in entries}


def backward_input(
    outputs: list[torch.Tensor], grads: list[torch.Tensor], leaves: list[torch.Tensor]
) -> tuple[list[torch.Tensor | None], WeightWork]:
    """Gradients of ``leaves`` (the received inputs), and the deferred weight work."""
    if not leaves:
        return [], WeightWork(list(outputs), list(grads), [])
    roots = [o.grad_fn for o in outputs if o.grad_fn is not None]
    reaches = _reaches(roots, {get_gradient_edge(leaf).node for leaf in leaves})

    def weight_children(node: Node) -> list[Node]:
        return [c for c, _ in node.next_functions if c is not None and not reaches[c]]

    frontier = [node for node, on_path in reaches.items() if on_path and weight_children(node)]
    entries: dict[object, list[Node]] = {node: weight_children(node) for node in frontier}
    entries.update(
        {i: [o.grad_fn] for i, o in enumerate(outputs) if o.grad_fn is not None and not reaches[o.grad_fn]}
    )
    regions = _weight_regions(entries, reaches)
    # Parameters shared between regions get their whole gradient now, at their AccumulateGrad edge
    shared = sorted({owner for owner, group in regions.items() if len(group) > 1}, key=str)
    shared_edges = list(
        {
            (n, 0): GradientEdge(n, 0) for owner in shared for n in _accumulators(entries[owner], reaches)
        }.values()
    )
    deferred = [n for n in frontier if len(regions[n]) == 1]
    arriving: dict[Node, tuple] = {}
    handles = [
        n.register_prehook(lambda grad_outputs, n=n: arriving.__setitem__(n, grad_outputs)) for n in deferred
    ]
    try:
        wrt: list[torch.Tensor | GradientEdge] = [*leaves, *shared_edges]
        # torch's stubs refuse a list that mixes tensors and edges; torch.autograd.grad takes it
        found = torch.autograd.grad(outputs, wrt, grads, retain_graph=True, allow_unused=True)  # type: ignore[arg-type]
    finally:
        for handle in handles:
            handle.remove()
    leaf_grads: list[torch.Tensor | None] = list(found[: len(leaves)])  # None: unused (allow_unused)
    work = WeightWork([], [], [])
    for edge, grad in zip(shared_edges, found[len(leaves) :], strict=True):
        if grad is not None:
            work.roots.append(edge)
            work.grads.append(grad)
    for i, (out, grad) in enumerate(zip(outputs, grads, strict=True)):
        if i in regions and len(regions[i]) == 1:  # an output that never touches an input
            work.roots.append(out)
            work.grads.append(grad)
    for node in deferred:
        arrived = [(GradientEdge(node, i), g) for i, g in enumerate(arriving.get(node, ())) if g is not None]
        children = [GradientEdge(c, nr) for c, nr in node.next_functions if c is not None and not reaches[c]]
        if arrived:
            work.frontier.append(([e for e, _ in arrived], [g for _, g in arrived], children))
    return leaf_grads, work


def _accumulators(starts: list[Node], reaches: dict[Node, bool]) -> list[Node]:
    """The AccumulateGrad nodes (parameters) below ``starts`` in the weight-only subgraph."""
    found, seen, stack = [], set(), list(starts)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not node.next_functions and hasattr(node, "variable"):
            found.append(node)
        stack.extend(c for c, _ in node.next_functions if c is not None and not reaches.get(c, False))
    return found


def backward_weight(work: WeightWork, params: list[torch.nn.Parameter]) -> None:
    """Accumulate the parameters' gradients into ``.grad`` from what ``backward_input`` kept.

    Each frontier node is re-entered on its own, asking only for its weight-only children: started
    together, the engine would also push gradients down the input path into other frontier nodes and
    count them twice. The graph is kept until the last call (custom autograd Functions that save the
    same tensor in several nodes lose it when one of them is released); it goes with the step's state.
    """
    roots, grads = list(work.roots), list(work.grads)
    # a weight-only node reached from several frontier nodes (a parameter used in several places) gets
    # one root edge with the summed gradient: the engine does not add up gradients of repeated roots
    summed: dict[tuple[Node, int], torch.Tensor] = {}
    for edges, arrived, children in work.frontier:
        found = torch.autograd.grad(edges, children, arrived, retain_graph=True, allow_unused=True)
        for child, grad in zip(children, found, strict=True):
            if grad is not None:
                key = (child.node, child.output_nr)
                summed[key] = grad if key not in summed else summed[key] + grad
    for (node, index), grad in summed.items():
        roots.append(GradientEdge(node, index))
        grads.append(grad)
    if roots and params:
        torch.autograd.backward(roots, grads, inputs=params)  # type: ignore[arg-type]  # tensors and edges mixed, as torch takes them
