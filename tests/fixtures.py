"""Helpers several test files share.

* Plans made the way the planner makes them, on node costs computed here: ``assign_balanced``,
  ``costs_of``, ``stage_records``.
* Pipelined training checked against one process (workers for ``harness.run_distributed``):
  ``train_and_compare``, ``train_many``, and the checks on what they report, ``check_runs``,
  ``check_coverage``, ``check_tied``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from dynapipe.cost import GraphCosts, graph_costs, stage_costs
from dynapipe.graph import CapturedGraph
from dynapipe.partition import balanced_partition
from dynapipe.schedules import StageCost

__all__ = [
    "assign_balanced",
    "check_coverage",
    "check_runs",
    "check_tied",
    "costs_of",
    "stage_records",
    "train_and_compare",
    "train_many",
]


def costs_of(captured: CapturedGraph, costs: GraphCosts | None = None, **options: Any) -> GraphCosts:
    """``costs``, else the estimated node costs of ``captured`` (``graph_costs`` options)."""
    return costs if costs is not None else graph_costs(captured, **options)


def assign_balanced(
    captured: CapturedGraph,
    n_stages: int,
    *,
    costs: GraphCosts | None = None,
    optimizer: str = "adamw",
    **options: Any,
) -> dict[fx.Node, int]:
    """The automatic partition's stage of every compute node (``balanced_partition`` options)."""
    return balanced_partition(
        captured, n_stages, costs=costs_of(captured, costs, optimizer=optimizer), **options
    ).stage_of


def stage_records(
    captured: CapturedGraph, stage_of: dict[fx.Node, int], *, costs: GraphCosts | None = None
) -> list[StageCost]:
    """Per-stage costs of ``stage_of``, on ``costs`` or the estimated node costs."""
    return stage_costs(captured, stage_of, costs_of(captured, costs))


def _owned(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.untyped_storage().nbytes() > 0}


def train_and_compare(
    rank: int, world: int, names: list[str], options: dict, steps: int = 2, tolerance: dict | None = None
) -> dict:
    """Train each case pipelined and on one process side by side; assert equality (within ``tolerance``,
    ``assert_close``'s rtol/atol, where given); report ownership."""
    close = tolerance or {}
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
        losses, compared = [], set()
        for i in range(steps):
            loss = step(*shard[0], **shard[1])
            loss.backward()
            ref_loss = ref.step(*ref.args, **ref.kwargs) * ref_scale
            ref_loss.backward()
            torch.testing.assert_close(loss, ref_loss, **close, msg=lambda m: f"{name} step {i} loss: {m}")
            assert loss.dim() == 0 and loss.grad_fn is not None
            losses.append((loss.item(), ref_loss.item()))
            owned = _owned(pipe.model)
            ref_params = dict(ref.model.named_parameters())
            for pname, p in owned.items():
                expect = ref_params[pname].grad
                got = p.grad if p.grad is not None else torch.zeros_like(p)
                expect = expect if expect is not None else torch.zeros_like(p)
                torch.testing.assert_close(
                    got, expect, **close, msg=lambda m: f"{name} step {i} grad {pname}: {m}"
                )
                compared.add(pname)
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
            for pname, p in owned.items():
                torch.testing.assert_close(
                    p, ref_params[pname], **close, msg=lambda m: f"{name} step {i} param {pname}: {m}"
                )
        report[name] = {n: p.detach().flatten().tolist() for n, p in _owned(pipe.model).items()}
        report[name + ":all"] = sorted(n for n, _ in ref.model.named_parameters())
        # what was compared here, so the test can see that every loss and gradient was
        report[name + ":losses"] = losses
        report[name + ":compared"] = sorted(compared)
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


def check_runs(results: dict, runs: list[tuple[list[str], dict]]) -> None:
    for i, (names, _) in enumerate(runs):
        check_coverage({r: out[i] for r, out in results.items()}, names)


def check_coverage(results: dict, names: list[str]) -> None:
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


def check_tied(results: dict, name: str, param: str, holders: int) -> None:
    """A tied parameter lives on exactly ``holders`` ranks (its first and last stage, per replica)."""
    held = [r for r, out in results.items() if param in out[name]]
    assert len(held) == holders, f"{name}: {param} should live on {holders} ranks, found on {held}"
