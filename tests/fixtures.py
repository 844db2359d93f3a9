"""Helpers several test files share: plans made the way the planner makes them, on node costs computed here."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from dynapipe.cost import GraphCosts, graph_costs, stage_costs
from dynapipe.graph import CapturedGraph
from dynapipe.partition import balanced_partition
from dynapipe.schedules import StageCost

__all__ = ["assign_balanced", "costs_of", "stage_records"]


def costs_of(captured: CapturedGraph, costs: GraphCosts | None = None, **options: Any) -> GraphCosts:
    """``costs``, else the estimated node costs of ``captured`` (``graph_costs`` options)."""
    return costs if costs is not None else graph_costs(captured, **options)


def assign_balanced(
    captured: CapturedGraph, n_stages: int, *, costs: GraphCosts | None = None, optimizer: str = "adamw", **options: Any
) -> dict[fx.Node, int]:
    """The automatic partition's stage of every compute node (``balanced_partition`` options)."""
    return balanced_partition(captured, n_stages, costs=costs_of(captured, costs, optimizer=optimizer), **options).stage_of


def stage_records(
    captured: CapturedGraph, stage_of: dict[fx.Node, int], *, costs: GraphCosts | None = None
) -> list[StageCost]:
    """Per-stage costs of ``stage_of``, on ``costs`` or the estimated node costs."""
    return stage_costs(captured, stage_of, costs_of(captured, costs))
