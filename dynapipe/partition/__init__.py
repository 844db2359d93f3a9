"""Graph -> stage assignment: by split points a person chose, or balanced automatically."""

from .manual import assign_by_split_points, layer_boundaries, marker_positions, pipe_split

__all__ = ["assign_by_split_points", "layer_boundaries", "marker_positions", "pipe_split"]
