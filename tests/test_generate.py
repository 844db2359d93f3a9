"""HuggingFace ``generate()`` through the pipeline with a :class:`dynapipe.PipelineCache`.

Every check compares the tokens with single-process ``model.generate(do_sample=False)`` (HF's own cache),
on left-padded prompts with an attention mask, and looks at where the cache lives: each layer's keys and
values hold memory on exactly one rank, and a decode step sends about one token's hidden state per
microbatch across each stage boundary, not the cache.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

pytestmark = pytest.mark.hf

BATCH, PROMPT, NEW, VOCAB, HIDDEN = 4, 5, 4, 64, 64


def _cache_argument(cache) -> dict:
    """``generate()``'s cache keyword: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__) >= Version("5.24")
    return {"cache" if new else "past_key_values": cache}


CACHE = 48  # longer than the sequences: a cache that crossed stages would show in the bytes sent


def _model(family: str, n_layers: int):
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}
    if family == "llama":
        config = tf.LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            **common,
        )
        return tf.LlamaForCausalLM(config).eval()
    if family == "gpt2":
        config = tf.GPT2Config(n_positions=32, n_embd=HIDDEN, n_layer=n_layers, n_head=4, **common)
        return tf.GPT2LMHeadModel(config).eval()
    if family == "opt":
        config = tf.OPTConfig(
            hidden_size=HIDDEN,
            ffn_dim=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=32,
            word_embed_proj_dim=HIDDEN,
            **common,
        )
        return tf.OPTForCausalLM(config).eval()
    config = tf.BloomConfig(hidden_size=HIDDEN, n_layer=n_layers, n_head=4, **common)
    return tf.BloomForCausalLM(config).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row i has i padding tokens."""
    ids = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for i in range(BATCH):
        ids[i, :i], mask[i, :i] = 0, 0
    return ids, mask


def _generate_pipelined(rank: int, world: int, families: list[str], n_layers: int, again: bool) -> dict:
    """Per family: the tokens, the bytes of each layer's keys this rank holds, and the bytes this rank
    sent in each pipelined call (prefill, then the decode steps)."""
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
            options={"n_microbatches": 2, "on_step": lambda _: per_step.append(sent[0])},
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
    results = run_distributed(_generate_pipelined, 2, families, 2, False, timeout=240)
    _check(results, families, 2, 2)


def test_generate_llama_on_four_ranks():
    results = run_distributed(_generate_pipelined, 4, ["llama"], 4, True, timeout=240)
    _check(results, ["llama"], 4, 4)
    ids, mask = _prompts()
    expected = _model("llama", 4).generate(
        ids[:, 2:], attention_mask=mask[:, 2:], max_new_tokens=NEW, do_sample=False
    )
    for rank in range(4):
        torch.testing.assert_close(torch.tensor(results[rank]["llama, shorter prompt"]), expected)


def _errors(rank: int, world: int) -> dict[str, str]:
    """Each misuse raises a ConfigError on every rank (a hang would fail the spawn's timeout instead)."""
    from dynapipe import DynapipeError, PipelineCache

    model = _model("llama", 2)
    model.compile(backend="dynapipe", options={"n_microbatches": 2, "timeout_s": 60})
    ids, mask = _prompts()
    messages = {}
    calls = {
        "too many tokens": ({"max_new_tokens": NEW}, PROMPT + 2),
        "beam search": ({"max_new_tokens": 2, "num_beams": 2}, CACHE),
    }
    for name, (kwargs, length) in calls.items():
        cache = PipelineCache(model, batch_size=BATCH, max_cache_len=length)
        # Dynamo raises the cache's own check while it traces, wrapped in its TorchRuntimeError
        expected = DynapipeError if name == "too many tokens" else RuntimeError
        with torch.no_grad(), pytest.raises(expected) as err:
            model.generate(ids, attention_mask=mask, do_sample=False, **_cache_argument(cache), **kwargs)
        messages[name] = str(err.value)
    return messages


def test_misuse_is_an_error_on_every_rank():
    results = run_distributed(_errors, 2, timeout=180)
    for messages in results.values():
        assert "holds 7 tokens, but this step would write token 8" in messages["too many tokens"]
        assert "beam search and num_return_sequences > 1 are not supported" in messages["beam search"]


def test_a_cache_that_does_not_fit_the_family_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    from dynapipe import ConfigError, PipelineCache

    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    with pytest.raises(ConfigError, match="sliding_attention"):
        PipelineCache(MistralForCausalLM(config), batch_size=2, max_cache_len=8)
