"""Pipeline schedules on sleeping stages: dynapipe against torch.distributed.pipelining and the simulator.

    python benchmarks/bench_schedules.py              # every row, about 7-8 minutes on 2 CPU cores
    python benchmarks/bench_schedules.py --rows main  # the schedules without data parallelism
    python benchmarks/bench_schedules.py --rows dp    # dp=1 against dp=2 (4 and 8 processes)
    python benchmarks/bench_schedules.py --quick      # a few rows, fewer steps: about two minutes

Every stage is a :class:`SleepStage`: its forward sleeps ``fwd_ms``, its backward sleeps ``bwd_ms`` (half
for the input gradient, half for the weight gradient, so zero-bubble schedules can split them), and it
passes an activation of ``--act-bytes`` bytes. Sleeping keeps 4-8 processes honest on 2 cores: a rank that
waits costs no CPU, so the step time measures the schedule and the runtime; only the stage's real work
(copying and scaling the activation, about 0.5-1 ms per action at 1 MiB) and the runtimes compete for cores.

Rows (schedule, p ranks, m microbatches, dp replicas) of the same world size share one set of spawned gloo
processes on 127.0.0.1. Each row runs the same model with dynapipe (``torch.compile(model,
backend="dynapipe")``, a split point at every stage, its timeline from ``options["on_step"]``) and with
torch.distributed.pipelining (a ``PipelineStage`` per local stage and the matching ``Schedule*`` class;
with dp > 1 each stage module wrapped in DDP over its data-parallel group): warm-up steps, then
``--steps`` timed steps of each, alternating. The medians are compared with the step the simulator
(``dynapipe.schedules.simulate``) gives for each library's action order, from per-stage costs measured in
isolation and a measured link; the dp rows with the time of the gradient all-reduce alone. Rows that
either library rejects are printed with the reason. benchmarks/README.md explains every column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dynapipe import launch
from dynapipe.schedules import (
    Action,
    Kind,
    StageCost,
    Timeline,
    get_schedule,
    lower,
    placement_map,
    simulate,
    stage_graph,
    validate,
)
from dynapipe.schedules.lowering import comm_before

MB_ROWS = 4  # rows of each microbatch; the activation is (MB_ROWS, act_bytes / 4 / MB_ROWS) float32


# -- the sleeping stage -------------------------------------------------------------------------------
# A plain torch.autograd.Function that calls time.sleep cannot be traced by Dynamo with fullgraph=True
# ("Dynamo does not know how to trace the builtin time.sleep"), and dynapipe captures with fullgraph.
# A custom op with an autograd formula is the same thing seen from autograd, and opaque to Dynamo.
class SleepLog:
    """How much longer than asked this process's sleeps took: the machine's wake-up latency, which
    both libraries pay on every action and the simulator does not know about."""

    def __init__(self) -> None:
        self.late, self.calls = 0.0, 0

    def sleep(self, ms: float) -> None:
        if ms > 0:
            t0 = time.perf_counter()
            time.sleep(ms / 1e3)
            self.late += time.perf_counter() - t0 - ms / 1e3
            self.calls += 1


SLEEPS = SleepLog()  # one per worker process: the sleep op below reports to it


@torch.library.custom_op("dynapipe_bench::sleep", mutates_args=())
def sleep_op(x: torch.Tensor, fwd_ms: float, bwd_ms: float) -> torch.Tensor:
    """Identity (a copy, the stage's tiny real op) that sleeps ``fwd_ms``; its backward sleeps ``bwd_ms``."""
    SLEEPS.sleep(fwd_ms)
    return x.clone()


@sleep_op.register_fake
def _(x, fwd_ms, bwd_ms):
    return torch.empty_like(x)


def _sleep_setup(ctx, inputs, output) -> None:
    ctx.bwd_ms = inputs[2]


def _sleep_backward(ctx, grad):
    SLEEPS.sleep(ctx.bwd_ms)
    return grad, None, None


sleep_op.register_autograd(_sleep_backward, setup_context=_sleep_setup)


class SleepStage(nn.Module):
    """``x -> sleep(x) * sleep(w)``: F sleeps ``fwd_ms``; I (input grad) and W (weight grad) ``bwd_ms / 2``
    each, because autograd runs only the sleep whose input it differentiates. The first stage's input
    needs no gradient, so its backward is W alone, in both libraries.

    ``param_bytes`` > 0 gives the stage parameters of that size for data parallelism to all-reduce, laid
    out as in a stage of several layers: ``head`` (all but 1 MiB: the last layer) is added to the output,
    so autograd reaches it first and its gradient is ready when the stage's weight-gradient work starts;
    ``tail`` (1 MiB: the first layer) is added to ``w`` before the W sleep, so its gradient is ready only
    when that work ends. DDP (torch 2.13) starts with all parameters in one bucket and, at the first
    forward through the DDP module after a synchronised backward, rebuilds its buckets in the order the
    gradients became ready, closing the first at 1 MiB: then ``head`` is a bucket of its own whose
    all-reduce runs during the W sleep, and ``w`` with ``tail`` the bucket that only the end of the W
    releases. dynapipe calls the stage module, not DDP's forward, so its buckets are never rebuilt.
    """

    def __init__(self, fwd_ms: float, bwd_ms: float, param_bytes: int = 0) -> None:
        super().__init__()
        self.fwd_ms, self.bwd_ms = fwd_ms, bwd_ms
        self.w = nn.Parameter(torch.ones(()))
        tail = min(param_bytes, 2**20) // 4
        self.tail = nn.Parameter(torch.zeros(tail)) if tail else None
        self.head = nn.Parameter(torch.zeros(param_bytes // 4 - tail)) if param_bytes // 4 > tail else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w if self.tail is None else self.w + self.tail[0]
        out = sleep_op(x, self.fwd_ms, self.bwd_ms / 2) * sleep_op(w, 0.0, self.bwd_ms / 2)
        return out if self.head is None else out + self.head[:1]


class SleepModel(nn.Module):
    def __init__(self, n_stages: int, fwd_ms: float, bwd_ms: float, param_bytes: int = 0) -> None:
        super().__init__()
        self.stages = nn.ModuleList(SleepStage(fwd_ms, bwd_ms, param_bytes) for _ in range(n_stages))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return F.mse_loss(x, y)


# -- rows ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One line of a table: ``dp`` data-parallel replicas of a ``p``-rank pipeline (global rank =
    pipeline position * dp + replica, as dynapipe lays them out). ``param_bytes`` sizes each stage's
    parameter (:class:`SleepStage`); ``all_reduce=False`` replaces DDP's all-reduce with a hook that
    returns the local gradients, the control that tells the all-reduce from the load of more processes."""

    schedule: str
    p: int
    m: int
    dp: int = 1
    param_bytes: int = 0
    all_reduce: bool = True

    @property
    def world(self) -> int:
        return self.p * self.dp

    @property
    def stages_per_rank(self) -> int:
        return {"interleaved-1f1b": 2, "zbv": 2}.get(self.schedule, 1)

    @property
    def label(self) -> str:
        dp = f" dp={self.dp}" + ("" if self.all_reduce else " (no all-reduce)") if self.dp > 1 else ""
        return f"{self.schedule} p={self.p} m={self.m}{dp}"


def torch_schedule(name: str):
    """The torch.distributed.pipelining class for a dynapipe schedule name. gpipe and 1f1b run the same
    action order in both; the others are the same family, not necessarily the same order (torch's
    interleaved 1F1B warms up more; for zb-h1 it is ZB1P on one stage per rank, torch's nearest)."""
    from torch.distributed import pipelining as pp

    return {
        "gpipe": pp.ScheduleGPipe,
        "1f1b": pp.Schedule1F1B,
        "interleaved-1f1b": pp.ScheduleInterleaved1F1B,
        "zb-h1": pp.ScheduleInterleavedZeroBubble,
        "zbv": pp.ScheduleZBVZeroBubble,
    }[name]


def make_rows(which: str, quick: bool, param_bytes: int) -> list[Row]:
    """``which``: "main" (schedules, no data parallelism), "dp" (dp=1 against dp=2) or "all"."""
    rows = []
    if which in ("main", "all"):
        if quick:
            rows += [Row("1f1b", 4, 8), Row("gpipe", 4, 8)]
        else:
            rows += [Row(s, p, m) for p in (2, 4) for s in ("gpipe", "1f1b") for m in (4, 8, 16)]
            rows += [Row(s, p, 8) for p in (2, 4) for s in ("interleaved-1f1b", "zb-h1", "zbv")]
    if which in ("dp", "all"):
        for p in (2,) if quick else (2, 4):
            for s in ("1f1b", "zb-h1"):
                rows += [
                    Row(s, p, 8, 1, param_bytes),
                    Row(s, p, 8, 2, param_bytes),
                    Row(s, p, 8, 2, param_bytes, all_reduce=False),
                ]
    return rows


@dataclass(frozen=True)
class Settings:
    fwd_ms: float
    bwd_ms: float
    act_bytes: int
    warmup: int
    steps: int
    timeout_s: float
    nice: int = 0
    realtime: bool = False

    @property
    def width(self) -> int:
        return max(1, self.act_bytes // 4 // MB_ROWS)


# -- measurements inside the workers -------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure_link(act_bytes: int, reps: int = 30) -> tuple[float, float]:
    """(one-way latency s, bandwidth B/s) between ranks 0 and 1 from gloo ping-pongs; the others wait.

    The fastest round trip counts: slower ones measure the machine's other load, not the link.
    """
    one_way = {}
    for size in (4, act_bytes):
        buf = torch.zeros(max(1, size // 4))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            if dist.get_rank() == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif dist.get_rank() == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            times.append((time.perf_counter() - t0) / 2)
        one_way[size] = min(times)
    got = [one_way[4], one_way[act_bytes]]
    dist.broadcast_object_list(got, 0)
    latency, big = got
    return latency, act_bytes / max(big - latency, 1e-9)


def measure_all_reduce(row: Row, reps: int = 20) -> list[float]:
    """Seconds per all-reduce of one stage's parameter (``row.param_bytes``) over one data-parallel group
    (ranks 0..dp-1, pipeline position 0) while the other ranks wait: the time the overlap has to hide."""
    ranks = list(range(row.dp))
    group = dist.new_group(ranks, timeout=timedelta(seconds=120))
    buf = torch.zeros(max(1, row.param_bytes // 4))
    times = []
    if dist.get_rank() in ranks:
        for _ in range(reps + 2):  # two to warm up
            dist.barrier(group)
            t0 = time.perf_counter()
            dist.all_reduce(buf, group=group)
            times.append(time.perf_counter() - t0)
    dist.barrier()
    return times[2:]


def measure_stage(
    fwd_ms: float, bwd_ms: float, width: int, *, first: bool, last: bool, param_bytes: int = 0, reps: int = 10
) -> dict:
    """Median F, B and W (seconds) of one SleepStage on one microbatch, eagerly; the last one with the loss."""
    stage = SleepStage(fwd_ms, bwd_ms, param_bytes)
    weights = list(stage.parameters())
    x = torch.randn(MB_ROWS, width, requires_grad=not first)
    y = torch.randn(MB_ROWS, width)
    out = {"F": [], "B": [], "W": []}
    late, calls = SLEEPS.late, SLEEPS.calls
    for _ in range(reps):
        for kind in ("B", "W"):
            t0 = time.perf_counter()
            h = stage(x)
            if last:
                h = F.mse_loss(h, y)
            t1 = time.perf_counter()
            grad = None if last else torch.ones_like(h)
            torch.autograd.backward(h, grad, inputs=weights if kind == "W" or first else [*weights, x])
            out[kind].append(time.perf_counter() - t1)
            out["F"].append(t1 - t0)
    return {
        **{k: _median(v) for k, v in out.items()},
        "late": (SLEEPS.late - late) / max(SLEEPS.calls - calls, 1),
    }


def stage_costs(row: Row, settings: Settings) -> tuple[list[StageCost], float]:
    """Cost of every stage of ``row``, measured on rank 0 while the others wait (a rank with v stages
    runs each at 1/v of the sleep), and the mean oversleep per sleep meanwhile. These, not the nominal
    sleeps, feed the simulator: ``time.sleep`` oversleeps and the stage's copy, multiply and loss take
    time too, and none of that is the runtime's."""
    v = row.stages_per_rank
    n = row.p * v
    measured = [None]
    if dist.get_rank() == 0:
        measured[0] = {
            kind: measure_stage(
                settings.fwd_ms / v,
                settings.bwd_ms / v,
                settings.width,
                first=kind[0],
                last=kind[1],
                param_bytes=row.param_bytes,
            )
            for kind in sorted({(s == 0, s == n - 1) for s in range(n)})
        }
    dist.broadcast_object_list(measured, 0)
    costs = []
    for s in range(n):
        c = measured[0][(s == 0, s == n - 1)]
        costs.append(
            StageCost(
                forward=c["F"],
                backward_input=max(c["B"] - c["W"], 0.0),
                backward_weight=c["W"],
                send_bytes=settings.act_bytes,
            )
        )
    return costs, statistics.mean(c["late"] for c in measured[0].values())


def ideal_timeline(
    row: Row, costs: list[StageCost], link: tuple[float, float], table: dict[int, list[str]] | None = None
) -> Timeline:
    """The simulated step of ``row``'s schedule, dynapipe's own or the given ``table`` (torch's order)."""
    spec = get_schedule(row.schedule)
    n_stages = row.p * row.stages_per_rank
    if table is None:
        table = spec.build(n_ranks=row.p, n_stages=n_stages, n_microbatches=row.m)
    return simulate(
        {int(r): acts for r, acts in table.items()},
        costs,
        n_ranks=row.p,
        n_stages=n_stages,
        placement=spec.placement,
        link_latency=link[0],
        link_bandwidth=link[1],
    )


@dataclass
class Runner:
    """One library's pipeline for one row on this rank: ``step()`` is one whole training step."""

    step: Callable[[], None]
    reset: Callable[[], None]  # zero the gradients (outside the timed region)
    timeline: Callable[[], list] | None = None  # this rank's events of the last step
    table: dict[int, list[str]] | None = None  # the compute actions each rank runs, when not dynapipe's
    reductions: list[int] | None = None  # [DDP bucket all-reduces so far on this rank] (data parallel)


def time_step(runner: Runner) -> tuple[float, float, float]:
    """One step from a barrier: wall time and CPU time (this process and its threads) of the slowest rank,
    and the mean oversleep per sleep over all ranks; seconds."""
    runner.reset()
    dist.barrier()
    late, calls = SLEEPS.late, SLEEPS.calls
    t0, c0 = time.perf_counter(), time.process_time()
    runner.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    took = torch.tensor([wall, cpu], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    slept = torch.tensor([SLEEPS.late - late, SLEEPS.calls - calls], dtype=torch.float64)
    dist.all_reduce(slept)
    return took[0].item(), took[1].item(), (slept[0] / slept[1].clamp(min=1)).item()


def counting_hook(calls: list[int], *, all_reduce: bool) -> Callable:
    """A DDP communication hook that counts its calls in ``calls[0]`` (one per bucket and step, if DDP's
    hooks run at all) and all-reduces as DDP does by default, its state being the data-parallel group;
    with ``all_reduce=False`` it returns the local gradients instead (the control rows)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        calls[0] += 1
        if all_reduce:
            return allreduce_hook(state, bucket)
        done = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    return hook


def setup_dynapipe(row: Row, settings: Settings, x: torch.Tensor, y: torch.Tensor) -> Runner:
    n_stages = row.p * row.stages_per_rank
    last = []  # the latest StepReport that on_step handed over: its timeline is this rank's last step

    def on_step(report) -> None:
        last[:] = [report]

    options = {
        "n_microbatches": row.m,
        "schedule": row.schedule,
        "split_points": [f"stages.{i}" for i in range(1, n_stages)],
        "timeout_s": settings.timeout_s,
        "on_step": on_step,
    }
    calls = [0]
    if row.dp > 1:
        options["dp_degree"] = row.dp
        options["ddp_comm_hook"] = counting_hook(calls, all_reduce=row.all_reduce)
    torch._dynamo.reset()  # a fresh model per row; Dynamo's per-code cache would hit its recompile limit
    v = row.stages_per_rank
    model = SleepModel(n_stages, settings.fwd_ms / v, settings.bwd_ms / v, row.param_bytes)
    compiled = torch.compile(model, backend="dynapipe", options=options)

    def timeline() -> list:
        return [(e.rank, e.name, e.kind, e.start, e.end) for e in last[0].timeline.events]

    return Runner(
        lambda: compiled(x, y).backward(),
        lambda: model.zero_grad(set_to_none=True),
        timeline,
        reductions=calls,
    )


def _groups(row: Row) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """This rank's (pipeline group, data-parallel group) for ``row``, laid out as dynapipe lays them out;
    (None, None) without data parallelism. Every rank creates every group, as ``new_group`` requires."""
    if row.dp == 1:
        return None, None
    mine = {}
    for kind, groups in (
        ("pp", [[i * row.dp + d for i in range(row.p)] for d in range(row.dp)]),
        ("dp", [[i * row.dp + d for d in range(row.dp)] for i in range(row.p)]),
    ):
        for ranks in groups:
            group = dist.new_group(ranks, timeout=timedelta(seconds=120))
            if dist.get_rank() in ranks:
                mine[kind] = group
    return mine["pp"], mine["dp"]


def setup_torch_pp(row: Row, settings: Settings, x: torch.Tensor, y: torch.Tensor) -> Runner:
    from torch.distributed.pipelining import PipelineStage

    pp_group, dp_group = _groups(row)
    v = row.stages_per_rank
    rank = dist.get_rank(pp_group) if pp_group is not None else dist.get_rank()
    n_stages = row.p * v
    if row.schedule == "zbv":  # V placement: rank r holds stages r and 2p-1-r
        local = [rank, n_stages - 1 - rank]
    else:
        local = [rank + i * row.p for i in range(v)]
    modules = [SleepStage(settings.fwd_ms / v, settings.bwd_ms / v, row.param_bytes) for _ in local]
    wrapped: list[nn.Module] = modules
    calls = [0]
    if dp_group is not None:
        wrapped = [DistributedDataParallel(mod, process_group=dp_group) for mod in modules]
        for ddp in wrapped:
            ddp.register_comm_hook(dp_group, counting_hook(calls, all_reduce=row.all_reduce))
    stages = [
        PipelineStage(mod, s, n_stages, torch.device("cpu"), group=pp_group)
        for mod, s in zip(wrapped, local, strict=True)
    ]
    cls = torch_schedule(row.schedule)
    single = cls.__name__ in ("ScheduleGPipe", "Schedule1F1B")
    schedule = cls(stages[0] if single else stages, n_microbatches=row.m, loss_fn=F.mse_loss)
    args = (x,) if 0 in local else ()
    target = y if n_stages - 1 in local else None

    def reset() -> None:
        for mod in modules:
            mod.zero_grad(set_to_none=True)

    # What the multi-stage schedules run is their pipeline_order (in dynapipe's text form, "1F0"). GPipe and
    # 1F1B run hand-written loops in dynapipe's order; their pipeline_order is only a picture, and 1F1B's
    # is wrong (the last rank's forwards are numbered 1..m), so the simulator gets dynapipe's table.
    order = {} if single else schedule.pipeline_order
    table = {r: [str(a) for a in acts if a is not None and a.is_compute_op] for r, acts in order.items()}
    return Runner(lambda: schedule.step(*args, target=target), reset, table=table or None, reductions=calls)


def _guarded(fn: Callable, *args) -> tuple[object, str | None]:
    try:
        return fn(*args), None
    except Exception as err:  # noqa: BLE001 - a rejected row becomes a note in the table
        first = (str(err).strip().splitlines() or [""])[0]
        return None, f"{type(err).__name__}: {first[:160]}"


def _agree(error: str | None) -> tuple[str | None, bool]:
    """The error any rank hit, and whether the group is still usable (every rank ended the same way)."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None), len(set(errors)) == 1


def setup_floor(row: Row, settings: Settings, x: torch.Tensor, y: torch.Tensor) -> Runner:
    """dynapipe's messages for the row over raw gloo and nothing else: every receive of the step posted up
    front into a buffer allocated once, then each rank walks a flat list of waits and sends in the order
    of its lowered table. No compute, no per-action Python beyond the call: the least that any runtime
    sending these messages can spend (no-compute rows only)."""
    if row.dp > 1 or settings.fwd_ms or settings.bwd_ms:
        raise ValueError("the floor times messages only: rows without compute (--no-compute) and dp=1")
    spec = get_schedule(row.schedule)
    n = row.p * row.stages_per_rank
    table = spec.build(n_ranks=row.p, n_stages=n, n_microbatches=row.m)
    rank_of = placement_map(spec.placement, n_ranks=row.p, n_stages=n)
    graph = stage_graph(n)
    lowered = lower(table, row.p, n, rank_of)
    validate(lowered, row.p, n, row.m, rank_of)

    def tag(kind: Kind, src: int, dst: int, mb: int) -> int:
        return ((int(kind in (Kind.SEND_B, Kind.RECV_B)) * n + src) * n + dst) * row.m + mb

    payload = x[: x.shape[0] // row.m].contiguous()
    receives: list[tuple[torch.Tensor, int, int]] = []  # buffer, peer rank, tag
    index: dict[Action, int] = {}
    ops: list[tuple[int | None, int]] = []  # (None, receive index): wait; (peer rank, tag): send
    for action in lowered[dist.get_rank()]:
        if action is None:
            continue
        if action.kind in (Kind.RECV_F, Kind.RECV_B):
            index[action] = len(receives)
            receives.append(
                (
                    torch.empty_like(payload),
                    rank_of[action.peer],
                    tag(action.kind, action.peer, action.stage, action.mb),
                )
            )
        elif action.kind in (Kind.SEND_F, Kind.SEND_B):
            ops.append((rank_of[action.peer], tag(action.kind, action.stage, action.peer, action.mb)))
        elif action.kind.is_compute:
            ops += [(None, index[recv]) for recv in comm_before(action, graph, rank_of)]

    def step() -> None:
        works = [dist.irecv(buffer, peer, tag=t) for buffer, peer, t in receives]
        sends = []
        for peer, value in ops:
            if peer is None:
                works[value].wait()
            else:
                sends.append(dist.isend(payload, peer, tag=value))
        for work in sends:
            work.wait()

    return Runner(step, lambda: None)


LIBRARIES = {"dynapipe": setup_dynapipe, "torch_pp": setup_torch_pp}


def runners_for(row: Row, settings: Settings) -> dict[str, Callable]:
    """The two libraries, and on rows without compute (dp=1) the floor of their messages."""
    if row.dp == 1 and not settings.fwd_ms and not settings.bwd_ms:
        return {**LIBRARIES, "floor": setup_floor}
    return LIBRARIES


def run_row(row: Row, settings: Settings, link: tuple[float, float], usable: bool) -> tuple[dict, bool]:
    """Set up both libraries (compile, warm up), then time their steps alternately so that load from
    outside the benchmark hits both alike; returns the result and whether the group is still usable."""
    torch.manual_seed(0)
    x = torch.randn(row.m * MB_ROWS, settings.width)
    y = torch.randn(row.m * MB_ROWS, settings.width)
    costs, late = stage_costs(row, settings)
    result: dict = {"row": asdict(row), "link": link, "costs": [asdict(c) for c in costs], "late": late}
    if row.dp > 1 and row.all_reduce:
        result["all_reduce"] = measure_all_reduce(row)
    runners = {}
    for name, setup in runners_for(row, settings).items():
        if not usable:
            result[name] = {"error": "skipped: an earlier failure left the process group unusable"}
            continue

        def warmed_up(setup=setup) -> Runner:
            runner = setup(row, settings, x, y)
            for _ in range(settings.warmup):
                time_step(runner)
            return runner

        runner, error = _guarded(warmed_up)
        error, usable = _agree(error)
        if error:
            result[name] = {"error": error}
        else:
            runners[name] = runner
            result[name] = {"times": [], "cpu": [], "late": [], "table": runner.table}
    timelines = []
    names = list(runners)
    for i in range(settings.steps if usable else 0):
        for name in names if i % 2 == 0 else names[::-1]:
            for key, value in zip(("times", "cpu", "late"), time_step(runners[name]), strict=True):
                result[name][key].append(value)
            if runners[name].timeline:
                timelines.append(runners[name].timeline())
    for name, runner in runners.items() if usable and row.dp > 1 else ():
        per_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, runner.reductions[0] / (settings.warmup + settings.steps))
        result[name]["buckets_per_step"] = per_rank
    if "dynapipe" in runners:
        times = result["dynapipe"]["times"]
        middle = times.index(sorted(times)[len(times) // 2])
        mine = timelines[middle]
        result["dynapipe"]["timeline_step"] = times[middle]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        result["dynapipe"]["timeline"] = [e for events in everyone for e in events]
    return result, usable


def _worker(rows: list[Row], settings: Settings) -> list[dict] | None:
    """One rank's rows (under ``dynapipe.launch``, which sets the rank's environment); rank 0 returns them."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if settings.nice:  # before gloo starts its threads, which inherit it
        os.nice(settings.nice)
    if settings.realtime:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=settings.timeout_s)
    )
    try:
        link = measure_link(settings.act_bytes)
        results, usable = [], True
        for row in rows:
            result, usable = run_row(row, settings, link, usable)
            results.append(result)
            if rank == 0:
                print(
                    f"  {row.label}: "
                    + ", ".join(
                        f"{n} {_median(result[n]['times']) * 1e3:.1f} ms"
                        if result[n].get("times")
                        else f"{n} failed"
                        for n in LIBRARIES
                    ),
                    file=sys.stderr,
                    flush=True,
                )
        return results if rank == 0 else None
    finally:
        dist.destroy_process_group()


# -- the report ---------------------------------------------------------------------------------------
def _aligned(head: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(cells[i]) for cells in [head, *lines]) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)]


def _spread(values: list[float], scale: float = 1e3, digits: int = 1) -> str:
    """``median (min-max)``."""
    return f"{_median(values) * scale:.{digits}f} ({min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f})"


def _compute_events(events: list) -> list[tuple[int, Action, float, float]]:
    """The compute actions of a recorded step (its sends, receives and the step's own work left out)."""
    out = []
    for rank, name, kind, start, end in events:
        if kind == "action" and (a := Action.parse(name)).kind.is_compute:
            out.append((rank, a, start, end))
    return out


def _run_costs(events: list, like: list[StageCost]) -> list[StageCost]:
    """Per-stage costs as the actions of a recorded step really took (mean per stage and kind)."""
    took: dict[tuple[int, str], list[float]] = {}
    for _, a, start, end in _compute_events(events):
        took.setdefault((a.stage, a.kind.value), []).append(end - start)

    def mean(stage: int, kind: str) -> float:
        return statistics.mean(took.get((stage, kind), [0.0]))

    return [
        StageCost(
            forward=mean(s, "F"),
            backward_input=mean(s, "B") + mean(s, "I"),
            backward_weight=mean(s, "W"),
            send_bytes=c.send_bytes,
        )
        for s, c in enumerate(like)
    ]


def breakdown(result: dict) -> list[str] | None:
    """Where dynapipe's median step went, from its timeline, against the simulated one."""
    events = result["dynapipe"].get("timeline")
    if not events:
        return None
    row, costs, link = Row(**result["row"]), [StageCost(**c) for c in result["costs"]], tuple(result["link"])
    sim = ideal_timeline(row, costs, link)
    at_run = ideal_timeline(row, _run_costs(events, costs), link).makespan
    span, busy, excess = {}, {}, []
    for rank, a, start, end in _compute_events(events):
        excess.append((end - start) - costs[a.stage].duration(a.kind))
        busy[rank] = busy.get(rank, 0.0) + end - start
        span[rank] = max(span.get(rank, 0.0), end)
    extra_idle = {r: (span[r] - busy[r]) - (sim.makespan - sim.busy_time(r)) for r in busy}
    step, executor = result["dynapipe"]["timeline_step"], max(span.values())
    worst = max(extra_idle, key=extra_idle.get)
    return [
        row.schedule,
        str(row.p),
        str(row.m),
        f"{step * 1e3:.1f}",
        f"{sim.makespan * 1e3:.1f}",
        f"{at_run * 1e3:.1f}",
        f"{at_run / step:.3f}",
        f"{executor * 1e3:.1f}",
        f"{(step - executor) * 1e3:.1f}",
        f"{statistics.mean(excess) * 1e6:.0f}",
        f"{_median(result['dynapipe']['late']) * 1e6:.0f} / {result['late'] * 1e6:.0f}",
        f"{extra_idle[worst] * 1e3:.1f} (r{worst})",
    ]


DETAIL_HEAD = (
    "schedule|p|m|step|ideal|ideal@run|eff@run|executor|outside|excess/action|oversleep run/alone|extra idle"
)


def _main_table(results: list[dict], notes: list[str]) -> list[str]:
    head = "schedule|p|m|ideal|dynapipe (min-max)|eff|ideal|torch-pp (min-max)|eff|dyn/tpp (min-max)|cpu dyn|cpu tpp"
    floors = any(r.get("floor", {}).get("times") for r in results)
    if floors:  # the target: at most 0.75 of torch's step or 1.15 of the floor, whichever is larger
        head += "|floor (min-max)|dyn/floor|target|met"
    lines = []
    for r in results:
        row, costs, link = Row(**r["row"]), [StageCost(**c) for c in r["costs"]], tuple(r["link"])
        cells = [row.schedule, str(row.p), str(row.m)]
        for name in LIBRARIES:
            table = r[name].get("table")
            ideal = _guarded(lambda t=table, rw=row, c=costs, ln=link: ideal_timeline(rw, c, ln, t).makespan)[
                0
            ]
            cells.append(f"{ideal * 1e3:.1f}" if ideal else "-")
            if r[name].get("times"):
                times = r[name]["times"]
                cells += [_spread(times), f"{ideal / _median(times):.3f}" if ideal else "-"]
            else:
                cells += ["skipped", "-"]
                notes.append(f"{row.label}, {name.replace('_', '-')}: {r[name]['error']}")
        cells.append(_spread(pairs, scale=1, digits=3) if (pairs := _pairs(r)) else "-")
        cells += [f"{_median(r[n]['cpu']) * 1e3:.0f}" if r[n].get("cpu") else "-" for n in LIBRARIES]
        if floors:
            floor = r.get("floor", {}).get("times")
            if floor and all(r[n].get("times") for n in LIBRARIES):
                dyn, tpp = _median(r["dynapipe"]["times"]), _median(r["torch_pp"]["times"])
                target = max(0.75 * tpp, 1.15 * _median(floor))
                cells += [
                    _spread(floor),
                    f"{dyn / _median(floor):.2f}",
                    f"{target * 1e3:.1f}",
                    "yes" if dyn <= target else "no",
                ]
            else:
                cells += ["-"] * 4
        lines.append(cells)
    return _aligned(head.split("|"), lines)


def _pairs(result: dict) -> list[float]:
    """dynapipe / torch-pp of each pair of back-to-back steps (empty unless both ran)."""
    if not all(result[name].get("times") for name in LIBRARIES):
        return []
    return [d / t for d, t in zip(result["dynapipe"]["times"], result["torch_pp"]["times"], strict=True)]


DP_HEAD = "schedule|p|m|all-reduce|library|dp=1|dp=2|dp=2 no AR|dp=2 - dp=1|dp=2 - no AR|dyn/tpp dp=2|buckets/step by rank"


def _dp_table(results: list[dict], notes: list[str]) -> list[str]:
    """dp=1 against dp=2 (and dp=2 without the all-reduce) per schedule and library: median step ms."""
    by_key: dict[tuple, dict[tuple[int, bool], dict]] = {}
    for r in results:
        row = Row(**r["row"])
        by_key.setdefault((row.schedule, row.p, row.m), {})[(row.dp, row.all_reduce)] = r
        for name in LIBRARIES:
            if not r[name].get("times"):
                notes.append(f"{row.label}, {name.replace('_', '-')}: {r[name]['error']}")
    lines = []
    for (schedule, p, m), runs in by_key.items():
        ar = runs.get((2, True), {}).get("all_reduce")
        for name in LIBRARIES:
            step = {
                key: _median(r[name]["times"]) if r[name].get("times") else None for key, r in runs.items()
            }
            one, two, local = step.get((1, True)), step.get((2, True)), step.get((2, False))

            def ms(value: float | None) -> str:
                return "-" if value is None else f"{value * 1e3:.1f}"

            lines.append(
                [
                    schedule,
                    str(p),
                    str(m),
                    _spread(ar) if ar and name == "dynapipe" else "",
                    name.replace("_", "-"),
                    ms(one),
                    ms(two),
                    ms(local),
                    ms(two - one if two and one else None),
                    ms(two - local if two and local else None),
                    (f"{_median(pairs):.3f}" if (pairs := _pairs(runs[(2, True)])) else "-")
                    if name == "dynapipe" and (2, True) in runs
                    else "",
                    " ".join(
                        f"{n:.1f}" for n in runs.get((2, True), {}).get(name, {}).get("buckets_per_step", [])
                    ),
                ]
            )
    return _aligned(DP_HEAD.split("|"), lines)


def report(results: list[dict], settings: Settings, load: tuple[float, float]) -> str:
    main = [r for r in results if not r["row"]["param_bytes"]]
    data_parallel = [r for r in results if r["row"]["param_bytes"]]
    notes: list[str] = []
    link = results[0]["link"] if results else (0.0, 1.0)
    out = [
        f"stages sleep F {settings.fwd_ms:g} ms, B {settings.bwd_ms:g} ms (I = W = B/2) per microbatch, "
        f"activation {settings.act_bytes / 2**20:g} MiB; {settings.steps} timed steps after {settings.warmup} "
        f"warm-up, the two libraries alternating",
        f"link {link[0] * 1e6:.0f} us + {link[1] / 1e9:.2f} GB/s (gloo, fastest ping-pong); machine load average "
        f"{load[0]:.1f} at start, {load[1]:.1f} at end on {os.cpu_count()} cores",
    ]
    if main:
        out += [
            "times in ms; ideal = simulated step of that library's own action order; eff = ideal / median; "
            "dyn/tpp = median of paired step ratios; cpu = CPU ms per step, busiest rank",
            "",
            *_main_table(main, notes),
        ]
    detail = [cells for r in main if (cells := breakdown(r))]
    if detail:
        out += [
            "",
            "dynapipe's median step from its timeline (ms; excess and oversleep in us):",
            *_aligned(DETAIL_HEAD.split("|"), detail),
        ]
    if data_parallel:
        size = data_parallel[0]["row"]["param_bytes"]
        out += [
            "",
            f"data parallelism: every stage holds a {size / 2**20:g} MiB parameter; median step ms; all-reduce = "
            "that parameter alone over 2 ranks (gloo), median (min-max); no AR = DDP with a hook that "
            "all-reduces nothing (same processes, same DDP bookkeeping)",
            *_dp_table(data_parallel, notes),
        ]
    if notes:
        out += ["", "skipped:", *(f"  {n}" for n in notes)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="main rows: p=4, m=8, gpipe and 1f1b; dp rows: p=2; fewer steps"
    )
    parser.add_argument(
        "--rows",
        choices=("all", "main", "dp"),
        default="all",
        help="main: the schedules without data parallelism; dp: dp=1 against dp=2 (4 and 8 processes)",
    )
    parser.add_argument(
        "--param-bytes", type=int, default=4 * 2**20, help="each stage's parameter in the dp rows (4 MiB)"
    )
    parser.add_argument("--fwd-ms", type=float, default=10.0, help="forward sleep per stage and microbatch")
    parser.add_argument("--bwd-ms", type=float, default=20.0, help="backward sleep (half input, half weight)")
    parser.add_argument("--act-bytes", type=int, default=2**20, help="activation size per microbatch")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row and library (10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (3)")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the workers; -10 (needs root) keeps other load on the machine from "
        "delaying their wake-ups, which it otherwise adds to every action",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="run the workers under SCHED_RR (needs root): the workers sleep most of the time, "
        "and a wake-up then never waits for other processes on the machine",
    )
    parser.add_argument(
        "--no-compute",
        action="store_true",
        help="stages that only pass a 4 KiB activation (F = B = 0 ms): the runtimes' own cost per action, "
        "with a floor row of the same messages over raw gloo",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    opts = parser.parse_args()
    if opts.no_compute:
        opts.fwd_ms, opts.bwd_ms, opts.act_bytes = 0.0, 0.0, 4096
    settings = Settings(
        opts.fwd_ms,
        opts.bwd_ms,
        opts.act_bytes,
        warmup=opts.warmup if opts.warmup is not None else (2 if opts.quick else 3),
        steps=opts.steps or (6 if opts.quick else 10),
        timeout_s=120.0,
        nice=opts.nice,
        realtime=opts.realtime,
    )
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers before they import torch
    rows = make_rows(opts.rows, opts.quick, opts.param_bytes)
    results = []
    started, load = time.perf_counter(), os.getloadavg()[0]
    for world in sorted({r.world for r in rows}):
        group = [r for r in rows if r.world == world]
        print(f"{world} processes: {len(group)} rows", file=sys.stderr, flush=True)
        results += launch(_worker, group, settings, nproc=world)[0]
    print(report(results, settings, (load, os.getloadavg()[0])))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    if opts.json:
        opts.json.write_text(json.dumps({"settings": asdict(settings), "results": results}, indent=1))


if __name__ == "__main__":
    main()
