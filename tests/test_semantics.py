"""Single-device semantics that a pipelined call keeps: inference, scaled and accumulated gradients,
memory of other ranks' stages released, code-level split markers, torch.cond, the entry point."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_distributed


def _owned(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.untyped_storage().nbytes() > 0}


def semantics_worker(rank: int, world: int, with_hf: bool = True) -> dict:
    from models import MarkedNet, llama, mlp

    import dynapipe  # noqa: F401 - pipe_split markers below

    out = {}
    # 1. A scaled loss halves the gradients, two calls accumulate, zero_grad clears.
    pipe, ref = mlp(world), mlp(world)
    step = torch.compile(
        pipe.step,
        backend="dynapipe",
        options={"split_points": pipe.split_points, "n_microbatches": 4, "schedule": "1f1b"},
    )
    (step(*pipe.args) * 0.5).backward()
    ref.step(*ref.args).backward()
    refs = dict(ref.model.named_parameters())
    owned = _owned(pipe.model)
    for n, p in owned.items():
        torch.testing.assert_close(p.grad, 0.5 * refs[n].grad)
    step(*pipe.args).backward()  # accumulates: 0.5 g + g
    for n, p in owned.items():
        torch.testing.assert_close(p.grad, 1.5 * refs[n].grad)
    for p in owned.values():
        p.grad = None
    loss = step(*pipe.args)  # a call whose loss is never back-propagated leaves .grad alone
    assert all(p.grad is None for p in owned.values())
    loss.backward()
    for n, p in owned.items():
        torch.testing.assert_close(p.grad, refs[n].grad)

    # 2. Memory: only this rank's stage keeps storage.
    total = sum(p.numel() * p.element_size() for p in ref.model.parameters())
    kept = sum(p.untyped_storage().nbytes() for p in pipe.model.parameters())
    out["kept_bytes"], out["total_bytes"] = kept, total
    out["owned"] = sorted(owned)

    # 2b. A second pipeline over the same model cut elsewhere (here: inference with other split points)
    # fetches the parameters its stages need from the ranks that kept them; the first one keeps working.
    other_points = [f"layers.{round(i * 8 / world) - 1}" for i in range(1, world)]
    assert other_points != pipe.split_points
    infer_mlp = torch.compile(
        pipe.model, backend="dynapipe", options={"split_points": other_points, "n_microbatches": 2}
    )
    with torch.no_grad():
        torch.testing.assert_close(infer_mlp(pipe.args[0]), ref.model(ref.args[0]))
    for p in owned.values():
        p.grad = None
    step(*pipe.args).backward()
    for n, p in owned.items():
        torch.testing.assert_close(p.grad, refs[n].grad)

    if not with_hf:
        return out
    # 3. Inference under no_grad: a HuggingFace ModelOutput on every rank, logits as on one process.
    case, ref_case = llama(world), llama(world)
    model = case.model.eval()
    infer = torch.compile(
        model, backend="dynapipe", options={"split_points": case.split_points, "n_microbatches": 2}
    )
    ids = case.args[0]
    with torch.no_grad():
        got = infer(input_ids=ids)
        expect = ref_case.model.eval()(input_ids=ids)
    torch.testing.assert_close(got.logits, expect.logits)
    assert got.logits.shape == (ids.shape[0], ids.shape[1], 96)
    # the same model, now training, through the same compiled object (Dynamo recompiles on grad mode)
    loss = infer(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_case.model(input_ids=ids, labels=ids).loss)

    # 4. pipe_split() markers, ours and torch.distributed.pipelining's, make the stages.
    if world == 2:
        for torch_marker in (False, True):
            torch.manual_seed(7)
            net = MarkedNet(use_torch_marker=torch_marker)
            torch.manual_seed(7)
            ref_net = MarkedNet(use_torch_marker=torch_marker)
            x, y = torch.randn(8, 6), torch.randint(0, 2, (8,))
            marked = torch.compile(net, backend="dynapipe", options={"n_microbatches": 2})
            marked(x, y).backward()
            ref_net(x, y).backward()
            kept = sorted(_owned(net))
            assert kept == (
                ["l1.bias", "l1.weight"] if rank == 0 else ["l2.bias", "l2.weight", "l3.bias", "l3.weight"]
            )
            for n, p in _owned(net).items():
                torch.testing.assert_close(p.grad, dict(ref_net.named_parameters())[n].grad)
    return out


@pytest.mark.hf
def test_semantics_on_two_ranks() -> None:
    results = run_distributed(semantics_worker, 2, timeout=240)
    for r in results.values():
        assert 0 < r["kept_bytes"] < 0.75 * r["total_bytes"], r
    assert not set(results[0]["owned"]) & set(results[1]["owned"])


def test_semantics_on_four_ranks() -> None:
    results = run_distributed(semantics_worker, 4, False, timeout=300)  # HF inference: on two ranks
    for r in results.values():
        assert 0 < r["kept_bytes"] < 0.5 * r["total_bytes"], r


class CondNet(nn.Module):
    """A data-dependent branch: torch.cond stays one graph node, so it lands whole in one stage."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)
        self.post = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        h = torch.cond(h.sum() > 0, lambda t: self.mid(t).relu(), lambda t: self.mid(t).tanh(), (h,))
        return F.cross_entropy(self.post(h), y)


