"""Exceptions raised by dynapipe. Each message names the offending value and the fix."""

__all__ = [
    "DynapipeError",
    "ConfigError",
    "CaptureError",
    "GraphBreakError",
    "PartitionError",
    "PipelineError",
    "ScheduleError",
]


class DynapipeError(RuntimeError):
    """Base class of every error dynapipe raises on purpose."""


class ConfigError(DynapipeError, ValueError):
    """An option or the launch set-up (world size, batch size) is not usable."""


class CaptureError(DynapipeError):
    """The model could not be captured as one graph."""


class GraphBreakError(CaptureError):
    """Dynamo broke the graph; pipelining needs the whole step as one graph."""


class PartitionError(DynapipeError):
    """The graph cannot be cut as asked."""


class PipelineError(DynapipeError):
    """Something failed while the pipeline ran: a peer died, ranks disagree, a collective timed out."""


class ScheduleError(DynapipeError, ValueError):
    """A schedule that cannot run: incomplete, misplaced, mis-ordered or deadlocking."""
