"""The automatic plan against brute force: on graphs small enough to try every choice of k - 1 cut
positions along the chain (at most 40 positions, k <= 4), the plan's predicted step is within 2% of the
shortest predicted step of any of them in which every stage does some work, costed and simulated
the same way (explain()'s numbers).

    pytest tests/test_partition_search.py
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
from fixtures import stage_records

from dynapipe.config import PipelineConfig
from dynapipe.cost import Rates, graph_costs
from dynapipe.errors import ConfigError
from dynapipe.explain import capture
from dynapipe.partition.bottleneck import min_bottleneck
from dynapipe.partition.chain import Chain
from dynapipe.plan import Explanation, plan_pipeline, predict_step
from dynapipe.schedules import get_schedule

BATCH, SEQ, N_MICRO = 8, 64, 4
MAX_POSITIONS = 40


class Hourglass(nn.Module):
    """Wide and narrow layers: a cut after a narrow one sends 8x fewer bytes, the widest layers weigh
    16x the narrowest, so balance and bytes pull the cuts different ways."""

    def __init__(self, widths=(1024, 1024, 128, 1024, 1024, 128, 512, 1024, 128, 1024)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x.square().mean()


class Residual(nn.Module):
    """Residual blocks of uneven width, with a skip from the input to the last block (read there only)."""

    def __init__(self, width: int = 512, hidden=(2048, 256, 1024, 2048, 512)) -> None:
        super().__init__()
        self.ups = nn.ModuleList(nn.Linear(width, h) for h in hidden)
        self.downs = nn.ModuleList(nn.Linear(h, width) for h in hidden)

    def forward(self, x):
        first = x
        for up, down in zip(self.ups, self.downs, strict=True):
            x = x + down(torch.relu(up(x)))
        return (x * first).mean()


def _plan_and_best(model: nn.Module, width: int, n_stages: int, schedule: str):
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, width)
    captured = capture(model, (x,), n_microbatches=N_MICRO)
    spec = get_schedule(schedule)
    config = PipelineConfig(n_stages=n_stages, n_microbatches=N_MICRO, schedule=schedule)
    plan = plan_pipeline(captured, config, spec=spec, n_ranks=n_stages, n_stages=n_stages)
    assert plan.costs is not None
    planned = predict_step(plan, stage_records(captured, plan.stage_of, costs=plan.costs)).makespan
    chain = Chain(captured, plan.costs, (), n_stages, N_MICRO)
    assert n_stages - 1 <= len(chain.allowed) <= MAX_POSITIONS
    steps = []
    for cuts in itertools.combinations(chain.allowed, n_stages - 1):
        ends = [*cuts, len(chain.nodes) - 1]
        if any(chain.last_busy[end] <= start for start, end in zip([-1, *cuts], ends, strict=True)):
            continue  # a stage that computes nothing (only a relu): not what anyone asks k stages for
        stage_of = {node: sum(1 for c in cuts if i > c) for i, node in enumerate(chain.nodes)}
        records = stage_records(captured, stage_of, costs=plan.costs)
        steps.append(predict_step(plan, records).makespan)
    return planned, min(steps), max(steps)


@pytest.mark.parametrize(
    ("model", "width"), [(Hourglass(), 1024), (Residual(), 512)], ids=["hourglass", "residual"]
)
@pytest.mark.parametrize(("n_stages", "schedule"), [(2, "1f1b"), (3, "1f1b"), (4, "1f1b"), (4, "gpipe")])
def test_plan_is_within_two_percent_of_the_best_split(model, width, n_stages, schedule):
    planned, best, worst = _plan_and_best(model, width, n_stages, schedule)
    assert worst > 1.2 * best, "the graph is too even for the search to mean anything"
    assert planned <= 1.02 * best, f"planned step {planned:.3e} s, best of every split {best:.3e} s"


@pytest.mark.parametrize(
    ("model", "width"), [(Hourglass(), 1024), (Residual(), 512)], ids=["hourglass", "residual"]
)
def test_balance_slack_bounds_the_slowest_stage(model, width):
    """By default the step decides, and with few microbatches a heavier first stage shortens it; with
    ``balance_slack`` no stage may be slower than the best balance by more than that share."""
    torch.manual_seed(0)
    captured = capture(model, (torch.randn(BATCH, SEQ, width),), n_microbatches=N_MICRO)
    spec = get_schedule("1f1b")

    def slowest_over_best(balance_slack):
        config = PipelineConfig(n_stages=4, n_microbatches=N_MICRO, balance_slack=balance_slack)
        plan = plan_pipeline(captured, config, spec=spec, n_ranks=4, n_stages=4)
        assert plan.costs is not None
        shown = str(Explanation.of(captured, plan))
        assert ("heavier: predicted step" in shown and "(balance_slack=0.03)" in shown) == (
            balance_slack is None
        ), shown
        chain = Chain(captured, plan.costs, (), 4, N_MICRO)
        best = min_bottleneck(chain, float("inf"), chain.allowed)
        return max(c.time_s for c in stage_records(captured, plan.stage_of, costs=plan.costs)) / best

    assert slowest_over_best(None) > 1.05  # the default trades balance for a shorter step here
    assert slowest_over_best(0.02) <= 1.02 + 1e-9


def test_balance_slack_is_validated() -> None:
    for bad in (-0.1, "3%", True):
        with pytest.raises(ConfigError, match="balance_slack must be a number >= 0"):
            PipelineConfig(balance_slack=bad)
    captured = capture(Residual(), (torch.randn(BATCH, SEQ, 512),), n_microbatches=N_MICRO)
    config = PipelineConfig(n_stages=2, split_points=["downs.2"], balance_slack=0.03)
    with pytest.raises(
        ConfigError, match="balance_slack shapes the automatic partition, but the stages are given"
    ):
        plan_pipeline(captured, config, spec=get_schedule("1f1b"), n_ranks=2, n_stages=2)


class _ThreeBlocks(nn.Module):
    """Three equal residual blocks: two stages balance best cut inside the middle block, where the
    stream and the block's hidden activation both cross (two tensors, two gradients back)."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.ups = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.downs = nn.ModuleList(nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        for up, down in zip(self.ups, self.downs, strict=True):
            x = x + down(torch.relu(up(x)))
        return x.square().mean()


