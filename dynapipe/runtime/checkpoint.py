"""Checkpoints of a pipelined model in the model's own names.

**Loading** runs no code from the folder and checks all of it before changing anything: every shard's
header against the model (``WeightsFolder.check``) and every other file it reads, every rank's files on
every rank, so a bad folder stops every rank with one error while each keeps its values. ``extra`` loads
with ``torch.load(weights_only=True)``; only ``allow_pickle=True`` unpickles it. :func:`load_checkpoint`
before the first call records the folder (:func:`pending_load`); the pipeline's build fills each rank's
stages from it (``dynapipe.builder.models``).

**Saving.** Each tensor is written by the lowest rank holding its current value (a tied weight once, one
data-parallel replica), as safetensors under the names of ``model.state_dict()``, with an index as
``save_pretrained`` writes, so the folder loads with ``from_pretrained`` or ``load_state_dict`` without
dynapipe. Beside it: optimizer state keyed by the same names, each rank's RNG state, and ``extra``. Every
rank writes into a temporary folder; after a barrier bounded by ``timeout_s``, rank 0 renames it into
place and then points ``latest`` at it (a symlink replaced atomically), so a rank that dies mid-save
leaves no folder that loads as a checkpoint and the previous one untouched. Ranks must share the
filesystem the folder is on.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import uuid
import weakref
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist

from ..empty import is_empty
from ..errors import ConfigError
from ..weights import INDEX, WeightsFolder, model_names
from .comm import Comm
from .files import fsync_dir, read_json, write_json
from .state import holds_current

__all__ = ["load_checkpoint", "load_optimizer_state", "pending_load", "save_checkpoint"]

OPTIMIZER_INDEX = "optimizer.index.json"
OPTIMIZER_GROUPS = "optimizer-groups.pt"
EXTRA = "extra.pt"
LATEST = "latest"


@dataclass
class _Source:
    """A :func:`load_checkpoint` whose tensors are filled when a pipeline first needs them."""

    folder: WeightsFolder
    optimizer: weakref.ref | None


# id(model) -> (weak reference to the model, where its not yet filled tensors come from)
_PENDING: dict[int, tuple[weakref.ref, _Source]] = {}


def _forget(key: int, _: weakref.ref) -> None:
    _PENDING.pop(key, None)


def pending_load(model: torch.nn.Module) -> _Source | None:
    entry = _PENDING.get(id(model))
    return entry[1] if entry is not None and entry[0]() is model else None


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Any = None,
    allow_pickle: bool = False,
    timeout_s: float = 300.0,
) -> str:
    """Write ``model`` (and ``optimizer``, RNG states, rank 0's ``extra``) to the folder ``path``,
    collectively: call it on every rank. Returns the folder. ``path`` must not exist; ``latest`` beside it
    is updated.

    ``extra`` must load back with ``torch.load(weights_only=True)``, so that loading runs no code: tensors,
    numbers, strings, and lists/tuples/dicts of them (a scheduler's or sampler's ``state_dict()``). Else it
    is a ConfigError on every rank before anything is written, unless ``allow_pickle=True``: then it is
    pickled, and loading it needs ``load_checkpoint(..., allow_pickle=True)``."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not _unpublished(path):
        raise ConfigError(f"checkpoint folder {path!r} exists already; save each checkpoint to a new folder")
    comm = Comm(timedelta(seconds=timeout_s))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    entries = list(
        {id(t): (name, t) for name, t in reversed(model.state_dict(keep_vars=True).items())}.values()
    )
    entries.reverse()  # each tensor under its first name, in state_dict order
    data, problem = _encode_extra(extra, allow_pickle) if rank == 0 else (None, None)
    owner, token = _writers(comm, entries, rank, world, problem)
    mine = {entries[i][0]: entries[i][1] for i in sorted(owner) if owner[i] == rank}
    tmp = f"{path}.tmp-{token}"
    os.makedirs(tmp, exist_ok=True)
    _write_rank_files(tmp, rank, mine, optimizer)
    if rank == 0:
        _save_rank0_files(tmp, model, optimizer, data)
    _barrier(comm, world, "writing the checkpoint")  # every rank wrote its files, or none is published
    if rank == 0:
        _publish(tmp, path, token, entries, owner, with_optimizer=optimizer is not None)
    _barrier(comm, world, "publishing the checkpoint")
    return path


def _writers(
    comm: Comm, entries: list[tuple[str, torch.Tensor]], rank: int, world: int, problem: str | None
) -> tuple[dict[int, int], str]:
    """The lowest rank holding each entry's current value, and one token for this save on every rank;
    rank 0's ``problem`` with ``extra`` raised on every rank."""
    current = [i for i, (_, t) in enumerate(entries) if holds_current(t, rank)]
    token = uuid.uuid4().hex[:12]
    if world > 1:
        per_rank = comm.gather_objects((current, token, problem), "which tensors each rank saves")
        token, problem = per_rank[0][1], per_rank[0][2]
    else:
        per_rank = [(current, token, problem)]
    if problem is not None:
        raise ConfigError(problem)
    owner: dict[int, int] = {}
    for r, (held, _, _) in enumerate(per_rank):
        for i in held:
            owner.setdefault(i, r)
    unheld = [entries[i][0] for i in range(len(entries)) if i not in owner]
    if unheld:
        raise ConfigError(
            f"no rank holds a value of {len(unheld)} tensor(s) of the model (e.g. {unheld[0]!r}): it was built "
            "under dynapipe.empty_init() and no pipeline has filled them yet; run a step before saving"
        )
    return owner, token


def _write_rank_files(
    tmp: str, rank: int, mine: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None
) -> None:
    """This rank's shard of the weights, its optimizer state for them and its RNG state."""
    if mine:
        tensors = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in mine.items()}
        shard = f"model-rank{rank:05d}.safetensors"
        safetensors.torch.save_file(tensors, os.path.join(tmp, shard), metadata={"format": "pt"})
    if optimizer is not None:
        by_id = {id(t): n for n, t in mine.items()}
        state = {by_id[id(p)]: s for p, s in optimizer.state.items() if id(p) in by_id}
        torch.save(state, os.path.join(tmp, f"optimizer-rank{rank:05d}.pt"))
    torch.save(_rng_state(), os.path.join(tmp, f"rng-rank{rank:05d}.pt"))


