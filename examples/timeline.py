"""Record what every rank did during a pipelined training step and draw it, next to the simulator's version.

    python examples/timeline.py                          # 4 processes, 1F1B, writes timeline*.svg/json here
    python examples/timeline.py --schedule zb-h1 --nproc 2 --out /tmp/tl
    python examples/timeline.py --nominal                # plan at a nominal GPU's rates: compare the pictures
    torchrun --nproc-per-node 4 examples/timeline.py

``options={"on_step": hook}`` hands every rank a :class:`dynapipe.runtime.StepReport` after each step;
its ``timeline`` holds the rank's compute actions with their start and end (seconds from that rank's
start of the step). The script trains a small Llama for a few steps, gathers the last step's timelines
on rank 0 (``torch.distributed.gather_object``), merges them and writes

* ``timeline.svg`` -- the measured step, one row per rank (open it in a browser; hover a box);
* ``timeline.json`` -- the same as a Chrome trace (chrome://tracing or ui.perfetto.dev);
* ``timeline_simulated.svg`` -- the schedule replayed by :func:`dynapipe.schedules.simulate` with each
  stage's measured mean forward and backward times and free communication: the gap between the two
  pictures is what communication, waiting and timing noise cost.

A barrier before each step lines the ranks' clocks up. On a CPU shared by several processes, boxes also
stretch when processes compete for cores. The run checks itself: its first loss against one process, and
every compute action of the schedule appearing exactly once in the merged timeline (which also holds the
sends and receives lowering added, and the step's own named work: ``event.kind`` tells them apart).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from dynapipe.launch import launch
from dynapipe.schedules import Kind, StageCost, get_schedule, simulate
from dynapipe.viz import merge_timelines, timeline_svg, write_chrome_trace

VOCAB, SEQ, BATCH, MICROBATCHES = 128, 64, 16, 8


def make_model(n_layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)  # every rank builds the same weights; each keeps only its own stages'
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    return (start + torch.arange(SEQ)) % VOCAB


def measured_costs(timeline, n_stages: int) -> dict[int, StageCost]:
    """Each stage's mean duration per kind of action in a recorded step, as the simulator's costs."""
    durations: dict[tuple[int, Kind], list[float]] = {}
    for event in timeline.events:
        action = event.action  # None for the step's own work ("refresh shared state", "wait for sends")
        if action is not None and action.kind.is_compute:
            durations.setdefault((action.stage, action.kind), []).append(event.end - event.start)

    def mean(stage: int, kind: Kind) -> float:
        values = durations.get((stage, kind), [])
        return sum(values) / len(values) if values else 0.0

    # A full backward B costs backward_input + backward_weight: put it all in backward_input.
    return {
        s: StageCost(
            forward=mean(s, Kind.F),
            backward_input=mean(s, Kind.B) + mean(s, Kind.I),
            backward_weight=mean(s, Kind.W),
        )
        for s in range(n_stages)
    }


def run(schedule: str, steps: int, out: Path, nominal: bool) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    spec = get_schedule(schedule)
    n_stages = spec.n_stages(world, stages_per_rank=None if spec.stages_per_rank else 2)
    model = make_model(n_layers=2 * n_stages)
    reports = []
    step_fn = torch.compile(
        lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss,
        backend="dynapipe",
        options={
            "schedule": schedule,
            "n_microbatches": MICROBATCHES,
            "n_stages": n_stages,
            "on_step": reports.append,
            # plan in this machine's measured seconds (the default), or a nominal GPU's
            "rates": "nominal" if nominal else "measure",
        },
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        if step:
            dist.barrier()  # every rank starts the step, and its clock, together
        loss = step_fn(batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(reports[-1].timeline, gathered, dst=0)
    if rank == 0:
        measured = merge_timelines(gathered)
        table = spec.build(n_ranks=world, n_stages=n_stages, n_microbatches=MICROBATCHES)
        simulated = simulate(
            table,
            measured_costs(measured, n_stages),
            n_ranks=world,
            n_stages=n_stages,
            placement=spec.placement,
        )
        out.mkdir(parents=True, exist_ok=True)
        what = f"{spec.name}, {world} ranks, {n_stages} stages, {MICROBATCHES} microbatches"
        timeline_svg(measured, out / "timeline.svg", title=f"Measured: {what}")
        write_chrome_trace(measured, out / "timeline.json")
        timeline_svg(
            simulated, out / "timeline_simulated.svg", title=f"Simulated, measured stage times: {what}"
        )
        print(f"measured step  {measured.makespan * 1e3:7.1f} ms, bubble {measured.bubble_fraction:.0%}")
        print(
            f"simulated step {simulated.makespan * 1e3:7.1f} ms, bubble {simulated.bubble_fraction:.0%}"
            " (same stage times, free communication)"
        )
        print(f"wrote {out / 'timeline.svg'}, {out / 'timeline.json'}, {out / 'timeline_simulated.svg'}")

        scheduled = sorted((r, str(a)) for r, acts in table.items() for a in acts if a is not None)
        # the table is compute only; the timeline also holds sends, receives and the step's own work
        recorded = sorted(
            (e.rank, e.name) for e in measured.events if e.action is not None and e.action.kind.is_compute
        )
        expected = make_model(n_layers=2 * n_stages)(input_ids=batch(0), labels=batch(0)).loss.item()
        ok = abs(losses[0] - expected) <= 1e-5 * max(1.0, abs(expected)) and recorded == scheduled
        print(
            f"first loss: pipelined {losses[0]:.6f}, single process {expected:.6f}; "
            f"{len(recorded)} of {len(scheduled)} scheduled actions recorded -> {'match' if ok else 'MISMATCH'}"
        )
        if not ok:
            raise SystemExit(1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b, interleaved-1f1b, zb-h1 or zbv")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument(
        "--nominal", action="store_true", help="plan at a nominal GPU's rates, not measured ones"
    )
    args = parser.parse_args()
    launch(run, args.schedule, args.steps, args.out, args.nominal, nproc=args.nproc)


if __name__ == "__main__":
    main()
