"""Greedy generation for a batch of prompts: dynapipe's cached pipeline against full recompute and one process.

    python benchmarks/bench_generate.py                    # 2 processes, Llama 8 x 256, 8 prompts, 32 new tokens
    python benchmarks/bench_generate.py --nproc 4 --new-tokens 64

Rows, each in fresh processes, every timing the median of ``--repeats`` warm runs (min-max beside it)
after one run that builds the pipelines (its time is the ``first run`` column; ``pipelines`` is the part of
it dynapipe spent building the prefill and decode pipelines, from ``StepReport.build_s`` on rank 0, the rest
being Dynamo's traces and the run itself):

* ``dynapipe + PipelineCache``: HF ``generate()`` on the dynapipe-compiled model; the prefill and every
  decode step are pipelined calls (2 microbatches), each stage keeps its own layers' keys and values;
* ``dynapipe, full recompute``: what ``examples/generate.py`` did before the cache: each new token runs
  the pipelined model on the whole sequence so far, left-padded to one window (``use_cache=False``);
* ``one process, HF cache``: ``model.generate()`` in one process with HuggingFace's own dynamic cache.

Time to first token is measured with a ``generate()`` streamer (the first new token's arrival); tokens/s
counts every generated token of the batch over the whole call. The last table is the cache memory each
rank holds against the whole cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

VOCAB, PAD = 1000, 0


def _model(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def _prompts(batch: int, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (batch, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for row in range(batch):
        ids[row, : row % 4], mask[row, : row % 4] = PAD, 0
    return ids, mask


class _Clock:
    """A ``generate()`` streamer that notes when each batch of tokens arrives (the prompt comes first)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _cached(
    args: argparse.Namespace, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[float, torch.Tensor, dict]:
    """One pipelined generate(); returns (time to first token, tokens, cache bytes of this rank)."""
    import dynapipe

    model = args.model
    cache = dynapipe.PipelineCache(
        model, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + args.new_tokens
    )
    clock, start = _Clock(), time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            do_sample=False,
            cache=cache,
            streamer=clock,
        )
    held = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
    whole = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return clock.times[1] - start, out, {"held": held, "whole": whole}


def _recompute(
    args: argparse.Namespace, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[float, torch.Tensor, dict]:
    """Full recompute on a left-padded window of prompt + new tokens - 1, one pipelined forward per token."""
    window = ids.shape[1] + args.new_tokens - 1
    first = None
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.new_tokens):
            pad = window - ids.shape[1]
            full_mask = torch.cat([torch.zeros(ids.shape[0], pad, dtype=torch.long), mask], dim=1)
            inputs = {
                "input_ids": torch.cat([torch.full((ids.shape[0], pad), PAD), ids], dim=1),
                "attention_mask": full_mask,
                "position_ids": (full_mask.cumsum(-1) - 1).clamp(min=0),
            }
            logits = args.logits_of(inputs)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            first = first or time.perf_counter() - start
    return first or 0.0, ids, {}


def _worker(mode: str, args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    torch.set_num_threads(1)
    args.model = _model(args.hidden, args.layers)
    builds: dict[int, float] = {}  # each pipeline's build seconds, by its plan

    def on_step(report) -> None:
        builds[id(report.plan)] = report.build_s

    if mode == "cached":
        args.model.compile(backend="dynapipe", options={"n_microbatches": 2, "on_step": on_step})
        run = _cached
    else:
        model = args.model
        args.logits_of = torch.compile(
            lambda inputs: model(**inputs, use_cache=False).logits,
            backend="dynapipe",
            options={"n_microbatches": 2, "schedule": "gpipe", "on_step": on_step},
        )
        run = _recompute
    ids, mask = _prompts(args.batch, args.prompt)
    start = time.perf_counter()
    _, out, memory = run(args, ids, mask)
    build, pipelines = time.perf_counter() - start, sum(builds.values())
    ttft, total = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        first, out, memory = run(args, ids, mask)
        total.append(time.perf_counter() - start)
        ttft.append(first)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, memory)
    return {
        "build": build,
        "pipelines": pipelines,
        "ttft": ttft,
        "total": total,
        "tokens": out.tolist(),
        "memory": per_rank,
    }


def _one_process(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    model = _model(args.hidden, args.layers)
    ids, mask = _prompts(args.batch, args.prompt)
    ttft, total = [], []
    for _ in range(args.repeats + 1):
        clock, start = _Clock(), time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, streamer=clock
            )
        total.append(time.perf_counter() - start)
        ttft.append(clock.times[1] - start)
    return {
        "build": 0.0,
        "pipelines": 0.0,
        "ttft": ttft[1:],
        "total": total[1:],
        "tokens": out.tolist(),
        "memory": [],
    }


def _spread(values: list[float], scale: float = 1.0) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"


def main() -> None:
    from dynapipe.launch import launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {}
    for mode, name in (("cached", "dynapipe + PipelineCache"), ("recompute", "dynapipe, full recompute")):
        rows[name] = launch(_worker, mode, args, nproc=args.nproc)[0]  # rank 0's row
    rows["one process, HF cache"] = _one_process(args)
    reference = rows["one process, HF cache"]["tokens"]
    generated = args.batch * args.new_tokens
    print(
        f"Llama {args.layers} x {args.hidden}, {args.batch} prompts of {args.prompt} tokens, {args.new_tokens} new "
        f"tokens each, {args.nproc} processes (1 thread each), median of {args.repeats} (min-max)\n"
    )
    print(
        f"| {'':26} | time to first token (ms) | tokens/s              | first run (s) | pipelines (s) "
        "| same tokens |"
    )
    print(f"| {'-' * 26} | {'-' * 24} | {'-' * 21} | {'-' * 13} | {'-' * 13} | {'-' * 11} |")
    for name, row in rows.items():
        rate = [generated / t for t in row["total"]]
        same = "yes" if row["tokens"] == reference else "NO"
        print(
            f"| {name:26} | {_spread(row['ttft'], 1000):>24} | {_spread(rate):>21} | {row['build']:13.1f} "
            f"| {row['pipelines']:13.1f} | {same:>11} |"
        )
    memory = rows["dynapipe + PipelineCache"]["memory"]
    print(
        "\n| rank | cache held (KiB) | whole cache (KiB) |\n| ---- | ---------------- | ----------------- |"
    )
    for rank, m in enumerate(memory):
        print(f"| {rank:4} | {m['held'] / 1024:16.0f} | {m['whole'] / 1024:17.0f} |")


if __name__ == "__main__":
    main()
