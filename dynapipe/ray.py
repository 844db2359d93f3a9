"""Run a training function on Ray workers: ``dynapipe.ray.launch(train, nproc=4)`` after ``ray.init()``.

The same function ``dynapipe.launch`` runs on local processes runs here on ``nproc`` Ray actors, one per
rank, held together by a placement group. Each actor gets torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``: rank 0's node and a port free there),
so dynapipe starts the process group from it on the first compiled call exactly as under torchrun (gloo
on CPU, NCCL on GPUs); nothing here forms a group.

Plain actors, not ``ray.train.torch.TorchTrainer``: core ``ray`` is enough (``pip install
"dynapipe[ray]"``; TorchTrainer needs ``ray[train]``, which adds pandas and pyarrow), each rank's return
value comes back as ``dynapipe.launch`` returns it, and dynapipe keeps starting its own group (scoped to
the restart attempt, see ``runtime/comm.py``) instead of inheriting one.

    ray.init(address="auto")                  # or ray.init() for a local instance
    results = dynapipe.ray.launch(train, steps, nproc=4)             # {rank: what train returned}
    results = dynapipe.ray.launch(train, steps, nproc=8, gpus_per_worker=1, timeout=3600)

A rank that raises or whose actor dies ends the launch with :class:`dynapipe.launch.LaunchError` naming
it (the others get ``grace`` seconds, then every actor is killed); ``timeout`` bounds the whole launch.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from .errors import ConfigError
from .launch import LaunchError

__all__ = ["launch", "RAY_HINT"]

RAY_HINT = 'pip install "dynapipe[ray]"'


def _import_ray() -> Any:
    """Ray, or a one-line ImportError with the command that installs it (Ray is an optional extra)."""
    try:
        import ray
        from ray.util import placement_group  # noqa: F401 - core ray has it; a broken install may not
    except ImportError as err:
        raise ImportError(f"dynapipe.ray.launch needs Ray, which is not installed: {RAY_HINT}") from err
    return ray


class _Worker:
    """One rank: where it runs (for the rendezvous address), then the user's function under torchrun's
    environment. Wrapped by ``ray.remote`` at launch, so that importing this module needs no Ray."""

    def where(self) -> tuple[str, str, list[str]]:
        """This actor's node IP, node id and the GPU ids Ray gave it."""
        import ray

        ctx = ray.get_runtime_context()
        return ray.util.get_node_ip_address(), ctx.get_node_id(), [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        """A port free on this node for rank 0's store (torchrun's ``--standalone`` finds one the same way)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, env: dict[str, str], threads: int, fn: Callable[..., Any], args: tuple) -> tuple[bool, Any]:
        """``(True, fn(*args))``, or ``(False, traceback)``: the driver reports it under this rank."""
        os.environ.update(env)
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        try:
            return True, fn(*args)
        except BaseException:  # noqa: BLE001 - SystemExit too: the driver reports it
            return False, traceback.format_exc()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _check_resources(ray: Any, nproc: int, cpus: float, gpus: float) -> None:
    """Fail before starting anything when the cluster can never hold ``nproc`` workers (stages x dp
    ranks): their placement group would wait for ever. Busy resources are waited for (``setup_timeout``),
    as another job's, or the last launch's while Ray frees them, come back."""
    total, free = ray.cluster_resources(), ray.available_resources()
    for kind, per in (("CPU", cpus), ("GPU", gpus)):
        need = nproc * per
        if need and total.get(kind, 0.0) < need:
            raise ConfigError(
                f"the Ray cluster has {total.get(kind, 0.0):g} {kind}s ({free.get(kind, 0.0):g} free) but "
                f"{nproc} workers (stages x dp) x {per:g} {kind} need {need:g}: add nodes, or lower nproc "
                f"or {kind.lower()}s_per_worker"
            )


def _rank_envs(places: list[tuple[str, str, list[str]]], port: int) -> list[dict[str, str]]:
    """torchrun's variables for every rank; ranks on one node are numbered locally in rank order and see
    every GPU of theirs on that node, local rank i's own as device i (as ``LOCAL_RANK`` selects it)."""
    on_node: dict[str, list[int]] = {}
    for rank, (_, node, _) in enumerate(places):
        on_node.setdefault(node, []).append(rank)
    envs = []
    for rank, (_, node, gpu_ids) in enumerate(places):
        peers = on_node[node]
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(len(places)),
            "LOCAL_RANK": str(peers.index(rank)),
            "LOCAL_WORLD_SIZE": str(len(peers)),
            "MASTER_ADDR": places[0][0],
            "MASTER_PORT": str(port),
        }
        if gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(g for r in peers for g in places[r][2])
        envs.append(env)
    return envs


