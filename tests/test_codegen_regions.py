"""Stages cut inside ``torch.autocast`` regions, and stages whose first op writes a received tensor in place.

The captured graph records ``with torch.autocast(...)`` as an enter call whose context its exit reads; each
stage re-enters the regions it starts inside and exits those it ends inside, and the pair is never a value
that crosses stages. A stage that modifies a received boundary in place (``nn.ReLU(inplace=True)`` right
after a split point) clones it first: the runtime makes received boundaries autograd leaves.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from fixtures import assign_balanced
from harness import run_distributed

from dynapipe.codegen import build_stages
from dynapipe.errors import PartitionError
from dynapipe.explain import capture
from dynapipe.graph import compute_nodes
from dynapipe.partition import assign_by_split_points

BATCH = 8
# bf16 keeps 8 bits of mantissa; microbatching changes what the matmuls round, so compare at its precision
BF16 = {"rtol": 2e-2, "atol": 2e-2}


class AutocastNet(nn.Module):
    """bf16 autocast around the step, a float32 (autocast-off) region nested in it holding a no_grad region.
    ``fp32`` reads only the input inside the float32 region and feeds the loss in float32: its gradients
    see no bf16 rounding, so they must match one process as float32 does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fp32 = nn.Linear(8, 16), nn.Linear(8, 16)
        self.c, self.d = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.tanh(self.a(x))
            with torch.autocast("cpu", enabled=False):
                g = self.fp32(x)
                with torch.no_grad():
                    scale = g.abs().mean(-1, keepdim=True)  # per row: microbatches see the same
            h = self.c(h) * scale
            loss = F.cross_entropy(self.d(h).float(), y)
        return loss + g.square().mean()


