"""Plans in this machine's seconds (``options["rates"]``, ``dynapipe.cost.Rates``): measured by every rank
at once when a pipeline is built, cached per machine, nominal or loaded; explain() plans for the machine
it is told about.

The prediction test states its tolerance: the plan's step within 0.4x-2.5x of the median measured step of
a 2-rank Llama on this 2-core machine, wide enough for a machine whose load changes between measuring and
running (nominal rates are off by two orders of magnitude here). Closer
figures (within 15% for the demo and ``benchmarks/bench_models.py``'s rows) are measured by that
benchmark, on a quiet machine, not asserted by a test.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import pytest
import torch
from harness import run_distributed
from models import HF_CASES

import dynapipe
from dynapipe.builder.rates import cache_path
from dynapipe.builder.rehearsed import CHECKED_STEPS
from dynapipe.cost import NOMINAL_RATES, Rates
from dynapipe.errors import ConfigError

pytestmark = pytest.mark.hf


def _train(rank: int, world: int, options: dict, steps: int = 1) -> dict:
    """Steps of the 2-stage Llama case; rank 0's plan (its rates, predicted step) and step times."""
    torch.set_num_threads(1)
    case = HF_CASES["llama"](2)
    reports: list = []
    options = {"n_microbatches": 4, "timeout_s": 60, "on_step": reports.append, **options}
    step = torch.compile(case.step, backend="dynapipe", options=options)
    times, started = [], time.perf_counter()
    torch.manual_seed(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            began = time.perf_counter()
            step(*case.args).backward()
            times.append(time.perf_counter() - began)
    plan = reports[0].plan
    drawn = torch.rand(4)  # what the user's script draws next (the step itself draws nothing)
    torch.manual_seed(5)
    return {
        "random stream kept": torch.equal(drawn, torch.rand(4)),
        "rates": plan.rates,
        "predicted": plan.predicted_step_s,
        "rehearsed": plan.rehearsed_step_s,
        "rehearsal": plan.rehearsal_source,
        "stages timed": plan.measured_stages,
        "simulated": plan.predicted.makespan,
        "times": times,
        "first_s": times[0],
        "total_s": time.perf_counter() - started,
        "text": str(plan),
        "warnings": [str(w.message) for w in caught],
    }


def test_measured_rates_drive_the_plan_and_predict_the_step() -> None:
    # profile=True measures afresh: the session's cache may hold this model's rates from another test
    measured = run_distributed(_train, 2, {"profile": True}, 8, timeout=240)
    nominal = run_distributed(_train, 2, {"rates": "nominal"}, timeout=240)
    rates = measured[0]["rates"]
    assert rates == measured[1]["rates"]  # every rank plans with the same numbers
    # measuring draws random tensors, each rank its own share, none from the user's random stream
    assert measured[0]["random stream kept"] and measured[1]["random stream kept"]
    assert rates.measured and rates.flop_rate < NOMINAL_RATES.flop_rate / 10  # a CPU, not the nominal GPU
    assert rates.link_latency_s != NOMINAL_RATES.link_latency_s and rates.link_bandwidth > 0
    assert rates.message_s > 0 and "CPU per message at each end" in measured[0]["text"]  # CPU processes
    assert "measured on this machine by 2 ranks" in rates.source and "rates: measured" in measured[0]["text"]
    assert nominal[0]["rates"] == NOMINAL_RATES and "rates: nominal" in nominal[0]["text"]
    step = statistics.median(measured[0]["times"][1:])
    assert 0.4 * step <= measured[0]["predicted"] <= 2.5 * step, (measured[0]["predicted"], step)
    assert nominal[0]["predicted"] < step / 20  # the nominal GPU's prediction is nowhere near this CPU
    # at measured rates on CPU processes the prediction is the rehearsed step, which every rank agrees on;
    # nominal rates describe another machine, so nothing is rehearsed here
    assert measured[0]["predicted"] == measured[0]["rehearsed"] == measured[1]["rehearsed"]
    assert "rehearsed on these ranks (measured now, cached in" in measured[0]["text"]  # profile: afresh
    # with each stage's time as it runs (every rank its own, exchanged), printed beside the plan's
    timed = measured[0]["stages timed"]
    assert timed is not None and timed == measured[1]["stages timed"] and all(s.time_s > 0 for s in timed)
    assert "stages timed as they run" in measured[0]["text"]
    assert nominal[0]["rehearsed"] is None and nominal[0]["predicted"] == nominal[0]["simulated"]


def test_the_cache_is_reused_and_a_foreign_one_ignored() -> None:
    first_run = run_distributed(_train, 2, {}, timeout=240)[0]
    again_run = run_distributed(_train, 2, {}, timeout=240)[0]
    first, again = first_run["rates"], again_run["rates"]
    assert again.source.startswith("cached on this machine") and again.op_times == first.op_times
    # the same plan on the same machine: its stages' times and rehearsed step are not measured again
    assert again_run["rehearsal"].startswith("cached in") and "rehearsal-" in again_run["rehearsal"]
    assert (
        again_run["predicted"] == first_run["predicted"]
        and again_run["stages timed"] == first_run["stages timed"]
    )
    path = cache_path(dict(first.machine))
    data = json.loads(path.read_text())
    for change in ({"torch": "1.0"}, {"rates format": "0"}):  # another torch's, another dynapipe's numbers
        foreign = {**data, "machine": {**data["machine"], **change}, "link_latency_s": 123.0}
        path.write_text(json.dumps(foreign))  # in this machine's file: not used
        fresh = run_distributed(_train, 2, {}, timeout=240)[0]["rates"]
        assert fresh.source.startswith("measured") and fresh.link_latency_s != 123.0
    path.write_text("{not json")  # a damaged cache is measured again, not an error
    assert run_distributed(_train, 2, {}, timeout=240)[0]["rates"].source.startswith("measured")
    assert json.loads(path.read_text())["machine"] == data["machine"]  # and rewritten


def test_a_cached_rehearsal_the_run_contradicts_is_dropped() -> None:
    first = run_distributed(_train, 2, {}, timeout=240)[0]
    path = Path(first["rehearsal"].split("cached in ")[1].split(";")[0])
    data = json.loads(path.read_text())
    # as if rehearsed in a second when the machine ran 3x slower than it does now
    path.write_text(json.dumps({**data, "rounds": [3 * r for r in data["rounds"]]}))
    checked = run_distributed(_train, 2, {}, 1 + CHECKED_STEPS, timeout=240)
    assert checked[0]["rehearsal"].startswith(f"cached in {path}")
    assert checked[0]["predicted"] == pytest.approx(3 * first["predicted"])
    # the run's steps 2-6 contradict it: the rank that wrote the entry deletes it and says so
    assert not path.exists()
    said = [w for w in checked[0]["warnings"] if "rehearsed step" in w]
    assert len(said) == 1 and f"dropped {path}, so the next run rehearses again" in said[0], said
    assert not any("rehearsed step" in w for w in checked[1]["warnings"])
    again = run_distributed(_train, 2, {}, timeout=240)[0]
    assert again["rehearsal"].startswith("measured now, cached in") and path.exists()


def test_saved_rates_are_loaded_and_bad_ones_refused(tmp_path) -> None:
    saved = Rates(flop_rate=1e9, memory_bandwidth=1e9, link_latency_s=1e-3, link_bandwidth=1e8, source="x")
    saved.save(tmp_path / "gpu.json")
    out = run_distributed(_train, 2, {"rates": str(tmp_path / "gpu.json")}, timeout=240)[0]
    assert out["rates"].link_latency_s == 1e-3 and f"loaded from {tmp_path / 'gpu.json'}" in out["text"]
    (tmp_path / "bad.json").write_text('{"flops": 1}')
    failed = run_distributed(
        _train, 2, {"rates": str(tmp_path / "bad.json")}, timeout=240, allow_failure=True
    )
    for rank in (0, 1):
        assert "options['rates']: cannot read rates from" in str(failed[rank]), failed[rank]
        assert "unknown fields ['flops']" in str(failed[rank])
    with pytest.raises(ConfigError, match="rates must be 'measure', 'nominal' or the path"):
        dynapipe.PipelineConfig(rates=3)


def test_explain_plans_for_the_machine_it_is_told_about(tmp_path) -> None:
    case = HF_CASES["llama"](2)
    inputs = dict(input_ids=case.args[0], labels=case.args[1])
    nominal = dynapipe.explain(case.model, inputs, n_stages=2)
    assert "rates: nominal (100 TFLOP/s" in str(nominal)  # never this machine's unasked
    slow = Rates(flop_rate=1e9, memory_bandwidth=1e9, op_overhead_s=1e-5, source="a slow machine")
    slow.save(tmp_path / "slow.json")
    loaded = dynapipe.explain(case.model, inputs, n_stages=2, rates=tmp_path / "slow.json")
    assert f"loaded from {tmp_path / 'slow.json'}" in str(loaded)
    assert loaded.predicted_step_s > 100 * nominal.predicted_step_s
    with pytest.raises(ConfigError, match="explain\\(\\) plans without a process group"):
        dynapipe.explain(case.model, inputs, n_stages=2, rates="measure")
