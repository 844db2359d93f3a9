"""Schedules as data: builtin tables validate, round-trip through text, lower, and simulate to the
textbook step times; bad tables fail with the offending action and rank.

    python -m pytest tests/test_schedules.py -q
"""

from __future__ import annotations

import functools
import itertools
import re
from types import SimpleNamespace

import pytest

from dynapipe.schedules import (
    SCHEDULES,
    Action,
    Kind,
    ScheduleError,
    StageCost,
    Timeline,
    TimelineEvent,
    format_schedule,
    get_schedule,
    in_flight_per_stage,
    load_schedule,
    lower,
    normalize_table,
    parse_schedule,
    placement_map,
    simulate,
    split_last_backward,
    stage_to_rank,
    validate,
)

RANKS = (1, 2, 3, 4)
MICROBATCHES = (1, 2, 4, 8, 16)
UNIFORM = StageCost(forward=1.0, backward_input=1.0, backward_weight=1.0)


def _stages(name: str, p: int) -> int:
    """Builtins fix their stages per rank; interleaved-1f1b takes the user's v, 2 here."""
    spec = SCHEDULES[name]
    return spec.n_stages(p) if spec.stages_per_rank else spec.n_stages(p, stages_per_rank=2)


def _grid():
    for name, p, m in itertools.product(SCHEDULES, RANKS, MICROBATCHES):
        if name == "interleaved-1f1b" and m % p:
            continue
        yield name, p, m


def _build(name: str, p: int, m: int):
    n = _stages(name, p)
    return SCHEDULES[name].build(n_ranks=p, n_stages=n, n_microbatches=m), n


def _run(
    name: str, p: int, m: int, cost: StageCost = UNIFORM, *, table=None, latency: float = 0.0
) -> Timeline:
    """Simulate with the whole model's cost per microbatch fixed: v chunks per rank each cost 1/v.
    ``table`` replaces the builtin's order (torch's, say)."""
    built, n = _build(name, p, m)
    v = n // p
    per_chunk = StageCost(
        forward=cost.forward / v,
        backward_input=cost.backward_input / v,
        backward_weight=cost.backward_weight / v,
    )
    return simulate(
        built if table is None else table,
        per_chunk,
        n_ranks=p,
        n_stages=n,
        placement=SCHEDULES[name].placement,
        link_latency=latency,
    )


@functools.cache
def _torch_order(name: str, p: int, m: int):
    """torch.distributed.pipelining's compute order for the same schedule, or None where this torch
    cannot build it. Its classes compute every rank's order in the constructor from the stages' sizes
    alone, so stand-in stages (no process group, no module) are enough."""
    try:
        from torch.distributed import pipelining
    except ImportError:
        return None
    classes = {
        "interleaved-1f1b": pipelining.ScheduleInterleaved1F1B,
        "zbv": pipelining.ScheduleZBVZeroBubble,
    }
    n = _stages(name, p)
    local = [s for s in range(n) if stage_to_rank(s, p, n, SCHEDULES[name].placement) == 0]
    sizes = dict(num_stages=n, group_size=p, group_rank=0, submod=None)
    stages = [SimpleNamespace(stage_index=s, is_first=s == 0, is_last=s == n - 1, **sizes) for s in local]
    try:
        order = classes[name](stages, n_microbatches=m).pipeline_order
    except (AttributeError, TypeError, ValueError):
        return None
    return normalize_table({r: [str(a) for a in acts if a is not None] for r, acts in order.items()})


# --- builtin schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,p,m", list(_grid()))
def test_builtin_validates_lowers_and_round_trips(name, p, m):
    spec = SCHEDULES[name]
    table, n = _build(name, p, m)
    lowered = lower(table, p, n, spec.placement)
    validate(lowered, p, n, m, spec.placement)

    compute = [a for acts in table.values() for a in acts if a is not None]
    assert len(compute) == len(set(compute)) == n * m * (3 if spec.splits_backward else 2)
    for rank, acts in lowered.items():
        assert [a for a in acts if a.kind.is_compute] == table[rank]
        assert all(stage_to_rank(a.stage, p, n, spec.placement) == rank for a in acts)
    comm = [a for acts in lowered.values() for a in acts if not a.kind.is_compute]
    sends = sorted(
        (a.stage, a.peer, a.mb, a.kind.value[-1]) for a in comm if a.kind in (Kind.SEND_F, Kind.SEND_B)
    )
    recvs = sorted(
        (a.peer, a.stage, a.mb, a.kind.value[-1]) for a in comm if a.kind in (Kind.RECV_F, Kind.RECV_B)
    )
    assert sends == recvs
    # every chain edge that crosses ranks carries one activation and one gradient per microbatch
    crossing = sum(
        stage_to_rank(s, p, n, spec.placement) != stage_to_rank(s + 1, p, n, spec.placement)
        for s in range(n - 1)
    )
    assert len(sends) == 2 * crossing * m

    assert parse_schedule(format_schedule(table)) == table
    assert parse_schedule(format_schedule(lowered)) == lowered
    if crossing:  # a compute-only table that must talk across ranks is refused, not lowered here
        with pytest.raises(ScheduleError, match=r"has no sends or receives.*lower\(\) returns"):
            validate(table, p, n, m, spec.placement)
    else:
        validate(table, p, n, m, spec.placement)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", list(itertools.product(RANKS, MICROBATCHES)))
