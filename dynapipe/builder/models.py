"""The models a compiled call reaches: checked before any rank waits, and their empty tensors filled.

A rank fills the empty tensors its stages read that no rank holds yet (built under
:func:`dynapipe.empty_init`): from the folder of a :func:`dynapipe.load_checkpoint` made before the first
call, else from ``options["checkpoint"]``, else with the modules' own initialisers. A tensor that holds
memory anywhere is never filled again, so a second pipeline over the model never reloads over trained
weights.
"""

from __future__ import annotations

import torch

from ..capture import FrameCall
from ..capture.names import reachable_modules, root_modules
from ..config import PipelineConfig
from ..empty import allocate, initialise
from ..errors import ConfigError
from ..runtime.checkpoint import load_optimizer_state, pending_load
from ..weights import WeightsFolder, model_names

__all__ = ["check_models", "fill_state"]


def check_models(frame: FrameCall, config: PipelineConfig) -> list[torch.nn.Module]:
    """The models the compiled call reaches, after the checks that must fail on every rank at once."""
    roots = [
        m
        for _, m in root_modules(reachable_modules(frame.arguments, frame.code, frame.closure, frame.globals))
    ]
    for root in roots:
        meta = [n for n, t in root.state_dict(keep_vars=True).items() if t.is_meta]
        if meta:
            raise ConfigError(
                f"{type(root).__name__} has {len(meta)} tensor(s) on the meta device (e.g. {meta[0]!r}), which hold "
                "no values a pipeline could run; build the model under `with dynapipe.empty_init():` instead of "
                "torch.device('meta') / init_empty_weights, so each rank fills only its own stages"
            )
    if config.checkpoint is not None:
        owners = [r for r in roots if any(True for _ in r.parameters())]
        if len(owners) != 1:
            raise ConfigError(
                f"options['checkpoint'] holds one model's weights, but the compiled call reaches {len(owners)} "
                f"models with parameters ({[type(r).__name__ for r in owners]}); call "
                "dynapipe.load_checkpoint(path, model) for each before the first step instead"
            )
        WeightsFolder.open(config.checkpoint).check(owners[0])
    return roots


def fill_state(roots: list[torch.nn.Module], checkpoint: str | None, tensors: list[torch.Tensor]) -> None:
    """Give ``tensors`` (empty, read by this rank's stages, held by no rank) their first values."""
    for root in roots:
        names = model_names(root)
        mine = [t for t in tensors if id(t) in names]
        if not mine:
            continue
        source = pending_load(root)
        folder = source.folder if source else WeightsFolder.open(checkpoint) if checkpoint else None
        if folder is None:
            initialise(mine, [root])
            continue
        for t in mine:
            allocate(t)
        folder.read_into([(names[id(t)], t) for t in mine])
        optimizer = source.optimizer() if source and source.optimizer else None
        if optimizer is not None:
            load_optimizer_state(folder.path, optimizer, {names[id(t)][0]: t for t in mine})
    leftover = {id(t) for t in tensors} - {k for root in roots for k in model_names(root)}
    if leftover:
        initialise([t for t in tensors if id(t) in leftover], roots)  # raises, naming the tensors
