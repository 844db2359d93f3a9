"""One trace where one can serve (issue 22): with ``torch.compile(..., dynamic=True)`` Dynamo's own graph is
symbolic in the batch size and becomes the microbatch graph, so the frame is traced once; the default call
re-traces it. Both equal one process, and the plan says which path ran."""

from __future__ import annotations

import torch
from harness import run_distributed


def one_trace_worker(rank: int, world: int, dynamic: bool) -> dict:
    from models import llama
    from torch._dynamo.callback import callback_handler

    seen = []
    case, ref = llama(world), llama(world)
    step = torch.compile(
        case.step,
        backend="dynapipe",
        dynamic=dynamic,
        options={
            "split_points": case.split_points[:1],
            "n_microbatches": 4,
            "on_step": lambda report: seen.append(report.plan.captured),
        },
    )
    traces = []  # every trace of a frame by Dynamo, whichever backend (dynapipe's re-trace has its own)
    callback_handler.register_start_callback(lambda *_: traces.append(1))
    out = {}
    for length in (12, 9):  # a second sequence length: the same capture serves it
        ids = case.args[0][:, :length].contiguous()
        loss = step(ids, ids.clone())
        loss.backward()
        expected = ref.step(ids, ids.clone())
        expected.backward()
        torch.testing.assert_close(loss, expected)
        refs = dict(ref.model.named_parameters())
        for name, p in case.model.named_parameters():
            if p.untyped_storage().nbytes() > 0:  # a parameter of this rank's stages
                torch.testing.assert_close(p.grad, refs[name].grad, msg=name)
        case.model.zero_grad(set_to_none=True)
        ref.model.zero_grad(set_to_none=True)
        out.setdefault("frames traced", len(traces))  # by the first step
    out["captures"] = sorted({c.number for c in seen})
    out["one trace"] = sorted({c.one_trace for c in seen})
    return out


def test_dynamic_compile_traces_the_frame_once() -> None:
    for rank, out in run_distributed(one_trace_worker, 2, True).items():
        # Dynamo's trace was the capture: nothing traced the frame again, and it serves the second length
        assert out == {"frames traced": 1, "captures": [1], "one trace": [True]}, (rank, out)


def test_default_compile_retraces() -> None:
    for rank, out in run_distributed(one_trace_worker, 2, False).items():
        # Dynamo traces at the full batch, dynapipe re-traces at the microbatch; the capture serves both lengths
        assert out == {"frames traced": 2, "captures": [1], "one trace": [False]}, (rank, out)
