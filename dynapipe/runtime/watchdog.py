"""A hang watchdog: when a rank makes no progress through a step for ``watchdog_s``, every rank stops with
one report of where each stands (the last action it finished, the one it is in or waits for, how long).

A hung rank is blocked in a receive, a kernel or a custom op, which no other thread can interrupt (gloo's
abort does not wake a pending receive either), and its peers soon block in receives from it. So the main
thread only records in memory where it is (:class:`Progress`, no store round trip per action); a daemon
thread per rank publishes that to the process group's store, as the dead-rank report does, and checks
its own rank's staleness. The first rank stuck for ``watchdog_s`` writes the report from every rank's
published place; every rank prints that same text, then its main thread's stack, to stderr and exits
with :data:`EXIT_CODE` (a launcher such as torchrun then ends or restarts the job). Only a running step
counts: building a pipeline (capture, compile) or code between steps never trips it by itself.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import torch.distributed as dist

from .comm import restart_attempt

__all__ = ["EXIT_CODE", "PROGRESS", "Progress", "watching"]

EXIT_CODE = 124  # as timeout(1): the job hung
_STACK_FRAMES = 12  # of the main thread, printed after the report


class Progress:
    """Where this rank's main thread stands: written per action, read by the watchdog's thread."""

    def __init__(self) -> None:
        # (in a step, last finished, current, receive waited for, since: monotonic), replaced whole so
        # that the thread never reads half an update
        self.state: tuple[bool, Any, Any, Any, float] = (False, None, None, None, time.monotonic())
        self.limit_s = 0.0  # of the running (or last) step; 0: off

    def at(self, what: Any) -> None:
        """The step starts ``what`` (an action or named work); what it was in is finished."""
        self.state = (True, self.state[2], what, None, time.monotonic())

    def wait_for(self, receive: Any) -> None:
        """The current action waits for the message of ``receive`` (a RECV action)."""
        _, done, now, _, _ = self.state
        self.state = (True, done, now, receive, time.monotonic())

    def resume(self) -> None:
        _, done, now, _, _ = self.state
        self.state = (True, done, now, None, time.monotonic())

    def _mark(self, in_step: bool) -> None:
        self.state = (in_step, self.state[2], None, None, time.monotonic())


PROGRESS = Progress()  # one per process: steps never overlap


@contextmanager
def watching(limit_s: float) -> Iterator[Progress]:
    """Count a step: while it runs, ``limit_s`` seconds without progress stop every rank (0: never)."""
    PROGRESS.limit_s = limit_s
    if limit_s:
        _Watchdog.ensure()
    PROGRESS._mark(True)
    try:
        yield PROGRESS
    finally:
        PROGRESS._mark(False)


def _key(name: object) -> str:
    """A store key of this restart attempt: torchrun's store outlives restarts (and a group the user
    started is not scoped to one), and a report left by the attempt that hung must not stop the next."""
    return f"dynapipe/watchdog/attempt{restart_attempt()}/{name}"


class _Watchdog(threading.Thread):
    """Publishes this rank's progress, trips on its own staleness, and stops on any rank's report."""

    running: _Watchdog | None = None

    @classmethod
    def ensure(cls) -> None:
        """Start the thread if none runs (it ends with the process group it served)."""
        if cls.running is None or not cls.running.is_alive():
            cls.running = cls()
            cls.running.start()

    def __init__(self) -> None:
        super().__init__(name="dynapipe-watchdog", daemon=True)
        self.published: tuple | None = None

    def run(self) -> None:
        while True:
            time.sleep(min(1.0, max(0.05, PROGRESS.limit_s / 10)))
            try:
                self._tick(dist.distributed_c10d._get_default_store(), dist.get_rank())
            except (RuntimeError, ValueError):  # the process group is gone: the job ends
                return

    def _tick(self, store: dist.Store, rank: int) -> None:
        report = _key("report")
        if store.check([report]):
            _stop(store.get(report).decode(), rank)
        state = PROGRESS.state
        if state != self.published:
            store.set(_key(rank), _encode(state))
            self.published = state
        limit = PROGRESS.limit_s
        if state[0] and limit and time.monotonic() - state[4] > limit:
            text = _report(store, dist.get_world_size(), limit)
            _stop(store.compare_set(report, "", text).decode(), rank)  # the first report wins


def _encode(state: tuple) -> str:
    in_step, done, now, waits, since = state
    wall = time.time() - (time.monotonic() - since)  # ranks compare wall clocks (NTP keeps hosts close)
    text = [None if x is None else str(x) for x in (done, now, waits)]
    return json.dumps({"step": in_step, "done": text[0], "now": text[1], "waits": text[2], "since": wall})


def _report(store: dist.Store, world: int, limit: float) -> str:
    """Where every rank stands, from what each published."""
    lines = [
        f"dynapipe watchdog: a rank made no progress through its step for {limit:g} s (watchdog_s); "
        "every rank stops. Where each rank stands:"
    ]
    for r in range(world):
        key = _key(r)
        lines.append("  " + _where(r, json.loads(store.get(key)) if store.check([key]) else None))
    lines.append(
        "A rank that is in an action (not waiting) is where it hangs; below the report, each rank prints "
        "its main thread's stack."
    )
    return "\n".join(lines)


def _where(rank: int, record: dict | None) -> str:
    if record is None:
        return f"rank {rank} has not started a step (it may still be building its pipeline)"
    seconds = f"{time.time() - record['since']:.0f} s"
    after = f" (last finished: {record['done']})" if record["done"] else ""
    if not record["step"]:
        return f"rank {rank} is outside a step for {seconds}{after}"
    if record["waits"]:
        return f"rank {rank} waits for {record['waits']} for {seconds}, in {record['now']}{after}"
    return f"rank {rank} is in {record['now'] or 'the start of a step'} for {seconds}{after}"


def _stop(report: str, rank: int) -> NoReturn:
    """Print the report and where this rank's main thread is, then end the process: a thread cannot
    raise into a main thread blocked in C++."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    stack = "".join(traceback.format_stack(frame)[-_STACK_FRAMES:]) if frame else "  (unknown)\n"
    sys.stderr.write(f"{report}\nrank {rank}'s main thread is at:\n{stack}")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_CODE)
