"""Run a training function on N local processes without a launcher: ``launch(train, nproc=4)``.

Under torchrun (RANK is set) the function simply runs in this process. Otherwise ``nproc`` processes are
spawned on this machine with torchrun's environment variables (gloo over loopback, one CPU thread each),
so a script starts with one plain ``python script.py``. For examples, demos and small jobs; use torchrun
for several hosts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["launch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    fn(*args)


def launch(fn: Callable[..., Any], *args: Any, nproc: int) -> None:
    """``fn(*args)`` on every rank: here if launched by torchrun, else on ``nproc`` spawned processes.

    ``fn`` must be importable (defined at module level). A failing process fails the whole launch.
    """
    if "RANK" in os.environ:
        fn(*args)
        return
    mp.start_processes(_worker, args=(nproc, _free_port(), fn, args), nprocs=nproc, start_method="spawn")
