"""Pipelined training of small OPT and Bloom causal LMs, cut into stages automatically, on local CPU processes.

    python examples/train_opt_bloom.py                   # both models, 2 stages on 2 processes
    python examples/train_opt_bloom.py --stages 4 --models bloom
    torchrun --nproc-per-node 2 examples/train_opt_bloom.py

No ``split_points``: dynapipe costs every graph node (FLOPs, bytes) and finds a balanced cut with a
min-cut partitioner -- the same call works for OPT's learned positions and Bloom's ALiBi biases without
naming a module. ``python -m dynapipe.viz partition opt --stages 2 -o opt.svg`` draws the cut it picks.

Each model is checked against one process trained on the same batches with the same optimizer: the loss
of every step, and every parameter after the last step, gathered from the ranks that hold it.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from transformers import BloomConfig, BloomForCausalLM, OPTConfig, OPTForCausalLM

from dynapipe.launch import launch

VOCAB, SEQ, BATCH = 128, 32, 8


def make_model(name: str, n_layers: int) -> torch.nn.Module:
    torch.manual_seed(0)  # every rank builds the same weights; each keeps only its own stages'
    if name == "opt":
        config = OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=SEQ,
            word_embed_proj_dim=64,
            dropout=0.0,
            attention_dropout=0.0,
        )  # no dropout: comparable runs
        return OPTForCausalLM(config)
    config = BloomConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        n_layer=n_layers,
        n_head=4,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return BloomForCausalLM(config)


def batch(step: int) -> torch.Tensor:
    """Sequences that count up by one from a random start: easy to learn, so the loss visibly falls."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    return (start + torch.arange(SEQ)) % VOCAB


def train(model: torch.nn.Module, step_fn, steps: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for step in range(steps):
        loss = step_fn(batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def check(name: str, stages: int, steps: int) -> bool:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # dynapipe starts the process group
    model = make_model(name, n_layers=2 * stages)
    step_fn = torch.compile(
        lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss,
        backend="dynapipe",
        options={"schedule": "1f1b", "n_microbatches": 4},  # no split_points: automatic partition
    )
    losses = train(model, step_fn, steps)
    held = {n: p.detach().clone() for n, p in model.named_parameters() if p.untyped_storage().nbytes()}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(held, gathered, dst=0)
    if rank != 0:
        return True
    reference = make_model(name, n_layers=2 * stages)
    expected = train(reference, lambda ids: reference(input_ids=ids, labels=ids, use_cache=False).loss, steps)
    ok = all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(losses, expected, strict=True))
    ref = dict(reference.named_parameters())
    worst = max((v - ref[n].detach()).abs().max().item() for params in gathered for n, v in params.items())
    missing = sorted(set(ref) - {n for params in gathered for n in params})
    params_ok = not missing and worst <= 1e-4
    print(f"{name}: pipelined loss   " + " ".join(f"{x:.4f}" for x in losses))
    print(f"{name}: single process   " + " ".join(f"{x:.4f}" for x in expected))
    print(
        f"{name}: {len(ref)} parameters after {steps} steps, max |diff| {worst:.2e}"
        + (f", missing {missing}" if missing else "")
        + f" -> {'match' if ok and params_ok else 'MISMATCH'}",
        flush=True,
    )
    return ok and params_ok


def run(models: list[str], stages: int, steps: int) -> None:
    torch.set_num_threads(1)
    if int(os.environ["WORLD_SIZE"]) != stages:
        raise SystemExit(f"--stages {stages} needs {stages} processes, got {os.environ['WORLD_SIZE']}")
    results = [check(name, stages, steps) for name in models]
    dist.destroy_process_group()
    if not all(results):
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=["opt", "bloom"], default=["opt", "bloom"])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    launch(run, args.models, args.stages, args.steps, nproc=args.stages)


if __name__ == "__main__":
    main()
