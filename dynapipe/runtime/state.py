"""Which rank keeps which parameters and buffers in memory.

The first pipeline built over a set of tensors frees, on each rank, the storage of every tensor its own
stages do not read: the tensors keep their shape, so the user's model, optimizer and Dynamo's guards stay
valid, but hold no memory. A later pipeline over the same tensors (an inference graph, another input
shape) may cut the graph elsewhere; a stage that then needs a tensor its rank has freed gets it back from a
rank that still holds it, and nothing more is freed, so every pipeline built so far keeps working.
"""

from __future__ import annotations

import torch

from ..codegen import StagePlan
from .comm import Comm

__all__ = ["place_state"]


def _state(plans: list[StagePlan], stages: list[int]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for s in stages:
        for t in [*plans[s].module.parameters(), *plans[s].module.buffers()]:
            seen.setdefault(id(t), t)
    return list(seen.values())


def _held(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() > 0 or t.numel() == 0


def _storage_bytes(t: torch.Tensor) -> int:
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return (t.storage_offset() + extent) * t.element_size()


def place_state(plans: list[StagePlan], local_stages: list[int], comm: Comm) -> int:
    """Make this rank hold what its stages read; on a first build free the rest. Returns bytes freed."""
    everything = _state(plans, list(range(len(plans))))
    index = {id(t): i for i, t in enumerate(everything)}
    needed = {index[id(t)] for t in _state(plans, local_stages)}
    held = {i for i, t in enumerate(everything) if _held(t)}
    first_build = len(held) == len(everything)
    per_rank = comm.gather_objects((sorted(needed), sorted(held)), "which parameters each rank holds")
    for i, t in enumerate(everything):  # every rank walks the same list, so sends and receives pair up
        holders = [r for r, (_, has) in enumerate(per_rank) if i in has]
        for r, (needs, has) in enumerate(per_rank):
            if i in needs and i not in has:
                if comm.rank == holders[0]:
                    comm.isend(t, r, i, f"parameter/buffer #{i} for rank {r}")
                elif comm.rank == r:
                    t.untyped_storage().resize_(_storage_bytes(t))
                    comm.wait(
                        comm.irecv(t.data, holders[0], i), f"receiving parameter/buffer #{i}", holders[0]
                    )
    comm.flush()
    if not first_build:
        return 0
    keep = {t.untyped_storage().data_ptr() for t in _state(plans, local_stages)}
    freed = 0
    for t in everything:
        storage = t.untyped_storage()
        if storage.data_ptr() not in keep and storage.nbytes():
            freed += storage.nbytes()
            storage.resize_(0)
            if isinstance(t, torch.nn.Parameter):
                t.grad = None
    return freed
