"""A job restarted after a rank died comes back every time and resumes exactly.

torchrun's agent (and ``dynapipe.launch``, which does the same) hosts the store the ranks meet in and keeps
it across restarts, so keys of the dead attempt are still there when the next one starts: the group
dynapipe starts and its failure reports must read only their own attempt's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

import dynapipe
from dynapipe.launch import LaunchError, launch
from dynapipe.runtime.comm import Comm, ensure_process_group, restart_attempt

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def rejoin_worker(rank: int, world: int, how: str, attempts: int) -> list[float]:
    """``attempts`` restarts in one pair of processes, over the launcher's store as torchrun's workers
    share its agent's: each attempt forms the group, all-reduces and destroys it, which closes its
    sockets as a dead process's are. From attempt 1 on, rank 0 joins 0.5 s after rank 1 began to, so
    rank 1 looks for rank 0's address while only the previous attempt's is in the store."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout=timedelta(seconds=30)
    )
    sums = []
    for attempt in range(attempts):
        os.environ["TORCHELASTIC_RESTART_COUNT"] = str(attempt)
        if rank == 1:
            store.set(f"test/rank 1 joins attempt {attempt}", "")
        else:
            store.wait([f"test/rank 1 joins attempt {attempt}"])
            time.sleep(0.5)
        if how == "dynapipe":
            ensure_process_group(torch.device("cpu"), 10)
        else:  # what a script that starts the group itself does
            dist.init_process_group("gloo", timeout=timedelta(seconds=5))
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)
        sums.append(total.item())
        dist.destroy_process_group()
    return sums


def test_restarted_group_forms_when_rank_0_arrives_late() -> None:
    assert run_distributed(rejoin_worker, 2, "dynapipe", 8, timeout=90) == {0: [3.0] * 8, 1: [3.0] * 8}


@pytest.mark.slow
def test_a_plain_group_in_the_same_restarts_fails() -> None:
    """The control: the order above fails without the attempt in the keys. Whether the early rank
    connects (and finds the dead port) or waits depends on how the two ports compare, so some of 8
    attempts fail (each passes with about 1/3 chance)."""
    results = run_distributed(rejoin_worker, 2, "plain", 8, timeout=90, allow_failure=True)
    errors = [str(r) for r in results.values() if isinstance(r, Exception)]
    assert errors, results
    assert any("connectFullMesh" in e for e in errors), errors


def stale_report_worker(rank: int, world: int) -> str:
    """Both ranks leave a report in attempt 0; in attempt 1, over the same store, rank 0 stays silent
    while rank 1 reports losing it."""
    os.environ["TORCHELASTIC_RESTART_COUNT"] = "0"
    ensure_process_group(torch.device("cpu"), 20)
    comm = Comm(timedelta(seconds=20))
    comm.report_failure("raised ValueError: in attempt 0", learn=False)
    dist.barrier()
    os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"
    if rank == 0:
        time.sleep(4)
        return ""
    return comm.report_failure("lost rank 0", peer=0)


def test_a_failure_after_a_restart_blames_the_rank_that_failed_in_it() -> None:
    message = run_distributed(stale_report_worker, 2, timeout=90)[1]
    assert message.startswith("rank 0 went silent first"), message
    assert "attempt 0" not in message, message


def always_fails() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError(f"attempt {restart_attempt()}")


def test_launch_restarts_every_rank_then_reports_the_last_attempt() -> None:
    with pytest.raises(LaunchError, match=r"rank\(s\) 1 failed after 1 restart") as err:
        launch(always_fails, nproc=2, timeout=120, max_restarts=1)
    assert "ValueError: attempt 1" in err.value.failures[1], err.value.failures[1]
    assert err.value.results == {0: None}


