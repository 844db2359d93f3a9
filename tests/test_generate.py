"""HuggingFace ``generate()`` through the pipeline with a :class:`dynapipe.PipelineCache`.

Every check compares the tokens with single-process ``model.generate(do_sample=False)`` (HF's own cache),
on left-padded prompts with an attention mask, and looks at where the cache lives: each layer's keys and
values hold memory on exactly one rank, and a decode step sends about one token's hidden state per
microbatch across each stage boundary, not the cache. A misuse (too many tokens, beams, another batch, a
filled cache, a sliding-window family) is a ConfigError on every rank before any forward.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from hf_models import causal_lm

pytestmark = pytest.mark.hf

BATCH, PROMPT, NEW, VOCAB, HIDDEN = 4, 5, 4, 64, 64


def _cache_argument(cache) -> dict:
    """``generate()``'s cache keyword: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__) >= Version("5.24")
    return {"cache" if new else "past_key_values": cache}


CACHE = 48  # longer than the sequences: a cache that crossed stages would show in the bytes sent


# each family's sizes beyond vocabulary, width and depth; no bos/eos token, so generate() never stops early
SIZES = {
    "llama": {"kv_heads": 2, "ffn": 64, "positions": 32},
    "gpt2": {"positions": 32},
    "opt": {"ffn": 64, "positions": 32},
    "bloom": {},
}
TOKENS = {"pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}


def _model(family: str, n_layers: int):
    return causal_lm(family, vocab=VOCAB, hidden=HIDDEN, layers=n_layers, **SIZES[family], **TOKENS).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row i has i padding tokens."""
    ids = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for i in range(BATCH):
        ids[i, :i], mask[i, :i] = 0, 0
    return ids, mask


def _generate_pipelined(
    rank: int, world: int, families: list[str], n_layers: int, again: bool, options: dict | None = None
) -> dict:
    """Per family: the tokens, the bytes of each layer's keys this rank holds, and the bytes this rank
    sent in each pipelined call (prefill, then the decode steps). ``options`` add to the backend's."""
    import torch.distributed as dist

    from dynapipe import PipelineCache

    sent = [0]
    isend = dist.isend

    def counting_isend(tensor, *args, **kwargs):  # a spy: the real send runs
        sent[0] += tensor.numel() * tensor.element_size()
        return isend(tensor, *args, **kwargs)

    dist.isend = counting_isend
    out = {}
    for family in families:
        model = _model(family, n_layers)
        per_step: list[int] = []
        model.compile(
            backend="dynapipe",
            options={"n_microbatches": 2, "on_step": lambda _: per_step.append(sent[0]), **(options or {})},
        )
        ids, mask = _prompts()
        cache = PipelineCache(model, batch_size=BATCH, max_cache_len=CACHE)
        with torch.no_grad():
            tokens = model.generate(
                ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **_cache_argument(cache)
            )
        held = [layer.keys.untyped_storage().nbytes() for layer in cache.layers]
        steps = [b - a for a, b in zip([0, *per_step], per_step, strict=False)]
        out[family] = (tokens.tolist(), held, steps)  # lists: a tensor would leave through shared memory
        if family == families[0]:  # sampling: every rank draws from the same logits with the same seed
            torch.manual_seed(7)
            cache = PipelineCache(model, batch_size=BATCH, max_cache_len=CACHE)
            with torch.no_grad():
                out[f"{family}, sampled"] = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=NEW,
                    do_sample=True,
                    top_k=8,
                    **_cache_argument(cache),
                ).tolist()
        if again:  # a new cache and a shorter prompt: a new prefill pipeline, the decode one reused
            cache = PipelineCache(model, batch_size=BATCH, max_cache_len=CACHE)
            with torch.no_grad():
                out[f"{family}, shorter prompt"] = model.generate(
                    ids[:, 2:],
                    attention_mask=mask[:, 2:],
                    max_new_tokens=NEW,
                    do_sample=False,
                    **_cache_argument(cache),
                ).tolist()
        sent[0] = 0
    return out


