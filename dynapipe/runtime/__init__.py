"""Running stages across processes: the only package that talks to torch.distributed.

It runs what it is given (stage plans from codegen, lowered tables from schedules) and imports nothing
from capture, config, cost, partition or plan."""

from .comm import Comm, ensure_process_group
from .grad_norm import clip_grad_norm_
from .mesh import PipelineMesh, build_mesh, tied_groups
from .pipeline import OutputSpec, Pipeline, StepRecord
from .state import owner_stages, place_state, record_owners

__all__ = [
    "Comm",
    "OutputSpec",
    "Pipeline",
    "PipelineMesh",
    "StepRecord",
    "build_mesh",
    "clip_grad_norm_",
    "ensure_process_group",
    "owner_stages",
    "place_state",
    "record_owners",
    "tied_groups",
]
