"""The automatic plan at real Llama-3-8B dimensions (hidden 4096, intermediate 14336, 32 layers, 32
heads, 8 KV heads, vocabulary 128256, bfloat16), built under ``dynapipe.empty_init()`` (no memory for
its 8B weights) and costed on fake tensors (no profiling). About 2 minutes; exits non-zero if a check
fails.

    python benchmarks/bench_partition_8b.py

Where the step rewards balance -- 32 microbatches per step, so 1F1B's steady state is most of it --
the slowest stage must be within 3% of the mean at 2, 4 and 8 stages: compute dominates what a cut
sends, so the step objective keeps the op-level cuts that balance (the best split at layer boundaries
is about 1.16 at 8 stages). With explain()'s default (one microbatch per stage) 1F1B's fill and drain
is most of the step and a heavier first stage shortens it (its forwards of later microbatches run
while the first goes down the pipeline and back), so that plan is not balanced, by design; it is
printed, with the predicted step beside the best-balanced split's.
"""

from __future__ import annotations

import math

import torch

import dynapipe
from dynapipe.config import PipelineConfig
from dynapipe.explain import capture
from dynapipe.partition.bottleneck import fewest_bytes, min_bottleneck
from dynapipe.partition.chain import Chain
from dynapipe.plan import Explanation, plan_pipeline, step_time
from dynapipe.schedules import get_schedule

SEQ, VOCAB, MANY = 256, 128256, 32


def build() -> torch.nn.Module:
    import transformers as t

    config = t.LlamaConfig(
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dynapipe.empty_init():
            return t.LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def main() -> None:
    model = build()
    spec = get_schedule("1f1b")
    print("stages  microbatches  imbalance  layer split  step (plan)  step (best balance)  largest send")
    failed = []
    for n_micro, batch in ((None, None), (MANY, MANY)):
        for n_stages in (2, 4, 8):
            m = n_micro or n_stages  # None: explain()'s default, one microbatch per stage
            ids = torch.randint(0, VOCAB, (batch or m, SEQ), generator=torch.Generator().manual_seed(0))
            captured = capture(model, dict(input_ids=ids, labels=ids, use_cache=False), n_microbatches=m)
            config = PipelineConfig(n_stages=n_stages, n_microbatches=m)
            plan = plan_pipeline(captured, config, spec=spec, n_ranks=n_stages, n_stages=n_stages)
            shown = Explanation.of(captured, plan)
            assert plan.costs is not None
            chain = Chain(captured, plan.costs, (), n_stages, max(plan.in_flight))
            best = fewest_bytes(chain, min_bottleneck(chain, math.inf, chain.allowed) * (1 + 1e-9), math.inf)
            assert best is not None
            balanced = step_time(plan.table, spec, n_stages)(chain.stage_costs(best[1]))
            send = max(s.send_bytes for s in shown.stages) / 2**20
            print(
                f"{n_stages:6d}  {m:12d}  {shown.imbalance:9.3f}  {shown.layer_imbalance or 0:11.3f}  "
                f"{(shown.predicted_step_s or 0) * 1e3:8.1f} ms  {balanced * 1e3:16.1f} ms  {send:9.2f} MiB",
                flush=True,
            )
            if n_micro and shown.imbalance > 1.03:
                failed.append(f"{n_stages} stages, {m} microbatches: imbalance {shown.imbalance:.3f} > 1.03")
    if failed:
        raise SystemExit("\n".join(failed))


if __name__ == "__main__":
    main()