def test_resume_starts_at_0_then_at_the_saved_step(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    assert dynapipe.resume(tmp_path, model) == 0
    dynapipe.save_checkpoint(tmp_path / "step-3", model, extra={"step": 3})
    saved = model.weight.detach().clone()
    fresh = torch.nn.Linear(3, 2)
    assert not torch.equal(fresh.weight, saved)
    assert dynapipe.resume(tmp_path, fresh) == 3
    assert torch.equal(fresh.weight, saved)
    dynapipe.save_checkpoint(tmp_path / "no-step", model)
    with pytest.raises(dynapipe.ConfigError, match=r"no step to resume from.*extra=\{'step': n"):
        dynapipe.resume(tmp_path, fresh)


def _restart_example():
    sys.path.insert(0, str(EXAMPLES))
    import restart

    return restart


def test_torchrun_restarts_a_killed_rank_and_resumes_exactly(tmp_path) -> None:
    """examples/restart.py under torchrun --max-restarts 1: rank 1 is SIGKILLed as step 3 begins, saving
    every 2 steps; the job resumes at step 2 and ends equal, bitwise, to an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = ["--steps", "6", "--every", "2", "--kill-at", "3", "--out", str(tmp_path)]
    proc = subprocess.run(
        [*command, "--max-restarts", "1", str(EXAMPLES / "restart.py"), *args],
        capture_output=True, text=True, timeout=150, env=env,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr[-4000:]}"
    assert "rank 1: killed as step 3 begins" in out, out
    done = [(int(a), int(s)) for a, s in re.findall(r"attempt (\d): step (\d+) done", out)]
    assert [s for a, s in done if a == 1] == [2, 3, 4, 5], out  # resumed from step-2: one step again
    assert max(s for a, s in done if a == 0) == 2, out
    assert os.readlink(tmp_path / "killed" / "latest") == "step-6"

    restart = _restart_example()
    launch(restart.train, str(tmp_path / "straight"), 6, 2, 1, None, nproc=2, timeout=120)
    resumed = restart.final_state(str(tmp_path / "killed" / "latest"))
    straight = restart.final_state(str(tmp_path / "straight" / "latest"))
    assert resumed.keys() == straight.keys() and len(straight) == 10 * 4  # 10 parameters, 3 AdamW states
    untrained = restart.make_model().state_dict()
    assert all(not torch.equal(straight[k], v) for k, v in untrained.items())
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), f"{key} differs after the restart"


@pytest.mark.slow
def test_pp_by_dp_restart_resumes_exactly(tmp_path) -> None:
    """4 ranks, 2 stages x 2 replicas, restarted by dynapipe.launch: the example's own check."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["--nproc", "4", "--dp", "2", "--steps", "5", "--kill-at", "3", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "restart.py"), *args],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "after a kill and restart vs uninterrupted -> match" in proc.stdout, proc.stdout
    assert "attempt 1: step 2 done" in proc.stdout, proc.stdout


def test_a_save_killed_before_latest_moved_is_saved_again(tmp_path) -> None:
    """A save killed after its folder was renamed into place but before ``latest`` pointed at it: the
    restart resumes from ``latest`` and saves that step again over the unpublished folder; a published
    checkpoint is never overwritten."""
    import dynapipe

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    dynapipe.save_checkpoint(tmp_path / "step-2", model, extra={"step": 2})
    dynapipe.save_checkpoint(tmp_path / "step-4", model, extra={"step": 4})
    os.replace(tmp_path / "latest", tmp_path / "old")  # the killed save's state: latest still at step-2
    os.symlink("step-2", tmp_path / "latest")
    with torch.no_grad():
        model.weight.add_(1.0)
    dynapipe.save_checkpoint(tmp_path / "step-4", model, extra={"step": 4})  # the restart's save
    assert os.readlink(tmp_path / "latest") == "step-4"
    fresh = torch.nn.Linear(4, 4)
    assert dynapipe.load_checkpoint(tmp_path / "latest", fresh) == {"step": 4}
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)
    with pytest.raises(dynapipe.ConfigError, match="exists already"):
        dynapipe.save_checkpoint(tmp_path / "step-2", model, extra={"step": 2})
