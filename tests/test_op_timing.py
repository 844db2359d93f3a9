"""Timing a graph's operations as a running stage pays them (``dynapipe.cost.profile``, ``calibrate``):
no page faults a stage in its steady state does not take, no gradient made for the timed backward, and
the composition window run as generated code.

    pytest tests/test_op_timing.py
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import dynapipe.cost.profile as profile
from dynapipe.cost import graph_costs, time_ops
from dynapipe.cost.calibrate import _as_code, _window
from dynapipe.cost.runner import call_node
from dynapipe.explain import capture
from dynapipe.graph import grad_modes


def test_calls_that_page_faulted_more_than_the_fewest_are_dropped(monkeypatch) -> None:
    faults = itertools.accumulate([0, 8000, 0, 0, 8000, 0, 0, 8000, 0, 0, 0])  # before and after each call
    seconds = iter([0.035, 0.024, 0.036, 0.025, 0.023])
    monkeypatch.setattr(profile, "_faults", lambda: next(faults))
    monkeypatch.setattr(profile, "timed", lambda fn, device: next(seconds))
    # calls 1 and 3 faulted: the median of the others (24, 25, 23 ms)
    assert profile._steady(lambda: None, 5, torch.device("cpu")) == 0.024


def test_a_timed_backward_does_not_count_making_its_gradient() -> None:
    scale = nn.Parameter(torch.ones(8))
    captured = capture(lambda x: (x * scale).view(-1, 4096 * 8).sum(), (torch.randn(64, 4096, 8),))
    costs = graph_costs(captured)
    view = next(n for n in costs.nodes if n.target == "view")
    made: list = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.ones_like:
                made.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    rounds = 5
    with Count():
        time_ops(captured, costs, {costs.signatures[view]}, rounds=rounds)
    # a view's backward reshapes the gradient it is given: the gradient is made once per phase timed
    # (here the input-gradient phase), not in each of the rounds, where a stage would not pay it
    assert 0 < len(made) < rounds, made


def test_the_composition_window_runs_as_generated_code() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Tanh(), nn.LayerNorm(16))])
    captured = capture(lambda x: model(x).sum(), (torch.randn(8, 16),))
    costs = graph_costs(captured)
    sigs = {s for s in costs.signatures.values() if s}
    window = _window(captured, costs, dict.fromkeys(sigs, (1e-6, 1e-6, 1e-6)))
    assert window
    inside = set(window)
    inputs = list(dict.fromkeys(s for n in window for s in n.all_input_nodes if s not in inside))
    values = {
        n: getattr(captured.gm, str(n.target)) if n.op == "get_attr" else torch.randn(8, 16) for n in inputs
    }
    modes = grad_modes(captured.gm.graph)
    read_after = [n for n in window if any(u not in inside for u in n.users)] or window[-1:]
    expected = dict(values)
    for node in window:
        args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda n: expected[n])
        expected[node] = call_node(node, captured.gm, args, kwargs)
    got = _as_code(captured, window, inputs, read_after, modes)(values)
    for a, b in zip(tree_flatten(got)[0], [expected[n] for n in read_after], strict=True):
        torch.testing.assert_close(a, b)
