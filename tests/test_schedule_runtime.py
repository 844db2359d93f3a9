"""Every shipped schedule gives the single-process loss and gradients, and 1F1B-style schedules bound the
activations alive at once on stage 0 (read from the runtime, not the simulator)."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from models import CASES
from test_pipeline import _check_runs, train_many


@pytest.mark.parametrize(
    ("world", "runs"),
    [
        (
            2,
            [
                ("zb-h1", 1, list(CASES)),
                ("interleaved-1f1b", 2, ["skip", "multi_io", "tied"]),
                ("zbv", 2, list(CASES)),
            ],
        ),
        (4, [("zb-h1", 1, ["skip", "tied"]), ("interleaved-1f1b", 2, ["mlp"]), ("zbv", 2, ["mlp"])]),
    ],
)
def test_schedules_match_single_process(world: int, runs: list) -> None:
    runs = [
        (names, {"schedule": schedule, "n_microbatches": 4, "n_stages": world * per_rank})
        for schedule, per_rank, names in runs
    ]
    results = run_distributed(train_many, world, runs, timeout=600)
    _check_runs(results, runs)


def inflight_worker(rank: int, world: int, schedules: list[str]) -> dict[str, int]:
    from models import mlp

    peaks = {}
    for schedule in schedules:
        case = mlp(world)
        reports = []
        step = torch.compile(
            case.step,
            backend="dynapipe",
            options={
                "schedule": schedule,
                "n_microbatches": 8,
                "split_points": case.split_points,
                "on_step": reports.append,
            },
        )
        step(*case.args).backward()
        assert len(reports) == 1 and reports[0].train and reports[0].timeline.events
        peaks[schedule] = reports[0].peak_inflight.get(0, -1)
    return peaks


def test_inflight_activations_on_stage_zero() -> None:
    results = run_distributed(inflight_worker, 4, ["gpipe", "1f1b", "zb-h1"], timeout=180)
    peaks = results[0]  # rank 0 holds stage 0
    assert peaks["gpipe"] == 8
    assert 1 <= peaks["1f1b"] <= 4
    assert 1 <= peaks["zb-h1"] <= 4