def cond_worker(rank: int, world: int) -> list[str]:
    torch.manual_seed(0)
    net = CondNet()
    torch.manual_seed(0)
    ref = CondNet()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    step = torch.compile(net, backend="dynapipe", options={"split_points": ["post"], "n_microbatches": 2})
    loss = step(x, y)
    loss.backward()
    xs, ys = x.chunk(2), y.chunk(2)  # the branch is taken per microbatch, so compare per microbatch
    ref_loss = sum(ref(a, b) for a, b in zip(xs, ys, strict=True)) / 2
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for n, p in _owned(net).items():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad)
    owned = sorted(_owned(net))

    # blocks checkpointed from the caller's loop (a higher-order op per block) can still be split points
    torch.manual_seed(0)
    net, ref = CheckpointNet(), CheckpointNet()
    ref.load_state_dict(net.state_dict())
    step = torch.compile(net, backend="dynapipe", options={"split_points": ["blocks.2"], "n_microbatches": 2})
    loss = step(x, y)
    loss.backward()
    ref_loss = ref(x, y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for n, p in _owned(net).items():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad)
    return owned + sorted(_owned(net))


class CheckpointNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return F.cross_entropy(self.head(x), y)


def test_torch_cond_and_checkpoint_regions() -> None:
    results = run_distributed(cond_worker, 2, timeout=120)
    # the cond's weights go with it; the checkpointed blocks 2 and 3 start the second stage
    assert results[0][:4] == ["mid.bias", "mid.weight", "pre.bias", "pre.weight"]
    assert results[0][4:] == [f"blocks.{i}.0.{w}" for i in (0, 1) for w in ("bias", "weight")]
    assert results[1][:2] == ["post.bias", "post.weight"]
    assert results[1][2:] == [f"blocks.{i}.0.{w}" for i in (2, 3) for w in ("bias", "weight")] + [
        "head.bias",
        "head.weight",
    ]


