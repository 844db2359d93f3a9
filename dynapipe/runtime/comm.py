"""All of dynapipe's torch.distributed calls: process-group set-up, point-to-point, collectives.

Every wait is bounded by the configured timeout, and a failed wait is turned into a PipelineError that
names this rank, the peer and what was being exchanged, so a rank that dies makes the others stop fast
with a message a person can act on, instead of hanging.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from ..errors import ConfigError, PipelineError

_T = TypeVar("_T")

__all__ = ["ensure_process_group", "Comm", "restart_attempt"]

_REPORT = "dynapipe/failure/attempt{}/rank{}"  # in the group's store: what this rank saw go wrong
_REPORT_GRACE_S = 2.0  # how long a failing rank waits for the others' reports before naming who is silent


def restart_attempt() -> int:
    """How many times the launcher restarted every rank of this job: torchrun and ``dynapipe.launch`` set
    ``TORCHELASTIC_RESTART_COUNT`` (0 in the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def ensure_process_group(device: torch.device, timeout_s: float) -> None:
    """Use the default process group if there is one, else start it from torchrun's environment."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            return
        raise ConfigError(
            "dynapipe found no process group and no RANK/WORLD_SIZE in the environment; launch with "
            "`torchrun --nproc-per-node N script.py` or call torch.distributed.init_process_group() first"
        )
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store, rank, world = _attempt_store(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _attempt_store(timeout: timedelta) -> tuple[dist.Store, int, int]:
    """The store of ``env://`` (as ``init_process_group`` would open it), its keys scoped to this restart.

    torchrun's agent hosts the store and keeps it across restarts (``TORCHELASTIC_USE_AGENT_STORE``);
    the default group's keys carry no attempt, so a rank that starts before its peer has republished its
    address reads the dead attempt's and gloo's connectFullMesh (or NCCL's unique id) gets "Connection
    refused" (pytorch #135712). Prefixing every key of the group, and of the groups made from it, with
    the restart count makes each attempt wait for its own peers' keys. The count is each agent's own: it
    agrees across the ranks of one machine (``--standalone``), not always across machines (pytorch
    #108158), where ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives each attempt a new store instead.
    """
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    return dist.PrefixStore(f"dynapipe/attempt{restart_attempt()}", store), rank, world


@dataclass
class _Batch:
    """Sends and receives issued together by one ``batch_isend_irecv``."""

    ops: list[dist.P2POp] = field(default_factory=list)
    works: list[dist.Work] = field(default_factory=list)  # one per operation (gloo), or one for all (NCCL)


class _Posted:
    """One operation of a batch: its work exists once the batch is issued. A gloo work must be waited for
    only once (a second wait blocks), so it remembers that it has been."""

    def __init__(self, batch: _Batch) -> None:
        self.batch, self.index, self.done = batch, len(batch.ops) - 1, False

    def wait(self, timeout: timedelta) -> bool:
        works = self.batch.works
        mine = [works[self.index]] if len(works) == len(self.batch.ops) else works
        if not self.done:
            self.done = all(work.wait(timeout) for work in mine)
        return self.done

    def is_completed(self) -> bool:
        return self.done


@dataclass
class Comm:
    """Point-to-point traffic of one pipeline, plus the few collectives a step needs."""

    timeout: timedelta
    pending: list[tuple[Any, torch.Tensor, object, int]] = field(default_factory=list)
    batch: _Batch | None = None  # sends and receives held, to be issued together

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def in_issue_order(self) -> bool:
        """Whether point-to-point calls between two ranks run in the order issued (NCCL: one stream per
        pair) rather than matched by tag whenever both sides are ready (gloo)."""
        return dist.get_backend() == "nccl"

    def _fail(self, err: Exception, what: str, peer: int | None) -> PipelineError:
        who = f"rank {peer}" if peer is not None else "a peer rank"
        cause = self.report_failure(f"{what} failed", peer=peer) or (
            f"{who} probably died or raised an error, or stalled past timeout_s "
            f"({self.timeout.total_seconds():.0f} s)"
        )
        return PipelineError(
            f"rank {self.rank}: {what} failed: {err}\n{cause}. Look for that rank's traceback, fix its error "
            "and relaunch all ranks."
        )

    def report_failure(self, seen: str, *, peer: int | None = None, learn: bool = True) -> str:
        """Tell the other ranks, through the process group's store, what failed here (and with which peer),
        and say who failed first: a silent rank that others lost died (so a rank that fails second-hand,
        because its neighbour gave up, still names the rank that died), else a rank that raised an error."""
        world = dist.get_world_size()
        try:
            store = dist.distributed_c10d._get_default_store()
            attempt = restart_attempt()  # a group the user started may keep an earlier attempt's reports
            store.set(_REPORT.format(attempt, self.rank), f"{'' if peer is None else peer}\t{seen}")
            if not learn:
                return ""
            keys = [_REPORT.format(attempt, r) for r in range(world)]
            deadline = time.monotonic() + _REPORT_GRACE_S
            while not store.check(keys) and time.monotonic() < deadline:
                time.sleep(0.05)
            reports = {
                r: store.get(k).decode().split("\t", 1) for r, k in enumerate(keys) if store.check([k])
            }
        except RuntimeError:
            return (
                ""
                if self.rank == 0
                else "rank 0 (which hosts the process group's store) is unreachable: it probably died"
            )
        silent = [r for r in range(world) if r not in reports]
        lost = {int(p) for p, _ in reports.values() if p}
        dead = [r for r in silent if r in lost] or silent
        if dead:
            seen_by = "; ".join(f"rank {r}: {text}" for r, (_, text) in sorted(reports.items()))
            return f"rank {', '.join(map(str, dead))} went silent first: it died or hung ({seen_by})"
        return "; ".join(
            f"rank {r} {text}" for r, (_, text) in sorted(reports.items()) if text.startswith("raised")
        )

    def open_batch(self) -> None:
        """Hold the sends and receives posted from now on, to issue them together (``close_batch``)."""
        if self.batch is None:
            self.batch = _Batch()

    def close_batch(self) -> None:
        """Issue the held sends and receives as one ``batch_isend_irecv``: over NCCL one group, so that a
        send and a receive between the same two ranks cannot wait on each other."""
        batch, self.batch = self.batch, None
        if batch is None or not batch.ops:
            return
        try:
            batch.works = dist.batch_isend_irecv(batch.ops)
        except RuntimeError as err:
            raise self._fail(err, f"issuing {len(batch.ops)} sends and receives", None) from err

    def isend(self, tensor: torch.Tensor, peer: int, tag: int, what: object) -> None:
        """Post a send; ``what`` (text, or an action) names it in an error message, formatted only then."""
        tensor = tensor.detach().contiguous()
        if self.batch is not None:
            self.batch.ops.append(dist.P2POp(dist.isend, tensor, peer, tag=tag))
            self.pending.append((_Posted(self.batch), tensor, what, peer))
            return
        try:
            # None only for a rank outside the group, which no send here involves
            work = cast(dist.Work, dist.isend(tensor, peer, tag=tag))
        except RuntimeError as err:
            raise self._fail(err, f"sending {what} to rank {peer}", peer) from err
        pending = self.pending
        while pending and pending[0][0].is_completed():  # its buffer may go: hold only what is in flight
            done, _, done_what, done_peer = pending.pop(0)
            self.wait(done, _Sending(done_what, done_peer), done_peer)  # raises if it failed
        pending.append((work, tensor, what, peer))

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> Any:
        if self.batch is not None:
            self.batch.ops.append(dist.P2POp(dist.irecv, tensor, peer, tag=tag))
            return _Posted(self.batch)
        try:
            return cast(dist.Work, dist.irecv(tensor, peer, tag=tag))  # None only outside the group
        except RuntimeError as err:
            raise self._fail(err, f"posting a receive from rank {peer}", peer) from err

    def wait(self, work: Any, what: object, peer: int | None) -> None:
        """Wait for ``work`` within the timeout; ``what`` names it in the error, formatted only then."""
        try:
            if not work.wait(self.timeout):
                raise TimeoutError(f"no answer within {self.timeout.total_seconds():.0f} s")
        except (RuntimeError, TimeoutError) as err:
            raise self._fail(err, str(what), peer) from err

    def flush(self) -> None:
        """Wait for every send still in flight (their buffers must live until then)."""
        pending, self.pending = self.pending, []
        for work, _, what, peer in pending:
            self.wait(work, _Sending(what, peer), peer)

    def all_reduce(self, tensor: torch.Tensor, group: dist.ProcessGroup | None, what: str) -> None:
        try:
            work = dist.all_reduce(tensor, group=group, async_op=True)
        except RuntimeError as err:
            raise self._fail(err, f"all-reducing {what}", None) from err
        self.wait(work, f"all-reducing {what}", None)

    def in_turns(self, cores: float, work: Callable[[], _T], what: str) -> _T | None:
        """``work`` on this rank, the ranks taking turns as many at once as they share ``cores`` (0: all at
        once), each turn starting together (a rank timing something on a core another rank also uses
        would see that rank's time too); None on a rank whose turn ran nothing. Every rank calls it."""
        rank, world = dist.get_rank(), dist.get_world_size()
        at_once = max(int(cores), 1) if cores else world
        result = None
        for turn in range(-(-world // at_once)):
            self.gather_objects(None, f"{what} in turns")
            if rank // at_once == turn:
                result = work()
        return result

    def gather_objects(self, obj: object, what: str) -> list:
        """``obj`` from every rank, in rank order (pickled; for set-up, not the hot path)."""
        out: list = [None] * dist.get_world_size()
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as err:
            raise self._fail(err, f"exchanging {what}", None) from err
        return out

    def agree(self, facts: dict[str, str], what: str) -> None:
        """Fail unless every rank computed the same ``facts``, naming each one that differs and its value
        on every rank (``batch size: rank 0 has 8, rank 1 has 12``)."""
        gathered = self.gather_objects(facts, what)
        differences = []
        for key in facts:
            values = [str(f.get(key)) for f in gathered]
            if len(set(values)) == 1:
                continue
            groups: dict[str, list[int]] = {}
            for r, value in enumerate(values):
                groups.setdefault(value, []).append(r)
            parts = [
                f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} {_difference(value, values[0])}"
                for value, ranks in groups.items()
            ]
            differences.append(f"  {key}: {'; '.join(parts)}")
        if differences:
            raise PipelineError(
                f"ranks disagree on {what}:\n"
                + "\n".join(differences)
                + "\nEvery rank must run the same model "
                "code, options and input shapes; check for rank-dependent branches, configs or data."
            )


@dataclass(frozen=True)
class _Sending:
    """``sending <what> to rank <peer>``, formatted only when an error needs the text."""

    what: object
    peer: int

    def __str__(self) -> str:
        return f"sending {self.what} to rank {self.peer}"


def _difference(value: str, first: str) -> str:
    """A value as one rank sees it: whole when short, else its first line that differs from rank 0's."""
    if len(value) <= 80 and "\n" not in value:
        return f"has {value}"
    for i, (a, b) in enumerate(zip(value.splitlines(), first.splitlines(), strict=False)):
        if a != b:
            return f"has line {i + 1}: {a[:100]!r}"
    return f"has {len(value.splitlines())} lines"
