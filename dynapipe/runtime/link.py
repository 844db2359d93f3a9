"""Timing the link between pipeline neighbours, over the process group that will carry the activations."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from ..errors import PipelineError
from .mesh import PipelineMesh

__all__ = ["time_link"]

_TAG = 1 << 30  # no pipeline traffic uses tags this high


def time_link(
    mesh: PipelineMesh, device: torch.device, sizes: Sequence[int], rounds: int, timeout: timedelta
) -> list[tuple[int, float, float]]:
    """(bytes, seconds, CPU seconds of this process) of each round in which every rank of this pipeline
    sends ``bytes`` to the next one and receives as much from the previous one, all at once, as a step's
    transfers run; the first round of each size is a warm-up. Every rank of the pipeline must call it
    with the same arguments."""
    if mesh.n_pp == 1:
        return []
    after = mesh.global_rank((mesh.pp_index + 1) % mesh.n_pp)
    before = mesh.global_rank((mesh.pp_index - 1) % mesh.n_pp)
    samples = []
    for size in sizes:
        send = torch.zeros(max(size // 4, 1), dtype=torch.float32, device=device)
        recv = torch.empty_like(send)
        for i in range(rounds + 1):
            start, cpu = time.perf_counter(), time.process_time()  # the transport's threads too
            # c10d's own functions: P2POp checks them by identity, and the build may run inside Dynamo,
            # where torch.distributed's names can stand for traceable wrappers
            works = c10d.batch_isend_irecv(
                [
                    c10d.P2POp(c10d.isend, send, after, tag=_TAG),
                    c10d.P2POp(c10d.irecv, recv, before, tag=_TAG),
                ]
            )
            for work in works:
                if not work.wait(timeout):
                    raise PipelineError(
                        f"rank {dist.get_rank()}: timing the link to rank {after} and from rank {before} got no "
                        f"answer within {timeout.total_seconds():.0f} s: a neighbour died or hung; relaunch all ranks"
                    )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                samples.append((send.numel() * 4, time.perf_counter() - start, time.process_time() - cpu))
    return samples
