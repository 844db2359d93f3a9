"""Stages compiled by inductor (``options["compile_stages"]``): every schedule gives the single-process loss
and gradients within inductor's reordering of float32 sums, each compiled graph runs once per microbatch
(zero-bubble's input and weight halves included: no backward runs twice), and nothing recompiles across
microbatch sizes and lengths."""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

# inductor fuses and reorders float32 reductions: the tolerance it allows (eager stages stay bitwise)
RTOL, ATOL = 1e-4, 1e-5


def _batches(name: str, case) -> list[tuple[tuple, dict]]:
    """The case's own inputs, then 1.5 times as many rows (another microbatch size) and for an LM a
    shorter sequence: one compiled graph per stage serves them all."""

    def more(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t[: len(t) // 2].flip(0)])

    args, kwargs = case.args, case.kwargs
    if name == "llama":  # (ids, labels)
        ids = more(args[0])[:, :9]
        return [(args, kwargs), ((ids, ids.clone()), {})]
    return [(args, kwargs), (tuple(more(a) for a in args), {k: more(v) for k, v in kwargs.items()})]


def compiled_worker(rank: int, world: int, runs: list[tuple[str, dict]]) -> list[dict]:
    from models import CASES, HF_CASES

    import dynapipe.compiled_stage as compiled_stage

    cases = {**CASES, **HF_CASES}
    out = []
    for name, options in runs:
        n_stages = options.get("n_stages", world)
        pipe, ref = cases[name](n_stages), cases[name](n_stages)
        reports: list = []
        opts = {"split_points": pipe.split_points, **pipe.options, **options}
        opts.pop("n_stages", None)
        opts.update(compile_stages=True, on_step=reports.append)
        before = compiled_stage.stats["compiled"]
        step = torch.compile(pipe.step, backend="dynapipe", options=opts)
        opt = torch.optim.SGD(pipe.model.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.model.parameters(), lr=0.1, momentum=0.9)
        compared = 0
        for i, (args, kwargs) in enumerate(_batches(name, pipe) * 2):
            loss = step(*args, **kwargs)
            loss.backward()
            ref_loss = ref.step(*args, **kwargs)
            ref_loss.backward()
            torch.testing.assert_close(
                loss, ref_loss, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} step {i}: {m}"
            )
            ref_params = dict(ref.model.named_parameters())
            for pname, p in pipe.model.named_parameters():
                if p.untyped_storage().nbytes() == 0:  # another rank's
                    continue
                expect = ref_params[pname].grad
                torch.testing.assert_close(
                    p.grad, expect, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} step {i} {pname}: {m}"
                )
                compared += 1
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
        last = reports[-1]
        out.append(
            {
                "compiled": last.compiled,
                "graph_runs": last.graph_runs,
                "compiles": compiled_stage.stats["compiled"] - before,
                "compared": compared,
                "steps": len(reports),
            }
        )
    return out


RUNS = [
    ("mlp", {"schedule": "gpipe", "n_microbatches": 4}),
    ("mlp", {"schedule": "1f1b", "n_microbatches": 4}),
    ("mlp", {"schedule": "zb-h1", "n_microbatches": 4}),
    ("tied", {"schedule": "zbv", "n_microbatches": 4, "n_stages": 4}),
    ("llama", {"schedule": "interleaved-1f1b", "n_microbatches": 4, "n_stages": 4}),
]


def test_compiled_stages_match_single_process() -> None:
    results = run_distributed(compiled_worker, 2, RUNS, timeout=900)
    for k, (name, options) in enumerate(RUNS):
        per_rank = [results[r][k] for r in sorted(results)]
        n_stages = options.get("n_stages", 2)
        stages = {s for r in per_rank for s in r["compiled"]}
        assert stages == set(range(n_stages)), (name, options, per_rank)
        for r in per_rank:
            assert all(how == "inductor" for how in r["compiled"].values()), r["compiled"]
            assert r["compiles"] == len(r["compiled"]), f"{name}: compiled {r['compiles']} times"
            assert r["compared"] > 0
            n = options["n_microbatches"] * r["steps"]
            for s, runs in r["graph_runs"].items():
                # every graph once per microbatch: the split backward computes nothing twice
                assert runs == {"forward": n, "input": n, "weight": n}, (name, s, runs)


def data_parallel_worker(rank: int, world: int) -> dict:
    from fixtures import train_and_compare

    import dynapipe.compiled_stage as compiled_stage

    options = {"schedule": "zb-h1", "dp_degree": 2, "n_microbatches": 4, "compile_stages": True}
    train_and_compare(rank, world, ["mlp"], options, tolerance={"rtol": RTOL, "atol": ATOL})
    return dict(compiled_stage.stats)


def test_compiled_zero_bubble_with_data_parallel() -> None:
    """pp x dp: the weight-gradient graph runs at W and still arms DDP's all-reduce (its gradients enter
    the parameters through autograd, where DDP's hooks wait): gradients equal one process's."""
    results = run_distributed(data_parallel_worker, 4, timeout=600)
    assert all(r == {"compiled": 1} for r in results.values()), results


