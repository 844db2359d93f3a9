"""Every shipped schedule gives the single-process loss and gradients, and 1F1B-style schedules bound the
activations alive at once on stage 0 (read from the runtime, not the simulator)."""

from __future__ import annotations

import pytest
import torch
from fixtures import check_runs, train_many
from harness import run_distributed
from models import CASES


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
    if world == 2:  # virtual_stages and no split points: the partitioner cuts four stages for two ranks
        options = {
            "schedule": "interleaved-1f1b",
            "virtual_stages": 2,
            "split_points": [],
            "n_microbatches": 4,
        }
        runs.append((["mlp"], {**options, "n_stages": 4}))  # n_stages here sizes the test model only
    results = run_distributed(train_many, world, runs, timeout=600)
    check_runs(results, runs)


def in_flight_worker(rank: int, world: int, schedules: list[str]) -> dict[str, int]:
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
        # the timeline records every action of the table that ran, sends and receives included
        ran = sorted(str(a) for a in reports[0].actions if a is not None)
        recorded = sorted(e.name for e in reports[0].timeline.events if e.kind == "action")
        assert ran == recorded and any("RECV" in a for a in ran) and any("SEND" in a for a in ran)
        named = {e.name for e in reports[0].timeline.events} - set(ran)
        assert named >= {"refresh shared state", "wait for sends", "receive outputs"}, named
        peaks[schedule] = reports[0].peak_in_flight.get(0, -1)
    return peaks


def test_in_flight_activations_on_stage_zero() -> None:
    results = run_distributed(in_flight_worker, 4, ["gpipe", "1f1b", "zb-h1"], timeout=180)
    peaks = results[0]  # rank 0 holds stage 0
    assert peaks["gpipe"] == 8
    assert 1 <= peaks["1f1b"] <= 4
    assert 1 <= peaks["zb-h1"] <= 4


CUSTOM_1F1B = """
rank 0: 0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3
rank 1: 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3
"""
# rank 0 waits for 0B0 before sending 0F1's activation; rank 1 waits for 1F1 before 1B0: a cycle
DEADLOCKED = """
rank 0: 0F0 0B0 0F1 0B1
rank 1: 1F1 1F0 1B0 1B1
"""


def _torch_lowered() -> str:
    """CUSTOM_1F1B lowered by torch.distributed.pipelining (its sends and receives, its order), as its CSV."""
    import os
    import tempfile

    from torch.distributed.pipelining import schedules as tdp

    from dynapipe.schedules import parse_schedule

    compute = {
        r: [tdp._Action.from_str(str(a)) for a in acts] for r, acts in parse_schedule(CUSTOM_1F1B).items()
    }
    lowered = tdp._add_send_recv(compute, lambda stage: stage, 2)
    # the same path on every rank (ranks compare their options), each rank writing it whole
    path = os.path.join(tempfile.gettempdir(), f"dynapipe-test-torch-1f1b-{os.getppid()}.csv")
    mine = f"{path}.{os.getpid()}"
    with open(mine, "w") as handle:
        handle.write("\n".join(",".join(str(a) for a in acts) for _, acts in sorted(lowered.items())))
    os.replace(mine, path)
    return path


def custom_schedule_worker(rank: int, world: int) -> dict:
    from dynapipe.schedules import Action, Kind

    def my_gpipe(n_ranks: int, n_stages: int, n_microbatches: int) -> dict:
        return {
            r: [Action(r, Kind.F, m) for m in range(n_microbatches)]
            + [Action(r, Kind.B, m) for m in reversed(range(n_microbatches))]
            for r in range(n_ranks)
        }

    out = {}
    for label, schedule in (("text", CUSTOM_1F1B), ("callable", my_gpipe), ("torch csv", _torch_lowered())):
        out[label] = train_many(
            rank, world, [(["skip", "tied"], {"schedule": schedule, "n_microbatches": 4})]
        )
    from models import mlp

    case = mlp(2)
    step = torch.compile(
        case.step,
        backend="dynapipe",
        options={"schedule": DEADLOCKED, "n_microbatches": 2, "split_points": case.split_points},
    )
    try:
        step(*case.args)
        out["deadlocked"] = "no error"
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        out["deadlocked"] = f"{type(err).__name__}: {err}"
    return out


def test_custom_schedules_run_and_a_deadlocking_one_is_rejected() -> None:
    results = run_distributed(custom_schedule_worker, 2, timeout=300)
    for label in (
        "text",
        "callable",
        "torch csv",
    ):  # numerics were asserted in the workers; every parameter was owned
        check_runs({r: out[label] for r, out in results.items()}, [(["skip", "tied"], {})])
    for out in results.values():
        message = out["deadlocked"]
        assert message.startswith("ScheduleError") and "deadlock" in message and "rank" in message, message


def in_issue_order_worker(rank: int, world: int, runs: list) -> list[dict]:
    """The NCCL way of posting (each receive right before its action, the sends and receives between two
    compute actions issued as one batch_isend_irecv), run over gloo: the same numbers as one process."""
    from dynapipe.runtime.comm import Comm

    Comm.in_issue_order = property(lambda self: True)  # type: ignore[method-assign,assignment]
    return train_many(rank, world, runs)


def test_batched_point_to_point_as_over_nccl_matches_single_process() -> None:
    runs = [
        (["skip", "tied"], {"schedule": "1f1b", "n_microbatches": 4}),
        (["mlp"], {"schedule": "zb-h1", "n_microbatches": 4}),
        (["mlp"], {"schedule": "interleaved-1f1b", "n_microbatches": 4, "n_stages": 4}),
    ]
    results = run_distributed(in_issue_order_worker, 2, runs, timeout=300)
    check_runs(results, runs)
