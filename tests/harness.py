"""Run a test's worker on N local processes over gloo: ``run_distributed(fn, world, *args)``.

A thin layer over :func:`dynapipe.launch.launch` (spawned processes, torchrun's environment variables,
a hard timeout, every rank's traceback in the error) that hands each worker its rank and world size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from dynapipe.launch import LaunchError, launch

__all__ = ["LaunchError", "run_distributed"]


def _ranked(fn: Callable, *args: Any) -> Any:
    return fn(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), *args)


def run_distributed(
    fn: Callable, world: int, *args: Any, timeout: float = 180.0, allow_failure: bool = False
) -> dict[int, Any]:
    """``fn(rank, world, *args)`` on ``world`` processes; returns {rank: result} or raises LaunchError.

    With ``allow_failure`` a failing rank's entry is a :class:`LaunchError` holding its traceback, for
    tests that check how ranks fail; the survivors still have the rest of ``timeout`` to report."""
    try:
        return launch(
            _ranked, fn, *args, nproc=world, timeout=timeout, grace=timeout if allow_failure else 30.0
        )
    except LaunchError as err:
        if not allow_failure:
            raise
        return {**err.results, **{r: LaunchError({r: tb}) for r, tb in err.failures.items()}}
