"""Capture and plan against depth: a HuggingFace Llama (hidden 256) with 4/8/16/32 layers, one process.

    python benchmarks/bench_capture.py           # 4, 8, 16, 32 layers, 3 runs each
    python benchmarks/bench_capture.py --quick   # 4 and 8 layers, 1 run each

Per depth, the seconds from the model in memory to a plan of 2 stages (4 microbatches of 2 sequences of 128):

* **default call** - what the backend does for ``torch.compile(model, backend="dynapipe")``: Dynamo's
  trace at the full batch, dynapipe's re-trace at the microbatch size, the plan;
* **dynamic=True** - the same for ``torch.compile(..., dynamic=True)``: Dynamo's trace, symbolic in the
  batch size, becomes the capture (no second trace), then the plan;
* **mark_dynamic** - the same with ``torch._dynamo.mark_dynamic`` on the batch and sequence dimensions
  instead (Dynamo then keeps the model's float constants fixed, which ``dynamic=True`` makes symbolic);
* **explain** - ``dynapipe.explain()``: the re-trace and the plan (no Dynamo trace of its own);
* **torch.export** - torch.distributed.pipelining's ``pipeline()`` (torch.export, then its split).

The ways alternate run by run so that load from elsewhere falls on all alike; the table gives the median
(min-max) and, per layer, the slope between the smallest and the largest depth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from typing import Any

import torch
from hf_models import bench_llama_model

from dynapipe import explain
from dynapipe.capture import capture_microbatch, frame_of_call
from dynapipe.capture.recorded import trace_of
from dynapipe.config import PipelineConfig
from dynapipe.plan import plan_pipeline
from dynapipe.schedules import get_schedule

BATCH, SEQ, MICRO, VOCAB = 8, 128, 4, 8000


class Logits(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.model = bench_llama_model(layers, SEQ)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def _explain(net: Logits, ids: torch.Tensor) -> None:
    explain(net, (ids,), n_stages=2, n_microbatches=MICRO)


def _backend_run(net: Logits, ids: torch.Tensor, *, dynamic: bool, marked: bool = False) -> None:
    """What the backend does on the first call: Dynamo's trace, then (outside Dynamo's compile, as the
    backend's first call does) the capture, from Dynamo's graph when it is symbolic in the batch size and
    else by a re-trace at the microbatch size, and the plan."""
    box = {}

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        box["dynamo"] = trace_of(gm)
        return gm.forward

    if marked:  # the batch and sequence dimensions only: Dynamo keeps the model's floats fixed
        ids = ids.clone()
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(ids, 1)
    torch.compile(net, backend=backend, dynamic=dynamic and not marked or None, fullgraph=True)(ids)
    frame = frame_of_call(net, (ids,), {})  # the frame Dynamo compiled, as the backend reads it
    captured = capture_microbatch(frame, n_microbatches=MICRO, batch_size=BATCH, dynamo=box["dynamo"])
    assert captured.one_trace == dynamic, "not the capture path measured"  # noqa: S101
    config = PipelineConfig(n_stages=2, n_microbatches=MICRO)
    plan_pipeline(captured, config, spec=get_schedule("1f1b"), n_ranks=2, n_stages=2, with_costs=True)


def _export(net: Logits, ids: torch.Tensor) -> None:
    from torch.distributed.pipelining import SplitPoint, pipeline

    layers = len(net.model.model.layers)
    pipeline(
        net,
        mb_args=(ids[: BATCH // MICRO],),
        split_spec={f"model.model.layers.{layers // 2}": SplitPoint.BEGINNING},
    )


WAYS = {
    "default call": partial(_backend_run, dynamic=False),
    "dynamic=True": partial(_backend_run, dynamic=True),
    "mark_dynamic": partial(_backend_run, dynamic=True, marked=True),
    "explain": _explain,
    "torch.export": _export,
}


def _warm_up(ids: torch.Tensor) -> None:
    """Pay once what the first measurement would pay alone (imports, Dynamo's and export's set-up)."""
    torch.compile(lambda x: x + 1, backend="eager", fullgraph=True)(torch.ones(2))
    torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
    with torch.no_grad():
        Logits(1)(ids[:1])


def _row(times: dict, layers: int) -> str:
    cells = [
        f"{statistics.median(t):6.2f} ({min(t):.2f}-{max(t):.2f})" for t in (times[(n, layers)] for n in WAYS)
    ]
    return f"{layers:6d} " + " ".join(f"{c:>20s}" for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 and 8 layers, one run each")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    depths, runs = ((4, 8), 1) if args.quick else ((4, 8, 16, 32), args.runs)
    sys.setrecursionlimit(
        max(sys.getrecursionlimit(), 10_000)
    )  # torch.export of a deep model recurses deeply
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    _warm_up(ids)
    print(f"Llama hidden 256, batch {BATCH} x {SEQ}, {MICRO} microbatches, 2 stages: seconds to a plan")
    print(f"{'layers':>6s} " + " ".join(f"{name:>20s}" for name in WAYS), flush=True)
    times: dict[tuple[str, int], list[float]] = {}
    for layers in depths:
        net = Logits(layers)
        for run in range(runs):
            for name in list(WAYS) if run % 2 == 0 else list(WAYS)[::-1]:
                torch._dynamo.reset()
                model = Logits(layers) if name == "torch.export" else net  # pipeline() patches the model
                start = time.perf_counter()
                WAYS[name](model, ids)
                times.setdefault((name, layers), []).append(time.perf_counter() - start)
        print(_row(times, layers), flush=True)
    low, high = depths[0], depths[-1]
    slopes = {
        name: (statistics.median(times[(name, high)]) - statistics.median(times[(name, low)])) / (high - low)
        for name in WAYS
    }
    print(f"{'s/layer':>6s} " + " ".join(f"{slopes[name]:20.3f}" for name in WAYS))
    base = slopes["torch.export"]
    if base > 0:
        print("per layer over torch.export: " + ", ".join(f"{n} {slopes[n] / base:.2f}x" for n in WAYS))


if __name__ == "__main__":
    main()
