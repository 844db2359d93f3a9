"""One capture and one partition for every sequence length: the stage graphs are symbolic in the sizes.

Training at lengths 64, 96, 80, 72 equals one process at every length (loss and every gradient), as does
inference (the logits), on a Llama and on a model that reads its input's sizes at the top and uses them
in the last stage; dynapipe captures each compiled call once (``StepReport.plan.captured.number``), and
a length Dynamo must treat apart (1) is one more, counted capture.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import run_distributed

import dynapipe
from dynapipe.codegen import build_stages
from dynapipe.errors import ConfigError

LENGTHS = (64, 96, 80, 72)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()  # eval: no dropout, the same on one process and in a pipeline


class SizesAtTop(nn.Module):
    """Reads the batch and sequence sizes once, at the top, and uses them in the last stage's reshape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        logits = self.head(h).reshape(b * t, -1)
        return F.cross_entropy(logits, ids.reshape(b * t))


def _assert_grads(model: nn.Module, ref: nn.Module, what: str) -> None:
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.untyped_storage().nbytes() == 0:  # another rank's stage
            continue
        expect = ref_params[name].grad
        expect = torch.zeros_like(p) if expect is None else expect
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, expect, msg=lambda m: f"{what} grad {name}: {m}")


def _every_length(rank: int, world: int) -> dict:
    captures: dict[str, list] = {}

    def watch(name: str):
        return lambda report: captures.setdefault(name, []).append(
            (report.plan.captured.number, id(report.plan.captured))
        )

    options = {"n_microbatches": 2, "schedule": "1f1b"}
    llama, ref = _llama(), _llama()
    step = torch.compile(
        lambda ids: llama(input_ids=ids, labels=ids, use_cache=False).loss,
        backend="dynapipe",
        options={**options, "split_points": ["model.layers.1"], "on_step": watch("llama")},
    )
    top, top_ref = SizesAtTop(), SizesAtTop()
    top_step = torch.compile(
        top, backend="dynapipe", options={**options, "split_points": ["layers.1"], "on_step": watch("top")}
    )
    torch.manual_seed(2)
    for length in LENGTHS:
        ids = torch.randint(0, 32, (4, length))
        loss = step(ids)
        loss.backward()
        ref_loss = ref(input_ids=ids, labels=ids, use_cache=False).loss
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, msg=lambda m: f"llama length {length} loss: {m}")
        _assert_grads(llama, ref, f"llama length {length}")
        loss = top_step(ids)
        loss.backward()
        ref_loss = top_ref(ids)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, msg=lambda m: f"top length {length} loss: {m}")
        _assert_grads(top, top_ref, f"top length {length}")
        for model in (llama, ref, top, top_ref):
            model.zero_grad()
    # a smaller last batch that still divides into microbatches: the same pipeline
    for rows in (8, 4):
        ids = torch.randint(0, 32, (rows, 48))
        loss = top_step(ids)
        torch.testing.assert_close(loss, top_ref(ids), msg=lambda m: f"top, batch of {rows}, loss: {m}")
        loss.backward()

    infer = torch.compile(
        lambda ids: llama(input_ids=ids, use_cache=False).logits,
        backend="dynapipe",
        options={**options, "split_points": ["model.layers.1"], "on_step": watch("infer")},
    )
    with torch.no_grad():
        for length in (*LENGTHS, 1):  # 1: Dynamo specialises it, so one more capture
            ids = torch.randint(0, 64, (4, length))
            torch.testing.assert_close(
                infer(ids),
                ref(input_ids=ids, use_cache=False).logits,
                msg=lambda m: f"logits at {length}: {m}",
            )
    return captures


def test_one_capture_serves_every_length() -> None:
    results = run_distributed(_every_length, 2, timeout=280)
    for rank, captures in results.items():
        # one capture (number 1, one captured graph) for every length of each compiled call
        assert [n for n, _ in captures["llama"]] == [1] * len(LENGTHS), (rank, captures["llama"])
        assert len({c for _, c in captures["llama"]}) == 1
        assert [n for n, _ in captures["top"]] == [1] * (len(LENGTHS) + 2), (rank, captures["top"])
        assert len({c for _, c in captures["top"]}) == 1
        # inference: one capture for the four lengths, one more (counted) for length 1
        assert [n for n, _ in captures["infer"]] == [1] * len(LENGTHS) + [2], (rank, captures["infer"])


def test_sizes_cross_stages_as_code_not_data() -> None:
    """A size read at the top and used in the last stage is computed there from the input: no boundary
    carries it, and the stage graphs hold at other lengths but not at a length Dynamo treats apart."""
    model = SizesAtTop()
    ids = torch.randint(0, 32, (4, 16))
    explanation = dynapipe.explain(model, (ids,), n_stages=2, n_microbatches=2, split_points=["layers.1"])
    captured = explanation.captured
    plans = build_stages(captured, explanation.stage_of, 2)
    assert [b.name for b in plans[1].receives] == ["h_1"]  # the activation only
    assert "size(1)" in plans[1].module.code  # the last stage computes t from its input
    shapes = captured.shapes
    at = shapes.sizes_at([torch.zeros(8, 40, dtype=torch.long)], 8, 2)
    assert at is not None and plans[1].receives[0].shape.at(at) == (4, 40, 16)
    assert shapes.sizes_at([torch.zeros(4, 1, dtype=torch.long)], 4, 2) is None  # length 1: its own capture
    assert shapes.sizes_at([torch.zeros(6, 16, dtype=torch.long)], 6, 4) is None  # 4 does not divide 6
    assert "costed at ids: (2, 16)" in str(explanation)


def test_packed_sequence_batch_is_refused() -> None:
    with pytest.raises(ConfigError, match="packed"):
        dynapipe.explain(SizesAtTop(), (torch.randint(0, 32, (1, 64)),), n_stages=2, n_microbatches=2)
