"""Real-model benchmark: dynapipe's automatic partition against the best manual split at layer boundaries.

    python benchmarks/bench_models.py                 # Llama and GPT-2, 2 and 4 stages, 1F1B, 8 microbatches
    python benchmarks/bench_models.py --quick         # Llama only, 2 stages, fewer steps

Each row trains a randomly initialised HuggingFace causal LM on local CPU processes (gloo), one per
stage. The manual split is the best one at layer boundaries: every choice of ``n_stages - 1`` block
starts is costed and simulated as explain() would (``plan.predict_step``), and the shortest taken,
with the equal-layer split (what a person writes) run too when it differs, and the automatic plan
with ``balance_slack=0.03`` (every stage within 3% of the best balance) when that plan differs from the
default one. Every variant is compiled in the same processes on its own copy of the model, and their
steps alternate (auto, balanced, manual, equal, auto, ...) so that load on the machine falls on all
alike. Reported: median step time (min-max) over the timed steps, in ms, and the ratios automatic /
best manual (below 1: the automatic partition is faster), each the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from dynapipe import launch

BATCH, SEQ, MICRO, LAYERS = 16, 64, 8, 8
BALANCED = 0.03  # the automatic plan's balance_slack in the 'balanced' column


def _model(name: str):
    torch.manual_seed(0)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=16000,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=LAYERS,
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
        n_layer=LAYERS,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config), "transformer.h"


def _layer_splits(name: str, n_stages: int) -> tuple[list[str], list[str], bool, bool]:
    """The layer split with the shortest predicted step (every choice tried), the equal one, whether the
    automatic plan is that best split, and whether ``balance_slack=BALANCED`` changes the plan."""
    import itertools

    from dynapipe.config import PipelineConfig
    from dynapipe.cost import graph_costs, stage_costs
    from dynapipe.explain import capture
    from dynapipe.partition import assign_by_split_points
    from dynapipe.plan import plan_pipeline, predict_step
    from dynapipe.schedules import get_schedule

    model, layers = _model(name)
    ids = torch.randint(0, 16000, (BATCH, SEQ))
    captured = capture(lambda ids: model(input_ids=ids, labels=ids).loss, (ids,), n_microbatches=MICRO)
    spec = get_schedule("1f1b")
    costs = graph_costs(captured, optimizer="sgd")

    def plan(**options: Any) -> Any:
        config = PipelineConfig(n_stages=n_stages, n_microbatches=MICRO, optimizer="sgd", **options)
        return plan_pipeline(
            captured,
            config,
            spec=spec,
            n_ranks=n_stages,
            n_stages=n_stages,
            costs=lambda *_: costs,
            with_costs=True,
        )

    def predicted(points: list[str]) -> float:
        at_points = plan(split_points=tuple(points))
        return predict_step(at_points, stage_costs(captured, at_points.stage_of, costs)).makespan

    choices = [[f"{layers}.{i}" for i in c] for c in itertools.combinations(range(1, LAYERS), n_stages - 1)]
    equal = [f"{layers}.{i * LAYERS // n_stages}" for i in range(1, n_stages)]
    automatic = [plan(balance_slack=slack).stage_of for slack in (None, BALANCED)]
    best = min(choices, key=predicted)
    return best, equal, automatic[0] == assign_by_split_points(captured, best), automatic[0] != automatic[1]


def _worker(name: str, variants: dict, steps: int) -> dict[str, list[float]]:
    """One rank's timed steps of every variant (under ``dynapipe.launch``)."""
    ids = torch.randint(0, 16000, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    runs = {}
    for variant, extra in variants.items():  # each variant pipelines its own copy of the model
        model, _ = _model(name)
        options: dict = {"schedule": "1f1b", "n_microbatches": MICRO, "optimizer": "sgd", **extra}
        step = torch.compile(
            lambda ids, model=model: model(input_ids=ids, labels=ids).loss,
            backend="dynapipe",
            options=options,
        )
        runs[variant] = (step, torch.optim.SGD(model.parameters(), lr=1e-3))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(steps + 2):
        for variant, (step, opt) in runs.items():  # alternate: load falls on every variant alike
            start = time.perf_counter()
            step(ids).backward()
            opt.step()
            opt.zero_grad()
            if i >= 2:
                times[variant].append(time.perf_counter() - start)
    return times


def _run(name: str, world: int, variants: dict, steps: int) -> dict[str, list[float]]:
    return launch(_worker, name, variants, steps, nproc=world, timeout=900)[0]


def _paired(times: list[float], baseline: list[float]) -> float:
    """Median of the per-round ratios: the variants of a round ran back to back, under the same load."""
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=["llama", "gpt2"])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    models, stages, steps = (["llama"], [2], 4) if args.quick else (args.models, args.stages, args.steps)
    print(
        f"1F1B, batch {BATCH} x {SEQ} tokens, {MICRO} microbatches, {steps} timed steps each, alternating; ms"
    )
    print(
        f"{'model':6s} {'stages':>6s} {'best layer split':>22s} {'equal':>20s} {'automatic':>20s} "
        f"{'balance_slack .03':>20s} {'auto/best':>10s} {'balanced/best':>14s}  best layer split"
    )

    def cell(ts: list[float] | None) -> str:
        if not ts:
            return "(same)"
        return f"{statistics.median(ts) * 1e3:7.1f} ({min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f})"

    for name in models:
        for n_stages in stages:
            best, equal, same, differs = _layer_splits(name, n_stages)
            variants = {
                "auto": {},
                **({"balanced": {"balance_slack": BALANCED}} if differs else {}),
                "best": {"split_points": best},
                **({"equal": {"split_points": equal}} if equal != best else {}),
            }
            times = _run(name, n_stages, variants, steps)
            manual = min((times["best"], times.get("equal") or times["best"]), key=statistics.median)
            ratio = _paired(times["auto"], manual)
            balanced = _paired(times.get("balanced") or times["auto"], manual)
            print(
                f"{name:6s} {n_stages:6d} {cell(times['best']):>22s} {cell(times.get('equal')):>20s} "
                f"{cell(times['auto']):>20s} {cell(times.get('balanced')):>20s} {ratio:10.3f} "
                f"{balanced:14.3f}  {best}{' (= automatic: the ratio is noise)' if same else ''}",
                flush=True,
            )


if __name__ == "__main__":
    main()
