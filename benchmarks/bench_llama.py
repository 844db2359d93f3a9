"""A HuggingFace Llama on 2 ranks, dynapipe against torch.distributed.pipelining: first step and steady step.

    python benchmarks/bench_llama.py            # hidden 256, 8 layers, sequence 128, 1F1B, 10 timed steps
    python benchmarks/bench_llama.py --steps 4  # quicker
    python benchmarks/bench_llama.py --profile  # and where dynapipe's first step goes (slows it)
    python benchmarks/bench_llama.py --firsts 3  # each first step 3 times, alternating: median, paired ratios

Both libraries train the same randomly initialised ``LlamaForCausalLM`` (split before ``model.layers.4``,
4 microbatches of 2 sequences) with the same loss. **First step** is everything from the model in memory to
the first step's loss and gradients: dynapipe's is ``torch.compile`` + the first call (Dynamo, capture,
partition, codegen, state placement, the step); torch's is ``pipeline()`` (torch.export) + building the stage
+ its first ``schedule.step``. dynapipe runs twice: the default call (Dynamo's trace, then a re-trace at the
microbatch size) and ``dynamic=True`` (Dynamo's trace is the capture). "Dynamo alone" is the floor of the
one-trace path: ``torch.compile(dynamic=True, backend="eager")`` of the same call and one microbatch's
eager step, no dynapipe (first step only). **Step** is the median (min-max) of
the timed steps afterwards, alternating the runs step by step so that load from elsewhere falls on all alike. Every step starts at a
barrier and counts the slowest rank. With ``--profile``, dynapipe's first step is also broken down (rank 0) by
a cProfile of its phases, so the table says where the time goes; the profiler slows Dynamo's tracing about
1.5x and only dynapipe's runs are profiled, so the first-step ratios are read from a run without it.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hf_models import bench_llama_model

from dynapipe import launch

WORLD, BATCH, SEQ, MICRO, VOCAB = 2, 8, 128, 4, 8000
FLOOR = "Dynamo alone"  # torch.compile(dynamic=True, backend="eager"): the one-trace path's floor
# dynapipe's functions that mark the phases of its first step (cumulative time on rank 0)
PHASES = {
    ("pipeline.py", "build_pipeline"): "dynapipe's build (all below but the step)",
    ("trace.py", "capture_microbatch"): "  capture (re-trace or Dynamo's graph)",
    ("trace.py", "_retrace"): "    re-trace at the microbatch size",
    ("one_trace.py", "at_microbatch"): "    Dynamo's graph at the microbatch size",
    ("rates.py", "plan_rates"): "  rates (measured, or read from cache)",
    ("planner.py", "plan_pipeline"): "  cost model + partition",
    ("codegen.py", "build_stages"): "  codegen",
    ("state.py", "place_state"): "  state placement",
    ("pipeline.py", "_tables"): "  schedule tables",
    ("pipeline.py", "run"): "the step itself",
}


def _model():
    return bench_llama_model(8, SEQ)


class Logits(torch.nn.Module):
    """``ids -> logits``: the module torch's ``pipeline()`` traces (its loss is a separate function)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def timed(fn) -> float:
    """Seconds of ``fn()`` from a barrier, the slowest rank's."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return took.item()


def _setup_dynapipe(ids: torch.Tensor, dynamic: bool = False):
    net = Logits(_model())
    # two lambdas, two code objects: Dynamo keeps the compiled code of each call apart
    call = (
        (lambda ids, labels: loss_fn(net(ids), labels))
        if dynamic
        else (lambda ids, labels: loss_fn(net(ids), labels))
    )
    step = torch.compile(
        call,
        backend="dynapipe",
        dynamic=dynamic or None,
        options={"schedule": "1f1b", "n_microbatches": MICRO, "split_points": ["model.model.layers.4"]},
    )

    def run() -> None:
        step(ids, ids).backward()
        net.zero_grad(set_to_none=True)

    return run


def _setup_dynamo_only(ids: torch.Tensor):
    """The floor of the one-trace path: Dynamo's own symbolic trace of the same call (backend "eager",
    one process per rank) and one microbatch's eager step, a quarter of the work a pipelined first step
    does; no dynapipe at all."""
    net = Logits(_model())
    step = torch.compile(lambda ids, labels: loss_fn(net(ids), labels), backend="eager", dynamic=True)
    micro = ids[: BATCH // MICRO]

    def run() -> None:
        step(micro, micro).backward()
        net.zero_grad(set_to_none=True)

    return run


def _setup_torch(ids: torch.Tensor):
    from torch.distributed.pipelining import Schedule1F1B, SplitPoint, pipeline

    net = Logits(_model())
    pipe = pipeline(
        net,
        mb_args=(ids[: BATCH // MICRO],),
        split_spec={"model.model.layers.4": SplitPoint.BEGINNING},
    )
    stage = pipe.build_stage(dist.get_rank(), torch.device("cpu"))
    schedule = Schedule1F1B(stage, n_microbatches=MICRO, loss_fn=loss_fn)
    first, last = dist.get_rank() == 0, dist.get_rank() == WORLD - 1

    def run() -> None:
        if first:
            schedule.step(ids)
        elif last:
            schedule.step(target=ids, losses=[])
        else:
            schedule.step()
        stage.submod.zero_grad(set_to_none=True)

    return run


def _warm_up_torch(ids: torch.Tensor) -> None:
    """Pay once, before timing either library, what the first of them would pay alone: importing and
    initialising Dynamo, torch.export and the model's code paths."""
    torch.compile(lambda x: x + 1, backend="eager", fullgraph=True)(torch.ones(2))
    torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    with torch.no_grad():
        Logits(_model())(ids[:1])
    torch._dynamo.reset()