def launch(
    fn: Callable[..., Any],
    *args: Any,
    nproc: int,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    timeout: float | None = None,
    grace: float = 60.0,
    setup_timeout: float = 300.0,
) -> dict[int, Any]:
    """``fn(*args)`` on ``nproc`` Ray actors (ranks), on the cluster ``ray.init()`` joined (or a local one).

    Returns ``{rank: fn's return value}``. ``fn`` and its results travel by pickle (cloudpickle): its module
    must be importable on the workers (``ray.init(runtime_env={"working_dir": ...})`` ships it).
    ``timeout`` (seconds) bounds the whole launch; ``grace`` is how long the others may run on after one
    rank failed; ``setup_timeout`` how long placing and starting the workers may take. Raises
    :class:`LaunchError` naming every failing rank, :class:`ConfigError` when the cluster lacks the CPUs
    or GPUs, ``TimeoutError`` when the workers cannot start, ``ImportError`` (with the pip command)
    without Ray.
    """
    ray = _import_ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if nproc < 1:
        raise ConfigError(f"nproc must be 1 or more, got {nproc}")
    if gpus_per_worker not in (0, 1):
        raise ConfigError(f"gpus_per_worker must be 0 or 1 (one device per rank), got {gpus_per_worker}")
    if not ray.is_initialized():
        ray.init()
    _check_resources(ray, nproc, cpus_per_worker, gpus_per_worker)
    deadline = time.monotonic() + timeout if timeout is not None else float("inf")
    setup = min(deadline, time.monotonic() + setup_timeout)
    bundle = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    group = placement_group([bundle] * nproc, strategy="PACK")
    actors: list[Any] = []
    try:
        _get(ray, group.ready(), setup, "waiting for the placement group of the workers")
        worker = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_Worker)
        actors = [
            worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, r)).remote()
            for r in range(nproc)
        ]
        places = _get(ray, [a.where.remote() for a in actors], setup, "starting the workers")
        port = _get(ray, actors[0].free_port.remote(), setup, "finding a free port on rank 0's node")
        threads = max(1, int(cpus_per_worker))
        envs = _rank_envs(places, port)
        refs = [a.run.remote(env, threads, fn, args) for a, env in zip(actors, envs, strict=True)]
        return _collect(ray, refs, deadline, grace, timeout)
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)


def _get(ray: Any, refs: Any, until: float, what: str) -> Any:
    """``ray.get`` bounded by ``until``: a set-up step that cannot finish is an error, not a wait."""
    try:
        return ray.get(refs, timeout=max(0.0, until - time.monotonic()))
    except ray.exceptions.GetTimeoutError as err:
        raise TimeoutError(
            f"dynapipe.ray.launch: timed out {what}; check `ray status` for free resources, or raise "
            "setup_timeout"
        ) from err


def _collect(ray: Any, refs: list, deadline: float, grace: float, timeout: float | None) -> dict[int, Any]:
    """Every rank's result, or :class:`LaunchError` after the first failure (plus ``grace``) or the
    deadline; an actor that died (killed, out of memory, ``os._exit``) is a failure of its rank."""
    rank_of = {ref: r for r, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    waiting = list(refs)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            why = (
                f"still running {grace:.0f} s after rank {min(failures)} failed"
                if failures
                else f"still running after the launch's timeout of {timeout:.0f} s"
            )
            failures.update({rank_of[ref]: f"killed: {why}" for ref in waiting})
            break
        done, waiting = ray.wait(waiting, num_returns=1, timeout=min(left, 1.0))
        for ref in done:
            rank = rank_of[ref]
            try:
                ok, value = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                ok, value = False, f"its Ray actor died: {err}"
            except ray.exceptions.RayError as err:  # e.g. a result that does not unpickle here
                ok, value = False, f"its result did not come back: {err}"
            (results if ok else failures)[rank] = value
            if not ok and deadline > time.monotonic() + grace:
                deadline = time.monotonic() + grace  # the first failure starts the others' grace period
    if failures:
        raise LaunchError(failures, results)
    return dict(sorted(results.items()))
