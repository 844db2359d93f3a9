"""Pipeline x data parallelism: pp=2 x dp=2 on 4 processes equals one process over the global batch,
for every schedule; GPT-2's tied embedding and LM head stay in sync with and without dp."""

from __future__ import annotations

import pytest

from harness import run_distributed
from models import CASES
from test_pipeline import _check_coverage, train_and_compare


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"])
def test_pp2_dp2_matches_single_process(schedule: str) -> None:
    stages = 4 if schedule == "interleaved-1f1b" else 2
    options = {"schedule": schedule, "n_microbatches": 2, "dp_degree": 2, "n_stages": stages}
    names = list(CASES)
    results = run_distributed(train_and_compare, 4, names, options, timeout=300)
    _check_coverage(results, names)


@pytest.mark.parametrize(("world", "dp"), [(2, 1), (4, 1), (4, 2)])
def test_gpt2_tied_embeddings(world: int, dp: int) -> None:
    options = {"schedule": "1f1b", "n_microbatches": 2, "dp_degree": dp}
    results = run_distributed(train_and_compare, world, ["gpt2"], options, timeout=300)
    _check_coverage(results, ["gpt2"])
    holders = [r for r, out in results.items() if "transformer.wte.weight" in out["gpt2"]]
    assert len(holders) == dp * 2, f"the tied embedding should live on the first and last stage: {holders}"
