"""dynapipe: pipeline-parallel training and inference through ``torch.compile(model, backend="dynapipe")``."""

from .config import PipelineConfig
from .errors import CaptureError, ConfigError, DynapipeError, GraphBreakError, PartitionError, PipelineError
from .explain import explain
from .launch import launch
from .partition import pipe_split

__all__ = [
    "CaptureError",
    "ConfigError",
    "DynapipeError",
    "GraphBreakError",
    "PartitionError",
    "PipelineConfig",
    "PipelineError",
    "explain",
    "launch",
    "pipe_split",
]
