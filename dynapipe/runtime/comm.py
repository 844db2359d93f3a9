"""All of dynapipe's torch.distributed calls: process-group set-up, point-to-point, collectives.

Every wait is bounded by the configured timeout, and a failed wait is turned into a PipelineError that
names this rank, the peer and what was being exchanged, so a rank that dies makes the others stop fast
with a message a person can act on, instead of hanging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError, PipelineError

__all__ = ["ensure_process_group", "Comm"]


def ensure_process_group(device: torch.device, timeout_s: float) -> None:
    """Use the default process group if there is one, else start it from torchrun's environment."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 and "MASTER_ADDR" not in os.environ:
            store = dist.HashStore()
            dist.init_process_group(
                backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=timeout_s)
            )
            return
        raise ConfigError(
            "dynapipe found no process group and no RANK/WORLD_SIZE in the environment; launch with "
            "`torchrun --nproc-per-node N script.py` or call torch.distributed.init_process_group() first"
        )
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


@dataclass
class Comm:
    """Point-to-point traffic of one pipeline, plus the few collectives a step needs."""

    timeout: timedelta
    pending: list[tuple[dist.Work, torch.Tensor, str]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def _fail(self, err: Exception, what: str, peer: int | None) -> PipelineError:
        who = f"rank {peer}" if peer is not None else "a peer rank"
        return PipelineError(
            f"rank {self.rank}: {what} failed: {err}\n{who} probably died or raised an error (look for its "
            f"traceback above), or stalled past timeout_s ({self.timeout.total_seconds():.0f} s). Fix that "
            "rank's error and relaunch all ranks."
        )

    def isend(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> None:
        tensor = tensor.detach().contiguous()
        try:
            work = dist.isend(tensor, peer, tag=tag)
        except RuntimeError as err:
            raise self._fail(err, f"sending {what} to rank {peer}", peer) from err
        self.pending.append((work, tensor, f"sending {what} to rank {peer}"))

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> dist.Work:
        try:
            return dist.irecv(tensor, peer, tag=tag)
        except RuntimeError as err:
            raise self._fail(err, f"posting a receive from rank {peer}", peer) from err

    def wait(self, work: dist.Work, what: str, peer: int | None) -> None:
        try:
            if not work.wait(self.timeout):
                raise TimeoutError(f"no answer within {self.timeout.total_seconds():.0f} s")
        except (RuntimeError, TimeoutError) as err:
            raise self._fail(err, what, peer) from err

    def flush(self) -> None:
        """Wait for every send still in flight (their buffers must live until then)."""
        pending, self.pending = self.pending, []
        for work, _, what in pending:
            self.wait(work, what, None)

    def all_reduce(self, tensor: torch.Tensor, group: dist.ProcessGroup | None, what: str) -> None:
        try:
            work = dist.all_reduce(tensor, group=group, async_op=True)
        except RuntimeError as err:
            raise self._fail(err, f"all-reducing {what}", None) from err
        self.wait(work, f"all-reducing {what}", None)

    def gather_objects(self, obj: object, what: str) -> list:
        """``obj`` from every rank, in rank order (pickled; for set-up, not the hot path)."""
        out: list = [None] * dist.get_world_size()
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as err:
            raise self._fail(err, f"exchanging {what}", None) from err
        return out

    def agree(self, digest: str, what: str) -> None:
        """Fail unless every rank computed the same ``digest`` (e.g. of its partition)."""
        digests = self.gather_objects(digest, what)
        if len(set(digests)) > 1:
            groups: dict[str, list[int]] = {}
            for r, d in enumerate(digests):
                groups.setdefault(str(d)[:12], []).append(r)
            raise PipelineError(
                f"ranks disagree on {what}: {groups} (hash prefix -> ranks). Every rank must run the same "
                "model code, options and input shapes; check for rank-dependent branches or configs."
            )