def test_fill_drain_and_1f1b_match_textbook_step_time(name, p, m):
    f, b = 1.0, 2.5
    timeline = _run(name, p, m, StageCost(forward=f, backward_input=1.5, backward_weight=1.0))
    assert timeline.makespan == pytest.approx((m + p - 1) * (f + b))
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert timeline.ideal_step_time == pytest.approx(m * (f + b))


@pytest.mark.parametrize("p,m", list(itertools.product(RANKS, MICROBATCHES)))
def test_peak_in_flight_activations(p, m):
    assert _run("gpipe", p, m).peak_in_flight_activations == dict.fromkeys(range(p), m)
    one_f_one_b = _run("1f1b", p, m).peak_in_flight_activations
    assert one_f_one_b == {r: min(p - r, m) for r in range(p)}
    zb = _run("zb-h1", p, m).peak_in_flight_activations
    assert zb[0] == min(p, m) <= p
    assert max(zb.values()) == max(one_f_one_b.values())  # ZB-H1 never exceeds 1F1B's peak
    zbv = _run("zbv", p, m).peak_in_flight_activations
    assert max(zbv.values()) <= 2 * p  # 2p half-size chunks = 1F1B's p whole stages


@pytest.mark.parametrize("name,p,m", list(_grid()))
def test_in_flight_per_stage_is_the_simulated_count(name, p, m):
    """Counted off each rank's list, without timing: the same peaks a simulated step holds per stage."""
    table, n = _build(name, p, m)
    rank_of = placement_map(SCHEDULES[name].placement, n_ranks=p, n_stages=n)
    timeline = simulate(table, StageCost(1, 1, 1), n_ranks=p, n_stages=n, placement=rank_of)
    simulated = {s: timeline.in_flight_activations({s: 1})[rank_of[s]] for s in range(n)}
    counted = in_flight_per_stage(table, rank_of)
    assert counted == simulated
    assert all(1 <= k <= m for k in counted.values())
    if name == "gpipe":
        assert counted == dict.fromkeys(range(n), m)


def test_in_flight_per_stage_holds_activations_until_the_weight_gradient():
    rank_of = {0: 0}
    split = parse_schedule("rank 0: 0F0 0F1 0I0 0I1 0W0 0W1")
    assert in_flight_per_stage(split, rank_of) == {0: 2}
    assert in_flight_per_stage(parse_schedule("rank 0: 0F0 0I0 0W0 0F1 0I1 0W1"), rank_of) == {0: 1}
    assert in_flight_per_stage(parse_schedule("rank 0: 0F0 0B0 0F1 0B1"), rank_of) == {0: 1}


def test_simulate_raises_where_a_table_cannot_complete():
    kwargs = dict(n_ranks=2, n_stages=2, placement="loop")
    crossed = parse_schedule("rank 0: 0F0 0B0 0F1 0B1\nrank 1: 1F1 1B1 1F0 1B0")
    with pytest.raises(ScheduleError, match=r"rank 0 waits at 0B0 for 1B0; rank 1 waits at 1F1 for 0F1"):
        simulate(crossed, UNIFORM, **kwargs)
    with pytest.raises(ScheduleError, match=r"rank 1 waits at 1F1 for 0F1"):
        simulate(parse_schedule("rank 0: 0F0 0B0\nrank 1: 1F0 1B0 1F1 1B1"), UNIFORM, **kwargs)


@pytest.mark.parametrize("p,m", [(p, m) for p, m in itertools.product(RANKS, MICROBATCHES) if p > 1])
def test_zero_bubble_beats_1f1b_when_weight_grads_cost_time(p, m):
    zb, base = _run("zb-h1", p, m).makespan, _run("1f1b", p, m).makespan
    assert zb < base
    if m >= p:  # Qi et al. 2023: ZB-H1's bubble is (p-1)(F + I - W) against 1F1B's (p-1)(F + I + W)
        assert zb == pytest.approx(3 * m + (p - 1) * 1.0)
    assert _run("zbv", p, m).makespan < zb
    no_w = StageCost(forward=1.0, backward_input=2.0, backward_weight=0.0)
    assert _run("zb-h1", p, m, no_w).makespan == pytest.approx(_run("1f1b", p, m, no_w).makespan)