def _publish(
    tmp: str,
    path: str,
    token: str,
    entries: list[tuple[str, torch.Tensor]],
    owner: dict[int, int],
    *,
    with_optimizer: bool,
) -> None:
    """Rank 0, once every rank wrote: the indexes, then the folder renamed into place and ``latest``
    pointed at it, each step atomic."""
    sizes = {n: t.numel() * t.element_size() for n, t in entries}
    weight_map = {entries[i][0]: f"model-rank{owner[i]:05d}.safetensors" for i in sorted(owner)}
    write_json(
        os.path.join(tmp, INDEX),
        {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
    )
    if with_optimizer:
        files = {entries[i][0]: f"optimizer-rank{owner[i]:05d}.pt" for i in sorted(owner)}
        write_json(os.path.join(tmp, OPTIMIZER_INDEX), files)
    fsync_dir(tmp)
    if os.path.exists(path):  # an unpublished folder of a killed save (save_checkpoint checked)
        shutil.rmtree(path)
    os.rename(tmp, path)
    link = os.path.join(os.path.dirname(path), f".{LATEST}-{token}")
    os.symlink(os.path.basename(path), link)
    os.replace(link, os.path.join(os.path.dirname(path), LATEST))
    fsync_dir(os.path.dirname(path))


def _unpublished(path: str) -> bool:
    """Whether ``path`` is a folder a killed save renamed into place without pointing ``latest`` at it (it
    is newer than ``latest``'s): a restart that resumed from ``latest`` saves that step again over it."""
    latest = os.path.realpath(os.path.join(os.path.dirname(path), LATEST))
    if not os.path.isdir(latest) or latest == os.path.realpath(path):
        return False
    return os.path.getmtime(path) >= os.path.getmtime(latest)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    allow_pickle: bool = False,
) -> Any:
    """Load a folder of :func:`save_checkpoint` (or ``save_pretrained``'s weights) into ``model`` and
    ``optimizer``; returns the ``extra`` saved with it. Tensors this rank holds are loaded now; empty ones
    (before the first call of a model built under empty_init) when a pipeline first needs them, but
    checked now. Restores this rank's RNG state when the checkpoint has one for it.

    A bad folder is a ConfigError on every rank naming the file and tensor, raised before the model,
    optimizer or RNG change. ``allow_pickle=True`` unpickles an ``extra`` that
    ``torch.load(weights_only=True)`` refuses, which runs any code the folder names: only for a folder
    you trust."""
    folder = WeightsFolder.open(path)
    folder.check(model)
    _check_files(folder.path, with_optimizer=optimizer is not None)
    names = model_names(model)
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    held = [t for t in tensors.values() if not is_empty(t)]
    extra = _load_extra(folder.path, allow_pickle)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))  # group not yet up
    rng_file = os.path.join(folder.path, f"rng-rank{rank:05d}.pt")
    rng = torch.load(rng_file, weights_only=True) if os.path.exists(rng_file) else None
    groups, state = [], {}
    if optimizer is not None:
        groups = _read_optimizer_groups(folder.path, optimizer)
        state = _read_optimizer_state(folder.path, optimizer, {names[id(t)][0]: t for t in held})
    # all read and checked: nothing below fails on a bad folder
    folder.read_into([(names[id(t)], t) for t in held])
    if optimizer is not None:
        for saved, group in zip(groups, optimizer.param_groups, strict=True):
            group.update(saved)
        optimizer.state.update(state)
    if len(held) < len(tensors):
        _PENDING[id(model)] = (
            weakref.ref(model, partial(_forget, id(model))),
            _Source(folder, weakref.ref(optimizer) if optimizer is not None else None),
        )
    if rng is not None:
        _set_rng_state(rng)
    return extra


