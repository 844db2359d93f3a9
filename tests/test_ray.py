"""dynapipe.ray: the demo model trained on 4 Ray workers equals one process; a failing worker is named;
too small a cluster and a missing Ray are one-line errors. Needs ``pip install "dynapipe[ray]"``
(CI installs it); without Ray the tests that need a cluster skip saying so."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

import dynapipe.ray
from dynapipe.errors import ConfigError
from dynapipe.launch import LaunchError

ROOT = Path(__file__).resolve().parent.parent
STEPS = 2


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 4 logical CPUs; its workers import this file and the demo by path."""
    ray = pytest.importorskip("ray", reason=f"Ray is not installed: {dynapipe.ray.RAY_HINT}")
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 2**20,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray
    ray.shutdown()


def _train_demo(steps: int) -> list[tuple[float, dict[str, torch.Tensor]]]:
    """One rank of the demo's pipelined step (examples/train_llama.py): each step's loss and this
    rank's gradients. SGD, not the demo's AdamW: linear in the gradients, so float noise stays small."""
    from train_llama import batch, make_model

    model = make_model()
    step = torch.compile(
        lambda ids: model(input_ids=ids, labels=ids).loss,
        backend="dynapipe",
        options={"schedule": "1f1b", "n_microbatches": 4, "timeout_s": 60},
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = []
    for i in range(steps):
        loss = step(batch(i))
        loss.backward()
        owned = {n: p for n, p in model.named_parameters() if p.untyped_storage().nbytes() > 0}
        out.append((loss.item(), {n: p.grad.clone() for n, p in owned.items() if p.grad is not None}))
        opt.step()
        opt.zero_grad()
    return out


def _reference(steps: int) -> list[tuple[float, dict[str, torch.Tensor]]]:
    sys.path.insert(0, str(ROOT / "examples"))
    from train_llama import batch, make_model

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = []
    for i in range(steps):
        loss = model(input_ids=batch(i), labels=batch(i)).loss
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
        opt.zero_grad()
    return out


@pytest.mark.hf
def test_demo_on_4_ray_workers_equals_one_process(ray_cluster):
    start = time.monotonic()
    results = dynapipe.ray.launch(_train_demo, STEPS, nproc=4, timeout=240, grace=10)
    print(f"4 Ray workers, {STEPS} steps: {time.monotonic() - start:.1f} s")
    assert sorted(results) == [0, 1, 2, 3]
    for i, (ref_loss, ref_grads) in enumerate(_reference(STEPS)):
        compared: set[str] = set()
        for rank, per_step in results.items():
            loss, grads = per_step[i]
            torch.testing.assert_close(loss, ref_loss, msg=lambda m: f"step {i} rank {rank} loss: {m}")
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], msg=lambda m: f"step {i} grad {name}: {m}")
            compared |= set(grads)
        assert compared == set(ref_grads), f"gradients no rank holds: {sorted(set(ref_grads) - compared)}"


def _fails_on_ranks_1_and_2() -> str:
    rank = os.environ["RANK"]
    if rank == "1":
        raise ValueError("rank one gives up")
    if rank == "2":
        os._exit(3)  # the actor dies without a word
    return rank


def test_failing_workers_are_named_not_waited_for(ray_cluster):
    start = time.monotonic()
    with pytest.raises(LaunchError) as err:
        dynapipe.ray.launch(_fails_on_ranks_1_and_2, nproc=3, timeout=60, grace=5)
    assert list(err.value.failures) == [1, 2]
    assert "ValueError: rank one gives up" in err.value.failures[1]
    assert "actor died" in err.value.failures[2]
    assert err.value.results == {0: "0"}
    assert time.monotonic() - start < 30


def test_too_few_cpus_is_one_line_not_a_wait(ray_cluster):
    with pytest.raises(ConfigError) as err:
        dynapipe.ray.launch(_fails_on_ranks_1_and_2, nproc=8)
    assert "has 4 CPUs" in str(err.value) and "8 workers (stages x dp)" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "dynapipe\[ray\]"') as err:
        dynapipe.ray.launch(_fails_on_ranks_1_and_2, nproc=4)
    assert "\n" not in str(err.value)


def test_ranks_on_two_nodes_number_locally_and_see_their_nodes_gpus():
    places = [("10.0.0.1", "a", ["0"]), ("10.0.0.2", "b", ["3"]), ("10.0.0.1", "a", ["1"])]
    envs = dynapipe.ray._rank_envs(places, 29500)
    assert [(e["RANK"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]) for e in envs] == [
        ("0", "0", "2"),
        ("1", "0", "1"),
        ("2", "1", "2"),
    ]
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.1"} and envs[2]["CUDA_VISIBLE_DEVICES"] == "0,1"
