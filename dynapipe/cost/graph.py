"""The cost model's entry point: every node's cost, estimated or profiled, cached on the graph."""

from __future__ import annotations

import torch

from ..config import Optimizer
from ..graph import CapturedGraph, compute_nodes
from .fake import fake_costs
from .profile import graph_device, measure
from .records import NOMINAL_FLOP_RATE, NOMINAL_MEMORY_BANDWIDTH, GraphCosts

__all__ = ["graph_costs"]

_META_KEY = "dynapipe.costs"


def graph_costs(
    captured: CapturedGraph,
    *,
    optimizer: Optimizer = "adamw",
    profile: bool = False,
    flop_rate: float = NOMINAL_FLOP_RATE,
    memory_bandwidth: float = NOMINAL_MEMORY_BANDWIDTH,
    repeats: int = 3,
) -> GraphCosts:
    """Cost every compute node of ``captured`` (cached on the graph module for the same options)."""
    nodes = compute_nodes(captured.gm.graph)
    cache = captured.gm.meta.setdefault(_META_KEY, {})
    key = (optimizer, bool(profile), float(flop_rate), float(memory_bandwidth), repeats if profile else 0)
    if key in cache:
        return cache[key]
    if profile:
        costs = graph_costs(
            captured, optimizer=optimizer, flop_rate=flop_rate, memory_bandwidth=memory_bandwidth
        )
        device = graph_device(captured.gm.graph)
        # profiling runs dropout too: leave the user's random streams as they were
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            costs = costs.with_times([measure(captured, n, costs.nodes[n], repeats, device) for n in nodes])
    else:
        costs = fake_costs(captured, nodes, optimizer, flop_rate, memory_bandwidth)
    cache[key] = costs
    return costs
