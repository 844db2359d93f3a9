"""Timing each node on the real device: forward, input-gradient and weight-gradient seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from ..graph import CapturedGraph, grad_modes
from .records import NodeCost
from .runner import Runner, backward_to, call_node
from .sizes import concrete, has_tensor

__all__ = ["graph_device", "measure"]


def graph_device(graph: fx.Graph) -> torch.device:
    for node in graph.nodes:
        for leaf in tree_flatten(node.meta.get("example_value"))[0]:
            if isinstance(leaf, torch.Tensor):
                return leaf.device
    return torch.device("cpu")


def measure(
    captured: CapturedGraph, node: fx.Node, cost: NodeCost, repeats: int, device: torch.device
) -> tuple[float, float, float]:
    """Forward, input-gradient and weight-gradient seconds of ``node`` on real random tensors."""
    value = node.meta.get("example_value")
    if not has_tensor(value):
        return (0.0, 0.0, 0.0)

    def make(meta: torch.Tensor, grad: bool) -> torch.Tensor:
        shape, _ = concrete(meta)
        if meta.is_floating_point() or meta.is_complex():
            t = torch.randn(shape, dtype=meta.dtype, device=meta.device)
        elif meta.dtype is torch.bool:
            t = torch.ones(shape, dtype=meta.dtype, device=meta.device)
        else:  # indices: zero is valid for every embedding, gather and index
            t = torch.zeros(shape, dtype=meta.dtype, device=meta.device)
        return t.requires_grad_(grad and meta.requires_grad and (t.is_floating_point() or t.is_complex()))

    def state(attr: torch.Tensor) -> torch.Tensor:  # a copy: in-place ops must not touch the user's tensors
        return attr.detach().clone().requires_grad_(attr.requires_grad)

    runner = Runner(captured, make, state)
    grad_mode = grad_modes(captured.gm.graph)[node]
    try:
        args, kwargs, inputs, params = runner.inputs(node)
        activations = [
            t
            for src, v in inputs.items()
            if src.op != "get_attr"
            for t in tree_flatten(v)[0]
            if isinstance(t, torch.Tensor)
        ]

        def forward() -> Any:
            with torch.set_grad_enabled(grad_mode):
                return call_node(node, captured.gm, args, kwargs)

        fwd = _timed(forward, repeats, device)
        if not grad_mode or not (cost.backward_input_flops or cost.backward_weight_flops or cost.saves):
            return (fwd, 0.0, 0.0)
        bwd_in = _timed(lambda: backward_to(forward(), activations, retain=False), repeats, device) - fwd
        bwd_w = _timed(lambda: backward_to(forward(), params, retain=False), repeats, device) - fwd
        return (fwd, max(bwd_in, 0.0), max(bwd_w, 0.0))
    except Exception:  # noqa: BLE001 - an op that will not run on random inputs keeps its FLOP estimate
        return (cost.forward, cost.backward_input, cost.backward_weight)


def _timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    fn()
    samples = []
    for _ in range(max(repeats, 1)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return min(samples)  # the least disturbed run: other processes only ever add time
