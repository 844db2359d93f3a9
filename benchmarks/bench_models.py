"""Real-model benchmark: dynapipe's automatic partition against the equal-layer manual split.

    python benchmarks/bench_models.py            # Llama and GPT-2, 4 stages, 1F1B, 8 microbatches
    python benchmarks/bench_models.py --quick    # Llama only, fewer steps

Each row trains a randomly initialised HuggingFace causal LM on 4 local CPU processes (gloo) with the
same schedule twice: split automatically (no ``split_points``) and split at equal layer counts (what a
person writes). The vocabulary is large enough that the embedding and the LM head weigh like several
layers, which is where an equal-layer split loses. Reported: median step time with min/max over the timed
steps, and the ratio automatic / manual (below 1: the automatic partition is faster).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

WORLD, BATCH, SEQ, MICRO = 4, 16, 64, 8


def _model(name: str):
    torch.manual_seed(0)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=16000,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config), "model.layers"
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=16000,
        n_positions=SEQ,
        n_embd=128,
        n_layer=8,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config), "transformer.h"


def _worker(rank: int, port: int, name: str, split: str, steps: int, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    model, layers = _model(name)
    options = {"schedule": "1f1b", "n_microbatches": MICRO}
    if split == "manual":
        n_layers = 8
        options["split_points"] = [f"{layers}.{i * n_layers // WORLD}" for i in range(1, WORLD)]
    step = torch.compile(
        lambda ids: model(input_ids=ids, labels=ids).loss, backend="dynapipe", options=options
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 16000, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        step(ids).backward()
        opt.step()
        opt.zero_grad()
        if i >= 3:
            times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(times)
    import torch.distributed as dist

    dist.destroy_process_group()


def _run(name: str, split: str, steps: int) -> list[float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, port, name, split, steps, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    times = queue.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    models = ["llama"] if args.quick else ["llama", "gpt2"]
    steps = 5 if args.quick else 10
    print(
        f"{WORLD} stages, 1F1B, batch {BATCH} x {SEQ} tokens, {MICRO} microbatches, {steps} timed steps; ms"
    )
    print(f"{'model':8s} {'manual (min-max)':>22s} {'automatic (min-max)':>22s} {'auto/manual':>12s}")
    for name in models:
        manual, auto = _run(name, "manual", steps), _run(name, "auto", steps)
        m, a = statistics.median(manual), statistics.median(auto)

        def cell(ts: list[float]) -> str:
            return f"{statistics.median(ts) * 1e3:7.1f} ({min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f})"

        print(f"{name:8s} {cell(manual):>22s} {cell(auto):>22s} {a / m:12.3f}", flush=True)


if __name__ == "__main__":
    main()
