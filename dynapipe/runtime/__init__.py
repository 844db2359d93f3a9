"""Running stages across processes: the only package that talks to torch.distributed."""

from .comm import Comm, ensure_process_group
from .executor import Executor
from .grad_norm import clip_grad_norm_
from .pipeline import Pipeline, StepReport
from .state import place_state

__all__ = [
    "Comm",
    "Executor",
    "Pipeline",
    "StepReport",
    "clip_grad_norm_",
    "ensure_process_group",
    "place_state",
]
