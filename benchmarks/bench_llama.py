"""A HuggingFace Llama on 2 ranks, dynapipe against torch.distributed.pipelining: first step and steady step.

    python benchmarks/bench_llama.py            # hidden 256, 8 layers, sequence 128, 1F1B, 10 timed steps
    python benchmarks/bench_llama.py --steps 4  # quicker

Both libraries train the same randomly initialised ``LlamaForCausalLM`` (split before ``model.layers.4``,
4 microbatches of 2 sequences) with the same loss. **First step** is everything from the model in memory to
the first step's loss and gradients: dynapipe's is ``torch.compile`` + the first call (Dynamo, capture,
partition, codegen, state placement, the step); torch's is ``pipeline()`` (torch.export) + building the stage
+ its first ``schedule.step``. dynapipe runs twice: the default call (Dynamo's trace, then a re-trace at the
microbatch size) and ``dynamic=True`` (Dynamo's trace is the capture). **Step** is the median (min-max) of
the timed steps afterwards, alternating the runs step by step so that load from elsewhere falls on all alike. Every step starts at a
barrier and counts the slowest rank. dynapipe's first step is also broken down (rank 0) by a profile of its
phases, so the table says where the time goes.
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
# dynapipe's functions that mark the phases of its first step (cumulative time on rank 0)
PHASES = {
    ("pipeline.py", "build_pipeline"): "dynapipe's build (all below but the step)",
    ("trace.py", "capture_microbatch"): "  capture (re-trace or Dynamo's graph)",
    ("trace.py", "_retrace"): "    re-trace at the microbatch size",
    ("one_trace.py", "at_microbatch"): "    Dynamo's graph at the microbatch size",
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


def _worker(steps: int) -> tuple | None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    _warm_up_torch(ids)
    first, runs, profiles = {}, {}, {}
    setups = {
        "torch-pp": _setup_torch,
        "dynapipe": _setup_dynapipe,
        "dynamic=True": partial(_setup_dynapipe, dynamic=True),
    }
    for name, setup in setups.items():
        box = []

        def build_and_step(setup=setup, box=box) -> None:
            box.append(setup(ids))
            box[0]()

        profiles[name] = profile = cProfile.Profile()
        if name != "torch-pp" and rank == 0:
            profile.enable()
        first[name] = timed(build_and_step)
        profile.disable()
        runs[name] = box[0]
    for run in runs.values():  # one more untimed step each: both warm
        timed(run)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps):
        for name in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            times[name].append(timed(runs[name]))
    if rank == 0:
        return first, times, {name: _phases(profiles[name]) for name in ("dynapipe", "dynamic=True")}
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
    args = parser.parse_args()
    first, times, phases = launch(_worker, args.steps, nproc=WORLD)[0]  # rank 0's timings and profile
    print(f"Llama hidden 256, 8 layers, batch {BATCH} x {SEQ}, {WORLD} ranks, 1F1B, {MICRO} microbatches")
    print(f"{'':10s} {'first step s':>13s} {'step ms median (min-max)':>26s}")
    for name in ("dynapipe", "dynamic=True", "torch-pp"):
        t = times[name]
        spread = f"{statistics.median(t) * 1e3:.1f} ({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})"
        print(f"{name:10s} {first[name]:13.2f} {spread:>26s}")
    for name in ("dynapipe", "dynamic=True"):
        ratios = [d / t for d, t in zip(times[name], times["torch-pp"], strict=True)]
        print(
            f"{name} / torch-pp: first step {first[name] / first['torch-pp']:.2f}, "
            f"step {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) over paired steps"
        )
    for name in ("dynapipe", "dynamic=True"):
        print(f"{name}'s first step on rank 0, by phase (s; the rest is Dynamo tracing the call):")
        for key, label in PHASES.items():
            if key in phases[name]:
                print(f"  {label:42s} {phases[name][key]:6.2f}")


if __name__ == "__main__":
    main()
