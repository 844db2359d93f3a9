"""Run a function on N local processes over gloo, with a hard timeout, and collect what each returns.

Workers are started with the ``spawn`` method (a clean interpreter, as torchrun gives), set the usual
torchrun environment variables, and report either their result or their traceback through a queue.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port", "WorkerFailed"]


class WorkerFailed(AssertionError):
    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        super().__init__("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, True, fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable, world: int, *args: Any, timeout: float = 180.0, allow_failure: bool = False
) -> dict[int, Any]:
    """``fn(rank, world, *args)`` on ``world`` processes; returns {rank: result} or raises WorkerFailed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, fn, args, queue), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    results, failures = {}, {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(failures) < world:
        try:
            rank, ok, value = queue.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            (results if ok else failures)[rank] = value
        except queue_mod.Empty:
            dead = [
                r for r, p in enumerate(procs) if not p.is_alive() and r not in results and r not in failures
            ]
            for r in dead:
                if procs[r].exitcode not in (0, None):
                    failures[r] = f"process exited with code {procs[r].exitcode} without reporting"
            if time.monotonic() > deadline:
                for r in range(world):
                    if r not in results and r not in failures:
                        failures[r] = f"timed out after {timeout:.0f} s"
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if failures and not allow_failure:
        raise WorkerFailed(failures)
    return {**results, **{r: WorkerFailed({r: tb}) for r, tb in failures.items()}}
