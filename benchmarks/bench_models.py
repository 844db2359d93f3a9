"""Real-model benchmark: the automatic plan against the equal-layer split and ``balance_slack=0.03``, and
every plan's predicted step beside its measured one.

    python benchmarks/bench_models.py                 # demo, Llama and GPT-2; 2 and 4 stages; m = p and 4p
    python benchmarks/bench_models.py --quick         # the demo model at 4 stages, m = 4, fewer steps
    python benchmarks/bench_models.py --models demo --stages 4 --micro 1 4 --steps 24

Each row trains a randomly initialised causal LM on local CPU processes (gloo), one per stage, with 1F1B
and ``n_microbatches`` = the stage count times ``--micro``. Three plans of the same model, each compiled
on its own copy in the same processes: **auto** (the default options), **even** (``balance_slack=0.03``:
every stage within 3% of the best balance; "(same)" where it is the auto plan) and **equal**
(``split_points`` at equal numbers of layers, what a person writes). Their steps alternate (auto, even,
equal, auto, ...) so that load on the machine falls on all alike, each plan running one untimed step after
the switch and then the timed one (switching plans disturbs the memory allocator: a plan's first step
after another's pays page faults that a training run of one plan does not); every step's time is the
slowest rank's. Reported per plan: the median step (min-max) in ms and the step its plan predicted
(``StepReport.plan.predicted_step_s``: rehearsed on the ranks when it was built); the ratio of the auto
plan to the better of the other two (to the equal layers where the even plan is the auto plan), the median
of the rounds' ratios (below 1: auto is faster); and over the row's plans, predicted / measured and
simulated / measured (the partitioner's model alone, at the measured rates).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dynapipe import launch

SEQ, LAYERS, VOCAB = 64, 8, 16000
EVEN = 0.03  # balance_slack of the 'even' plan


def _model(name: str) -> tuple[Any, str, int, int, int]:
    """(model, layer prefix, vocabulary, batch, sequence) of a benchmark model."""
    torch.manual_seed(0)
    if name == "demo":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
        import train_llama

        return train_llama.make_model(), "model.layers", train_llama.VOCAB, train_llama.BATCH, train_llama.SEQ
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config), "model.layers", VOCAB, 16, SEQ
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=128,
        n_layer=LAYERS,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config), "transformer.h", VOCAB, 16, SEQ


def _worker(
    name: str, n_mb: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, float | None], dict[str, float], dict[str, bool]]:
    """One rank's timed steps of every plan, each plan's predicted and simulated step, and whether 'even'
    and 'equal' cut where 'auto' does."""
    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    _, layers, vocab, batch, seq = _model(name)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    equal = [f"{layers}.{i * LAYERS // world}" for i in range(1, world)]
    variants = {"auto": {}, "even": {"balance_slack": EVEN}, "equal": {"split_points": equal}}
    runs, reports = {}, {}
    for variant, extra in variants.items():  # each plan pipelines its own copy of the model
        model = _model(name)[0]
        reports[variant] = seen = []
        options: dict = {
            "schedule": "1f1b",
            "n_microbatches": n_mb,
            "optimizer": "sgd",
            "on_step": seen.append,
        }
        step = torch.compile(
            lambda ids, model=model: model(input_ids=ids, labels=ids).loss,
            backend="dynapipe",
            options={**options, **extra},
        )
        runs[variant] = (step, torch.optim.SGD(model.parameters(), lr=1e-3))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(steps + 2):
        for variant, (step, opt) in runs.items():  # alternate: load falls on every plan alike
            for settle in (True, False):  # a step untimed after the switch: the allocator settles
                if dist.is_initialized():  # the first call starts the process group
                    dist.barrier()
                start = time.perf_counter()
                step(ids).backward()
                opt.step()
                opt.zero_grad()
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's step
                if i >= 2 and not settle:
                    times[variant].append(elapsed.item())
    predicted = {v: r[0].plan.predicted_step_s for v, r in reports.items()}
    simulated = {v: r[0].plan.predicted.makespan for v, r in reports.items()}
    same = {v: _cuts(reports["auto"][0]) == _cuts(reports[v][0]) for v in ("even", "equal")}
    return times, predicted, simulated, same


def _cuts(report: Any) -> list[str]:
    return [str(s.modules) for s in report.plan.stages]


def _paired(times: list[float], baseline: list[float]) -> float:
    """Median of the per-round ratios: the plans of a round ran back to back, under the same load."""
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=["demo", "llama", "gpt2"])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 4], help="microbatches per stage")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if args.quick:
        args.models, args.stages, args.micro, args.steps = ["demo"], [4], [1], 6
    print(
        f"1F1B, {args.steps} timed steps per plan, alternating (each after an untimed one); ms: median (min-max) [predicted]"
    )
    print(
        f"{'model':6s} {'p':>2s} {'m':>3s} {'auto':>28s} {'even (slack .03)':>28s} {'equal layers':>28s} "
        f"{'auto/better':>11s} {'pred/meas':>11s} {'sim/meas':>11s}"
    )

    def cell(ts: list[float], predicted: float | None) -> str:
        guess = f"[{predicted * 1e3:.1f}]" if predicted else "[-]"
        return f"{statistics.median(ts) * 1e3:6.1f} ({min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}) {guess}"

    for name in args.models:
        for n_stages in args.stages:
            for per_stage in args.micro:
                n_mb = n_stages * per_stage
                times, predicted, simulated, same = launch(
                    _worker, name, n_mb, args.steps, nproc=n_stages, timeout=1800
                )[0]
                # the even plan that is the auto plan is no other plan: auto is then set against equal layers
                others = ("equal",) if same["even"] else ("even", "equal")
                better = min(others, key=lambda v: statistics.median(times[v]))
                accuracy = [predicted[v] / statistics.median(times[v]) for v in times if predicted[v]]
                alone = [simulated[v] / statistics.median(times[v]) for v in times]
                even = "(same)" if same["even"] else cell(times["even"], predicted["even"])
                mark = "*" if same[better] else " "
                print(
                    f"{name:6s} {n_stages:2d} {n_mb:3d} {cell(times['auto'], predicted['auto']):>28s} {even:>28s} "
                    f"{cell(times['equal'], predicted['equal']):>28s} {_paired(times['auto'], times[better]):10.3f}{mark} "
                    f"{f'{min(accuracy):.2f}-{max(accuracy):.2f}x':>11s} {f'{min(alone):.2f}-{max(alone):.2f}x':>11s}",
                    flush=True,
                )
    print("* auto cuts between the same modules as the plan it is set against: the ratio is mostly noise")


if __name__ == "__main__":
    main()
