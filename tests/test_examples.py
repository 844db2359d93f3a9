"""The examples run as a person runs them (``python examples/<name>.py``: a subprocess that spawns its own
CPU processes) and pass their own check against one process (a line ending in ``-> match``, exit 0).
The demo and two-stage GPT-2 run by default; the rest are marked ``slow`` (``python -m pytest -m slow``,
which CI runs after the default suite)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=cwd,
        env=env,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    matches = [line for line in proc.stdout.splitlines() if line.endswith("-> match")]
    assert matches, f"{name} printed no '-> match' line:\n{proc.stdout}"
    assert "MISMATCH" not in proc.stdout
    return proc.stdout


@pytest.mark.hf
def test_demo_says_what_dynapipe_did(tmp_path):
    out = run_example("train_llama.py", "--steps", "3", "--out", str(tmp_path))
    assert "dynapipe cut the model into 4 stages" in out and "parameters per stage" in out
    # which layers share a stage is the partitioner's choice (the step objective's), not the demo's
    assert "model.layers." in out and "lm_head" in out and "schedule: 1f1b" in out
    # the plan in this machine's measured seconds, and its prediction beside the median step that ran
    assert "rates: measured on this machine by 4 ranks, cached in" in out, out
    assert re.search(
        r"the plan beside the run: predicted step [\d.]+ [mu]?s.*measured step [\d.]+ [mu]?s", out
    ), out
    assert "(median of 2 steps" in out
    for name in ("partition.svg", "timeline.svg"):
        ET.parse(tmp_path / name)  # well-formed SVG
    assert (tmp_path / "timeline.json").stat().st_size > 0
    # the run as one page, and the run saved beside it (tests/test_report_page.py reads one in a browser)
    assert (
        f"the run as one page: {tmp_path / 'run.html'}" in out and (tmp_path / "run.json").stat().st_size > 0
    )


@pytest.mark.hf
def test_train_gpt2_two_stages():
    out = run_example("train_gpt2.py", "--steps", "2")
    assert "tied transformer.wte.weight held by 2 ranks" in out
    assert "parameters after 2 steps" in out


@pytest.mark.hf
@pytest.mark.slow
def test_train_gpt2_pipeline_and_data_parallel():
    out = run_example("train_gpt2.py", "--steps", "2", "--stages", "2", "--dp", "2")
    assert "held by 4 ranks" in out


@pytest.mark.hf
@pytest.mark.slow
def test_train_opt_bloom():
    out = run_example("train_opt_bloom.py", "--steps", "2")
    assert "opt:" in out and "bloom:" in out and out.count("-> match") == 2


@pytest.mark.hf
@pytest.mark.slow
def test_generate():
    out = run_example("generate.py", "--new-tokens", "3")
    assert "pipelined greedy tokens vs single-process generate -> match" in out


@pytest.mark.hf
@pytest.mark.slow
def test_timeline(tmp_path):
    run_example("timeline.py", "--nproc", "2", "--steps", "2", "--out", str(tmp_path))
    for name in ("timeline.svg", "timeline_simulated.svg"):
        root = ET.parse(tmp_path / name).getroot()
        rows = [e for e in root.iter() if e.get("class") == "row"]
        assert len(rows) == 2
    assert (tmp_path / "timeline.json").stat().st_size > 0


@pytest.mark.hf
@pytest.mark.slow
def test_big_model(tmp_path):
    """2 ranks, a small Llama: empty init, each rank loads its stage, save, resume in new processes. At this
    size the example skips its memory check (the fixed cost of a rank hides a 55 MiB model); the default
    845 MiB run checks it."""
    quick = ["--nproc", "2", "--hidden", "512", "--layers", "2", "--steps", "1"]
    out = run_example("big_model.py", *quick, "--out", str(tmp_path))
    assert "trained on vs trained straight -> match" in out and "memory not checked" in out
