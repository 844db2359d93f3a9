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
CACHE = 24  # longer than the sequences: a cache that crossed stages would show in the bytes sent


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


def _generate_pipelined(rank: int, world: int, families: list[str], n_layers: int) -> dict:
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
                ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, cache=cache
            )
        held = [layer.keys.untyped_storage().nbytes() for layer in cache.layers]
        steps = [b - a for a, b in zip([0, *per_step], per_step, strict=False)]
        out[family] = (tokens, held, steps)
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
            torch.testing.assert_close(tokens, expected, msg=f"{family}, rank {rank}")
            assert len(steps) == NEW, (family, steps)  # one prefill, NEW - 1 decode steps
        kv_width = HIDDEN // 2 if family == "llama" else HIDDEN  # Llama: 2 of 4 heads are key/value heads
        key_bytes = BATCH * kv_width * CACHE * 4
        for layer in range(n_layers):
            holders = [r for r in range(world) if results[r][family][1][layer]]
            assert len(holders) == 1, f"{family}: layer {layer}'s cache is held on ranks {holders}"
            assert results[holders[0]][family][1][layer] == key_bytes  # at the full batch
        # the first stage sends the new token's hidden state, and small per-token values (rotary angles) to
        # each stage that reads them, never keys or values (one layer's keys alone are 12 to 24 x larger)
        hidden_state = BATCH * HIDDEN * 4
        for step in results[0][family][2][1:]:
            assert hidden_state <= step < 3 * hidden_state, (family, step, hidden_state)


def test_generate_matches_one_process_on_two_ranks():
    families = ["llama", "gpt2", "opt", "bloom"]
    results = run_distributed(_generate_pipelined, 2, families, 2, timeout=240)
    _check(results, families, 2, 2)


def test_generate_llama_on_four_ranks():
    results = run_distributed(_generate_pipelined, 4, ["llama"], 4, timeout=240)
    _check(results, ["llama"], 4, 4)