@torch.library.custom_op("dynapipe_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@double.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _double_backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG001 - the op saves nothing
    # a branch on the gradient's values: eager runs it, AOTAutograd cannot trace it
    return grad * (2.0 if bool(grad.abs().sum() > 0) else 0.0)


double.register_autograd(_double_backward)


class _DataDependentHead(torch.nn.Module):
    """Its head's op has a backward that branches on data: inductor cannot compile that stage."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return double(self.head(torch.relu(self.body(x)))).square().mean()


def fallback_worker(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model, x = _DataDependentHead(), torch.randn(8, 8)
    ref = _DataDependentHead()
    ref.load_state_dict(model.state_dict())
    ref(x).backward()
    reports: list = []
    options = {"split_points": ["head"], "compile_stages": True, "on_step": reports.append}
    loss = torch.compile(model, backend="dynapipe", options=options)(x)
    loss.backward()
    torch.testing.assert_close(loss, ref(x), rtol=RTOL, atol=ATOL)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.untyped_storage().nbytes():  # this rank's stage
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=RTOL, atol=ATOL)
    return reports[-1].compiled


def test_a_stage_inductor_cannot_compile_runs_eagerly() -> None:
    """The step runs, the stage that failed to compile eagerly, and the report says why in one line."""
    results = run_distributed(fallback_worker, 2, timeout=300)
    assert results[0] == {0: "inductor"}
    assert results[1][1].startswith("eager (GuardOnDataDependentSymNode: "), results[1]
    assert "\n" not in results[1][1]


def regions_worker(rank: int, world: int) -> list:
    """A torch.cond (one node, so in one stage) and blocks under activation checkpointing, compiled."""
    from test_semantics import CheckpointNet, CondNet

    out = []
    for make, split in ((CondNet, "post"), (CheckpointNet, "blocks.2")):
        torch.manual_seed(0)
        net, ref = make(), make()
        ref.load_state_dict(net.state_dict())
        x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        reports: list = []
        options = {
            "split_points": [split],
            "n_microbatches": 2,
            "compile_stages": True,
            "on_step": reports.append,
        }
        loss = torch.compile(net, backend="dynapipe", options=options)(x, y)
        loss.backward()
        # the cond's branch is taken per microbatch, so the reference runs per microbatch too
        ref_loss = sum(ref(a, b) for a, b in zip(x.chunk(2), y.chunk(2), strict=True)) / 2
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
        ref_params, compared = dict(ref.named_parameters()), []
        for name, p in net.named_parameters():
            if p.untyped_storage().nbytes():
                torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=RTOL, atol=ATOL)
                compared.append(name)
        out.append([reports[-1].compiled, compared])
    return out


def test_cond_and_activation_checkpointing_inside_compiled_stages() -> None:
    results = run_distributed(regions_worker, 2, timeout=300)
    for rank, runs in results.items():
        for compiled, compared in runs:
            assert compiled == {rank: "inductor"}
            assert compared  # every rank compared its own parameters' gradients
    assert len(results[0][1][1]) == 4 and len(results[1][1][1]) == 6  # blocks 0-1; blocks 2-3 and the head


@pytest.mark.hf
def test_generate_with_compiled_stages() -> None:
    """Prefill and decode pipelines (a cache written in place, one token per step) compiled: the tokens
    equal one process's."""
    from test_generate import _check, _generate_pipelined

    results = run_distributed(
        _generate_pipelined, 2, ["llama"], 2, False, {"compile_stages": True}, timeout=400
    )
    _check(results, ["llama"], 2, 2)


def guards_worker(rank: int, world: int) -> list:
    """Inductor assumes things about sizes while it compiles (on this CPU: at most 4096 tokens in a
    microbatch); a call outside them captures and compiles again instead of running the wrong kernel."""
    from models import llama

    import dynapipe.compiled_stage as compiled_stage

    case, ref = llama(2), llama(2)
    options = {"split_points": case.split_points, "n_microbatches": 2, "compile_stages": True}
    step = torch.compile(case.step, backend="dynapipe", options=options)
    compiles = []
    for rows, length in ((8, 12), (16, 600), (8, 10)):
        ids = torch.randint(0, 96, (rows, length), generator=torch.Generator().manual_seed(length))
        loss = step(ids, ids)
        loss.backward()
        ref_loss = ref.step(ids, ids)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
        ref_params = dict(ref.model.named_parameters())
        for name, p in case.model.named_parameters():
            if p.untyped_storage().nbytes():
                torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=RTOL, atol=ATOL)
        case.model.zero_grad(), ref.model.zero_grad()
        compiles.append(compiled_stage.stats["compiled"])
    return compiles


def test_a_call_outside_what_inductor_assumed_compiles_again() -> None:
    results = run_distributed(guards_worker, 2, timeout=400)
    # 16 x 600 (4800 tokens per microbatch) compiles again; 8 x 10 runs on what was compiled before
    assert all(compiles == [1, 2, 2] for compiles in results.values()), results
