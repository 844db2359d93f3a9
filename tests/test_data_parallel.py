"""Pipeline x data parallelism: pp=2 x dp=2 on 4 processes equals one process over the global batch,
for every schedule; GPT-2's tied embedding and LM head stay in sync with and without dp."""

from __future__ import annotations

import pytest
from fixtures import check_coverage, check_runs, check_tied, train_and_compare, train_many
from harness import run_distributed
from models import CASES


def test_pp2_dp2_matches_single_process() -> None:
    """1F1B on the whole model set; the other schedules on the models with skip connections, several
    inputs/outputs and tied weights (a schedule changes only the order of the same per-stage work)."""
    runs = [
        (list(CASES), "1f1b"),
        (["skip", "tied"], "gpipe"),
        (["multi_io", "tied"], "interleaved-1f1b"),
        (["skip", "multi_io", "tied"], "zb-h1"),
    ]
    runs = [
        (
            names,
            {
                "schedule": schedule,
                "n_microbatches": 2,
                "dp_degree": 2,
                "n_stages": 4 if schedule == "interleaved-1f1b" else 2,
            },
        )
        for names, schedule in runs
    ]
    results = run_distributed(train_many, 4, runs, timeout=600)
    check_runs(results, runs)


@pytest.mark.hf
def test_gpt2_tied_embeddings_with_dp() -> None:
    """pp=2 x dp=2 (pp=2 and pp=4 without dp are in test_pipeline.py::test_huggingface_models...)."""
    options = {"schedule": "1f1b", "n_microbatches": 2, "dp_degree": 2}
    results = run_distributed(train_and_compare, 4, ["gpt2"], options, timeout=300)
    check_coverage(results, ["gpt2"])
    check_tied(results, "gpt2", "transformer.wte.weight", 4)


def allreduce_count_worker(rank: int, world: int, schedules: list[str]) -> dict[str, int]:
    import torch
    from models import mlp
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counts = {}
    for schedule in schedules:
        calls = []

        def counting_hook(state, bucket, calls=calls):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        case = mlp(2)
        options = {
            "schedule": schedule,
            "n_microbatches": 4,
            "dp_degree": 2,
            "split_points": case.split_points,
            "ddp_comm_hook": counting_hook,
        }
        step = torch.compile(case.step, backend="dynapipe", options=options)
        for _ in range(3):
            step(*case.args).backward()
        counts[schedule] = len(calls)
    return counts


def test_gradients_all_reduced_once_per_step() -> None:
    """Three steps of four microbatches: one bucket all-reduce per stage per step, not per microbatch,
    also when the weight gradients come late (zero-bubble)."""
    results = run_distributed(allreduce_count_worker, 4, ["1f1b", "zb-h1"], timeout=240)
    assert all(counts == {"1f1b": 3, "zb-h1": 3} for counts in results.values()), results
