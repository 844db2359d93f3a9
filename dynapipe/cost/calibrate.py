"""How a graph's operations compose when a stage runs them one after another.

An operation timed alone (:func:`.profile.time_ops`) misses what running many together costs: the
autograd engine walking a long graph (every view and cast has a backward node), gradients accumulated
into parameters, caches that hold another operation's data. This runs a window of the graph as a stage
runs it, forward then backward, on random tensors, and compares it with the sum of its operations'
own times. The difference, per operation, is added to every operation's time
(:attr:`Rates.forward_extra_s`, :attr:`Rates.backward_extra_s`; it may be negative, where timing one
operation alone costs more than running it among others): a per-operation cost, the same for a norm and
for a large matmul, not a share of each.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from ..graph import CapturedGraph, grad_modes
from .profile import graph_device, random_like, stand_in, timed
from .rates import OpTimes
from .records import GraphCosts
from .runner import call_node, differentiable
from .sizes import has_tensor, hint

__all__ = ["composition"]

_WINDOW = 1 / 6  # of the graph's compute nodes, from its middle
_MIN_NODES = 24
_MAX_STATE_BYTES = 64 << 20  # random parameters the window may allocate


def composition(
    captured: CapturedGraph,
    costs: GraphCosts,
    op_times: Mapping[str, OpTimes],
    entry_s: float,
    rounds: int = 15,
) -> tuple[float, float]:
    """(forward, backward) seconds per operation: a window of the graph, run forward and backward as a
    stage runs it, less the sum of its operations' own times, per operation (0.0 each where no window
    can be run)."""
    window = _window(captured, costs, op_times)
    if not window:
        return (0.0, 0.0)
    device = graph_device(captured.gm.graph)
    modes = grad_modes(captured.gm.graph)
    inside = set(window)
    outside: dict[fx.Node, Any] = {}
    for node in window:
        for src in node.all_input_nodes:
            if src not in inside and src not in outside:
                attr = getattr(captured.gm, str(src.target)) if src.op == "get_attr" else None
                outside[src] = (
                    stand_in(attr, device)
                    if isinstance(attr, torch.Tensor)
                    else tree_map(
                        lambda v: random_like(v, True, v.device) if isinstance(v, torch.Tensor) else hint(v),
                        src.meta.get("example_value"),
                    )
                )
    read_after = [n for n in window if any(u not in inside for u in n.users)] or window[-1:]
    run = _as_code(captured, window, list(outside), read_after, modes)

    def forward() -> list[torch.Tensor]:
        return [t for t in tree_flatten(run(outside))[0] if differentiable(t) and t.grad_fn]

    grads: list[torch.Tensor] = []

    def both() -> None:  # into the parameters' .grad, as a stage; the output gradients made once, as
        outs = forward()  # the operations' own times leave making them out
        if outs:
            torch.autograd.backward(outs, grads)

    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            grads = [torch.ones_like(o) for o in forward()]
            both()  # warm
            f = statistics.median(timed(forward, device) for _ in range(rounds))
            b = statistics.median(timed(both, device) for _ in range(rounds)) - f - entry_s
    except Exception:  # noqa: BLE001 - a window that will not run on random inputs: no correction
        return (0.0, 0.0)
    ops = [op_times[sig] for n in window if (sig := costs.signatures.get(n)) is not None]
    forwards, backwards = [t[0] for t in ops if t[0] > 0], [t[1] + t[2] for t in ops if t[1] + t[2] > 0]
    return (
        (f - sum(forwards)) / len(forwards) if forwards else 0.0,
        (b - sum(backwards)) / len(backwards) if backwards else 0.0,
    )


def _as_code(
    captured: CapturedGraph,
    window: list[fx.Node],
    inputs: list[fx.Node],
    read_after: list[fx.Node],
    modes: Mapping[fx.Node, bool],
) -> Callable[[Mapping[fx.Node, Any]], Any]:
    """``window`` as a stage runs it: generated code (a node at a time through Python adds an
    interpreter's overhead per operation that no stage pays: 4 to 11 us each here), in one grad mode
    (else, or where the code cannot be generated, a node at a time)."""
    code = _generated(captured, window, inputs, read_after) if len({modes[n] for n in window}) == 1 else None
    if code is not None:
        mode = modes[window[0]]

        def compiled(values: Mapping[fx.Node, Any]) -> Any:
            with torch.set_grad_enabled(mode):
                return code(*(values[n] for n in inputs))

        return compiled

    def interpreted(outside: Mapping[fx.Node, Any]) -> Any:
        values = dict(outside)
        for node in window:
            args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n: values[n])
            with torch.set_grad_enabled(modes[node]):
                values[node] = call_node(node, captured.gm, args, kwargs)
        return [values[n] for n in read_after]

    return interpreted


def _generated(
    captured: CapturedGraph, window: list[fx.Node], inputs: list[fx.Node], read_after: list[fx.Node]
) -> fx.GraphModule | None:
    graph = fx.Graph()
    env = {n: graph.placeholder(f"in_{i}") for i, n in enumerate(inputs)}
    for node in window:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output([env[n] for n in read_after])
    try:
        return fx.GraphModule(captured.gm, graph)
    except Exception:  # noqa: BLE001 - a window fx cannot write as code is run a node at a time
        return None


def _window(captured: CapturedGraph, costs: GraphCosts, op_times: Mapping[str, OpTimes]) -> list[fx.Node]:
    """The middle sixth of the compute nodes (fewer where their parameters would take too much memory);
    empty where one of them has no timed signature."""
    nodes = list(costs.nodes)
    size = max(_MIN_NODES, int(len(nodes) * _WINDOW))
    while size >= _MIN_NODES:
        start = max((len(nodes) - size) // 2, 0)
        window = nodes[start : start + size]
        state = {s for n in window for s in n.all_input_nodes if s in costs.state_bytes}
        if sum(costs.state_bytes[s][0] for s in state) <= _MAX_STATE_BYTES:
            return window if all(_timed_op(n, costs, op_times) for n in window) else []
        size //= 2
    return []


def _timed_op(node: fx.Node, costs: GraphCosts, op_times: Mapping[str, OpTimes]) -> bool:
    """Whether ``node``'s time is known: its signature was timed, or it does no tensor work."""
    sig = costs.signatures.get(node)
    return sig in op_times if sig is not None else not has_tensor(node.meta.get("example_value"))
