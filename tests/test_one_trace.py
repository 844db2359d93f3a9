"""One trace where one can serve (issue 22): with ``torch.compile(..., dynamic=True)`` Dynamo's own graph is
symbolic in the batch size and becomes the microbatch graph, so the frame is traced once; the default call
re-traces it. Both equal one process, and the plan says which path ran."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from models import CASES, HF_CASES


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


def _rebuilt_and_rerun(case) -> tuple:
    """Dynamo's graph of ``case`` (dynamic=True) at two rows, both ways: rebuilt from its symbolic sizes,
    and with every operation run again on fake tensors."""
    from dynapipe.capture import ignore_logging_in_graphs, one_trace
    from dynapipe.capture.frame import FrameCall
    from dynapipe.capture.recorded import trace_of
    from dynapipe.capture.resized import rebuilt_at

    ignore_logging_in_graphs()  # as the backend does: HF's warning_once inside the loss
    box = {}

    def record(gm, example_inputs):
        box["trace"] = trace_of(gm)
        return gm.forward

    torch.compile(case.step, backend=record, dynamic=True, fullgraph=True)(*case.args, **case.kwargs)
    module = isinstance(case.step, torch.nn.Module)
    fn = type(case.step).forward if module else case.step
    code = fn.__code__
    values = ((case.step,) if module else ()) + case.args
    frame = FrameCall(
        code,
        fn.__globals__,
        fn.__closure__,
        {**dict(zip(code.co_varnames, values, strict=False)), **case.kwargs},
    )
    trace = box["trace"]
    kinds = one_trace._kinds(trace, frame, case.args[0].shape[0])
    assert kinds is not None and one_trace._holds_at(trace, kinds, 2)
    return rebuilt_at(trace, kinds, 2), one_trace._propagate(trace, frame, kinds, 2)


def _values(trace) -> list:
    """Every node's example value: tensors as (shape, stride, dtype, requires_grad, which storage they
    share), sizes at their values and whether symbolic (symbol names may differ: s48 is s77)."""
    storages: dict[int, int] = {}

    def describe(value):
        if isinstance(value, (torch.SymInt, torch.SymFloat)):
            expr = value.node.shape_env.replace(value.node.expr)  # a size its environment fixed reads fixed
            return value.node.pytype(expr) if expr.is_number else ("symbolic", value.node.hint)
        if isinstance(value, torch.Tensor):
            storage = storages.setdefault(value.untyped_storage()._cdata, len(storages))
            shape, stride = (tuple(describe(d) for d in dims) for dims in (value.shape, value.stride()))
            return (shape, stride, value.dtype, value.requires_grad, storage)
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        return value

    return [(n.name, describe(n.meta.get("example_value"))) for n in trace.gm.graph.nodes if n.op != "output"]


@pytest.mark.parametrize("name", ["llama", "gpt2", "skip", "tied"])
def test_rebuilt_sizes_equal_a_rerun(name) -> None:
    # the one-trace path rebuilds each value from Dynamo's symbols instead of running the graph again:
    # the same sizes, strides, dtypes, grad flags and aliasing as running it, at the microbatch's hints
    rebuilt, rerun = _rebuilt_and_rerun({**CASES, **HF_CASES}[name](2))
    assert _values(rebuilt) == _values(rerun)
    assert rebuilt.hints.items() <= rerun.hints.items()
    assert [s for s, v in rebuilt.placeholders] == [s for s, v in rerun.placeholders]


def dynamic_cases_worker(rank: int, world: int, names: list[str]) -> dict:
    """Each case compiled with dynamic=True, two steps against one process (loss and every gradient)."""
    import sys

    # the first cases compile before transformers is imported: the warning_once it then adds to
    # logging.Logger (GPT-2's loss logs with it) must still be skipped, not break Dynamo's graph
    assert "transformers" not in sys.modules
    cases = {**CASES, **HF_CASES}
    out = {}
    for name in names:
        pipe, ref = cases[name](world), cases[name](world)
        paths: list = []
        options = {"split_points": pipe.split_points, "n_microbatches": 4, "on_step": paths.append}
        step = torch.compile(pipe.step, backend="dynapipe", dynamic=True, options={**pipe.options, **options})
        for i in range(2):
            loss = step(*pipe.args, **pipe.kwargs)
            loss.backward()
            expected = ref.step(*ref.args, **ref.kwargs)
            expected.backward()
            torch.testing.assert_close(loss, expected, msg=lambda m: f"{name} step {i}: {m}")
            refs = dict(ref.model.named_parameters())
            for pname, p in pipe.model.named_parameters():
                if p.untyped_storage().nbytes() > 0 and refs[pname].grad is not None:
                    torch.testing.assert_close(p.grad, refs[pname].grad, msg=lambda m: f"{name} {pname}: {m}")
            pipe.model.zero_grad(set_to_none=True)
            ref.model.zero_grad(set_to_none=True)
        out[name] = paths[0].plan.captured.one_trace
    return out


def test_one_trace_of_other_models_equals_one_process() -> None:
    # a skip connection, tied weights, Python control flow, GPT-2 (float constants), T5 (encoder-decoder)
    names = ["skip", "tied", "loop_if", "gpt2", "t5"]
    for rank, out in run_distributed(dynamic_cases_worker, 2, names, timeout=400).items():
        assert out == dict.fromkeys(names, True), (rank, out)
