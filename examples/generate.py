"""HuggingFace ``generate()`` through a pipeline, each stage keeping its own layers' KV cache.

    python examples/generate.py                      # a 4-layer Llama on 2 processes, 16 new tokens
    python examples/generate.py --stages 4 --new-tokens 32
    torchrun --nproc-per-node 2 examples/generate.py

Every rank runs the same lines a single-process user writes, plus the cache:

    model.compile(backend="dynapipe", options={"n_microbatches": 2})
    cache = dynapipe.PipelineCache(model, batch_size=4, max_cache_len=prompt + new_tokens)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, cache=cache)

``generate()`` is HuggingFace's own. The prefill is one pipelined call and every decode step another
(one pipeline for the prompt's shape, one for a one-token step): the batch of prompts flows through the
stages as 2 microbatches, each stage writes and reads the keys and values of its own layers on its own
rank, only the new token's hidden state crosses a stage boundary, and only the last position's logits
come back to every rank, which picks the same next token. The tokens are checked against single-process
``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import dynapipe
from dynapipe.launch import launch

VOCAB, PROMPT, BATCH, PAD = 128, 8, 4, 0


def make_model(n_layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)  # every rank builds the same weights; each keeps only its own stages'
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of prompts of different lengths, left-padded to one, with their attention mask."""
    ids = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row in range(BATCH):
        ids[row, : 2 * row], mask[row, : 2 * row] = PAD, 0
    return ids, mask


def run(stages: int, new_tokens: int) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    model = make_model(n_layers=2 * stages)
    model.compile(backend="dynapipe", options={"n_microbatches": 2})
    ids, mask = prompts()
    cache = dynapipe.PipelineCache(model, batch_size=BATCH, max_cache_len=PROMPT + new_tokens)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, cache=cache
        )
    elapsed = time.perf_counter() - start
    held = sum(layer.keys.untyped_storage().nbytes() * 2 for layer in cache.layers)
    mine = [i for i, layer in enumerate(cache.layers) if layer.keys.untyped_storage().nbytes()]
    print(f"rank {rank}: holds the cache of layers {mine} ({held / 1024:.0f} KiB)", flush=True)
    dist.barrier()
    if rank == 0:
        print(
            f"{new_tokens} tokens for {BATCH} prompts in {elapsed:.1f} s (the first calls build the pipelines)"
        )
        expected = make_model(n_layers=2 * stages).generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False
        )
        for row, want in zip(out.tolist(), expected.tolist(), strict=True):
            print(f"  {row[PROMPT:]}  (single process {want[PROMPT:]})")
        ok = torch.equal(out, expected)
        print(f"pipelined greedy tokens vs single-process generate -> {'match' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit(1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    stages = int(os.environ.get("WORLD_SIZE", args.stages))  # torchrun decides when it launched us
    launch(run, stages, args.new_tokens, nproc=args.stages)


if __name__ == "__main__":
    main()
