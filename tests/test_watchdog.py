"""The hang watchdog: a rank stuck inside a step makes every rank print one report of where each stands
and exit; a slow build is not a hang."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from harness import LaunchError, run_distributed

from dynapipe.config import PipelineConfig
from dynapipe.errors import ConfigError
from dynapipe.runtime.watchdog import EXIT_CODE

LIMIT = 3.0  # watchdog_s of these tests


class _Stall:
    """What the op does in this process: block at one call of its real kernel, or slow its capture."""

    calls = 0
    block_at: int | None = None  # which call, counted from when the test arms it, never returns
    note: str = ""  # file where the blocked call writes when it blocked
    capture_sleep = 0.0  # the next capture (the op's fake kernel) takes this long, once


@torch.library.custom_op("dynapipe_test::stall", mutates_args=())
def stall(x: torch.Tensor) -> torch.Tensor:
    """Stands for a kernel or custom op that never returns."""
    if _Stall.block_at is not None:
        if _Stall.calls == _Stall.block_at:
            Path(_Stall.note).write_text(str(time.time()))
            time.sleep(120)
        _Stall.calls += 1
    return x.clone()


@stall.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    slept, _Stall.capture_sleep = _Stall.capture_sleep, 0.0
    time.sleep(slept)
    return torch.empty_like(x)


stall.register_autograd(lambda ctx, grad: grad)


class Stalling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.stalls, self.last = nn.Linear(8, 8), Stalls(), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.stalls(torch.relu(self.first(x)))).pow(2).mean()


class Stalls(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stall(x)


def _compiled(fn):
    options = {"split_points": ["stalls"], "n_microbatches": 4, "timeout_s": 30, "watchdog_s": LIMIT}
    return torch.compile(fn, backend="dynapipe", options=options)


def hang_worker(rank: int, world: int, folder: str) -> str:
    fd = os.open(os.path.join(folder, f"stderr{rank}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)  # the report goes to stderr before the process exits
    model = Stalling()
    step, x = _compiled(model), torch.randn(8, 8)
    step(x).backward()  # one good step
    _Stall.block_at, _Stall.note = 1, os.path.join(folder, "blocked_at")  # microbatch 1 of the next step
    step(x).backward()
    return "the step finished"


def test_a_hung_rank_stops_every_rank_with_one_report(tmp_path: Path) -> None:
    results = run_distributed(hang_worker, 2, str(tmp_path), timeout=90, allow_failure=True)
    blocked_at = float((tmp_path / "blocked_at").read_text())  # the op runs on rank 1 (stage 1)
    reports = []
    for rank in range(2):
        assert isinstance(results[rank], LaunchError), results[rank]
        assert f"exited with code {EXIT_CODE}" in str(results[rank]), results[rank]
        path = tmp_path / f"stderr{rank}"
        seconds = path.stat().st_mtime - blocked_at
        assert seconds < LIMIT + 5, f"rank {rank} stopped {seconds:.1f} s after the op blocked"
        text = path.read_text()
        report, _, stack = text[text.index("dynapipe watchdog:") :].partition(f"rank {rank}'s main thread")
        reports.append(report)
        print(f"--- rank {rank}, {seconds:.1f} s after the op blocked ---\n{report}main thread{stack}")
    assert reports[0] == reports[1], reports  # the same report on every rank
    assert re.search(r"rank 1 is in 1F1 for [3-9] s \(last finished: ", reports[0]), reports[0]
    assert re.search(r"rank 0 waits for 0RECV_B\d<-1 for \d s, in 0B\d", reports[0]), reports[0]


def slow_build_worker(rank: int, world: int) -> tuple[float, bool, float]:
    from dynapipe.runtime.watchdog import PROGRESS, _Watchdog

    model = Stalling()
    x = torch.randn(8, 8)
    _compiled(model)(x).backward()  # the watchdog runs from the first step on
    if rank == 1:
        _Stall.capture_sleep = LIMIT + 2  # rank 0 waits in the build's exchanges meanwhile
    second = _compiled(lambda x: model(x) * 2)  # a new frame: a new capture and pipeline
    start = time.monotonic()
    loss = second(x)
    loss.backward()
    seconds = time.monotonic() - start
    watched = _Watchdog.running is not None and _Watchdog.running.is_alive() and PROGRESS.limit_s == LIMIT
    return loss.item(), watched, seconds


def test_a_slow_build_is_not_a_hang() -> None:
    results = run_distributed(slow_build_worker, 2, timeout=90)
    assert results[0][:2] == results[1][:2] and results[0][1], results  # watched, and let it be
    assert results[0][2] > LIMIT + 1, results  # rank 0 waited in the build longer than watchdog_s


def test_watchdog_s_defaults_below_timeout_s_and_is_checked() -> None:
    assert PipelineConfig().watchdog_s == 180  # below the default timeout_s of 300
    assert PipelineConfig(timeout_s=60).watchdog_s == 0  # no room below it: off unless set
    assert PipelineConfig(timeout_s=60, watchdog_s=20).watchdog_s == 20
    with pytest.raises(ConfigError, match=r"watchdog_s \(300\) must be below timeout_s \(300\)"):
        PipelineConfig(watchdog_s=300)
    with pytest.raises(ConfigError, match="watchdog_s must be a number of seconds"):
        PipelineConfig(watchdog_s=-1)
