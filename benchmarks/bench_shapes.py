"""Sequence lengths that change between steps: the cost of a new length, and variable against padded data.

    python benchmarks/bench_shapes.py            # 2 ranks, small Llama split at model.layers.2; ~1 minute
    python benchmarks/bench_shapes.py --steps 40
    python benchmarks/bench_shapes.py --dynamic  # torch.compile(..., dynamic=True): Dynamo never recompiles

One group of 2 processes (gloo) trains a small randomly initialised Llama, 1F1B, batch 8 in 4 microbatches:

1. **steady** -- steps at one length (64) after warm-up: the median step time (min-max);
2. **new length** -- the first step at each of 96, 80, 72, 112 (each never seen before). At the first of
   them Dynamo compiles the frame again with dynamic sizes (its automatic dynamic shapes), and dynapipe
   reuses its pipeline; at the later ones only dynapipe's size check runs. Each is given as a multiple of
   the steady step (the issue's target: at most 3x; before issue 12, 130-290x). With ``--dynamic``
   Dynamo compiles the frame with dynamic sizes from the start, so no new length recompiles it;
3. **variable vs padded** -- the same ``--steps`` batches, each of a random length in 32..128 (a multiple
   of 8), run as they are and padded to 128 (labels of the padding are -100): steps/s of each.

Run the same script with ``PYTHONPATH`` pointing at an older checkout to measure it side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dynapipe import launch

WORLD, BATCH, MICRO, VOCAB, MAX_LEN = 2, 8, 4, 1000, 128
STEADY, NEW = 64, (96, 80, 72, 112)


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
    )
    return LlamaForCausalLM(config)


def _worker(steps: int, dynamic: bool, out: str) -> None:
    rank = int(os.environ["RANK"])
    model = _model()
    step = torch.compile(
        lambda ids, labels: model(input_ids=ids, labels=labels, use_cache=False).loss,
        backend="dynapipe",
        dynamic=dynamic or None,
        options={"schedule": "1f1b", "n_microbatches": MICRO, "split_points": ["model.layers.2"]},
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)

    def timed(ids: torch.Tensor, labels: torch.Tensor) -> float:
        start = time.perf_counter()
        step(ids, labels).backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    def batch(length: int) -> torch.Tensor:
        return torch.randint(0, VOCAB, (BATCH, length), generator=gen)

    ids = batch(STEADY)
    for _ in range(3):
        timed(ids, ids)
    steady = [timed(ids, ids) for _ in range(steps)]
    new = []
    for length in NEW:
        ids = batch(length)
        new.append(timed(ids, ids))
    pick = random.Random(2)
    lengths = [8 * pick.randint(4, 16) for _ in range(steps)]
    data = [batch(n) for n in lengths]
    for ids in data[:2]:  # warm-up at two lengths: the frame is compiled with dynamic sizes
        timed(ids, ids)
    start = time.perf_counter()
    for ids in data:
        timed(ids, ids)
    variable = time.perf_counter() - start
    padded_data = []
    for ids in data:
        pad = torch.zeros(BATCH, MAX_LEN - ids.shape[1], dtype=ids.dtype)
        labels = torch.cat([ids, torch.full_like(pad, -100)], dim=1)
        padded_data.append((torch.cat([ids, pad], dim=1), labels))
    timed(*padded_data[0])
    start = time.perf_counter()
    for ids, labels in padded_data:
        timed(ids, labels)
    padded = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(
            json.dumps([steady, new, steps / variable, steps / padded, sorted(set(lengths))])
        )
    import torch.distributed as dist

    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(..., dynamic=True)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        launch(_worker, args.steps, args.dynamic, out, nproc=WORLD)
        steady, new, variable, padded, lengths = json.loads(Path(out).read_text())
    median = statistics.median(steady)
    print(
        f"{WORLD} ranks, 1F1B, batch {BATCH} in {MICRO} microbatches, small Llama split at model.layers.2; "
        f"{args.steps} steps{'; torch.compile(dynamic=True)' if args.dynamic else ''}"
    )
    print(
        f"steady step at length {STEADY}: {median * 1e3:.1f} ms ({min(steady) * 1e3:.1f}-{max(steady) * 1e3:.1f})"
    )
    print(f"{'new length':>10s} {'step ms':>9s} {'x steady':>9s}")
    for length, t in zip(NEW, new, strict=True):
        print(f"{length:10d} {t * 1e3:9.1f} {t / median:9.1f}")
    print(f"variable lengths {lengths[0]}-{lengths[-1]} ({len(lengths)} distinct): {variable:.2f} steps/s")
    print(f"padded to {MAX_LEN}: {padded:.2f} steps/s; variable / padded: {variable / padded:.2f}x")


if __name__ == "__main__":
    main()
