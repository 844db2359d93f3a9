"""Bad input gets a clear error that names the value and the fix; a dead or stalled rank never hangs the rest."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_distributed


class Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        torch._dynamo.graph_break()  # stands for any untraceable call in user code
        return F.cross_entropy(self.b(h), y)


class BreaksInside(nn.Module):
    """The break is in a submodule: Dynamo compiles pieces of the inner frame on their own."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Breaks()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner(x * 2, y)


class Depth(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean()


def _error(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        return f"{type(err).__name__}: {err}"
    return "no error"


def bad_input_worker(rank: int, world: int) -> dict[str, str]:
    from models import mlp

    out = {}

    def run(case, **options):
        step = torch.compile(case.step, backend="dynapipe", options=options)
        return step(*case.args)

    out["unknown_option"] = _error(lambda: run(mlp(2), n_microbatch=4))
    out["not_divisible"] = _error(lambda: run(mlp(2), n_microbatches=3, split_points=["layers.4"]))
    out["world_not_multiple"] = _error(lambda: run(mlp(3), n_microbatches=2, n_stages=3))
    out["bad_split_point"] = _error(lambda: run(mlp(2), split_points=["layer.4"]))
    out["virtual_fixed"] = _error(lambda: run(mlp(2), schedule="1f1b", virtual_stages=2))
    out["virtual_count"] = _error(
        lambda: run(mlp(2), schedule="interleaved-1f1b", virtual_stages=2, split_points=["layers.4"])
    )
    tiny = Depth(1)  # three graph nodes cannot make eight stages
    out["too_many_stages"] = _error(
        lambda: torch.compile(
            tiny, backend="dynapipe", options={"n_stages": 8, "schedule": "interleaved-1f1b"}
        )(torch.randn(8, 4))
    )
    breaks = Breaks()
    out["graph_break"] = _error(
        lambda: torch.compile(breaks, backend="dynapipe", options={"split_points": ["b"]})(
            torch.randn(4, 4), torch.randint(0, 2, (4,))
        )
    )
    nested = BreaksInside()
    out["nested_break"] = _error(
        lambda: torch.compile(nested, backend="dynapipe")(torch.randn(4, 4), torch.randint(0, 2, (4,)))
    )
    same = Depth(4)
    out["batch_differs"] = _error(
        lambda: torch.compile(same, backend="dynapipe", options={"split_points": ["layers.2"]})(
            torch.randn(8 + 4 * rank, 4)
        )
    )
    out["options_differ"] = _error(
        lambda: torch.compile(same, backend="dynapipe", options={"split_points": [f"layers.{1 + rank}"]})(
            torch.randn(8, 4)
        )
    )
    differs = Depth(4 + rank)  # rank 1 builds a different model: the ranks capture different graphs
    out["ranks_differ"] = _error(
        lambda: torch.compile(differs, backend="dynapipe", options={"split_points": ["layers.2"]})(
            torch.randn(4, 4)
        )
    )
    return out


def test_bad_input_is_a_clear_error() -> None:
    results = run_distributed(bad_input_worker, 2, timeout=180)
    for out in results.values():
        assert "ConfigError: unknown dynapipe option(s) ['n_microbatch']" in out["unknown_option"]
        assert "n_microbatches" in out["unknown_option"]  # lists the valid names
        assert (
            "n_microbatches (3) must divide the batch size (8); use one of [1, 2, 4, 8]"
            in out["not_divisible"]
        )
        assert "world size (2) is not a multiple of the stage count (3)" in out["world_not_multiple"]
        assert "split point 'layer.4' names no module" in out["bad_split_point"]
        assert "did you mean layers.4" in out["bad_split_point"]
        assert "schedule '1f1b' runs 1 stage(s) per rank, not 2" in out["virtual_fixed"], out["virtual_fixed"]
        assert (
            "virtual_stages=2 on 2 pipeline ranks makes 4 stages, but 1 split_points make 2"
            in (out["virtual_count"])
        ), out["virtual_count"]
        assert "PartitionError" in out["too_many_stages"] and "8 stages" in out["too_many_stages"], out[
            "too_many_stages"
        ]
        assert "GraphBreakError" in out["graph_break"]
        assert "test_errors.py" in out["graph_break"] and "torch._dynamo.graph_break()" in out["graph_break"]
        assert "PipelineError: ranks disagree on the partition" in out["ranks_differ"], out["ranks_differ"]
        assert "stage code (hash): rank 0 has" in out["ranks_differ"], out["ranks_differ"]
        assert "batch size: rank 0 has 8; rank 1 has 12" in out["batch_differs"], out["batch_differs"]
        assert "input shapes: rank 0 has ['x']: (8, 4); rank 1 has ['x']: (12, 4)" in out["batch_differs"]
        assert "split_points: rank 0 has ('layers.1',); rank 1 has ('layers.2',)" in out["options_differ"]
        assert out["nested_break"].startswith("GraphBreakError"), out["nested_break"]


def dying_worker(rank: int, world: int, mode: str, victim: int) -> float:
    from models import mlp

    case = mlp(world)
    step = torch.compile(
        case.step,
        backend="dynapipe",
        options={"split_points": case.split_points, "n_microbatches": 4, "timeout_s": 6},
    )
    step(*case.args).backward()  # one good step: everything is set up
    if rank == victim:
        if mode == "dies":
            os._exit(3)
        time.sleep(14)  # stalls: never sends its next activations or gradients
        return 0.0
    start = time.monotonic()
    try:
        step(*case.args)
    except Exception as err:  # noqa: BLE001
        elapsed = time.monotonic() - start
        raise RuntimeError(f"noticed after {elapsed:.1f} seconds: {err}") from err
    raise AssertionError("the step finished although a peer was gone")


@pytest.mark.parametrize("mode", ["dies", "stalls"])
def test_dead_or_stalled_rank_fails_the_others_fast(mode: str) -> None:
    start = time.monotonic()
    results = run_distributed(dying_worker, 2, mode, 1, timeout=90, allow_failure=True)
    message = str(results[0])
    assert "PipelineError: rank 0:" in message and "rank 1" in message, message
    assert "relaunch" in message
    seconds = float(re.search(r"noticed after ([0-9.]+) seconds", message).group(1))
    assert seconds < 20, f"rank 0 needed {seconds:.1f} s to notice"
    assert time.monotonic() - start < 80


def test_every_survivor_names_the_rank_that_died() -> None:
    """Rank 2 of four dies: rank 0, which talks only to ranks 1 and 3, still names rank 2."""
    results = run_distributed(dying_worker, 4, "dies", 2, timeout=120, allow_failure=True)
    for rank in (0, 1, 3):
        message = str(results[rank])
        assert f"PipelineError: rank {rank}:" in message, message
        assert "rank 2 went silent first: it died or hung" in message, message


def rehearsal_failing_worker(rank: int, world: int, victim: int) -> float:
    import contextlib

    from models import mlp

    import dynapipe.runtime.rehearsal as rehearsal

    if rank == victim:  # this rank's rehearsal breaks as it starts, before its peers hear from it

        @contextlib.contextmanager
        def broken(*args):
            raise RuntimeError("the rehearsal broke here")
            yield

        rehearsal.unchanged = broken
    case = mlp(world)
    options = {"split_points": case.split_points, "n_microbatches": 4, "timeout_s": 30, "on_step": print}
    step = torch.compile(case.step, backend="dynapipe", options={**options, "profile": True})
    start = time.monotonic()
    try:
        step(*case.args)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"noticed after {time.monotonic() - start:.1f} seconds: {err}") from err
    raise AssertionError("the step finished although a rank's rehearsal failed")


def test_a_rehearsal_that_fails_on_one_rank_fails_every_rank_fast() -> None:
    results = run_distributed(rehearsal_failing_worker, 2, 1, timeout=120, allow_failure=True)
    assert "RuntimeError: the rehearsal broke here" in str(results[1]), results[1]
    message = str(results[0])
    assert "rank 1" in message and "the rehearsal broke here" in message, message
    seconds = float(re.search(r"noticed after ([0-9.]+) seconds", message).group(1))
    assert seconds < 25, f"rank 0 needed {seconds:.1f} s to notice (its timeout: 30 s)"
