"""dynapipe: pipeline-parallel training and inference through ``torch.compile(model, backend="dynapipe")``."""

from .builder import StepReport
from .capture import pipe_split
from .config import PipelineConfig
from .empty import empty_init
from .errors import (
    CaptureError,
    ConfigError,
    DynapipeError,
    GraphBreakError,
    PartitionError,
    PipelineError,
    ScheduleError,
)
from .explain import Explanation, explain
from .launch import launch
from .runtime import clip_grad_norm_
from .runtime.checkpoint import load_checkpoint, save_checkpoint
from .runtime.resume import resume
from .schedules import Timeline

__all__ = [
    "CaptureError",
    "ConfigError",
    "DynapipeError",
    "Explanation",
    "GraphBreakError",
    "PartitionError",
    "PipelineCache",
    "PipelineConfig",
    "PipelineError",
    "ScheduleError",
    "StepReport",
    "Timeline",
    "clip_grad_norm_",
    "empty_init",
    "explain",
    "launch",
    "load_checkpoint",
    "pipe_split",
    "resume",
    "save_checkpoint",
]


def __getattr__(name: str) -> object:
    """``dynapipe.PipelineCache`` needs transformers, which dynapipe does not: imported on first use."""
    if name == "PipelineCache":
        from .kv_cache import PipelineCache

        return PipelineCache
    raise AttributeError(f"module 'dynapipe' has no attribute {name!r}")
