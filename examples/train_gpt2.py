"""Pipelined, optionally also data-parallel, training of a small GPT-2 with tied embeddings on local CPU processes.

    python examples/train_gpt2.py                         # 2 pipeline stages on 2 processes
    python examples/train_gpt2.py --stages 4              # 4 stages on 4 processes
    python examples/train_gpt2.py --stages 2 --dp 2       # pp=2 x dp=2 on 4 processes
    torchrun --nproc-per-node 4 examples/train_gpt2.py --stages 2 --dp 2

GPT-2 ties its token embedding to its LM head: the first and the last stage both read
``transformer.wte.weight``. dynapipe finds that from the graph, keeps a copy on each of those ranks and
sums their gradients, so the copies stay equal. With ``--dp 2`` each pipeline replica trains on its half
of the batch (``dp_degree`` in the options) and the loss and gradients are averaged over replicas.

The script checks itself against one process trained on the whole batch with the same optimizer: the
loss of every step, and every parameter after the last step -- gathered from the ranks that hold it,
both copies of the tied embedding included.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from dynapipe.launch import launch

VOCAB, SEQ, BATCH = 128, 32, 16


def make_model(n_layers: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)  # every rank builds the same weights; each keeps only its own stages'
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=64,
        n_layer=n_layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # no dropout: comparable runs
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def batch(step: int) -> torch.Tensor:
    """Sequences that count up by one from a random start: easy to learn, so the loss visibly falls."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    return (start + torch.arange(SEQ)) % VOCAB


def train(model: GPT2LMHeadModel, step_fn, steps: int, shard) -> list[float]:
    """The single-device training loop; ``shard`` picks this replica's part of the batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = step_fn(shard(batch(step)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def run(stages: int, dp: int, steps: int) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != stages * dp:
        raise SystemExit(f"--stages {stages} x --dp {dp} needs {stages * dp} processes, got {world}")
    torch.set_num_threads(1)
    model = make_model(n_layers=2 * stages)
    step_fn = torch.compile(
        lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss,
        backend="dynapipe",
        options={"schedule": "1f1b", "n_microbatches": 4, "dp_degree": dp},  # automatic partition
    )
    dp_index = rank % dp  # ranks of one pipeline are dp apart (dynapipe's pp x dp mesh)
    losses = train(model, step_fn, steps, lambda ids: ids.chunk(dp)[dp_index])
    if rank == 0:
        print(f"pipelined ({stages} stages x {dp} replicas): loss " + " ".join(f"{x:.4f}" for x in losses))

    # Every rank holds the parameters of its own stages (the others have no storage): gather them.
    held = {n: p.detach().clone() for n, p in model.named_parameters() if p.untyped_storage().nbytes()}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(held, gathered, dst=0)
    if rank == 0:
        reference = make_model(n_layers=2 * stages)
        expected = train(
            reference, lambda ids: reference(input_ids=ids, labels=ids).loss, steps, lambda ids: ids
        )
        print("single process:                loss " + " ".join(f"{x:.4f}" for x in expected))
        ok = all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(losses, expected, strict=True))
        print(f"losses over {steps} steps -> {'match' if ok else 'MISMATCH'}")

        ref = dict(reference.named_parameters())
        worst, copies = 0.0, {}
        for params in gathered:
            for name, value in params.items():
                worst = max(worst, (value - ref[name].detach()).abs().max().item())
                copies[name] = copies.get(name, 0) + 1
        missing = sorted(set(ref) - set(copies))
        params_ok = not missing and worst <= 1e-4
        print(
            f"tied transformer.wte.weight held by {copies.get('transformer.wte.weight', 0)} ranks "
            f"(first and last stage of each replica)"
        )
        print(
            f"{len(ref)} parameters after {steps} steps vs single process: max |diff| {worst:.2e}"
            + (f", missing {missing}" if missing else "")
            + f" -> {'match' if params_ok else 'MISMATCH'}"
        )
        if not (ok and params_ok):
            raise SystemExit(1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2, choices=[2, 4])
    parser.add_argument("--dp", type=int, default=1, choices=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    launch(run, args.stages, args.dp, args.steps, nproc=args.stages * args.dp)


if __name__ == "__main__":
    main()
