"""Graph -> stage assignment: by split points a person chose, or balanced automatically."""

from .automatic import BALANCE_SLACK, BalancedPartition, StepObjective, balanced_partition
from .manual import assign_by_owners, assign_by_split_points, layer_boundaries

__all__ = [
    "BALANCE_SLACK",
    "BalancedPartition",
    "StepObjective",
    "assign_by_owners",
    "assign_by_split_points",
    "balanced_partition",
    "layer_boundaries",
]
