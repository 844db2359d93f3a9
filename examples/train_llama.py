"""Pipelined training of a small Llama on 4 local CPU processes.

    python examples/train_llama.py                      # spawns 4 processes itself
    torchrun --nproc-per-node 4 examples/train_llama.py # or let torchrun launch them

A randomly initialised ``LlamaForCausalLM`` is cut into 4 stages (one per process) by
``torch.compile(..., backend="dynapipe")`` and trained with the 1F1B schedule on a synthetic "count up by
one" language. The training loop is the single-device one. Rank 0 first says what dynapipe did (the
stages it cut, from the plan that runs: modules, parameters, estimated time; the schedule), writes a
picture of the partition and the measured timeline of one step, and the run as one HTML page that links
both to the plan (``run.html``; all in ``--out``, default ``dynapipe-demo/``),
prints the loss as it falls, and ends by checking its first step against the same model on one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from dynapipe.formatting import format_bytes
from dynapipe.launch import launch
from dynapipe.viz import (
    merge_timelines,
    partition_svg,
    partition_text,
    timeline_svg,
    write_chrome_trace,
    write_report,
)

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


def describe(report, out: Path) -> None:
    """Say what dynapipe did, from the plan that runs (rank 0), and draw it."""
    plan = report.plan
    print(
        f"dynapipe cut the model into {len(plan.stages)} stages, one per process (times at the rates measured "
        "on this machine when the pipeline was built):"
    )
    print(partition_text(plan))
    params = ", ".join(f"stage {s.index}: {format_bytes(s.param_bytes)}" for s in plan.stages)
    print(f"parameters per stage ({format_bytes(sum(s.param_bytes for s in plan.stages))} in all): {params}")
    out.mkdir(parents=True, exist_ok=True)
    partition_svg(plan, out / "partition.svg", title="dynapipe's partition of the demo Llama")


def train(steps: int, out: Path) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    model = make_model()
    reports = []
    options = {"schedule": "1f1b", "n_microbatches": 4}
    step_fn = torch.compile(
        lambda ids: model(input_ids=ids, labels=ids).loss,
        backend="dynapipe",
        options={**options, "on_step": reports.append},
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, step_times, start = [], [], time.perf_counter()
    for step in range(steps):
        began = time.perf_counter()
        loss = step_fn(batch(step))
        loss.backward()
        step_times.append(time.perf_counter() - began)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step == 0 and rank == 0:
            describe(reports[0], out)
            print("schedule: 1f1b, 4 microbatches of 4 sequences per step", flush=True)
        if step == 1:  # the first step also captured and partitioned: draw a steady one
            # the run as one page (partition, every rank's step, the plan beside it): every rank calls it
            page = write_report(out / "run.html", reports[-1], options=options, title="dynapipe demo: step 1")
            timelines = [None] * world if rank == 0 else None
            dist.gather_object(reports[-1].timeline, timelines, dst=0)
            if rank == 0:
                measured = merge_timelines(timelines)
                timeline_svg(measured, out / "timeline.svg", title="Measured step 1: 1f1b, 4 ranks")
                write_chrome_trace(measured, out / "timeline.json")
                print(
                    f"step 1 took {measured.makespan * 1e3:.0f} ms, {measured.bubble_fraction:.0%} of it idle; "
                    f"wrote {out / 'partition.svg'}, {out / 'timeline.svg'} and {out / 'timeline.json'} "
                    "(chrome://tracing)",
                    flush=True,
                )
                print(f"the run as one page: {page} (open it in a browser; saved run beside it)", flush=True)
        if rank == 0 and (step % 5 == 0 or step == steps - 1):
            print(
                f"step {step:3d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)", flush=True
            )

    if rank == 0 and steps > 2:  # every step after the first (which captured, measured and planned)
        later = sorted(step_times[1:])
        print(
            f"the plan beside the run: {reports[-1].plan.beside(measured, step_s=statistics.median(later))} "
            f"(median of {len(later)} steps, {later[0] * 1e3:.0f}-{later[-1] * 1e3:.0f} ms)"
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
    parser.add_argument("--out", type=Path, default=Path("dynapipe-demo"), help="where the pictures go")
    args = parser.parse_args()
    launch(train, args.steps, args.out, nproc=args.nproc)


if __name__ == "__main__":
    main()
