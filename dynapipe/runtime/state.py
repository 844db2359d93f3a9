"""Which rank keeps which parameters and buffers in memory, and keeps the copies current.

The first pipeline built over a set of tensors frees, on each rank, the storage of every tensor its own
stages do not read: the tensors keep their shape, so the user's model, optimizer and Dynamo's guards stay
valid, but hold no memory. A later pipeline over the same tensors (an inference graph, another input
shape) may cut the graph elsewhere; a stage that then needs a tensor its rank has freed gets it back from a
rank that still holds it, and nothing more is freed, so every pipeline built so far keeps working.

With several pipelines over one model a tensor can then live on several ranks, and only the ranks whose
stages read it in the pipeline that ran last have its current value (the optimizer steps the copies that
got gradients; a forward updates buffers where it runs). So before a pipeline runs after another one, each
rank that reads a tensor but did not read it last fetches it from a rank that did.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial

import torch

from ..codegen import StagePlan
from ..empty import allocate, is_empty, storage_bytes
from ..errors import DynapipeError, PipelineError
from .comm import Comm

__all__ = [
    "allocate_read_inputs",
    "holds_current",
    "owner_stages",
    "place_state",
    "record_owners",
    "refresh_state",
    "state_readers",
]

# id(tensor) -> (weak reference, the pipeline that read it last, the ranks whose stages read it there)
_LAST_READERS: dict[int, tuple[weakref.ref, int, frozenset[int]]] = {}
_LAST_PIPELINE: int | None = None  # the pipeline that ran last, over any tensors
# id(tensor) -> (weak reference, the stages that own it, the stage -> pipeline rank tuple they are for):
# set by the first pipeline over a tensor, so later ones keep each module on the rank that owns it
_OWNERS: dict[int, tuple[weakref.ref, frozenset[int], tuple[int, ...]]] = {}


def _state(plans: list[StagePlan], stages: list[int]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for s in stages:
        for t in [*plans[s].module.parameters(), *plans[s].module.buffers()]:
            seen.setdefault(id(t), t)
    return list(seen.values())


def release(t: torch.Tensor) -> None:
    """Free ``t``'s memory, keeping the tensor object, shape and dtype. A storage that cannot be resized
    (memory-mapped by ``from_pretrained``'s safetensors loading) is swapped for an empty resizable one."""
    storage = t.untyped_storage()
    if storage.resizable():
        storage.resize_(0)
        return
    empty = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    empty.untyped_storage().resize_(0)
    with torch.no_grad():
        t.data = empty


def record_owners(plans: list[StagePlan], stage_ranks: tuple[int, ...]) -> None:
    """Remember which stages own each tensor, for tensors no earlier pipeline owns (first one wins)."""
    stages: dict[int, tuple[torch.Tensor, set[int]]] = {}
    for s, plan in enumerate(plans):
        for t in [*plan.module.parameters(), *plan.module.buffers()]:
            stages.setdefault(id(t), (t, set()))[1].add(s)
    for key, (t, owned) in stages.items():
        entry = _OWNERS.get(key)
        if entry is None or entry[0]() is not t:
            _OWNERS[key] = (weakref.ref(t, partial(_drop_owner, key)), frozenset(owned), stage_ranks)


def owner_stages(tensors: list[torch.Tensor], stage_ranks: tuple[int, ...]) -> dict[int, frozenset[int]]:
    """The owning stages of those ``tensors`` an earlier pipeline with the same stage -> rank tuple owns."""
    out = {}
    for t in tensors:
        entry = _OWNERS.get(id(t))
        if entry is not None and entry[0]() is t and entry[2] == stage_ranks:
            out[id(t)] = entry[1]
    return out


def _drop_owner(key: int, _: weakref.ref) -> None:
    _OWNERS.pop(key, None)


def _forget(key: int, _: weakref.ref) -> None:
    _LAST_READERS.pop(key, None)


def _last_readers(t: torch.Tensor) -> tuple[int, frozenset[int]] | None:
    entry = _LAST_READERS.get(id(t))
    return (entry[1], entry[2]) if entry is not None and entry[0]() is t else None


def holds_current(t: torch.Tensor, rank: int) -> bool:
    """Whether ``rank``'s copy of ``t`` has its current value: it holds memory and, if pipelines have run
    over ``t``, ``rank`` read it in the one that ran last."""
    last = _last_readers(t)
    return not is_empty(t) and (last is None or rank in last[1])


def state_readers(
    plans: list[StagePlan], rank_of_stage: dict[int, int]
) -> list[tuple[torch.Tensor, frozenset]]:
    """Every parameter and buffer of a pipeline with the ranks whose stages read it."""
    readers: dict[int, tuple[torch.Tensor, set[int]]] = {}
    for s in range(len(plans)):
        for t in _state(plans, [s]):
            readers.setdefault(id(t), (t, set()))[1].add(rank_of_stage[s])
    return [(t, frozenset(ranks)) for t, ranks in readers.values()]


def refresh_state(readers: list[tuple[torch.Tensor, frozenset]], pipeline: int, comm: Comm) -> None:
    """Before pipeline number ``pipeline`` runs: give each rank that reads a tensor the value held by the
    ranks that read it in the pipeline that ran last over it. Every rank runs the same pipelines in the
    same order, so every rank computes the same transfers."""
    global _LAST_PIPELINE
    if _LAST_PIPELINE == pipeline:
        return
    _LAST_PIPELINE = pipeline
    for i, (t, ranks) in enumerate(readers):
        last = _last_readers(t)
        if last is not None and last[0] != pipeline:
            source = min(last[1])
            for r in sorted(ranks - last[1]):
                if comm.rank == source:
                    comm.isend(t, r, i, f"the current value of parameter/buffer #{i} for rank {r}")
                elif comm.rank == r:
                    if is_empty(t):
                        t.untyped_storage().resize_(storage_bytes(t))
                    work = comm.irecv(t.data, source, i)
                    comm.wait(work, f"receiving the current value of parameter/buffer #{i}", source)
        key = id(t)
        _LAST_READERS[key] = (weakref.ref(t, partial(_forget, key)), pipeline, ranks)
    comm.flush()


def place_state(
    plans: list[StagePlan],
    local_stages: list[int],
    comm: Comm,
    fill: Callable[[list[torch.Tensor]], None],
) -> int:
    """Make this rank hold what its stages read, and free the tensors that no pipeline has read yet and
    its stages do not read. A tensor its stages read that no rank holds (built under empty_init) is
    given to ``fill``. Returns the bytes freed."""
    everything = _state(plans, list(range(len(plans))))
    index = {id(t): i for i, t in enumerate(everything)}
    needed = {index[id(t)] for t in _state(plans, local_stages)}
    held = {i for i, t in enumerate(everything) if not is_empty(t)}
    per_rank = comm.gather_objects((sorted(needed), sorted(held)), "which parameters each rank holds")
    anywhere = set().union(*(has for _, has in per_rank))
    unheld = [everything[i] for i in sorted(needed - anywhere)]
    failure = None
    if unheld:
        try:
            fill(unheld)
        except (
            DynapipeError
        ) as err:  # a bad checkpoint on one rank only: every rank stops now, not at timeout
            failure = err
    failed = comm.gather_objects(None if failure is None else f"{type(failure).__name__}: {failure}", "fill")
    if failure is not None:
        raise failure
    for r, message in enumerate(failed):
        if message is not None:
            raise PipelineError(f"rank {r} could not fill the parameters its stages read: {message}")
    for i, t in enumerate(everything):  # every rank walks the same list, so sends and receives pair up
        holders = [r for r, (_, has) in enumerate(per_rank) if i in has]
        if not holders:
            continue  # filled by every rank that reads it
        for r, (needs, has) in enumerate(per_rank):
            if i in needs and i not in has:
                if comm.rank == holders[0]:
                    comm.isend(t, r, i, f"parameter/buffer #{i} for rank {r}")
                elif comm.rank == r:
                    t.untyped_storage().resize_(storage_bytes(t))
                    comm.wait(
                        comm.irecv(t.data, holders[0], i), f"receiving parameter/buffer #{i}", holders[0]
                    )
    comm.flush()
    # free what this rank's stages do not read, among the tensors that no pipeline has read yet (the same
    # on every rank): a tensor an earlier pipeline reads stays where it is
    keep = {t.untyped_storage().data_ptr() for t in _state(plans, local_stages)}
    freed = 0
    for t in everything:
        storage = t.untyped_storage()
        if _last_readers(t) is None and storage.data_ptr() not in keep and storage.nbytes():
            freed += storage.nbytes()
            release(t)
            if isinstance(t, torch.nn.Parameter):
                t.grad = None
    return freed


def allocate_read_inputs(plans: list[StagePlan], local_stages: list[int], values: list) -> None:
    """Give memory (zeros) to the call's input tensors that were built without any and that this rank's
    stages read: a ``PipelineCache``'s keys and values, so each rank holds only its own layers' cache."""
    for s in local_stages:
        for i, reads_data in zip(plans[s].inputs, plans[s].reads_data, strict=True):
            if reads_data and isinstance(values[i], torch.Tensor) and is_empty(values[i]):
                allocate(values[i])