@pytest.mark.parametrize(
    "p,m", [(p, m) for p, m in itertools.product(RANKS, MICROBATCHES) if p > 1 and m % p == 0]
)
def test_interleaved_shrinks_the_bubble_by_v(p, m):
    inter, base = _run("interleaved-1f1b", p, m), _run("1f1b", p, m)
    assert inter.bubble_fraction < base.bubble_fraction
    assert inter.makespan == pytest.approx(3 * m + (p - 1) * 3 / 2)  # v = 2 chunks per rank


LATENCIES = (0.025, 0.1)  # per hop, against a chunk's forward of 0.5: 5% and 20% of it


@pytest.mark.parametrize(
    "p,m", [(p, m) for p, m in itertools.product(RANKS, MICROBATCHES) if p > 1 and m % p == 0]
)
def test_interleaved_warm_up_hides_link_latency(p, m):
    # Megatron's extra p-1-r warm-up forwards leave only the first microbatch's trip down the 2p
    # chunks and back exposed: 2(vp - 1) hops. torch's order (the same, for v = 2) is no faster.
    for latency in LATENCIES:
        ours = _run("interleaved-1f1b", p, m, latency=latency).makespan
        assert ours == pytest.approx(3 * m + (p - 1) * 3 / 2 + 2 * (2 * p - 1) * latency)
        if (theirs := _torch_order("interleaved-1f1b", p, m)) is not None:
            assert ours <= _run("interleaved-1f1b", p, m, table=theirs, latency=latency).makespan + 1e-9
    in_flight = _run("interleaved-1f1b", p, m).peak_in_flight_activations
    assert in_flight == {r: min(p + 2 * (p - 1 - r) + 1, 2 * m) for r in range(p)}


@pytest.mark.parametrize(
    "p,m", [(p, m) for p, m in itertools.product(RANKS, (*MICROBATCHES, 3, 5, 6, 7)) if p > 1]
)
def test_zbv_no_slower_than_torch_under_link_latency(p, m):
    theirs = _torch_order("zbv", p, m)
    if theirs is None:
        pytest.skip("this torch cannot build ScheduleZBVZeroBubble's order from stand-in stages")
    ours, _ = _build("zbv", p, m)
    if m >= 2 * p:
        assert ours == theirs  # the V construction, written independently
    free_first_input = [StageCost(0.5, 0.0 if s == 0 else 0.5, 0.5) for s in range(2 * p)]
    for latency in (0.0, *LATENCIES):
        for cost in (StageCost(0.5, 0.5, 0.5), free_first_input):
            kwargs = dict(n_ranks=p, n_stages=2 * p, placement="v", link_latency=latency)
            assert simulate(ours, cost, **kwargs).makespan <= simulate(theirs, cost, **kwargs).makespan + 1e-9
        # in-flight counts depend on each rank's order only, not on timing: still at most 2p chunks
        assert max(_run("zbv", p, m, latency=latency).peak_in_flight_activations.values()) <= 2 * p


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"])
@pytest.mark.parametrize("p,m", [(p, m) for p, m in itertools.product(RANKS, MICROBATCHES) if m % p == 0])
def test_split_last_backward_sends_the_gradient_before_the_weight_work(name, p, m):
    table, n = _build(name, p, m)
    split = split_last_backward(table)
    validate(lower(split, p, n, SCHEDULES[name].placement), p, n, m, SCHEDULES[name].placement)
    weight_work = [a for acts in split.values() for a in acts if a.kind is Kind.W]
    if SCHEDULES[name].splits_backward:
        assert split == table
    else:  # exactly one I/W pair per stage, for the microbatch whose B came last on its rank
        last_b = {a.stage: a.mb for acts in table.values() for a in acts if a.kind is Kind.B}
        assert sorted((a.stage, a.mb) for a in weight_work) == sorted(last_b.items())
    placement = SCHEDULES[name].placement
    for rank, acts in lower(split, p, n, placement).items():
        for i, a in enumerate(acts):
            if a.kind is Kind.I and a.stage > 0 and stage_to_rank(a.stage - 1, p, n, placement) != rank:
                assert acts[i + 1].kind is Kind.SEND_B  # the gradient leaves before W
    for latency in (0.0, *LATENCIES):
        assert (
            _run(name, p, m, table=split, latency=latency).makespan
            <= _run(name, p, m, latency=latency).makespan + 1e-9
        )


