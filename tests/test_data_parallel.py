"""Pipeline x data parallelism: pp=2 x dp=2 on 4 processes equals one process over the global batch,
for every schedule; GPT-2's tied embedding and LM head stay in sync with and without dp."""

from __future__ import annotations

import pytest

from harness import run_distributed
from models import CASES
from test_pipeline import _check_coverage, _check_tied, train_and_compare


# 1F1B on the whole model set; the other schedules on the models with skip connections, several
# inputs/outputs and tied weights (the schedule changes only the order of the same per-stage work).
@pytest.mark.parametrize(
    ("schedule", "names"),
    [("1f1b", list(CASES)), ("gpipe", ["skip", "tied"]), ("interleaved-1f1b", ["multi_io", "tied"]),
     ("zb-h1", ["skip", "multi_io", "tied"])],
)
def test_pp2_dp2_matches_single_process(schedule: str, names: list[str]) -> None:
    stages = 4 if schedule == "interleaved-1f1b" else 2
    options = {"schedule": schedule, "n_microbatches": 2, "dp_degree": 2, "n_stages": stages}
    results = run_distributed(train_and_compare, 4, names, options, timeout=300)
    _check_coverage(results, names)


# pp=2 without dp is in test_pipeline.py::test_huggingface_models_match_single_process.
@pytest.mark.parametrize(("world", "dp"), [(4, 1), (4, 2)])
def test_gpt2_tied_embeddings(world: int, dp: int) -> None:
    options = {"schedule": "1f1b", "n_microbatches": 2, "dp_degree": dp}
    results = run_distributed(train_and_compare, world, ["gpt2"], options, timeout=300)
    _check_coverage(results, ["gpt2"])
    _check_tied(results, "gpt2", "transformer.wte.weight", 2 * dp)