def _check(results: dict, families: list[str], n_layers: int, world: int) -> None:
    ids, mask = _prompts()
    for family in families:
        expected = _model(family, n_layers).generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False
        )
        for rank in range(world):
            tokens, held, steps = results[rank][family]
            torch.testing.assert_close(torch.tensor(tokens), expected, msg=f"{family}, rank {rank}")
            assert len(steps) == NEW, (family, steps)  # one prefill, NEW - 1 decode steps
        if family == families[0]:
            model = _model(family, n_layers)
            torch.manual_seed(7)
            sampled = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=8)
            for rank in range(world):
                torch.testing.assert_close(torch.tensor(results[rank][f"{family}, sampled"]), sampled)
        kv_width = HIDDEN // 2 if family == "llama" else HIDDEN  # Llama: 2 of 4 heads are key/value heads
        key_bytes = BATCH * kv_width * CACHE * 4
        for layer in range(n_layers):
            holders = [r for r in range(world) if results[r][family][1][layer]]
            assert len(holders) == 1, f"{family}: layer {layer}'s cache is held on ranks {holders}"
            assert results[holders[0]][family][1][layer] == key_bytes  # at the full batch
        # the first stage sends the new token's hidden state (twice where a cut falls inside a layer: the
        # residual and the attention output) and small per-token values (rotary angles) to each stage that
        # reads them, never keys or values (one layer's keys alone are 24 to 48 hidden states)
        # Bloom also sends its ALiBi bias, computed once from the mask: (batch x heads, 1, cache length)
        hidden_state = BATCH * HIDDEN * 4
        alibi = BATCH * 4 * CACHE * 4 if family == "bloom" else 0
        for step in results[0][family][2][1:]:
            assert hidden_state <= step < 4 * hidden_state + alibi, (family, step, hidden_state)


def test_generate_matches_one_process_on_two_ranks():
    families = ["llama", "gpt2", "opt", "bloom"]
    # the bytes each decode step sends are bounded for the plan of nominal rates (here and below):
    # measured ones (this machine's, under whatever load) may move a cut to one that sends another tensor
    results = run_distributed(_generate_pipelined, 2, families, 2, False, {"rates": "nominal"}, timeout=240)
    _check(results, families, 2, 2)


def test_generate_llama_on_four_ranks():
    results = run_distributed(_generate_pipelined, 4, ["llama"], 4, True, {"rates": "nominal"}, timeout=240)
    _check(results, ["llama"], 4, 4)
    ids, mask = _prompts()
    expected = _model("llama", 4).generate(
        ids[:, 2:], attention_mask=mask[:, 2:], max_new_tokens=NEW, do_sample=False
    )
    for rank in range(4):
        torch.testing.assert_close(torch.tensor(results[rank]["llama, shorter prompt"]), expected)


def _refused(model, cache, **kwargs) -> str:
    """The ConfigError ``generate()`` raises with ``cache``: its message."""
    from dynapipe import ConfigError

    ids, mask = _prompts()
    with torch.no_grad(), pytest.raises(ConfigError) as err:
        model.generate(ids, attention_mask=mask, **{"do_sample": False, **kwargs}, **_cache_argument(cache))
    return str(err.value)


MISUSES = {  # name: (PipelineCache arguments, generate arguments, part of the message)
    "too many new tokens": (
        {"batch_size": BATCH, "max_cache_len": PROMPT + 2},
        {"max_new_tokens": NEW},
        "holds max_cache_len=7 tokens, but a prompt of 5 tokens and max_new_tokens=4 need 8 (the prompt and "
        "every new token but the last); build it with max_cache_len >= 8, or pass max_new_tokens <= 3",
    ),
    "too long max_length": (
        {"batch_size": BATCH, "max_cache_len": PROMPT + 2},
        {"max_length": PROMPT + NEW},
        "max_length=9 need 8 (the prompt and every new token but the last); build it with max_cache_len >= 8, "
        "or pass max_length <= 8",
    ),
    "beam search": (
        {"batch_size": BATCH, "max_cache_len": CACHE},
        {"max_new_tokens": 2, "num_beams": 2},
        "beam search and num_return_sequences > 1 are not supported through a PipelineCache (got num_beams=2",
    ),
    "num_return_sequences": (
        {"batch_size": BATCH, "max_cache_len": CACHE},
        {"max_new_tokens": 2, "do_sample": True, "num_return_sequences": 2},
        "num_beams=1, num_return_sequences=2)",
    ),
    "another batch size": (
        {"batch_size": BATCH - 1, "max_cache_len": CACHE},
        {"max_new_tokens": 2},
        "generate() got 4 prompts, but the PipelineCache was built with batch_size=3",
    ),
}