def _encode_extra(extra: Any, allow_pickle: bool) -> tuple[bytes | None, str | None]:
    """``extra`` as ``torch.save`` writes it, or why it cannot be saved: without ``allow_pickle``, what
    ``weights_only=True`` refuses, found here so that a save never writes what a load will refuse."""
    if extra is None:
        return None, None
    buffer = io.BytesIO()
    try:
        torch.save(extra, buffer)
        if not allow_pickle:
            torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except pickle.UnpicklingError as err:
        return None, (
            f"save_checkpoint's extra holds an object that loads only by unpickling, which can run code "
            f"({_refused(err)}): save plain values instead (numbers, strings, tensors, lists and dicts of "
            "them, such as a scheduler's state_dict()), or pass allow_pickle=True here and to load_checkpoint"
        )
    except Exception as err:  # noqa: BLE001 - torch.save fails on a user's value in many ways
        return None, f"save_checkpoint's extra cannot be saved ({type(err).__name__}: {err})"
    return buffer.getvalue(), None


def _refused(err: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, from its long message."""
    line = next((ln for ln in str(err).splitlines() if "WeightsUnpickler error:" in ln), str(err))
    return line.split("WeightsUnpickler error:")[-1].strip()


def _load_extra(path: str, allow_pickle: bool) -> Any:
    file = os.path.join(path, EXTRA)
    if not os.path.exists(file):
        return None
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise ConfigError(
                f"{file} holds an object that loads only by unpickling, which runs code the file names "
                f"({_refused(err)}): it was saved with allow_pickle=True or before dynapipe saved extra without "
                "pickle. Pass load_checkpoint(..., allow_pickle=True) only if you trust the folder"
            ) from None
    return torch.load(file, weights_only=False)


def _check_files(path: str, *, with_optimizer: bool) -> None:
    """Every file beside the weights that a load reads, every rank's, is there and complete (its zip
    directory, at the end of what ``torch.save`` writes, reads), so a cut one stops every rank at once."""
    holds = {f: "a rank's RNG state" for f in os.listdir(path) if f.startswith("rng-rank")}
    if os.path.exists(os.path.join(path, EXTRA)):
        holds[EXTRA] = "save_checkpoint's extra"
    if with_optimizer:
        if not os.path.exists(os.path.join(path, OPTIMIZER_GROUPS)):
            raise ConfigError(f"checkpoint {path!r} has no optimizer state; load it without optimizer=")
        holds[OPTIMIZER_GROUPS] = "the optimizer's parameter groups"
        for name, file in sorted(read_json(os.path.join(path, OPTIMIZER_INDEX)).items(), reverse=True):
            holds[file] = f"optimizer state (e.g. of {name!r})"
    for file, what in sorted(holds.items()):
        try:
            zipfile.ZipFile(os.path.join(path, file)).close()
        except (OSError, zipfile.BadZipFile) as err:
            raise ConfigError(
                f"checkpoint file {os.path.join(path, file)}, which holds {what}, is missing, truncated or "
                f"damaged ({err}); the save did not finish or the copy was cut: copy the folder again or load "
                "another checkpoint"
            ) from None


def _save_rank0_files(tmp: str, model: torch.nn.Module, optimizer: Any, extra: bytes | None) -> None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file"):
        config.architectures = [type(model).__name__]  # as save_pretrained records it
        config.to_json_file(os.path.join(tmp, "config.json"))
    if optimizer is not None:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        torch.save(groups, os.path.join(tmp, OPTIMIZER_GROUPS))
    if extra is not None:
        with open(os.path.join(tmp, EXTRA), "wb") as f:
            f.write(extra)


def _read_optimizer_groups(path: str, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The saved groups' settings (lr, betas, ...), checked against ``optimizer``'s groups."""
    groups = torch.load(os.path.join(path, OPTIMIZER_GROUPS), weights_only=True)
    if len(groups) != len(optimizer.param_groups):
        raise ConfigError(
            f"the checkpoint's optimizer has {len(groups)} parameter group(s), this one "
            f"{len(optimizer.param_groups)}; build the optimizer with the same groups"
        )
    return groups


