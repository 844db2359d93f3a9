"""Gradient clipping by the norm of the whole model's gradient, not of one rank's stages.

``torch.nn.utils.clip_grad_norm_`` on a pipeline rank sees only the gradients of the stages that rank
holds, so every rank would clip by a different, too small norm. Each pipeline registers the parameters
this rank counts (a parameter held by several ranks, such as tied embeddings, counts on the lowest of
them) with its pipeline process group, and :func:`clip_grad_norm_` sums over that group. Data-parallel
replicas hold equal gradients after DDP's all-reduce, so each replica computes the same norm.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError, PipelineError

__all__ = ["clip_grad_norm_", "register_pipeline_params"]

# id(parameter) -> (weak reference to it, pipeline process group (None: the default group), whether this
# rank counts it); keyed by id because tensors compare elementwise
_PIPELINE_PARAMS: dict[int, tuple[weakref.ref, Any, bool]] = {}


def register_pipeline_params(params: Iterable[torch.Tensor], group: Any, not_counted: set[int]) -> None:
    """Record ``params`` (this rank's trainable parameters of one pipeline); ``not_counted``: ids of those
    another rank counts."""
    for p in params:
        key = id(p)
        _PIPELINE_PARAMS[key] = (weakref.ref(p, partial(_forget, key)), group, key not in not_counted)


def _forget(key: int, _: weakref.ref) -> None:
    _PIPELINE_PARAMS.pop(key, None)


def _registered(p: torch.Tensor) -> tuple[Any, bool] | None:
    """(group, counted here) of a pipeline's parameter; None for any other tensor."""
    entry = _PIPELINE_PARAMS.get(id(p))
    return (entry[1], entry[2]) if entry is not None and entry[0]() is p else None


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a pipelined model: call it on every rank with the model's
    parameters after ``loss.backward()``; it returns the total norm (the same on every rank) and scales
    the gradients this rank holds. Parameters of no pipeline are clipped as torch clips them."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    registered = [_registered(p) for p in params]
    groups = {r[0] for r in registered if r is not None}
    if len(groups) > 1:
        raise ConfigError(
            "clip_grad_norm_ got parameters of pipelines over different process groups; call it once per "
            "pipeline, with that pipeline's parameters"
        )
    counted = [
        p.grad for p, r in zip(params, registered, strict=True) if p.grad is not None and (r is None or r[1])
    ]
    norm_type = float(norm_type)
    device = grads[0].device if grads else torch.device("cpu")
    each = [torch.linalg.vector_norm(g.detach(), norm_type).to(device) for g in counted]
    norms = torch.stack(each) if each else torch.zeros(1, device=device)
    if norm_type == float("inf"):
        total = norms.max()
        op = dist.ReduceOp.MAX
    else:
        total = norms.pow(norm_type).sum()
        op = dist.ReduceOp.SUM
    if groups:
        dist.all_reduce(total, op=op, group=next(iter(groups)))
    if norm_type != float("inf"):
        total = total.pow(1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise PipelineError(
            f"the total norm of order {norm_type} of the gradients is non-finite, so they cannot be clipped; "
            "set error_if_nonfinite=False to clip anyway"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device))
    return total
