"""Splitting a batch into microbatches and merging per-microbatch outputs back.

The rule, as in torch.distributed.pipelining's default chunk spec: every input tensor whose first
dimension equals the batch size is split along dim 0 into equal chunks; every other value (parameters,
modules, Python scalars, tensors of another length) is given whole to each microbatch.
Outputs: 0-dim tensors are reduced (mean or sum, as the loss is), others are concatenated on dim 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .empty import is_empty
from .errors import ConfigError

__all__ = ["infer_batch_size", "merge_outputs", "split_inputs", "split_value"]


def _is_data_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) and x.dim() >= 1


def infer_batch_size(values: Any) -> int | None:
    """Batch size = first dim of the first data tensor among the call's arguments."""
    for leaf in tree_flatten(values)[0]:
        if _is_data_tensor(leaf):
            return int(leaf.shape[0])
    return None


def check_divisible(batch_size: int, n_microbatches: int) -> None:
    if batch_size % n_microbatches:
        fits = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        packed = (
            "; a batch of one row (packed sequences: documents concatenated, position_ids restarting) "
            "cannot be split, because dynapipe splits along dim 0 only: pack into several rows instead"
            if batch_size == 1
            else ""
        )
        raise ConfigError(
            f"n_microbatches ({n_microbatches}) must divide the batch size ({batch_size}); "
            f"use one of {fits} or change the batch size{packed}"
        )


def is_batched(x: Any, batch_size: int) -> bool:
    return _is_data_tensor(x) and x.shape[0] == batch_size


def split_value(value: Any, n_microbatches: int, batch_size: int, index: int) -> Any:
    """Microbatch `index` of a (pytree) value: batched tensors are sliced, all else passes through."""
    size = batch_size // n_microbatches

    def pick(x: Any) -> Any:
        if is_batched(x, batch_size):
            return rows_of(x, index * size, size)
        return x

    return tree_map(pick, value)


def split_inputs(values: Sequence[Any], n_microbatches: int, batch_size: int) -> list[list[Any]]:
    """The graph inputs of each microbatch: the same as ``split_value`` on each value, for flat values (a
    graph's inputs), with one ``split`` per tensor instead of a pytree walk per value and microbatch."""
    size = batch_size // n_microbatches

    def rows(v: Any) -> Any:
        if not is_batched(v, batch_size):
            return [v] * n_microbatches
        if is_empty(v):
            return [rows_of(v, mb * size, size) for mb in range(n_microbatches)]
        return v.split(size)

    columns = [rows(v) for v in values]
    return (
        [list(row) for row in zip(*columns, strict=True)] if columns else [[] for _ in range(n_microbatches)]
    )


def rows_of(x: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows ``start : start + rows`` of ``x`` as a view. A tensor without memory (another stage's part of a
    ``PipelineCache``, which this rank never reads) cannot be viewed: its rows are another such tensor."""
    if is_empty(x):
        out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        out.untyped_storage().resize_(0)
        return out
    return x.narrow(0, start, rows)


def merge_outputs(per_microbatch: list[torch.Tensor], reduction: str, merge: str) -> torch.Tensor:
    """One graph output over all microbatches. ``merge``: "cat" for batched outputs (dim 0); "last" for
    model state updated in place (each microbatch updates it, as BatchNorm's running statistics); "reduce"
    for the rest (the loss, a statistic, a buffer's new value): combined as the loss is, mean or sum."""
    if merge == "cat":
        return torch.cat(per_microbatch, dim=0)
    if merge == "last":
        return per_microbatch[-1]
    total = torch.stack(per_microbatch).sum(0)
    return total / len(per_microbatch) if reduction == "mean" else total