def test_interleaved_needs_microbatches_divisible_by_ranks():
    with pytest.raises(
        ScheduleError, match=r"n_microbatches \(6\) to be a multiple of n_ranks \(4\); use 4, 8"
    ):
        SCHEDULES["interleaved-1f1b"].build(n_ranks=4, n_stages=8, n_microbatches=6)
    with pytest.raises(ScheduleError, match=r"use n_stages=8 for 4 ranks"):
        SCHEDULES["zbv"].build(n_ranks=4, n_stages=4, n_microbatches=4)


def test_small_tables_are_exact():
    assert format_schedule(SCHEDULES["1f1b"].build(n_ranks=2, n_stages=2, n_microbatches=3)) == (
        "rank 0: 0F0 0F1 0B0 0F2 0B1 0B2\nrank 1: 1F0 1B0 1F1 1B1 1F2 1B2"
    )
    assert format_schedule(SCHEDULES["zb-h1"].build(n_ranks=2, n_stages=2, n_microbatches=3)) == (
        "rank 0: 0F0 0F1 0I0 0W0 0F2 0I1 0W1 0I2 0W2\nrank 1: 1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1W2"
    )
    # a receive is posted one compute action ahead of the action that waits for it
    lowered = lower(SCHEDULES["1f1b"].build(n_ranks=2, n_stages=2, n_microbatches=1), 2, 2, "loop")
    assert lowered == parse_schedule(
        "rank 0: 0RECV_B0<-1 0F0 0SEND_F0->1 0B0\nrank 1: 1RECV_F0<-0 1F0 1B0 1SEND_B0->0"
    )


