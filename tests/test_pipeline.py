"""Pipelined training equals one process: loss, every gradient and the parameters after optimizer steps."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from models import CASES


def _owned(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.untyped_storage().nbytes() > 0}


def train_and_compare(rank: int, world: int, names: list[str], options: dict, steps: int = 2) -> dict:
    """Train each case pipelined and on one process side by side; assert equality; report ownership."""
    from models import CASES, HF_CASES

    from dynapipe.microbatch import split_value

    cases = {**CASES, **HF_CASES}
    report = {}
    dp = options.get("dp_degree", 1)
    for name in names:
        n_stages = options.get("n_stages", world // dp)
        pipe, ref = cases[name](n_stages), cases[name](n_stages)
        opts = {"split_points": pipe.split_points, **pipe.options, **options}
        opts.pop("n_stages", None)
        step = torch.compile(pipe.step, backend="dynapipe", options=opts)
        # SGD with momentum: linear in the gradients, so float32 summation-order noise stays ~1e-7 (Adam
        # divides by sqrt(v) and would amplify it on near-zero gradients)
        opt = torch.optim.SGD(pipe.model.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.model.parameters(), lr=0.1, momentum=0.9)
        # with data parallelism each replica feeds its own shard of the global batch (global rank = pp * dp + dp_index)
        shard = [split_value(a, dp, len(pipe.args[0]), rank % dp) for a in (pipe.args, pipe.kwargs)]
        # one process over the global batch; a summed loss is averaged over replicas, as DDP averages
        ref_scale = 1.0 / dp if opts.get("loss_reduction") == "sum" else 1.0
        for i in range(steps):
            loss = step(*shard[0], **shard[1])
            loss.backward()
            ref_loss = ref.step(*ref.args, **ref.kwargs) * ref_scale
            ref_loss.backward()
            torch.testing.assert_close(loss, ref_loss, msg=lambda m: f"{name} step {i} loss: {m}")
            assert loss.dim() == 0 and loss.grad_fn is not None
            owned = _owned(pipe.model)
            ref_params = dict(ref.model.named_parameters())
            for pname, p in owned.items():
                expect = ref_params[pname].grad
                got = p.grad if p.grad is not None else torch.zeros_like(p)
                expect = expect if expect is not None else torch.zeros_like(p)
                torch.testing.assert_close(got, expect, msg=lambda m: f"{name} step {i} grad {pname}: {m}")
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
            for pname, p in owned.items():
                torch.testing.assert_close(
                    p, ref_params[pname], msg=lambda m: f"{name} step {i} param {pname}: {m}"
                )
        report[name] = {n: p.detach().flatten().tolist() for n, p in _owned(pipe.model).items()}
        report[name + ":all"] = sorted(n for n, _ in ref.model.named_parameters())
    return report


def train_many(rank: int, world: int, runs: list[tuple[list[str], dict]]) -> list[dict]:
    """Several ``train_and_compare`` runs in one set of processes (process start-up is the slow part)."""
    out = []
    for names, options in runs:
        try:
            out.append(train_and_compare(rank, world, names, options))
        except AssertionError as err:
            raise AssertionError(f"with options {options}: {err}") from err
    return out


def _check_runs(results: dict, runs: list[tuple[list[str], dict]]) -> None:
    for i, (names, _) in enumerate(runs):
        _check_coverage({r: out[i] for r, out in results.items()}, names)


def _check_coverage(results: dict, names: list[str]) -> None:
    """Every parameter is owned by some rank, and no rank owns everything (state was released)."""
    for name in names:
        all_params = set(results[0][name + ":all"])
        owned = [set(r[name]) for r in results.values()]
        for pname in all_params:  # a parameter held by several ranks (tied weights) stays bitwise equal
            copies = [r[name][pname] for r in results.values() if pname in r[name]]
            assert all(c == copies[0] for c in copies[1:]), f"{name}: copies of {pname} differ"
        union = set().union(*owned)
        # parameters the graph never reads (none in these models) would be kept by every rank
        assert union == all_params, f"{name}: parameters owned by no rank: {sorted(all_params - union)}"
        assert all(o != all_params for o in owned), f"{name}: some rank kept every parameter"


def _check_tied(results: dict, name: str, param: str, holders: int) -> None:
    """A tied parameter lives on exactly ``holders`` ranks (its first and last stage, per replica)."""
    held = [r for r, out in results.items() if param in out[name]]
    assert len(held) == holders, f"{name}: {param} should live on {holders} ranks, found on {held}"


# Schedules beyond these two are checked in test_schedule_runtime.py; here every model on both widths.
@pytest.mark.parametrize(("world", "schedule"), [(2, "gpipe"), (4, "1f1b")])
def test_small_models_match_single_process(world: int, schedule: str) -> None:
    names = list(CASES)
    results = run_distributed(
        train_and_compare, world, names, {"schedule": schedule, "n_microbatches": 4}, timeout=240
    )
    _check_coverage(results, names)
    _check_tied(results, "tied", "embed.weight", 2)


@pytest.mark.hf
@pytest.mark.parametrize(("world", "names"), [(2, ["llama", "gpt2", "opt", "bloom"]), (4, ["llama", "gpt2"])])
def test_huggingface_models_match_single_process(world: int, names: list[str]) -> None:
    results = run_distributed(
        train_and_compare, world, names, {"schedule": "1f1b", "n_microbatches": 4}, timeout=300
    )
    _check_coverage(results, names)
    if "gpt2" in names:
        _check_tied(results, "gpt2", "transformer.wte.weight", 2)


@pytest.mark.hf
def test_automatic_partition_matches_single_process() -> None:
    names = ["skip", "tied", "llama"]
    options = {"schedule": "1f1b", "n_microbatches": 4, "split_points": ()}
    results = run_distributed(train_and_compare, 2, names, options, timeout=300)
    _check_coverage(results, names)


@pytest.mark.hf
def test_more_huggingface_families_with_automatic_partition() -> None:
    """Qwen2 (GQA), T5 (encoder-decoder) and BERT (classification), cut by the automatic partitioner."""
    names = ["qwen2", "t5", "bert"]
    results = run_distributed(train_and_compare, 2, names, {"n_microbatches": 4}, timeout=300)
    _check_coverage(results, names)