@pytest.mark.parametrize("name", MISUSES)
def test_misuse_is_refused_before_any_forward(name):
    """``generate()`` checks the cache against its settings before the prefill: no forward runs (the model
    is not compiled here, so the check needs no pipeline)."""
    from dynapipe import PipelineCache

    model = _model("llama", 2)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    cache_kwargs, kwargs, message = MISUSES[name]
    assert message in _refused(model, PipelineCache(model, **cache_kwargs), **kwargs)
    assert forwards == []


def test_hf_does_not_compile_the_decode_step_around_the_pipeline():
    """HF compiles a static cache's decode step on CUDA unless ``disable_compile``; through a PipelineCache
    it must not, whatever generation_config the user passes (``_compile_all_devices`` makes HF consider
    it on the CPU too)."""
    from transformers import CompileConfig, GenerationConfig

    from dynapipe import PipelineCache

    model = _model("llama", 2)
    ids, mask = _prompts()
    asked = []
    real = model._valid_auto_compile_criteria

    def criteria(model_kwargs, generation_config):
        asked.append(real(model_kwargs, generation_config))
        raise _Stop  # the answer is all this test needs: no forward

    model._valid_auto_compile_criteria = criteria
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, compile_config=CompileConfig())
    config.compile_config._compile_all_devices = True
    for cache in (None, PipelineCache(model, batch_size=BATCH, max_cache_len=CACHE)):
        kwargs = _cache_argument(cache) if cache is not None else {"cache_implementation": "static"}
        with torch.no_grad(), pytest.raises(_Stop):
            model.generate(ids, attention_mask=mask, generation_config=config, **kwargs)
    assert asked == [True, False]  # HF's own static cache would be compiled; a PipelineCache is not


class _Stop(Exception):
    pass


def _misuse_on_ranks(rank: int, world: int) -> dict:
    """Every misuse, before and after a good ``generate()``: the messages, the tokens, and the number of
    pipelined calls at each point (a hang would fail the spawn's timeout instead)."""
    from dynapipe import PipelineCache

    model = _model("llama", 2)
    calls: list[int] = []
    model.compile(
        backend="dynapipe",
        options={"n_microbatches": 2, "timeout_s": 60, "on_step": lambda _: calls.append(1)},
    )
    out: dict = {"messages": {}}
    for name, (cache_kwargs, kwargs, _) in MISUSES.items():  # before the model's first call
        out["messages"][name] = _refused(model, PipelineCache(model, **cache_kwargs), **kwargs)
    out["calls before"] = len(calls)
    ids, mask = _prompts()
    cache = PipelineCache(model, batch_size=BATCH, max_cache_len=CACHE)
    generate = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False}
    with torch.no_grad():
        out["tokens"] = model.generate(ids, **generate, **_cache_argument(cache)).tolist()
    out["reused"] = _refused(model, cache, max_new_tokens=NEW)
    cache.reset()
    with torch.no_grad():
        out["tokens after reset"] = model.generate(ids, **generate, **_cache_argument(cache)).tolist()
    out["beam search later"] = _refused(model, PipelineCache(model, **MISUSES["beam search"][0]), num_beams=2)
    out["calls after"] = len(calls)
    return out


def test_misuse_is_an_error_on_every_rank_before_any_pipelined_call():
    results = run_distributed(_misuse_on_ranks, 2, timeout=240)
    ids, mask = _prompts()
    expected = _model("llama", 2).generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    for out in results.values():
        assert out["messages"] == results[0]["messages"]
        for name, (_, _, message) in MISUSES.items():
            assert message in out["messages"][name], name
        assert out["calls before"] == 0
        assert "filled by an earlier generate()" in out["reused"]
        torch.testing.assert_close(torch.tensor(out["tokens"]), expected)
        torch.testing.assert_close(torch.tensor(out["tokens after reset"]), expected)
        assert "(got num_beams=2" in out["beam search later"]
        assert out["calls after"] == 2 * NEW  # the two good generate() calls, nothing for the misuses


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_cache_that_does_not_fit_the_family_is_refused(family):
    """Sliding-window layers (every one in Mistral, every other one in Gemma2) are refused when the cache is
    built, before the model is called."""
    import transformers as tf

    from dynapipe import ConfigError, PipelineCache

    sizes = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 4}
    if family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**sizes, **heads))
    else:
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**sizes, **heads, head_dim=8))
    with pytest.raises(ConfigError, match="does not fit PipelineCache: .* has sliding_attention layers"):
        PipelineCache(model, batch_size=2, max_cache_len=8)