def test_placements():
    assert [stage_to_rank(s, 4, 8, "loop") for s in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [stage_to_rank(s, 4, 8, "v") for s in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    with pytest.raises(ScheduleError, match="unknown placement style 'zigzag'"):
        stage_to_rank(0, 2, 4, "zigzag")


# --- lowering and simulation ------------------------------------------------------------------------


def test_skip_connection_edges_are_lowered_and_timed():
    # rank 0: stages 0, 1, 2; rank 1: stage 3; a skip 0 -> 3 crosses ranks next to the chain edge 2 -> 3
    placement = {0: 0, 1: 0, 2: 0, 3: 1}
    table = parse_schedule("rank 0: 0F0 1F0 2F0 2B0 1B0 0B0\nrank 1: 3F0 3B0")
    lowered = lower(table, 2, 4, placement, edges=[(0, 3)])
    validate(lowered, 2, 4, 1, placement, edges=[(0, 3)])
    assert format_schedule({1: lowered[1]}).split() == (
        "rank 1: 3RECV_F0<-0 3RECV_F0<-2 3F0 3B0 3SEND_B0->0 3SEND_B0->2".split()
    )
    assert lowered[0][:2] == [Action.parse("0F0"), Action.parse("0SEND_F0->3")]
    assert lowered[0][-3:] == [Action.parse("0RECV_B0<-3"), Action.parse("1B0"), Action.parse("0B0")]

    slow_skip = [StageCost(1.0, 1.0, 0.0, send_bytes=b) for b in (4e6, 0, 0, 0)]
    kwargs = dict(n_ranks=2, n_stages=4, placement=placement, link_bandwidth=1e6)
    chain, skip = simulate(table, slow_skip, **kwargs), simulate(table, slow_skip, **kwargs, edges=[(0, 3)])
    chain_start, skip_start = ({e.name: e.start for e in t.events} for t in (chain, skip))
    assert chain_start["3F0"] == 3.0  # after 2F0
    assert skip_start["3F0"] == 5.0  # 0F0 ends at 1.0, plus 4e6 bytes at 1e6 B/s
    with pytest.raises(ScheduleError, match=r"edge \(3, 1\) must satisfy 0 <= producer < consumer"):
        lower(table, 2, 4, placement, edges=[(3, 1)])


def test_each_edge_is_charged_its_own_bytes():
    """A stage that sends a big tensor over a skip and a small one to its neighbour: the neighbour waits
    for the small one only, and the gradient coming back over each edge is that edge's size."""
    table = SCHEDULES["1f1b"].build(n_ranks=3, n_stages=3, n_microbatches=1)
    costs = [
        StageCost(1.0, 1.0, 0.0, send_bytes=4e6, index=0, sends={1: 1000, 2: 4e6}),
        StageCost(1.0, 1.0, 0.0, send_bytes=1000, index=1, sends={2: 1000}),
        StageCost(1.0, 1.0, 0.0, index=2),
    ]
    kwargs = dict(n_ranks=3, n_stages=3, placement="loop", link_bandwidth=1e6, edges=[(0, 2)])
    start = {e.name: e.start for e in simulate(table, costs, **kwargs).events}
    assert start["1F0"] == pytest.approx(1.001)  # 1000 bytes, not the 4e6 the skip carries
    assert start["2F0"] == pytest.approx(5.0)  # the skip: 0F0 ends at 1.0, plus 4e6 bytes at 1e6 B/s
    assert start["1B0"] == pytest.approx(7.001)  # 2B0 ends at 7.0; its gradient to stage 1 is 1000 bytes
    assert start["0B0"] == pytest.approx(11.0)  # the skip's gradient: 2B0 ends at 7.0, plus 4 s


def test_link_latency_and_timeline_exports():
    table = SCHEDULES["1f1b"].build(n_ranks=2, n_stages=2, n_microbatches=1)
    timeline = simulate(
        table, StageCost(1.0, 0.5, 0.5), n_ranks=2, n_stages=2, placement="loop", link_latency=0.5
    )
    assert [(e.rank, e.name, e.start, e.end) for e in timeline.events] == [
        (0, "0F0", 0.0, 1.0),
        (1, "1F0", 1.5, 2.5),
        (1, "1B0", 2.5, 3.5),
        (0, "0B0", 4.0, 5.0),
    ]
    assert timeline.bubble_fraction == pytest.approx(1 - 4 / 10)

    trace = timeline.to_chrome_trace()
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["pid"], e["name"], e["ts"], e["dur"]) for e in slices][-1] == (0, "0B0", 4e6, 1e6)
    assert {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"} == {"rank 0", "rank 1"}

    # the runtime records one rank at a time, with comm events and the step's own work mixed in:
    # metrics cover just that rank's compute actions
    recorded = Timeline([e for e in timeline.events if e.rank == 1])
    recorded.events.insert(0, TimelineEvent(1, "1RECV_F0<-0", 0.0, 1.5))
    recorded.events.append(TimelineEvent(1, "wait for sends", 3.5, 4.0, kind="step"))
    assert recorded.ranks == [1]
    assert recorded.busy_time(1) == 2.0
    assert recorded.peak_in_flight_activations == {1: 1}
    assert recorded.bubble_fraction == pytest.approx(1 - 2 / 4.0)
    assert [e.action for e in recorded.events] == [
        Action.parse("1RECV_F0<-0"), Action.parse("1F0"), Action.parse("1B0"), None
    ]  # fmt: skip
    kinds = {
        e["name"]: (e["cat"], e["args"]["kind"])
        for e in recorded.to_chrome_trace()["traceEvents"]
        if e["ph"] == "X"
    }
    assert kinds == {
        "1RECV_F0<-0": ("comm", "action"), "1F0": ("F", "action"), "1B0": ("B", "action"),
        "wait for sends": ("step", "step"),
    }  # fmt: skip
    with pytest.raises(ScheduleError, match=r"'wait for sends' on rank 1 is no action.*kind='step'"):
        TimelineEvent(1, "wait for sends", 0.0, 1.0)


# --- bad schedules ----------------------------------------------------------------------------------

BAD = {
    "missing backward": (
        "rank 0: 0F0 0F1 0B0\nrank 1: 1F0 1B0 1F1 1B1",
        2,
        r"0F1 on rank 0 has no backward: add 0B1",
    ),
    "deadlock": (
        "rank 0: 0F0 0B0 0F1 0B1\nrank 1: 1F1 1B1 1F0 1B0",
        2,
        r"deadlock: 0B0 on rank 0 waits at 0RECV_B0<-1 for 1B0 from rank 1; "
        r"1F1 on rank 1 waits at 1RECV_F1<-0 for 0F1 from rank 0",
    ),
    "wrong rank": (
        "rank 0: 0F0 1F0 0B0\nrank 1: 1B0",
        1,
        r"1F0 on rank 0: stage 1 lives on rank 1 under placement 'loop'",
    ),
    "W before I": ("rank 0: 0F0 0W0 0I0\nrank 1: 1F0 1I0 1W0", 1, r"0W0 on rank 0 runs before its own 0I0"),
    "I without W": ("rank 0: 0F0 0I0\nrank 1: 1F0 1B0", 1, r"0I0 on rank 0 has no 0W0"),
    "duplicate": ("rank 0: 0F0 0F0 0B0\nrank 1: 1F0 1B0", 1, r"0F0 on rank 0 appears twice"),
    "B and W mixed": ("rank 0: 0F0 0B0 0W0\nrank 1: 1F0 1B0", 1, r"0W0 on rank 0: .* already has 0B0"),
    "backward first": ("rank 0: 0B0 0F0\nrank 1: 1F0 1B0", 1, r"0B0 on rank 0 runs before its own 0F0"),
    "missing forward": (
        "rank 0: 0F0 0B0\nrank 1: 1B0",
        1,
        r"stage 1 has no forward of microbatch 0: add 1F0 to rank 1",
    ),
    "missing rank": ("rank 0: 0F0 0B0", 1, r"n_ranks is 2: add ranks \[1\]"),
    "bad microbatch": (
        "rank 0: 0F0 0B0 0F5\nrank 1: 1F0 1B0",
        1,
        r"0F5 on rank 0: microbatch 5 is outside 0..0",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_schedules_name_the_action_and_rank(case):
    text, m, message = BAD[case]
    table = parse_schedule(text)
    if case == "deadlock":  # only a lowered table is replayed; the others fail before the replay
        table = lower(table, 2, 2, "loop")
    with pytest.raises(ScheduleError, match=message):
        validate(table, 2, 2, m, "loop")


def test_local_order_across_stages_of_one_rank():
    with pytest.raises(
        ScheduleError, match=r"0B0 on rank 0 runs before 1B0, the backward of its consumer stage 1"
    ):
        validate(parse_schedule("rank 0: 0F0 1F0 0B0 1B0"), 1, 2, 1, "loop")
    with pytest.raises(
        ScheduleError, match=r"1F0 on rank 0 runs before 0F0, the forward of its producer stage 0"
    ):
        validate(parse_schedule("rank 0: 1F0 0F0 1B0 0B0"), 1, 2, 1, "loop")


def test_hand_lowered_tables_are_checked_as_written():
    lowered = lower(SCHEDULES["1f1b"].build(n_ranks=2, n_stages=2, n_microbatches=2), 2, 2, "loop")
    no_recv = {r: [a for a in acts if a.kind is not Kind.RECV_B] for r, acts in lowered.items()}
    with pytest.raises(ScheduleError, match=r"0B0 on rank 0 needs 0RECV_B0<-1 before it"):
        validate(no_recv, 2, 2, 2, "loop")
    no_send = {0: lowered[0], 1: [a for a in lowered[1] if a.kind is not Kind.SEND_B]}
    with pytest.raises(ScheduleError, match=r"rank 1 finished without sending it; add 1SEND_B0->0 after 1B0"):
        validate(no_send, 2, 2, 2, "loop")


def test_forward_only_tables():
    table = {r: [Action(r, Kind.F, k) for k in range(4)] for r in range(2)}
    lowered = lower(table, 2, 2, "loop")
    assert lowered[1][0] == Action.parse("1RECV_F0<-0")
    assert validate(lowered, 2, 2, 4, "loop", forward_only=True) is None
    with pytest.raises(ScheduleError, match=r"0F0 on rank 0 has no backward"):
        validate(lowered, 2, 2, 4, "loop")


# --- user schedules ---------------------------------------------------------------------------------

USER_TEXT = """
# a hand-written 1F1B for 2 ranks and 3 microbatches
rank 0: 0F0 0F1 0B0 0F2 0B1 _   0B2
rank 1: -   1F0 1B0 1F1 1B1 1F2 1B2
"""


def test_user_schedule_as_text_and_csv(tmp_path):
    table = parse_schedule(USER_TEXT)
    assert table[0][5] is None and table[1][0] is None
    validate(lower(table, 2, 2, "loop"), 2, 2, 3, "loop")

    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("rank 0,0F0,0F1,0B0,0F2,0B1,,0B2\nrank 1,,1F0,1B0,1F1,1B1,1F2,1B2,,\n")
    assert load_schedule(csv_path) == table
    txt_path = tmp_path / "mine.txt"
    txt_path.write_text(USER_TEXT)
    assert load_schedule(txt_path) == table

    for given in (
        USER_TEXT,
        str(txt_path),
        csv_path,
        {0: [str(a) if a else None for a in table[0]], 1: table[1]},
    ):
        spec = get_schedule(given)
        built = spec.build(n_ranks=2, n_stages=2, n_microbatches=3)
        assert built == table
        validate(lower(built, 2, 2, spec.placement), 2, 2, 3, spec.placement)
    assert get_schedule(csv_path).placement == {0: 0, 1: 1}


def test_user_schedule_as_callable_and_builtin_names():
    def reversed_gpipe(n_ranks, n_stages, n_microbatches):
        mbs = range(n_microbatches)
        return {r: [f"{r}F{k}" for k in mbs] + [f"{r}B{k}" for k in reversed(mbs)] for r in range(n_ranks)}

    spec = get_schedule(reversed_gpipe)
    assert (spec.name, spec.placement, spec.splits_backward) == ("reversed_gpipe", "loop", None)
    table = spec.build(n_ranks=3, n_stages=3, n_microbatches=4)
    validate(lower(table, 3, 3, spec.placement), 3, 3, 4, spec.placement)
    assert simulate(table, UNIFORM, n_ranks=3, n_stages=3, placement="loop").makespan == pytest.approx(6 * 3)

    assert get_schedule("ZB_H1") is SCHEDULES["zb-h1"]
    assert get_schedule("1F1B", placement="v").placement == "v"
    assert SCHEDULES["interleaved-1f1b"].n_stages(4, stages_per_rank=3) == 12
    assert SCHEDULES["interleaved-1f1b"].n_stages(4) == 8  # two per rank unless virtual_stages says
    assert SCHEDULES["zbv"].n_stages(4) == 8
    assert SCHEDULES["1f1b"].n_stages(4) == 4 and get_schedule(reversed_gpipe).n_stages(4) == 4
    with pytest.raises(ScheduleError, match=r"'zbv' runs 2 stage\(s\) per rank, not 3"):
        SCHEDULES["zbv"].n_stages(4, stages_per_rank=3)
    with pytest.raises(ScheduleError, match=r"unknown schedule 'pipedream': use one of \['1f1b', 'gpipe'"):
        get_schedule("pipedream")


def test_action_text_form():
    every_kind = [Action(2, kind, 7, 3 if kind.is_p2p else None) for kind in Kind]
    assert [str(a) for a in every_kind] == [
        "2F7", "2B7", "2I7", "2W7", "2SEND_F7->3", "2RECV_F7<-3", "2SEND_B7->3", "2RECV_B7<-3", "2REDUCE7",
    ]  # fmt: skip
    assert [Action.parse(str(a)) for a in every_kind] == every_kind
    for bad in ("F0", "0X1", "2SEND_F0<-3", "0F0->1", "2RECV_B1", "1REDUCE0->2"):
        with pytest.raises(ScheduleError, match=re.escape(repr(bad))):
            Action.parse(bad)
    with pytest.raises(ScheduleError, match=r"line 2: cannot read action '0Q1'"):
        parse_schedule("rank 0: 0F0\nrank 1: 0Q1")


# --- what the runtime runs: REDUCE markers, torch.distributed.pipelining's CSV -------------------------


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "interleaved-1f1b", "zbv"])
def test_reduce_sits_right_before_each_stages_last_weight_work(name):
    p, m = 2, 4
    table, n = _build(name, p, m)
    placement = SCHEDULES[name].placement
    lowered = lower(split_last_backward(table), p, n, placement, reduce_stages=range(n))
    validate(lowered, p, n, m, placement)
    for rank, acts in lowered.items():
        compute = [a for a in acts if a.kind.is_compute]
        for stage in {a.stage for a in compute}:
            reduces = [i for i, a in enumerate(acts) if a.kind is Kind.REDUCE and a.stage == stage]
            assert len(reduces) == 1, f"{name}: stage {stage} on rank {rank}"
            nxt = next(a for a in acts[reduces[0] + 1 :] if a.kind.is_compute and a.stage == stage)
            last = [a for a in compute if a.stage == stage and a.kind in (Kind.B, Kind.W)][-1]
            assert nxt == last and acts[reduces[0]].mb == last.mb
    early = {r: list(acts) for r, acts in lowered.items()}
    first = next(i for i, a in enumerate(early[0]) if a.kind is Kind.REDUCE)
    marker = early[0].pop(first)
    early[0].insert(0, marker)  # armed before the stage's first backward: DDP would reduce too soon
    with pytest.raises(ScheduleError, match=rf"{marker} on rank 0 must come right before stage"):
        validate(early, p, n, m, placement)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("dp", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_nccl_tables_issue_every_pair_in_one_order_and_cannot_deadlock(name, dp, skip):
    """Over NCCL each rank issues its sends and receives in one global order, and the validator's NCCL
    replay (groups one at a time, a pair matched in issue order) runs it to the end."""
    spec = SCHEDULES[name]
    for p, m in ((2, 4), (3, 6), (4, 8)):
        table, n = _build(name, p, m)
        edges = [(0, n - 1)] if skip else None
        table = split_last_backward(table) if dp else table
        reduce = range(n) if dp else ()
        lowered = lower(table, p, n, spec.placement, edges, in_issue_order=True, reduce_stages=reduce)
        validate(lowered, p, n, m, spec.placement, edges, in_issue_order=True)
        rank_of = placement_map(spec.placement, n_ranks=p, n_stages=n)
        sent: dict[tuple[int, int], list] = {}
        received: dict[tuple[int, int], list] = {}
        for rank, acts in lowered.items():
            for a in acts:
                if a.kind in (Kind.SEND_F, Kind.SEND_B):
                    sent.setdefault((rank, rank_of[a.peer]), []).append(
                        (a.kind.value[-1], a.stage, a.peer, a.mb)
                    )
                elif a.kind in (Kind.RECV_F, Kind.RECV_B):
                    received.setdefault((rank_of[a.peer], rank), []).append(
                        (a.kind.value[-1], a.peer, a.stage, a.mb)
                    )
        assert sent == received, f"{name} p={p}: a pair of ranks sees its messages in two orders"
        assert [a for acts in lowered.values() for a in acts if a.kind.is_compute] == [
            a for acts in table.values() for a in acts if a is not None
        ]


def test_nccl_replay_refuses_what_gloo_runs():
    """Receives posted right before each action run over gloo (matched by tag) but not over NCCL:
    interleaved 1F1B deadlocks on the groups, and ZBV receives a pair's messages out of order."""
    spec = SCHEDULES["interleaved-1f1b"]
    table, n = _build("interleaved-1f1b", 2, 4)
    eager = lower(table, 2, n, spec.placement, receive_ahead=0)
    validate(eager, 2, n, 4, spec.placement)
    with pytest.raises(ScheduleError, match=r"deadlock over NCCL.*rank 0 waits to compute"):
        validate(eager, 2, n, 4, spec.placement, in_issue_order=True)

    spec = SCHEDULES["zbv"]
    table, n = _build("zbv", 2, 4)
    eager = lower(table, 2, n, spec.placement, receive_ahead=0)
    validate(eager, 2, n, 4, spec.placement)
    with pytest.raises(
        ScheduleError, match=r"rank 0's send #3 to rank 1 is 0SEND_F2->1, but rank 1's receive #3"
    ):
        validate(eager, 2, n, 4, spec.placement, in_issue_order=True)


def test_torch_pipelining_csv_both_ways(tmp_path):
    from torch.distributed.pipelining import schedules as tdp

    from dynapipe.schedules import dump_torch_csv

    p, m = 2, 4
    for name in ("1f1b", "interleaved-1f1b", "zb-h1"):
        table, n = _build(name, p, m)
        rank_of = placement_map(SCHEDULES[name].placement, n_ranks=p, n_stages=n)
        # ours -> torch: every cell reads as torch's action; torch lowers it with its own policy
        path = tmp_path / f"{name}.csv"
        dump_torch_csv(table, path)
        theirs = {r: [tdp._Action.from_str(c) for c in row] for r, row in enumerate(_csv_rows(path))}
        assert {r: [str(a) for a in acts] for r, acts in theirs.items()} == {
            r: [str(a) for a in acts] for r, acts in table.items()
        }
        lowered_by_torch = tdp._add_send_recv(theirs, rank_of.__getitem__, n)
        # torch -> ours: its lowered table (sends and receives without peers) is replayed as written
        path.write_text(
            "\n".join(",".join(str(a) for a in acts) for _, acts in sorted(lowered_by_torch.items()))
        )
        loaded = load_schedule(path)
        assert any(a.kind.is_p2p for acts in loaded.values() for a in acts)
        validate(loaded, p, n, m, rank_of)
        # and our own lowered table goes out with its peers dropped, and comes back the same
        ours = lower(table, p, n, rank_of)
        dump_torch_csv(ours, path)
        assert load_schedule(path) == ours
    with pytest.raises(ScheduleError, match="skips stages"):
        dump_torch_csv(lower(parse_schedule("rank 0: 0F0 0B0\nrank 1: 1F0 2F0 2B0 1B0"), 2, 3,
                             {0: 0, 1: 1, 2: 1}, edges=[(0, 2)]), tmp_path / "skip.csv")  # fmt: skip
    with pytest.raises(ScheduleError, match="has no action that arms DDP"):
        dump_torch_csv({0: [Action.parse("0F0"), Action.parse("0REDUCE0"), Action.parse("0B0")]}, path)
    path.write_text("0F0,0UNSHARD,0B0\n")
    with pytest.raises(ScheduleError, match="no dynapipe counterpart"):
        load_schedule(path)


def _csv_rows(path):
    import csv

    with open(path, newline="") as handle:
        return [[c for c in row if c] for row in csv.reader(handle)]
