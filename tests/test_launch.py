"""dynapipe.launch: per-rank results, a failing rank's traceback, and no hang when a rank cannot report."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dynapipe.launch import LaunchError, launch


def _rank_times(factor: int) -> int:
    return int(os.environ["RANK"]) * factor


def _rank_one_raises() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one gives up")


def _unpicklable_result() -> threading.Lock:
    return threading.Lock()


def _sleeps() -> None:
    time.sleep(60)


def test_results_come_back_by_rank():
    assert launch(_rank_times, 10, nproc=2) == {0: 0, 1: 10}


def test_a_failing_rank_raises_with_its_traceback_and_the_others_results():
    with pytest.raises(LaunchError) as err:
        launch(_rank_one_raises, nproc=2, timeout=120)
    assert list(err.value.failures) == [1]
    assert "ValueError: rank one gives up" in err.value.failures[1]
    assert err.value.results == {0: None}


def test_a_result_that_cannot_travel_is_a_failure_not_a_hang():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="could not be pickled"):
        launch(_unpicklable_result, nproc=2)  # no timeout: only the check for silent exits ends it
    assert time.monotonic() - start < 60


def test_the_timeout_kills_a_stuck_launch():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="timeout of 8 s"):
        launch(_sleeps, nproc=2, timeout=8)
    assert time.monotonic() - start < 30