def load_optimizer_state(
    path: str, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]
) -> None:
    """Optimizer state of ``params`` (name -> parameter), reading only the files that hold them."""
    optimizer.state.update(_read_optimizer_state(path, optimizer, params))


def _read_optimizer_state(
    path: str, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]
) -> dict[torch.Tensor, dict[str, Any]]:
    file_of = read_json(os.path.join(path, OPTIMIZER_INDEX))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    by_file: dict[str, list[str]] = {}
    for name, p in params.items():
        if id(p) in in_optimizer and name in file_of:
            by_file.setdefault(file_of[name], []).append(name)
    out = {}
    for file, names in sorted(by_file.items()):
        state = torch.load(os.path.join(path, file), weights_only=True, mmap=True)
        for name in names:
            if name in state:
                p = params[name]
                out[p] = {k: _to_param_device(v, p) for k, v in state[name].items()}
    return out


def _to_param_device(value: Any, param: torch.Tensor) -> Any:
    """A copy of one optimizer state entry; moments go to the parameter's device, 0-dim ``step`` stays put
    (where torch's optimizers keep it unless ``capturable``)."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(param.device, copy=True) if value.dim() else value.clone()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(comm: Comm, world: int, what: str) -> None:
    """All ranks reached this point, or a PipelineError after ``timeout_s`` (a dead rank never hangs it)."""
    if world > 1:
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        comm.all_reduce(torch.zeros(1, device=device), None, what)
