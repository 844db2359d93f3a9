"""Run a training function on N local processes without a launcher: ``launch(train, nproc=4)``.

Under torchrun (RANK is set) the function simply runs in this process. Otherwise ``nproc`` processes are
spawned on this machine with torchrun's environment variables (gloo over loopback, one CPU thread each),
so a script starts with one plain ``python script.py``. For examples, demos, benchmarks, tests and small
jobs; use torchrun for several hosts.

    results = launch(train, steps, nproc=4)               # {rank: what train returned on that rank}
    results = launch(train, steps, nproc=4, timeout=300)  # every process killed after 300 s
    results = launch(train, steps, nproc=4, max_restarts=1)  # a failure restarts every rank, once

A rank that raises (``SystemExit`` included) or dies sends back its traceback or exit code; once one has
failed, the others get ``grace`` seconds to end on their own (they usually notice the lost peer and fail
with their own message), then ``launch`` kills what is left and raises :class:`LaunchError`, which holds
every failing rank's traceback and the results of those that finished. With ``max_restarts`` left, a
failure instead kills every rank at once and starts them all again, as torchrun's ``--max-restarts``
does: the launcher hosts the store the ranks meet in, as torchrun's agent does, and it outlives each
attempt; ``TORCHELASTIC_RESTART_COUNT`` says which attempt a rank is in.
"""

from __future__ import annotations

import os
import queue as queue_mod
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from .runtime.watchdog import EXIT_CODE as WATCHDOG_EXIT

__all__ = ["LaunchError", "launch"]

_STOPPED = "killed: "  # a rank the launcher stopped, not one that failed on its own


class LaunchError(RuntimeError):
    """Some spawned ranks failed. ``failures``: rank -> traceback (or how the process ended);
    ``results``: rank -> return value of the ranks that finished."""

    def __init__(self, failures: dict[int, str], results: dict[int, Any] | None = None, restarts: int = 0):
        self.failures = dict(sorted(failures.items()))
        self.results = results or {}
        ranks = ", ".join(str(r) for r in self.failures)
        after = f" after {restarts} restart(s)" if restarts else ""
        super().__init__(
            f"rank(s) {ranks} failed{after}\n"
            + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in self.failures.items())
        )


def _worker(rank: int, world: int, env: dict, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        **env,
    )
    import torch

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
            why = {
                0: "its result could not be pickled?",
                WATCHDOG_EXIT: "the watchdog stopped it: see its stderr",
            }
            failures[r] = (
                f"process exited with code {code} without reporting ({why.get(code, 'it was killed or crashed?')})"
            )


def launch(
    fn: Callable[..., Any],
    *args: Any,
    nproc: int,
    timeout: float | None = None,
    grace: float = 60.0,
    max_restarts: int = 0,
) -> dict[int, Any]:
    """``fn(*args)`` on every rank: here if launched by torchrun, else on ``nproc`` spawned processes.

    Returns ``{rank: fn's return value}`` (under torchrun, this rank's only), so results must pickle.
    ``fn`` must be importable (defined at module level). ``timeout`` (seconds, default none) bounds the
    whole launch, restarts included; ``grace`` is how long the other ranks may run on after one has failed
    in the last attempt. ``max_restarts``: as torchrun's, how many times a failure stops every rank and
    starts them all again (``TORCHELASTIC_RESTART_COUNT`` tells them which attempt this is). Raises
    :class:`LaunchError` with every failing rank's traceback of the last attempt.
    """
    if "RANK" in os.environ:
        return {int(os.environ["RANK"]): fn(*args)}
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be 0 or more, got {max_restarts}")
    # the store outlives every rank and every attempt, as torchrun's agent store does
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
    deadline = time.monotonic() + timeout if timeout is not None else float("inf")
    try:
        for attempt in range(max_restarts + 1):
            env = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(store.port),
                "TORCHELASTIC_USE_AGENT_STORE": "True",
                "TORCHELASTIC_RESTART_COUNT": str(attempt),
                "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
            }
            last = attempt == max_restarts
            results, failures = _run_attempt(fn, args, nproc, env, deadline, grace if last else 0.0, timeout)
            if not failures:
                return dict(sorted(results.items()))
            if last or time.monotonic() >= deadline:
                break
            _say_restart(failures, attempt + 1, max_restarts)
    finally:
        del store
    raise LaunchError(failures, results, restarts=attempt)


def _say_restart(failures: dict[int, str], restart: int, max_restarts: int) -> None:
    """One line on stderr per failing rank (not those the launcher stopped), as torchrun logs them."""
    for rank, why in sorted(failures.items()):
        if not why.startswith(_STOPPED):
            last = why.strip().splitlines()[-1] if why.strip() else why
            print(f"dynapipe.launch: rank {rank} failed: {last}", file=sys.stderr)
    print(
        f"dynapipe.launch: restarting every rank ({restart} of {max_restarts})", file=sys.stderr, flush=True
    )


def _run_attempt(
    fn: Callable[..., Any],
    args: tuple,
    nproc: int,
    env: dict[str, str],
    deadline: float,
    grace: float,
    timeout: float | None,
) -> tuple[dict[int, Any], dict[int, str]]:
    """Every rank once: their results and failures. After the first failure the others get ``grace``
    seconds to end on their own; the rest are killed."""
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, nproc, env, fn, args, reports), daemon=True)
        for r in range(nproc)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    reported: set[int] = set()
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
                    {r: f"{_STOPPED}{why}" for r in range(nproc) if r not in results and r not in failures}
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
    return results, failures
