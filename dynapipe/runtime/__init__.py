"""Running stages across processes: the only package that talks to torch.distributed."""

from .comm import Comm, ensure_process_group
from .executor import Executor
from .pipeline import Pipeline, StepReport
from .state import place_state

__all__ = ["Comm", "Executor", "Pipeline", "StepReport", "ensure_process_group", "place_state"]
