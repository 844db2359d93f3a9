"""The captured graph and its vocabulary: what capture produces and every later step reads."""

from .captured import CapturedGraph
from .modules import module_counts, modules_of, prefixes
from .nodes import (
    autocast_regions,
    carries_gradient,
    compute_nodes,
    grad_modes,
    is_autocast_node,
    is_size_node,
    settle_getitems,
    unpacked_by,
    written_in_place,
)
from .shapes import CaptureShapes, Dim, Sizes, SymbolicShape, dims_of

__all__ = [
    "CaptureShapes",
    "CapturedGraph",
    "Dim",
    "Sizes",
    "SymbolicShape",
    "autocast_regions",
    "carries_gradient",
    "compute_nodes",
    "dims_of",
    "grad_modes",
    "is_autocast_node",
    "is_size_node",
    "module_counts",
    "modules_of",
    "prefixes",
    "settle_getitems",
    "unpacked_by",
    "written_in_place",
]
