"""Every stage of a pipeline on one process, on the CPU and (where there is one) on a CUDA device.

With one rank, interleaved 1F1B and ZBV place several stages on it and hand tensors over in memory; on
CUDA the process group is NCCL's. Loss and every gradient must equal the same model run directly on the
same device, and a CUDA stage must hold its parameters on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def _train_on_one_rank(rank: int, world: int, device: str, runs: list[tuple[str, int, str]]) -> list[str]:
    from models import CASES, HF_CASES
    from torch.utils._pytree import tree_map

    done = []
    to_device = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    for name, n_stages, schedule in runs:
        pipe, ref = ({**CASES, **HF_CASES}[name](n_stages) for _ in range(2))
        for case in (pipe, ref):
            case.model.to(device)
            case.args, case.kwargs = tree_map(to_device, (case.args, case.kwargs))
        reports = []
        options = {
            "split_points": pipe.split_points,
            **pipe.options,
            "schedule": schedule,
            "n_microbatches": 4,
            "on_step": reports.append,
        }
        step = torch.compile(pipe.step, backend="dynapipe", options=options)
        for i in range(2):
            loss = step(*pipe.args, **pipe.kwargs)
            loss.backward()
            ref_loss = ref.step(*ref.args, **ref.kwargs)
            ref_loss.backward()
            what = f"{name} on {device}, {n_stages} stages, {schedule}, step {i}"
            assert loss.device.type == device, what
            torch.testing.assert_close(loss, ref_loss, msg=lambda m: f"{what} loss: {m}")
            ref_params = dict(ref.model.named_parameters())
            for pname, p in pipe.model.named_parameters():
                assert p.device.type == device, f"{what}: {pname} is on {p.device}"
                expect = ref_params[pname].grad
                got = p.grad if p.grad is not None else torch.zeros_like(p)
                expect = expect if expect is not None else torch.zeros_like(p)
                torch.testing.assert_close(got, expect, msg=lambda m: f"{what} grad {pname}: {m}")
                p.grad = ref_params[pname].grad = None
        stages = reports[-1].stages
        assert len(stages) == n_stages, f"{name}: one rank should run all {n_stages} stages"
        for plan in stages.values():
            assert all(t.device.type == device for t in plan.module.parameters()), name
        done.append(f"{name}/{n_stages}/{schedule}")
    return done


@pytest.mark.parametrize("device", _DEVICES)
def test_all_stages_on_one_process(device: str) -> None:
    runs = [
        ("mlp", 2, "interleaved-1f1b"),
        ("skip", 4, "interleaved-1f1b"),
        ("tied", 2, "zbv"),
        ("multi_io", 2, "interleaved-1f1b"),
    ]
    results = run_distributed(_train_on_one_rank, 1, device, runs, timeout=240)
    assert results[0] == [f"{n}/{s}/{k}" for n, s, k in runs]


@pytest.mark.hf
@pytest.mark.parametrize("device", _DEVICES)
def test_huggingface_stages_on_one_process(device: str) -> None:
    runs = [("llama", 2, "interleaved-1f1b"), ("gpt2", 2, "zbv")]
    results = run_distributed(_train_on_one_rank, 1, device, runs, timeout=240)
    assert results[0] == [f"{n}/{s}/{k}" for n, s, k in runs]