def test_messages_cost_their_cpu_and_the_plan_sends_fewer() -> None:
    """Where every message costs CPU at both ends (measured on CPU processes: ``Rates.message_s``), a cut
    that sends two tensors is dearer than one that sends one: the plan moves to a block boundary. Slow
    compute (1 GFLOP/s), so that balance, not the link, decides without the messages' cost."""
    torch.manual_seed(0)
    captured = capture(_ThreeBlocks(), (torch.randn(16, SEQ, 256),), n_microbatches=16)
    config = PipelineConfig(n_stages=2, n_microbatches=16)

    def plan_at(message_s: float):
        rates = Rates(flop_rate=1e9, memory_bandwidth=1e9, message_s=message_s)
        plan = plan_pipeline(
            captured,
            config,
            spec=get_schedule("1f1b"),
            n_ranks=2,
            n_stages=2,
            costs=lambda captured, config: graph_costs(captured, optimizer=config.optimizer, rates=rates),
        )
        assert plan.costs is not None
        return plan, stage_records(captured, plan.stage_of, costs=plan.costs)

    free, free_stages = plan_at(0.0)
    assert dict(free_stages[0].messages) == {1: 2}  # messages cost nothing: the balanced cut, mid-block
    dear, dear_stages = plan_at(0.01)
    assert (dict(dear_stages[0].messages), dict(dear_stages[0].grad_messages)) == ({1: 1}, {1: 1})

    def seconds(plan, name: str) -> float:  # one action's simulated time in the plan's step
        return next(e.end - e.start for e in predict_step(plan, dear_stages).events if e.name == name)

    for name in ("0F0", "1F0", "1B0", "0B0"):  # each end pays its message, forward and backward
        assert seconds(dear, name) == pytest.approx(seconds(free, name) + 0.01)
