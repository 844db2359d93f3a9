"""Inputs a new user tries first get a message that says what to do, not a failure deep inside Dynamo."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn as nn
from harness import run_distributed

import dynapipe


def _generate_without_cache(rank: int, world: int) -> str:
    """``generate()`` through the pipeline as a HuggingFace user writes it, with no PipelineCache."""
    from hf_models import causal_lm

    model = causal_lm(
        "llama", vocab=64, hidden=32, layers=2, ffn=64, kv_heads=2, positions=32, pad_token_id=0
    ).eval()
    model.compile(backend="dynapipe", options={"n_microbatches": 2})
    ids = torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(0))
    try:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    except dynapipe.ConfigError as err:
        return str(err)
    return "generate() ran"


@pytest.mark.hf
def test_generate_without_pipeline_cache_names_the_cache_to_pass() -> None:
    results = run_distributed(_generate_without_cache, 2, timeout=120)
    for message in results.values():
        # transformers before 5.24 passes the cache as past_key_values
        assert re.search(r"argument '(cache|past_key_values)' is a HuggingFace DynamicCache", message), (
            message
        )
        assert "cache=dynapipe.PipelineCache(model, batch_size=" in message
        assert "use_cache=False" in message
    assert results[0] == results[1]  # every rank stops with the same words


def _passthrough(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def _unnamed(fn):
    def wrapper(*args, **kwargs):  # no functools.wraps: nothing tells the parameters' names
        return fn(*args, **kwargs)

    return wrapper


class _Decorated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 16)

    @_passthrough
    def forward(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (self.second(torch.relu(self.first(tokens))) * weights).sum()


class _Undecorated(_Decorated):
    @_unnamed
    def forward(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (self.second(torch.relu(self.first(tokens))) * weights).sum()


@pytest.mark.parametrize(
    "model, inputs, shown",
    [
        (_Decorated(), "positional", "costed at tokens: (2, 16), weights: (2, 1)"),
        (_Decorated(), "keywords", "costed at tokens: (2, 16), weights: (2, 1)"),
        (_Undecorated(), "positional", "costed at args[1]: (2, 16), args[2]: (2, 1)"),
    ],
)
def test_explain_names_inputs_of_a_decorated_forward(model: nn.Module, inputs: str, shown: str) -> None:
    tokens, weights = torch.randn(4, 16), torch.rand(4, 1)
    call = (tokens, weights) if inputs == "positional" else {"tokens": tokens, "weights": weights}
    table = str(dynapipe.explain(model, call, n_stages=2))
    assert shown in table
    assert "L[" not in table
