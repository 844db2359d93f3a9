"""Pipelined training of a small Llama on 4 local CPU processes.

    python examples/train_llama.py                      # spawns 4 processes itself
    torchrun --nproc-per-node 4 examples/train_llama.py # or let torchrun launch them

A randomly initialised ``LlamaForCausalLM`` is cut into 4 stages (one per process) by
``torch.compile(..., backend="dynapipe")`` and trained with the 1F1B schedule on a synthetic "count up by
one" language. The training loop is the single-device one. Rank 0 prints the loss as it falls, and the
script ends by checking its first step against the same model trained on one process.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from dynapipe.launch import launch

VOCAB, SEQ, BATCH = 128, 32, 16


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)  # every rank builds the same weights; each keeps only its own stage's
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


def batch(step: int) -> torch.Tensor:
    """Sequences that count up by one from a random start: easy to learn, so the loss visibly falls."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    return (start + torch.arange(SEQ)) % VOCAB


def train(steps: int) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    model = make_model()
    step_fn = torch.compile(
        lambda ids: model(input_ids=ids, labels=ids).loss,
        backend="dynapipe",
        options={"schedule": "1f1b", "n_microbatches": 4},
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        loss = step_fn(batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if rank == 0 and (step % 5 == 0 or step == steps - 1):
            print(
                f"step {step:3d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)", flush=True
            )

    if rank == 0:
        reference = make_model()
        expected = reference(input_ids=batch(0), labels=batch(0)).loss.item()
        ok = abs(losses[0] - expected) <= 1e-5 * max(1.0, abs(expected))
        print(
            f"first step: pipelined {losses[0]:.6f}, single process {expected:.6f} -> {'match' if ok else 'MISMATCH'}"
        )
        print(f"loss fell from {losses[0]:.3f} to {losses[-1]:.3f} over {steps} steps")
        if not ok or not losses[-1] < losses[0]:
            raise SystemExit(1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args()
    launch(train, args.steps, nproc=args.nproc)


if __name__ == "__main__":
    main()