def _first_steps(ids: torch.Tensor, repeats: int, profiled: bool) -> tuple[dict, dict, dict]:
    """Each way's first step, ``repeats`` times (the order reversed every other time, Dynamo reset before
    each): the seconds, the last build's steady step function, and rank 0's profile of the last build."""
    rank = dist.get_rank()
    first: dict[str, list[float]] = {}
    runs, profiles = {}, {}
    setups = {
        "torch-pp": _setup_torch,
        "dynapipe": _setup_dynapipe,
        "dynamic=True": partial(_setup_dynapipe, dynamic=True),
        FLOOR: _setup_dynamo_only,
    }
    for repeat in range(repeats):
        for name in list(setups) if repeat % 2 == 0 else list(setups)[::-1]:
            box: list = []

            def build_and_step(setup=setups[name], box=box) -> None:
                box.append(setup(ids))
                box[0]()

            torch._dynamo.reset()
            profiles[name] = profile = cProfile.Profile()
            if profiled and name != "torch-pp" and rank == 0:
                profile.enable()
            first.setdefault(name, []).append(timed(build_and_step))
            profile.disable()
            runs[name] = box[0]
    return first, runs, profiles


def _worker(steps: int, profiled: bool = False, repeats: int = 1) -> tuple | None:
    dist.init_process_group("gloo")
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    _warm_up_torch(ids)
    first, runs, profiles = _first_steps(ids, repeats, profiled)
    del runs[FLOOR]  # a first step only: its steps are not pipelined
    for run in runs.values():  # one more untimed step each: both warm
        timed(run)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps):
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            times[name].append(timed(runs[name]))
    if dist.get_rank() == 0:
        phases = {name: _phases(profiles[name]) for name in ("dynapipe", "dynamic=True") if profiled}
        return first, times, phases
    return None


def _phases(profile: cProfile.Profile) -> dict:
    """Cumulative seconds of each of PHASES' functions in ``profile``."""
    phases: dict = {}
    for (path, _, func), (_, _, _, cumulative, _) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        key = (os.path.basename(path), func)
        if key in PHASES and f"dynapipe{os.sep}" in path:
            phases[key] = max(phases.get(key, 0.0), cumulative)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="profile dynapipe's first step (slows it)")
    parser.add_argument("--firsts", type=int, default=1, help="first steps of each way, alternating")
    args = parser.parse_args()
    # rank 0's timings and profile
    first, times, phases = launch(_worker, args.steps, args.profile, args.firsts, nproc=WORLD)[0]
    print(f"Llama hidden 256, 8 layers, batch {BATCH} x {SEQ}, {WORLD} ranks, 1F1B, {MICRO} microbatches")
    print(f"{'':12s} {'first step s median (min-max)':>30s} {'step ms median (min-max)':>26s}")
    for name in ("dynapipe", "dynamic=True", "torch-pp", FLOOR):
        t, f = times.get(name), first[name]
        spread = f"{statistics.median(t) * 1e3:.1f} ({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})" if t else "-"
        firsts = f"{statistics.median(f):.2f} ({min(f):.2f}-{max(f):.2f})"
        print(f"{name:12s} {firsts:>30s} {spread:>26s}")
    for name in ("dynapipe", "dynamic=True", FLOOR):
        paired = [d / t for d, t in zip(first[name], first["torch-pp"], strict=True)]
        line = f"{name} / torch-pp: first step {statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f})"
        line += f" over {len(paired)} paired"
        if name in times:
            ratios = [d / t for d, t in zip(times[name], times["torch-pp"], strict=True)]
            line += f", step {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) over paired steps"
        print(line)
    for name in ("dynapipe", "dynamic=True") if args.profile else ():
        print(f"{name}'s first step on rank 0, by phase (s; the rest is Dynamo tracing the call):")
        for key, label in PHASES.items():
            if key in phases[name]:
                print(f"  {label:42s} {phases[name][key]:6.2f}")


if __name__ == "__main__":
    main()