def test_backend_resolves_without_importing_dynapipe() -> None:
    code = "import sys, torch; assert 'dynapipe' in torch._dynamo.list_backends(); assert 'dynapipe' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class ScaledNet(nn.Module):
    """Python numbers in the call (a float, an int inside a dict), several outputs, and buffers that the
    forward updates: in place (a counter) and by reassignment (a running centre, as DINO keeps one)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("center", torch.zeros(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float, cfg: dict) -> dict:
        self.count += 1
        logits = self.b(torch.tanh(self.a(x))) * scale
        loss = F.cross_entropy(logits - self.center, y) * cfg["weight"]
        with torch.no_grad():
            self.center = 0.9 * self.center + 0.1 * logits.mean(0)
        return {"loss": loss, "aux": logits.pow(2).mean(), "mean_logits": logits.mean(0), "logits": logits}


def call_values_worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    net = ScaledNet()
    torch.manual_seed(0)
    ref = ScaledNet()
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    # on_step: the plan is reported, so its stages are timed on the call's inputs and its step rehearsed
    # before the first step (profile: afresh, not from the cache); both must leave the buffers, gradients
    # and random stream as they were
    options = {"split_points": ["b"], "n_microbatches": 2, "on_step": lambda report: None, "profile": True}
    step = torch.compile(net, backend="dynapipe", options=options)
    # Dynamo makes the numbers graph inputs from their second value on: every value must reach the stages
    for scale, weight in [(0.5, 1), (2.0, 2), (3.0, 3), (0.5, 4)]:
        out = step(x, y, scale, {"weight": weight})
        expect = ref(x, y, scale, {"weight": weight})
        for key in ("loss", "aux", "mean_logits", "logits"):  # batched outputs concatenated, others reduced
            torch.testing.assert_close(out[key], expect[key], msg=lambda m, k=key: f"{k} at {scale}: {m}")
        out["loss"].backward()
        expect["loss"].backward()
        for n, p in _owned(net).items():
            torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad)
            p.grad, dict(ref.named_parameters())[n].grad = None, None
        torch.testing.assert_close(net.center, ref.center)
        torch.testing.assert_close(net.count, 2 * ref.count)  # updated in place once per microbatch
    with pytest.raises(RuntimeError, match=r"output 1 of the compiled call is not the loss"):
        out = step(x, y, 0.5, {"weight": 1})
        (out["loss"] + out["aux"]).backward()  # the aux term would silently add nothing


def test_python_numbers_outputs_and_buffer_updates() -> None:
    run_distributed(call_values_worker, 2, timeout=180)


def clip_worker(rank: int, world: int, dp: int) -> float:
    """dynapipe.clip_grad_norm_ clips by the whole model's norm, tied weights counted once."""
    from models import tied

    import dynapipe

    pipe, ref = tied(world // dp), tied(world // dp)
    options = {"split_points": pipe.split_points, "n_microbatches": 2, "dp_degree": dp}
    step = torch.compile(pipe.step, backend="dynapipe", options=options)
    shard = [a.chunk(dp)[rank % dp] for a in pipe.args]  # each replica feeds its shard (rank = pp * dp + d)
    step(*shard).backward()
    ref.step(*ref.args).backward()
    norm = dynapipe.clip_grad_norm_(pipe.model.parameters(), max_norm=0.1)
    expect = torch.nn.utils.clip_grad_norm_(ref.model.parameters(), max_norm=0.1)
    torch.testing.assert_close(norm, expect)
    assert norm > 0.1  # the gradients were clipped
    for n, p in _owned(pipe.model).items():
        torch.testing.assert_close(p.grad, dict(ref.model.named_parameters())[n].grad)
    return norm.item()


@pytest.mark.parametrize(("world", "dp"), [(2, 1), (4, 2)])
def test_clip_grad_norm_over_the_pipeline(world: int, dp: int) -> None:
    run_distributed(clip_worker, world, dp, timeout=180)


def two_pipelines_worker(rank: int, world: int) -> None:
    """Two compiled calls over one model that cut it in different places, alternating with optimizer
    steps: a parameter trained on one rank by the first is read on another by the second, whose copy
    must be brought up to date before it runs."""
    torch.manual_seed(0)
    net = nn.Sequential(*(m for _ in range(5) for m in (nn.Linear(6, 6), nn.Tanh())), nn.Linear(6, 3))
    ref = copy.deepcopy(net)
    first = torch.compile(
        lambda x, y: F.cross_entropy(net(x), y), backend="dynapipe", options={"split_points": ["4"]}
    )
    second = torch.compile(
        lambda x, y: F.cross_entropy(net(x), y) * 2, backend="dynapipe", options={"split_points": ["8"]}
    )
    calls = [
        (first, lambda x, y: F.cross_entropy(ref(x), y)),
        (second, lambda x, y: F.cross_entropy(ref(x), y) * 2),
    ]
    opt, ref_opt = torch.optim.SGD(net.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    for i in range(4):
        step, ref_step = calls[i % 2]
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        loss, ref_loss = step(x, y), ref_step(x, y)
        torch.testing.assert_close(loss, ref_loss, msg=lambda m, i=i: f"call {i}: {m}")
        loss.backward()
        ref_loss.backward()
        for n, p in net.named_parameters():  # the gradient is on the ranks that read it in this call
            if p.grad is not None:
                torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad)
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()


def test_two_pipelines_over_one_model() -> None:
    run_distributed(two_pipelines_worker, 2, timeout=180)


def ownership_worker(rank: int, world: int) -> list[list[str]]:
    """Training cuts the model at ``split_points``; an evaluation call and a call at another batch size,
    both without split points, keep every module on the rank that owns it (no rank fetches another's
    weights) and equal one process."""
    torch.manual_seed(0)
    net = nn.Sequential(*(m for _ in range(6) for m in (nn.Linear(6, 6), nn.Tanh())), nn.Linear(6, 3))
    ref = copy.deepcopy(net)
    train = torch.compile(
        lambda x, y: F.cross_entropy(net(x), y), backend="dynapipe", options={"split_points": ["2"]}
    )
    evaluate = torch.compile(lambda x: net(x), backend="dynapipe")
    held = []

    def holding() -> list[str]:
        return sorted(n for n, p in net.named_parameters() if p.untyped_storage().nbytes() > 0)

    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    train(x, y).backward()
    held.append(holding())
    with torch.no_grad():
        for batch in (8, 12):
            x = torch.randn(batch, 6)
            torch.testing.assert_close(evaluate(x), ref(x))
            held.append(holding())
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    torch.testing.assert_close(train(x, y), F.cross_entropy(ref(x), y))
    held.append(holding())
    return held


def test_later_pipelines_keep_each_module_on_its_owner() -> None:
    results = run_distributed(ownership_worker, 2, timeout=180)
    for rank, held in results.items():
        assert all(h == held[0] for h in held), f"rank {rank} fetched weights: {held}"
    assert set(results[0][0]).isdisjoint(results[1][0]) and "0.weight" in results[0][0]
