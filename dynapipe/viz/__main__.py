"""Draw a schedule or a partition from the command line.

    python -m dynapipe.viz schedule 1f1b --ranks 4 --microbatches 8 -o 1f1b.svg
    python -m dynapipe.viz schedule zbv --ranks 4 --microbatches 8 --f 1 --b 1 --w 0.5 -o zbv.svg
    python -m dynapipe.viz partition llama --stages 4 -o llama.svg      # also prints the table
    python -m dynapipe.viz report run.json -o run.html                  # the page of a saved run

``schedule`` simulates one step of a builtin schedule (or a table file) with the given per-stage times
(forward, backward-input and backward-weight; a full backward costs b + w) and draws the timeline;
``--trace`` also writes a Chrome trace. ``partition`` builds a small randomly initialised HuggingFace
model from a config (``llama``, ``gpt2``, ``opt``, ``bloom``), partitions it with
:func:`dynapipe.explain` and draws the result. ``report`` writes the HTML page of a run that
:func:`dynapipe.viz.write_report` saved (its JSON format: :mod:`dynapipe.viz.run`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..schedules import StageCost, get_schedule, simulate
from .partition import partition_text
from .partition_picture import partition_svg
from .report import report_html
from .run import load_run
from .timeline import timeline_svg, write_chrome_trace

__all__ = ["main"]


def _schedule(args: argparse.Namespace) -> None:
    spec = get_schedule(args.name)
    n_stages = args.stages or spec.n_stages(
        args.ranks, stages_per_rank=2 if spec.stages_per_rank is None else None
    )
    table = spec.build(n_ranks=args.ranks, n_stages=n_stages, n_microbatches=args.microbatches)
    timeline = simulate(
        table,
        StageCost(forward=args.f, backward_input=args.b, backward_weight=args.w),
        n_ranks=args.ranks,
        n_stages=n_stages,
        placement=spec.placement,
    )
    title = f"{spec.name}, {args.ranks} ranks, {args.microbatches} microbatches (F={args.f:g}, I={args.b:g}, W={args.w:g})"
    timeline_svg(timeline, args.output, title=args.title or title)
    if args.trace:
        write_chrome_trace(timeline, args.trace)
    print(f"{args.output}: makespan {timeline.makespan:g}, bubble {timeline.bubble_fraction:.1%}")


def _hf_model(name: str, layers: int, hidden: int, vocab: int, seq: int):
    import transformers as hf

    heads = max(1, hidden // 16)
    if name == "llama":
        config = hf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=seq,
        )
        return hf.LlamaForCausalLM(config)
    if name == "gpt2":
        return hf.GPT2LMHeadModel(
            hf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=seq)
        )
    if name == "opt":
        return hf.OPTForCausalLM(
            hf.OPTConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                ffn_dim=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                max_position_embeddings=seq,
                word_embed_proj_dim=hidden,
            )
        )
    if name == "bloom":
        return hf.BloomForCausalLM(
            hf.BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads)
        )
    raise SystemExit(f"unknown model {name!r}: use llama, gpt2, opt or bloom")


def _partition(args: argparse.Namespace) -> None:
    import torch

    from ..explain import explain

    torch.manual_seed(0)
    model = _hf_model(args.model, args.layers, args.hidden, args.vocab, args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    # use_cache=False: a training step has no use for the KV cache, which would otherwise be an output
    # that every stage ships to the last one.
    explanation = explain(
        model,
        dict(input_ids=ids, labels=ids, use_cache=False),
        n_stages=args.stages,
        split_points=args.split_points or (),
    )
    title = args.title or (
        f"{args.model} ({args.layers} layers, hidden {args.hidden}) in "
        f"{args.stages} stages, imbalance {explanation.imbalance:.2f}"
    )
    partition_svg(explanation, args.output, title=title)
    print(partition_text(explanation))
    print(f"wrote {args.output}")


def _report(args: argparse.Namespace) -> None:
    output = Path(args.output or Path(args.saved).with_suffix(".html"))
    output.write_text(report_html(load_run(args.saved)), encoding="utf-8")
    print(f"wrote {output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynapipe.viz", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("schedule", help="simulate a schedule and draw its timeline")
    s.add_argument("name", help="gpipe, 1f1b, interleaved-1f1b, zb-h1, zbv, or a table file")
    s.add_argument("--ranks", type=int, default=4)
    s.add_argument("--microbatches", type=int, default=8)
    s.add_argument("--stages", type=int, default=None, help="default: what the schedule runs per rank")
    s.add_argument("--f", type=float, default=1.0, help="forward time per stage and microbatch")
    s.add_argument("--b", type=float, default=1.0, help="backward-input time (a full backward is b + w)")
    s.add_argument("--w", type=float, default=1.0, help="backward-weight time")
    s.add_argument("--trace", help="also write a Chrome trace (JSON) here")
    s.add_argument("--title")
    s.add_argument("-o", "--output", default="schedule.svg")
    s.set_defaults(run=_schedule)
    p = sub.add_parser("partition", help="partition a small random HuggingFace model and draw it")
    p.add_argument("model", choices=["llama", "gpt2", "opt", "bloom"])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--split-points", nargs="*", help="module names to cut before instead of the automatic partition"
    )
    p.add_argument("--title")
    p.add_argument("-o", "--output", default="partition.svg")
    p.set_defaults(run=_partition)
    r = sub.add_parser("report", help="write the HTML page of a run saved by dynapipe.viz.write_report")
    r.add_argument("saved", metavar="RUN.json", help="the saved run (JSON)")
    r.add_argument("-o", "--output", help="default: the run's name with .html")
    r.set_defaults(run=_report)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
