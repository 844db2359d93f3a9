"""Pipelined training equals one process: loss, every gradient and the parameters after optimizer steps."""

from __future__ import annotations

import pytest
from fixtures import check_coverage, check_tied, train_and_compare
from harness import run_distributed
from models import CASES


def _assert_matched(results: dict, names: list[str], steps: int = 2) -> None:
    """Every rank compared each step's loss with one process (equal), and the ranks together compared
    the gradient of every parameter of the model."""
    for name in names:
        for rank, out in results.items():
            losses = out[name + ":losses"]
            assert len(losses) == steps, f"{name}: rank {rank} compared {len(losses)} losses, not {steps}"
            for pipelined, single in losses:
                assert pipelined == pytest.approx(single, rel=1.3e-6, abs=1e-5), (
                    f"{name}: rank {rank} {losses}"
                )
        compared = set().union(*(out[name + ":compared"] for out in results.values()))
        every = set(results[0][name + ":all"])
        assert compared == every, f"{name}: gradients never compared: {sorted(every - compared)}"


# Schedules beyond these two are checked in test_schedule_runtime.py; here every model on both widths.
@pytest.mark.parametrize(("world", "schedule"), [(2, "gpipe"), (4, "1f1b")])
def test_small_models_match_single_process(world: int, schedule: str) -> None:
    names = list(CASES)
    results = run_distributed(
        train_and_compare, world, names, {"schedule": schedule, "n_microbatches": 4}, timeout=240
    )
    _assert_matched(results, names)
    check_coverage(results, names)
    check_tied(results, "tied", "embed.weight", 2)


@pytest.mark.hf
@pytest.mark.parametrize(("world", "names"), [(2, ["llama", "gpt2", "opt", "bloom"]), (4, ["llama", "gpt2"])])
def test_huggingface_models_match_single_process(world: int, names: list[str]) -> None:
    results = run_distributed(
        train_and_compare, world, names, {"schedule": "1f1b", "n_microbatches": 4}, timeout=300
    )
    _assert_matched(results, names)
    check_coverage(results, names)
    if "gpt2" in names:
        check_tied(results, "gpt2", "transformer.wte.weight", 2)


@pytest.mark.hf
def test_automatic_partition_matches_single_process() -> None:
    names = ["skip", "tied", "llama"]
    options = {"schedule": "1f1b", "n_microbatches": 4, "split_points": ()}
    results = run_distributed(train_and_compare, 2, names, options, timeout=300)
    _assert_matched(results, names)
    check_coverage(results, names)


@pytest.mark.hf
def test_more_huggingface_families_with_automatic_partition() -> None:
    """Qwen2 (GQA), T5 (encoder-decoder) and BERT (classification), cut by the automatic partitioner."""
    names = ["qwen2", "t5", "bert"]
    results = run_distributed(train_and_compare, 2, names, {"n_microbatches": 4}, timeout=300)
    _assert_matched(results, names)
    check_coverage(results, names)