class InPlaceNet(nn.Module):
    """In-place ops that start a stage when split at ``act`` (``F.relu(x, inplace=True)``) or at ``shift``
    (``x += b``), as torchvision's VGG ``features.N`` ReLUs do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 16)
        self.shift = Shift(16)
        self.d = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.b(self.act(self.a(x)))
        return F.cross_entropy(self.d(self.shift(h)), y)


class Shift(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1, 1, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h += self.bias
        return h


MODELS = {"autocast": AutocastNet, "inplace": InPlaceNet}


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def train_and_compare(rank: int, world: int, runs: list[tuple[str, dict]], steps: int = 2) -> list[str]:
    """Each run: a model trained pipelined and on one process over ``steps`` SGD steps, loss and every
    owned parameter's gradient compared (bf16 tolerance under autocast, float32 where no bf16 reaches)."""
    done = []
    for name, options in runs:
        torch.manual_seed(0)
        pipe = MODELS[name]()
        torch.manual_seed(0)
        ref = MODELS[name]()
        step = torch.compile(
            pipe, backend="dynapipe", options={"n_microbatches": 2, "timeout_s": 60, **options}
        )
        opt = torch.optim.SGD(pipe.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        x, y = _inputs()
        for i in range(steps):
            loss = step(x, y)
            loss.backward()
            ref_loss = ref(x, y)
            ref_loss.backward()
            # the forward runs the same ops on the same rows as one process: before any bf16 gradient has
            # moved the weights apart, the loss matches to float32 precision
            tol = BF16 if name == "autocast" and i > 0 else {}
            torch.testing.assert_close(
                loss, ref_loss, **tol, msg=lambda m: f"{name} {options} step {i} loss: {m}"
            )
            ref_params = dict(ref.named_parameters())
            owned = {n: p for n, p in pipe.named_parameters() if p.untyped_storage().nbytes() > 0}
            assert owned and len(owned) < len(ref_params), f"{name}: rank {rank} owns {sorted(owned)}"
            for pname, p in owned.items():
                exact = name != "autocast" or pname.startswith("fp32.")
                got = p.grad if p.grad is not None else torch.zeros_like(p)
                torch.testing.assert_close(
                    got,
                    ref_params[pname].grad,
                    **({} if exact else BF16),
                    msg=lambda m: f"{name} {options} step {i} grad {pname}: {m}",
                )
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
        done.append(name)
    return done


def test_autocast_regions_across_stages_match_single_process() -> None:
    runs = [
        ("autocast", {"split_points": ["c"]}),  # the bf16 region spans the split
        ("autocast", {"split_points": ["fp32"]}),  # stage 1 starts in float32 nested in bf16, then no_grad
        ("autocast", {}),  # the automatic partition cuts inside the region
    ]
    results = run_distributed(train_and_compare, 2, runs, timeout=180)
    assert all(r == ["autocast"] * 3 for r in results.values())


def test_in_place_op_right_after_a_split_point_matches_single_process() -> None:
    runs = [
        ("inplace", {"split_points": ["act"], "schedule": "1f1b"}),
        ("inplace", {"split_points": ["act"], "schedule": "zb-h1"}),  # backward split into input and weight
        ("inplace", {"split_points": ["shift"], "schedule": "zb-h1"}),
    ]
    results = run_distributed(train_and_compare, 2, runs, timeout=180)
    assert all(r == ["inplace"] * 3 for r in results.values())


# ---------------------------------------------------------------------------------- one process, FX level


def _run_stages(plans, inputs):
    received = {}
    for plan in plans:
        out = plan.module(*[inputs[i] for i in plan.inputs], *[received[b.name] for b in plan.receives])
        assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled(), (
            f"stage {plan.index} leaks state"
        )
        received.update(zip((b.name for b in plan.sends), out, strict=False))
    return out


def _calls(plan) -> list[fx.Node]:
    return [n for n in plan.module.graph.nodes if n.op in ("call_function", "call_method")]


@pytest.fixture(scope="module")
def autocast_capture():
    torch.manual_seed(0)
    return capture(AutocastNet(), _inputs(), n_microbatches=2)


def test_stage_starting_inside_autocast_enters_it_first(autocast_capture) -> None:
    cap = autocast_capture
    enters = [n for n in cap.gm.graph.nodes if n.target is torch.amp.autocast_mode._enter_autocast]
    assert [e.args for e in enters] == [("cpu", torch.bfloat16, True, None), ("cpu", None, False, None)]
    plans = build_stages(cap, assign_by_split_points(cap, ["fp32"]), 2)
    calls = _calls(plans[1])
    # both regions re-entered, outermost first, with their own arguments, before any work; exited at the end
    assert [c.target for c in calls[:2]] == [torch.amp.autocast_mode._enter_autocast] * 2
    assert [c.args for c in calls[:2]] == [e.args for e in enters]
    exits = [c for c in calls if c.target is torch.amp.autocast_mode._exit_autocast]
    assert [e.args for e in exits] == [(calls[1],), (calls[0],)], "exits innermost first"
    assert _calls(plans[0])[-1].target is torch.amp.autocast_mode._exit_autocast, "stage 0 ends inside bf16"
    assert "_enter_autocast('cpu', torch.bfloat16, True, None)" in plans[1].module.code
    assert all(b.dtype in (torch.float32, torch.bfloat16) for b in plans[0].sends)
    # every node runs under the state it was traced under: the stages compute what the graph computes
    x, y = _inputs()
    inputs = [x[: BATCH // 2], y[: BATCH // 2]]
    torch.testing.assert_close(_run_stages(plans, inputs), cap.gm(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("n_stages", [2, 3, 4])
def test_automatic_partition_cuts_inside_autocast(autocast_capture, n_stages: int) -> None:
    cap = autocast_capture
    plans = build_stages(cap, assign_balanced(cap, n_stages), n_stages)
    for plan in plans[1:]:
        assert _calls(plan)[0].target is torch.amp.autocast_mode._enter_autocast
    x, y = _inputs()
    inputs = [x[: BATCH // 2], y[: BATCH // 2]]
    torch.testing.assert_close(_run_stages(plans, inputs), cap.gm(*inputs), rtol=0, atol=0)


@pytest.fixture(scope="module")
def inplace_capture():
    torch.manual_seed(0)
    return capture(InPlaceNet(), _inputs(), n_microbatches=2)


@pytest.mark.parametrize(("split", "cloned"), [("act", "linear"), ("b", None), ("shift", "h"), ("d", None)])
def test_clone_only_received_inputs_written_in_place(inplace_capture, split: str, cloned: str | None) -> None:
    plans = build_stages(inplace_capture, assign_by_split_points(inplace_capture, [split]), 2)
    clones = [n for n in _calls(plans[1]) if n.target == "clone"]
    assert [c.args[0].name for c in clones] == ([cloned] if cloned else [])
    if cloned:
        assert clones[0] is _calls(plans[1])[0], "the clone comes before any use"
    assert not any(n.target == "clone" for n in _calls(plans[0]))


def test_first_stage_input_written_in_place_is_not_cloned() -> None:
    def step(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return torch.tanh(x).exp().sum()

    cap = capture(step, (torch.randn(BATCH, 4),), n_microbatches=2)
    plans = build_stages(cap, assign_by_split_points(cap, [2]), 2)
    assert not any(n.target == "clone" for plan in plans for n in _calls(plan))


def test_write_a_later_stage_would_miss_is_an_error() -> None:
    """``h.add_(1)`` on stage 1 changes h, which stage 2 reads afterwards from its own copy (from stage 0)."""
    torch.manual_seed(0)
    a, b, d = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def step(x: torch.Tensor) -> torch.Tensor:
        h = a(x)
        h.add_(1)
        g = b(h)
        return d(g + h).sum()

    cap = capture(step, (torch.randn(BATCH, 8),), n_microbatches=2)
    names = [n.name for n in compute_nodes(cap.gm.graph)]
    add_, plus = names.index("add_"), names.index("add")
    with pytest.raises(
        PartitionError, match=r"add_ \(stage 1\) modifies h in place, but add reads h after it on stage 2"
    ):
        build_stages(cap, assign_by_split_points(cap, [add_, plus]), 3)
    plans = build_stages(cap, assign_by_split_points(cap, [add_]), 2)  # reader on the writing stage: fine
    x = torch.randn(BATCH // 2, 8)
    torch.testing.assert_close(_run_stages(plans, [x]), cap.gm(x), rtol=0, atol=0)


def test_input_written_in_place_and_read_on_a_later_stage_is_an_error() -> None:
    """Every stage reads the inputs straight from the microbatch: stage 1 would miss stage 0's write."""

    def step(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return torch.tanh(x).sum() + x.sum()

    cap = capture(step, (torch.randn(BATCH, 4),), n_microbatches=2)
    with pytest.raises(PartitionError, match=r"mul_ \(stage 0\) modifies l_x_ in place, .* share a stage"):
        build_stages(cap, assign_by_split_points(cap, [2]), 2)


def test_write_through_one_received_view_that_another_copy_would_miss_is_an_error() -> None:
    """A view and its base cross as two boundaries, two buffers on the receiving stage: a write through the
    view never reaches the base's copy, which the stage reads afterwards."""
    torch.manual_seed(0)
    a, d = nn.Linear(8, 8), nn.Linear(8, 3)

    def step(x: torch.Tensor) -> torch.Tensor:
        h = a(x)
        v = h.view(-1)
        v.mul_(2)
        return d(h).sum()

    cap = capture(step, (torch.randn(BATCH, 8),), n_microbatches=2)
    names = [n.name for n in compute_nodes(cap.gm.graph)]
    with pytest.raises(
        PartitionError, match=r"stage 1 receives h and v as separate copies, so linear_1 misses"
    ):
        build_stages(cap, assign_by_split_points(cap, [names.index("mul_")]), 2)
    plans = build_stages(cap, assign_by_split_points(cap, [names.index("v")]), 2)  # only h crosses: one copy
    assert [b.name for b in plans[1].receives] == ["h"] and _calls(plans[1])[0].target == "clone"
    x = torch.randn(BATCH // 2, 8)
    torch.testing.assert_close(_run_stages(plans, [x]), cap.gm(x), rtol=0, atol=0)
