"""The cost model on tiny modules, in one process: FLOPs per phase, state and activation bytes, symbolic
sizes, autocast, profiling, caching, and per-stage sums.

    pytest tests/test_cost.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from dynapipe.cost import fit_link, graph_costs, stage_costs
from dynapipe.cost.records import NodeCost
from dynapipe.explain import capture
from dynapipe.graph import compute_nodes
from dynapipe.schedules import Kind, StageCost
from dynapipe.schedules.simulate import PhaseCost

BATCH = 16


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8, bias=False))


def _linears(costs) -> list[NodeCost]:
    return [c for n, c in costs.nodes.items() if n.target is torch._C._nn.linear]


@pytest.mark.parametrize("n_microbatches", [2, 4])
def test_linear_flops_are_2_b_in_out_and_backward_splits_into_input_and_weight(n_microbatches):
    model = _mlp()
    captured = capture(lambda x: model(x).sum(), (torch.randn(BATCH, 16),), n_microbatches=n_microbatches)
    b = BATCH // n_microbatches
    first, second = _linears(graph_costs(captured))
    # the first reads the input, which needs no gradient: its backward is the weight gradient only
    assert (first.forward_flops, first.backward_input_flops, first.backward_weight_flops) == (
        2 * b * 16 * 24,
        0,
        2 * b * 16 * 24,
    )
    assert (second.forward_flops, second.backward_input_flops, second.backward_weight_flops) == (
        (2 * b * 24 * 8,) * 3
    )
    assert second.flops == 3 * second.forward_flops  # the record's total: forward + backward
    assert second.time_s == pytest.approx(second.forward + second.backward_input + second.backward_weight)


def test_estimated_time_is_the_roofline_of_flops_and_bytes_moved():
    model = _mlp()
    captured = capture(lambda x: model(x).sum(), (torch.randn(BATCH, 16),), n_microbatches=2)
    compute_bound = graph_costs(captured, flop_rate=1e9, memory_bandwidth=1e30)
    for c in _linears(compute_bound):
        assert c.forward == pytest.approx(c.forward_flops / 1e9)
        assert c.backward_weight == pytest.approx(c.backward_weight_flops / 1e9)
    (tanh,) = [n for n in compute_bound.nodes if n.target is torch.tanh]
    assert compute_bound.nodes[tanh].flops == 0 and compute_bound.nodes[tanh].moved_bytes > 0
    slow, fast = (graph_costs(captured, memory_bandwidth=bw).nodes[tanh] for bw in (1e9, 2e9))
    assert slow.forward > 0 and slow.forward == pytest.approx(
        2 * fast.forward
    )  # memory-bound: bytes / bandwidth


@pytest.mark.parametrize(("optimizer", "copies"), [("adamw", 2), ("sgd", 1), ("none", 0)])
def test_state_bytes_are_parameter_gradient_and_optimizer_copies(optimizer, copies):
    model = _mlp()
    model[2].weight.requires_grad_(False)  # frozen: no gradient, no optimizer state
    captured = capture(lambda x: model(x).sum(), (torch.randn(BATCH, 16),), n_microbatches=2)
    costs = graph_costs(captured, optimizer=optimizer)
    by_name = {captured.state_names[str(n.target)]: b for n, b in costs.state_bytes.items()}
    trained = {"0.weight": 16 * 24 * 4, "0.bias": 24 * 4}
    assert by_name == {
        **{name: (b, b, copies * b) for name, b in trained.items()},
        "2.weight": (24 * 8 * 4, 0, 0),
    }


def test_inference_graph_has_no_gradient_or_optimizer_state():
    model = _mlp()

    def step(x):
        with torch.no_grad():
            return model(x).sum()

    captured = capture(step, (torch.randn(BATCH, 16),), n_microbatches=2)
    costs = graph_costs(captured)
    assert costs.state_bytes and all(g == o == 0 < p for p, g, o in costs.state_bytes.values())
    assert all(c.backward_input_flops == c.backward_weight_flops == 0 for c in costs.nodes.values())


def test_sizes_are_symbolic_and_activation_bytes_scale_with_the_microbatch():
    model = _mlp()
    halves, quarters = (
        capture(lambda x: model(x).sum(), (torch.randn(BATCH, 16),), n_microbatches=m) for m in (2, 4)
    )
    big, small = graph_costs(halves), graph_costs(quarters)
    assert big.buffer_names == small.buffer_names and big.buffer_bytes
    *rows, loss = big.buffer_bytes
    assert (
        rows == [2 * b for b in small.buffer_bytes[:-1]] and loss == small.buffer_bytes[-1] == 4
    )  # a scalar
    for (n, c), s in zip(big.nodes.items(), small.nodes.values(), strict=True):
        if isinstance(n.meta["example_value"], torch.Tensor) and n.meta["example_value"].dim() == 2:
            (symbol,) = c.out_bytes_expr.free_symbols  # the batch size, one expression for any microbatch
            assert c.out_bytes_expr.subs(symbol, BATCH // 2) == c.out_bytes == 2 * s.out_bytes
            assert s.out_bytes_expr.subs(symbol, BATCH // 4) == s.out_bytes


class _Mixed(nn.Module):
    def __init__(self, autocast: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.autocast = nn.Linear(32, 64), nn.Linear(64, 32), autocast

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            h = self.b(torch.relu(self.a(x)))
        return h.float().sum()


def test_autocast_region_saves_activations_in_its_dtype_and_keeps_state_in_float32():
    x = torch.randn(BATCH, 32)
    records = {}
    for autocast in (False, True):
        captured = capture(_Mixed(autocast), (x,), n_microbatches=2)
        costs = graph_costs(captured)
        (records[autocast],) = stage_costs(
            captured, dict.fromkeys(compute_nodes(captured.gm.graph), 0), costs
        )
        assert [c.forward_flops for c in _linears(costs)] == [2 * 8 * 32 * 64, 2 * 8 * 64 * 32]
    plain, mixed = records[False], records[True]
    assert mixed.param_bytes == plain.param_bytes == 4 * (32 * 64 + 64 + 64 * 32 + 32)  # state: float32
    # kept for backward: x (by a), relu's output (by relu and b, once), in float32 ...
    assert plain.activation_bytes == 8 * 32 * 4 + 8 * 64 * 4
    # ... and in the region's bfloat16, plus the bf16 copy of b's weight its input gradient needs
    assert mixed.activation_bytes == 8 * 32 * 2 + 8 * 64 * 2 + 64 * 32 * 2


def test_costs_are_cached_per_options_and_profiling_replaces_only_times():
    model = _mlp()
    captured = capture(lambda x: model(x).sum(), (torch.randn(BATCH, 16),), n_microbatches=2)
    estimated = graph_costs(captured)
    assert graph_costs(captured) is estimated
    assert graph_costs(captured, optimizer="sgd") is not estimated
    profiled = graph_costs(captured, profile=True, rounds=1)
    assert graph_costs(captured, profile=True, rounds=1) is profiled  # not measured again
    assert profiled.profiled and not estimated.profiled
    for (n, e), p in zip(estimated.nodes.items(), profiled.nodes.values(), strict=True):
        assert p.measured
        same = ("forward_flops", "backward_input_flops", "backward_weight_flops", "out_bytes", "saves")
        assert all(getattr(p, f) == getattr(e, f) for f in same), n.name
    linears = _linears(profiled)
    assert all(c.forward > 0 for c in linears)
    assert any(c.forward != e.forward for c, e in zip(linears, _linears(estimated), strict=True))


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4])
def test_stage_costs_sum_node_costs(n_stages):
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(24, 24), nn.Tanh())])
    captured = capture(lambda x: model(x).sum(), (torch.randn(BATCH, 24),), n_microbatches=2)
    costs = graph_costs(captured)
    nodes = compute_nodes(captured.gm.graph)
    stage_of = {n: i * n_stages // len(nodes) for i, n in enumerate(nodes)}
    stages = stage_costs(captured, stage_of, costs)
    assert [s.index for s in stages] == list(range(n_stages))
    assert sum(s.n_nodes for s in stages) == len(nodes)
    whole, summed = PhaseCost.total(costs.nodes.values()), PhaseCost.total(stages)
    for field in dataclasses.fields(PhaseCost):
        assert getattr(summed, field.name) == pytest.approx(getattr(whole, field.name)), field.name
    for s in stages:
        mine = PhaseCost.total(costs.nodes[n] for n in nodes if stage_of[n] == s.index)
        assert s.flops == mine.flops and s.time_s == pytest.approx(mine.time_s)
    assert sum(s.param_bytes for s in stages) == sum(p.numel() * 4 for p in model.parameters())
    assert all(s.next_bytes == 8 * 24 * 4 for s in stages[:-1])  # one hidden state of the microbatch
    assert stages[-1].next_bytes == 0


def test_node_and_stage_costs_share_one_phase_record():
    node = NodeCost(
        forward=1.0, backward_input=2.0, backward_weight=4.0, forward_flops=3, backward_input_flops=5
    )
    stage = StageCost(1.0, 2.0, 4.0, forward_flops=3, backward_input_flops=5)
    assert isinstance(node, PhaseCost) and isinstance(stage, PhaseCost)
    phases = {f.name for f in dataclasses.fields(PhaseCost)}
    assert {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.name in phases} == {
        f.name: getattr(stage, f.name) for f in dataclasses.fields(stage) if f.name in phases
    }
    assert [stage.duration(k) for k in (Kind.F, Kind.I, Kind.W, Kind.B)] == [1.0, 2.0, 4.0, 6.0]
    assert (
        node.duration(Kind.B) == 6.0 and node.time_s == stage.time_s == 7.0 and node.flops == stage.flops == 8
    )


def test_link_fit_is_a_line_through_two_sizes_and_survives_noise():
    """Latency and bandwidth from the medians at a small and a large size; each round a rank sends one
    message and receives one, so a message's CPU is half a round's. Where noise makes the large size no
    slower than the small one, the large message's whole time counts as bandwidth (never infinite)."""
    small, large = 4 << 10, 1 << 20
    rounds = [(small, 1e-4 + small / 1e9, 2e-5), (large, 1e-4 + large / 1e9, 3e-5)] * 3
    latency, bandwidth, message = fit_link(rounds)
    assert (
        latency == pytest.approx(1e-4) and bandwidth == pytest.approx(1e9) and message == pytest.approx(1e-5)
    )
    latency, bandwidth, _ = fit_link([(small, 2e-3, 0.0), (large, 1e-3, 0.0)])
    assert latency == 2e-3 and bandwidth == pytest.approx(large / 1e-3)
