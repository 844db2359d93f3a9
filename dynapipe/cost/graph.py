"""The cost model's entry point: every node's cost at the given rates, cached on the graph."""

from __future__ import annotations

import dataclasses

from ..config import Optimizer
from ..graph import CapturedGraph, compute_nodes
from .fake import fake_costs
from .profile import time_ops
from .rates import NOMINAL_RATES, Rates
from .records import GraphCosts

__all__ = ["graph_costs"]

_META_KEY = "dynapipe.costs"


def graph_costs(
    captured: CapturedGraph,
    *,
    optimizer: Optimizer = "adamw",
    rates: Rates = NOMINAL_RATES,
    profile: bool = False,
    flop_rate: float | None = None,
    memory_bandwidth: float | None = None,
    rounds: int = 10,
) -> GraphCosts:
    """Cost every compute node of ``captured`` at ``rates`` (cached on the graph module for the same
    options). ``profile``: time every operation ``rates`` has not timed, here, in this process.
    ``flop_rate`` / ``memory_bandwidth`` replace the rates' roofline."""
    if flop_rate or memory_bandwidth:
        rates = dataclasses.replace(
            rates,
            flop_rate=flop_rate or rates.flop_rate,
            memory_bandwidth=memory_bandwidth or rates.memory_bandwidth,
        )
    cache = captured.gm.meta.setdefault(_META_KEY, {})
    key = (optimizer, rates, profile)
    if key in cache:
        return cache[key]
    estimate = _estimate(captured, optimizer, rates, cache)
    if profile:
        missing = {s for s in estimate.signatures.values() if s is not None and s not in rates.op_times}
        timed = time_ops(captured, estimate, missing, rounds)
        rates = rates.with_ops(timed, source=f"{rates.source}, {len(timed)} operations timed in this process")
    cache[key] = costs = estimate.timed(rates)
    return costs


def _estimate(captured: CapturedGraph, optimizer: Optimizer, rates: Rates, cache: dict) -> GraphCosts:
    """The fake run's costs at the rates' roofline (what the graph does does not depend on the rates)."""
    key = (optimizer, rates.flop_rate, rates.memory_bandwidth, rates.op_overhead_s)
    if key not in cache:
        cache[key] = fake_costs(captured, compute_nodes(captured.gm.graph), optimizer, rates)
    return cache[key]
