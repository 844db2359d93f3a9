"""Small HuggingFace models from their configs: the one home of the sizes tests and benchmarks share.

    from hf_models import causal_lm, hf_config
    model = causal_lm("llama", vocab=96, hidden=32, layers=4, ffn=64, kv_heads=2, positions=64)

Benchmarks import it as a sibling (``python benchmarks/bench_x.py`` puts this folder first on
``sys.path``); tests import it because ``tests/conftest.py`` puts this folder on ``sys.path``. The
examples keep their configs inline, so that each reads on its own.

One vocabulary for every family: ``hidden``, ``layers``, ``heads``, ``kv_heads`` (grouped-query heads,
Llama-style families only), ``ffn`` (the MLP's inner width) and ``positions`` (the longest sequence)
become each family's own argument names. An argument left at None is not passed, so the family's default
holds; ``extra`` goes to the config as it is (dropout, token ids, ``tie_word_embeddings``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FAMILIES",
    "NO_DROPOUT",
    "PARTITION_HIDDEN",
    "PARTITION_VOCAB",
    "causal_lm",
    "hf_config",
    "partition_model",
]

# each family's dropout switched off: a pipelined run and one process then compute the same numbers
NO_DROPOUT: dict[str, dict[str, float]] = {
    "llama": {},
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "opt": {"dropout": 0.0, "attention_dropout": 0.0},
    "bloom": {"hidden_dropout": 0.0, "attention_dropout": 0.0},
}

# family -> (config class, causal-LM class, {our name: the config's name})
FAMILIES: dict[str, tuple[str, str, dict[str, str]]] = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "hidden": "hidden_size",
            "layers": "num_hidden_layers",
            "heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads",
            "ffn": "intermediate_size",
            "positions": "max_position_embeddings",
        },
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "hidden": "n_embd",
            "layers": "n_layer",
            "heads": "n_head",
            "ffn": "n_inner",
            "positions": "n_positions",
        },
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden": "hidden_size",
            "layers": "num_hidden_layers",
            "heads": "num_attention_heads",
            "ffn": "ffn_dim",
            "positions": "max_position_embeddings",
        },
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {"hidden": "hidden_size", "layers": "n_layer", "heads": "n_head"},
    ),
}


def hf_config(
    family: str,
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int = 4,
    kv_heads: int | None = None,
    ffn: int | None = None,
    positions: int | None = None,
    **extra: Any,
) -> Any:
    """The ``transformers`` config of ``family`` ("llama", "gpt2", "opt", "bloom") at these sizes."""
    import transformers

    config_class, _, names = FAMILIES[family]
    ours = {
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "ffn": ffn,
        "positions": positions,
    }
    unknown = sorted(k for k, v in ours.items() if v is not None and k not in names)
    if unknown:
        raise ValueError(f"{family} configs have no {', '.join(unknown)}; leave them out (None)")
    kwargs = {names[k]: v for k, v in ours.items() if v is not None}
    return getattr(transformers, config_class)(vocab_size=vocab, **kwargs, **extra)


def causal_lm(family: str, *, seed: int | None = 0, **sizes: Any) -> Any:
    """A randomly initialised causal LM of ``family`` (``hf_config`` arguments), seeded first unless
    ``seed`` is None, so that every rank builds the same weights."""
    import torch
    import transformers

    config = hf_config(family, **sizes)
    if seed is not None:
        torch.manual_seed(seed)
    return getattr(transformers, FAMILIES[family][1])(config)


# The partition tests' and benchmarks' models: vocab 1000 x hidden 64, so that the embedding and the LM
# head weigh about 1.3-1.7 layers of FLOPs and where a cut falls around them matters.
PARTITION_VOCAB, PARTITION_HIDDEN = 1000, 64
_PARTITION_EXTRA: dict[str, dict[str, Any]] = {
    "llama": {"kv_heads": 2, "ffn": 2 * PARTITION_HIDDEN, "positions": 64},
    "gpt2": {"positions": 64, "bos_token_id": 0, "eos_token_id": 0},
    "opt": {
        "ffn": 2 * PARTITION_HIDDEN,
        "positions": 64,
        "word_embed_proj_dim": PARTITION_HIDDEN,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
    },
    "bloom": {"bos_token_id": 0, "eos_token_id": 0},
}


def partition_model(family: str, layers: int) -> Any:
    """The partition tests' model of ``family`` with ``layers`` layers, seeded, in eval mode (no dropout,
    so stage-by-stage runs match exactly)."""
    model = causal_lm(
        family,
        vocab=PARTITION_VOCAB,
        hidden=PARTITION_HIDDEN,
        layers=layers,
        heads=4,
        **_PARTITION_EXTRA[family],
    ).eval()
    model.loss_type = "ForCausalLM"
    return model


def bench_llama_model(layers: int, positions: int) -> Any:
    """The Llama the first-step benchmarks share (hidden 256, 8 heads, 4 key/value heads, vocabulary
    8000, untied), seeded."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = hf_config(
        "llama",
        vocab=8000,
        hidden=256,
        layers=layers,
        heads=8,
        kv_heads=4,
        ffn=688,
        positions=positions,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)
