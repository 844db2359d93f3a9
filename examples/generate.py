"""Pipelined greedy generation with a small Llama on local CPU processes, checked against HF ``generate``.

    python examples/generate.py                      # 2 stages on 2 processes, 8 new tokens
    python examples/generate.py --stages 4 --new-tokens 12
    python examples/generate.py --grow               # no padding: a new pipeline per sequence length
    torchrun --nproc-per-node 2 examples/generate.py

Under ``torch.no_grad()`` a dynapipe-compiled call is pipelined inference: the batch of prompts is split
into microbatches that flow through the stages, and the logits come back on every rank, so every rank
picks the same next token and grows the same sequences.

No KV cache: each step runs the model on the whole sequence so far (full recompute, ``use_cache=False``),
which costs O(n^2) over n tokens; a cache would have to live inside the stages across calls, which
dynapipe does not do. It keeps the example honest about what is pipelined: one full forward per token.

Shapes: dynapipe builds one pipeline (capture, partition, stage code) per input shape, and a sequence
that grows by one token each step is a new shape each step -- Dynamo itself turns the length dynamic
after the second one, but dynapipe still re-captures per concrete length, which costs seconds a token
here. So by default the sequences are left-padded to one fixed window (the longest length it will see), with an
attention mask and the position ids they would have unpadded: one shape, one pipeline, and every token
after the first is a single pipelined forward. ``--grow`` calls the model on the growing sequence instead
to show the difference.

The tokens are compared with ``model.generate(do_sample=False)`` in one process (which does use a KV
cache: the same greedy tokens by a different route).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

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
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def prompts() -> torch.Tensor:
    return torch.randint(1, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))


def step_inputs(ids: torch.Tensor, window: int | None) -> dict[str, torch.Tensor]:
    """The model's inputs for the sequences so far: as they are, or left-padded to ``window`` tokens with
    an attention mask and the position ids the real tokens would have without padding."""
    if window is None:
        return {"input_ids": ids}
    pad = window - ids.shape[1]
    mask = torch.cat([torch.zeros(ids.shape[0], pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    return {
        "input_ids": torch.cat([torch.full((ids.shape[0], pad), PAD), ids], dim=1),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }


def run(stages: int, new_tokens: int, grow: bool) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    model = make_model(n_layers=2 * stages)
    logits_of = torch.compile(
        lambda inputs: model(**inputs, use_cache=False).logits,
        backend="dynapipe",
        options={"n_microbatches": 2, "schedule": "gpipe"},
    )
    window = None if grow else PROMPT + new_tokens - 1  # the longest sequence the model is called on
    ids = prompts()
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(new_tokens):
            t0 = time.perf_counter()
            logits = logits_of(step_inputs(ids, window))  # (batch, length, vocab) on every rank
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            if rank == 0:
                print(
                    f"token {i + 1:2d}: length {ids.shape[1]:2d}  {time.perf_counter() - t0:5.1f} s",
                    flush=True,
                )
    if rank == 0:
        print(
            f"{new_tokens} tokens in {time.perf_counter() - start:.1f} s (the first call includes building the pipeline)"
        )
        reference = make_model(n_layers=2 * stages)
        with torch.no_grad():
            expected = reference.generate(prompts(), max_new_tokens=new_tokens, do_sample=False)
        for row, want in zip(ids.tolist(), expected.tolist(), strict=True):
            print(f"  {row[PROMPT:]}  (single process {want[PROMPT:]})")
        ok = torch.equal(ids, expected)
        print(f"pipelined greedy tokens vs single-process generate -> {'match' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit(1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument(
        "--grow", action="store_true", help="call on the growing sequence: one pipeline per length"
    )
    args = parser.parse_args()
    stages = int(os.environ.get("WORLD_SIZE", args.stages))  # torchrun decides when it launched us
    launch(run, stages, args.new_tokens, args.grow, nproc=args.stages)


if __name__ == "__main__":
    main()
