"""Run a training function on N local processes without a launcher: ``launch(train, nproc=4)``.

Under torchrun (RANK is set) the function simply runs in this process. Otherwise ``nproc`` processes are
spawned on this machine with torchrun's environment variables (gloo over loopback, one CPU thread each),
so a script starts with one plain ``python script.py``. For examples, demos, benchmarks, tests and small
jobs; use torchrun for several hosts.

    results = launch(train, steps, nproc=4)               # {rank: what train returned on that rank}
    results = launch(train, steps, nproc=4, timeout=300)  # every process killed after 300 s

A rank that raises (``SystemExit`` included) or dies sends back its traceback or exit code; once one has
failed, the others get ``grace`` seconds to end on their own (they usually notice the lost peer and fail
with their own message), then ``launch`` kills what is left and raises :class:`LaunchError`, which holds
every failing rank's traceback and the results of those that finished.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["LaunchError", "launch"]


class LaunchError(RuntimeError):
    """Some spawned ranks failed. ``failures``: rank -> traceback (or how the process ended);
    ``results``: rank -> return value of the ranks that finished."""

    def __init__(self, failures: dict[int, str], results: dict[int, Any] | None = None):
        self.failures = dict(sorted(failures.items()))
        self.results = results or {}
        ranks = ", ".join(str(r) for r in self.failures)
        super().__init__(
            f"rank(s) {ranks} failed\n"
            + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in self.failures.items())
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: the parent reports them
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_silent_exits(procs: list, reports: Any, results: dict, failures: dict, reported: set) -> None:
    """Ranks whose process ended without a report: killed (os._exit, a signal, out of memory), or whose
    result could not be pickled (the queue drops it and the process exits 0). Either is a failure, never a
    wait: a report still in the pipe is taken first."""
    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results and r not in failures]
    if not dead:
        return
    try:
        while True:
            rank, ok, value = reports.get(timeout=0.5)
            (results if ok else failures)[rank] = value
            reported.add(rank)
    except queue_mod.Empty:
        pass
    for r in dead:
        if r not in results and r not in failures:
            code = procs[r].exitcode
            why = "its result could not be pickled" if code == 0 else "it was killed or crashed"
            failures[r] = f"process exited with code {code} without reporting ({why}?)"


def launch(
    fn: Callable[..., Any], *args: Any, nproc: int, timeout: float | None = None, grace: float = 60.0
) -> dict[int, Any]:
    """``fn(*args)`` on every rank: here if launched by torchrun, else on ``nproc`` spawned processes.

    Returns ``{rank: fn's return value}`` (under torchrun, this rank's only), so results must pickle.
    ``fn`` must be importable (defined at module level). ``timeout`` (seconds, default none) bounds the
    whole launch; ``grace`` is how long the other ranks may run on after one has failed. Raises
    :class:`LaunchError` with every failing rank's traceback.
    """
    if "RANK" in os.environ:
        return {int(os.environ["RANK"]): fn(*args)}
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, nproc, port, fn, args, reports), daemon=True)
        for r in range(nproc)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    reported: set[int] = set()
    start = time.monotonic()
    deadline = start + timeout if timeout is not None else float("inf")
    try:
        while len(results) + len(failures) < nproc:
            now = time.monotonic()
            if now > deadline:
                why = (
                    f"still running {grace:.0f} s after rank {min(failures)} failed"
                    if failures
                    else f"still running after the launch's timeout of {timeout:.0f} s"
                )
                failures.update(
                    {r: f"killed: {why}" for r in range(nproc) if r not in results and r not in failures}
                )
                break
            try:
                rank, ok, value = reports.get(timeout=max(0.05, min(1.0, deadline - now)))
                (results if ok else failures)[rank] = value
                reported.add(rank)
            except queue_mod.Empty:
                _check_silent_exits(procs, reports, results, failures, reported)
            if failures and deadline > time.monotonic() + grace:
                deadline = time.monotonic() + grace  # the first failure starts the others' grace period
    finally:
        for r, p in enumerate(procs):  # a rank that reported is tearing down its group; the rest are killed
            p.join(timeout=5 if r in reported else 0)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise LaunchError(failures, results)
    return dict(sorted(results.items()))
