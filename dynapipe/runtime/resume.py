"""``step = dynapipe.resume(path, model, optimizer)``: where a restarted training script picks up.

A script that saves every k steps with ``save_checkpoint(f"{path}/step-{n}", ..., extra={"step": n})``
and starts with ``resume`` repeats at most k steps after a crash, whatever rank died: ``latest`` only ever
points at a complete checkpoint (see ``checkpoint.py``).
"""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError
from .checkpoint import LATEST, load_checkpoint

__all__ = ["resume"]


def resume(
    path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Load ``path/latest`` into ``model`` and ``optimizer`` (and this rank's RNG state) if it exists and
    return the step saved with it (``extra["step"]``); 0, loading nothing, when there is no checkpoint
    yet. Call it on every rank before the first compiled call."""
    latest = os.path.join(os.fspath(path), LATEST)
    if not os.path.lexists(latest):
        return 0
    extra = load_checkpoint(latest, model, optimizer=optimizer)
    step = extra.get("step") if isinstance(extra, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise ConfigError(
            f"checkpoint {os.path.realpath(latest)!r} has no step to resume from (its extra is "
            f"{type(extra).__name__}); save it with extra={{'step': n, ...}}"
        )
    return step
