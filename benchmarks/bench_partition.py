"""Balance and speed of dynapipe's automatic partitioner on small HuggingFace models.

    python benchmarks/bench_partition.py                 # both parts
    python benchmarks/bench_partition.py --part balance --layers 16
    python benchmarks/bench_partition.py --part speed --sizes 8 16 32 64
    python benchmarks/bench_partition.py --part llama3             # Llama-3-8B proportions (slow: ~2 min)

balance: for Llama, GPT-2, OPT and Bloom (hidden 64, vocab 1000: the embedding and LM head weigh like
1.3-1.7 layers), the imbalance (slowest stage / mean, in estimated forward + backward time) of dynapipe's
partition and of the best split at layer boundaries (exact: every choice of n_stages - 1 block starts is
scored from prefix sums), and the bytes each boundary sends.

llama3: a Llama with Llama-3-8B proportions (32 layers, hidden 256, intermediate 896, vocab 8000,
sequence 256, batch 4; the head is about 2 layers of work), explain() with its defaults (one microbatch
per stage -- 4 at 8 stages, all that batch 4 allows --, roofline estimate): imbalance and predicted step
of the default plan (the shortest step: with so few microbatches a heavier first stage is faster) and of
``balance_slack=0.03`` (stages within 3% of the best balance), and the best layer split's imbalance; then,
at 8 stages, the fewest-bytes split at each balance limit with its largest send and predicted step at 1
and 8 microbatches (what balance costs in bytes on this graph).

speed: a Llama of each size is captured (Dynamo, one microbatch), costed and partitioned into 8 stages;
seconds for each step, and partition microseconds per graph node (flat means linear growth).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from hf_models import PARTITION_HIDDEN, PARTITION_VOCAB, partition_model

from dynapipe.cost import graph_costs, stage_costs
from dynapipe.explain import capture
from dynapipe.graph import compute_nodes
from dynapipe.partition import balanced_partition, layer_boundaries
from dynapipe.partition.manual import _inside

VOCAB, HIDDEN, BATCH, SEQ, N_MICRO = PARTITION_VOCAB, PARTITION_HIDDEN, 4, 16, 2


def make(kind: str, layers: int) -> torch.nn.Module:
    return partition_model(kind, layers)


def capture_model(kind: str, layers: int):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    return capture(
        make(kind, layers), dict(input_ids=ids, labels=ids, use_cache=False), n_microbatches=N_MICRO
    )


def best_layer_split(captured, n_stages: int) -> float:
    """Smallest imbalance over every split at n_stages - 1 block starts (the split a person would make)."""
    costs = graph_costs(captured)
    nodes = compute_nodes(captured.gm.graph)
    prefix = [0]
    for node in nodes:
        c = costs.nodes[node]
        prefix.append(prefix[-1] + c.time_s)
    starts = [
        next(i for i, n in enumerate(nodes) if _inside(n.meta.get("module_path", ""), b))
        for b in layer_boundaries(captured)
    ]
    mean = prefix[-1] / n_stages
    best = float("inf")
    if len(starts) <= 20:
        for cut in itertools.combinations(starts, n_stages - 1):
            edges = [0, *cut, len(nodes)]
            best = min(best, max(prefix[b] - prefix[a] for a, b in zip(edges, edges[1:], strict=False)))
        return best / mean
    # many blocks: exact min-max by dynamic programming over block starts
    points = [0, *starts, len(nodes)]
    dp = {0: 0.0}  # last cut index in points -> best max so far
    for _ in range(n_stages - 1):
        dp = {
            j: min(max(v, prefix[points[j]] - prefix[points[i]]) for i, v in dp.items() if i < j)
            for j in range(1, len(points) - 1)
            if any(i < j for i in dp)
        }
    return min(max(v, prefix[-1] - prefix[points[i]]) for i, v in dp.items()) / mean


def balance(kinds: list[str], layers: int, stages: list[int]) -> None:
    print(f"balance: max/mean stage time (estimate), {layers} layers, hidden {HIDDEN}, vocab {VOCAB}")
    print(f"{'model':7s} {'stages':>6s} {'dynapipe':>9s} {'layer split':>12s}  bytes sent per boundary")
    for kind in kinds:
        captured = capture_model(kind, layers)
        for n_stages in stages:
            part = balanced_partition(captured, n_stages)
            records = stage_costs(captured, part.stage_of)
            times = [r.time_s for r in records]
            ours = max(times) / (sum(times) / n_stages)
            sent = [sum(r.sends.values()) for r in records[:-1]]
            print(f"{kind:7s} {n_stages:6d} {ours:9.3f} {best_layer_split(captured, n_stages):12.3f}  {sent}")


def speed(sizes: list[int], n_stages: int) -> None:
    print(f"speed: Llama, {n_stages} stages (seconds; machine load adds to every column)")
    print(
        f"{'layers':>6s} {'nodes':>6s} {'capture':>8s} {'cost':>6s} {'partition':>9s} {'total':>6s} {'us/node':>8s}"
    )
    for layers in sizes:
        t0 = time.perf_counter()
        captured = capture_model("llama", layers)
        t1 = time.perf_counter()
        graph_costs(captured)
        t2 = time.perf_counter()
        balanced_partition(captured, n_stages)
        t3 = time.perf_counter()
        n = len(compute_nodes(captured.gm.graph))
        print(
            f"{layers:6d} {n:6d} {t1 - t0:8.2f} {t2 - t1:6.2f} {t3 - t2:9.3f} {t3 - t0:6.2f} "
            f"{(t3 - t2) / n * 1e6:8.1f}"
        )


def llama3(stages: list[int]) -> None:
    import transformers as t

    from dynapipe import explain
    from dynapipe.partition.bottleneck import fewest_bytes, min_bottleneck
    from dynapipe.partition.chain import Chain
    from dynapipe.plan import step_time
    from dynapipe.schedules import get_schedule

    torch.manual_seed(0)
    config = t.LlamaConfig(
        num_hidden_layers=32,
        hidden_size=256,
        intermediate_size=896,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8000,
        max_position_embeddings=256,
    )
    model = t.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 8000, (4, 256))
    print("llama3: Llama-3-8B proportions, explain() defaults (a microbatch per stage, estimate, 1f1b)")
    print("imbalance (slowest / mean stage) and predicted step, by default and with balance_slack=0.03")
    print(
        f"{'use_cache':>9s} {'stages':>6s} {'default':>8s} {'step':>9s} {'slack .03':>10s} {'step':>9s} "
        f"{'layer split':>12s}"
    )
    for use_cache in (True, False):
        inputs = dict(input_ids=ids, labels=ids, use_cache=use_cache)
        for n_stages in stages:
            m = min(n_stages, 4)
            e = explain(model, inputs, n_stages=n_stages, n_microbatches=m)
            b = explain(model, inputs, n_stages=n_stages, n_microbatches=m, balance_slack=0.03)
            layer = f"{e.layer_imbalance:.3f}" if e.layer_imbalance else "-"
            print(
                f"{use_cache!s:>9s} {n_stages:6d} {e.imbalance:8.3f} {(e.predicted_step_s or 0) * 1e3:6.3f} ms "
                f"{b.imbalance:10.3f} {(b.predicted_step_s or 0) * 1e3:6.3f} ms {layer:>12s}"
            )
    k = max(stages)
    captured = capture(model, dict(input_ids=ids, labels=ids, use_cache=False))
    costs = graph_costs(captured)
    chain = Chain(captured, costs, (), k, 1)
    bound = min_bottleneck(chain, float("inf"), chain.allowed)
    spec = get_schedule("1f1b")
    steps = {m: step_time(spec.build(n_ranks=k, n_stages=k, n_microbatches=m), spec, k) for m in (1, 8)}
    print(f"{k} stages, use_cache=False: the fewest-bytes split within each balance limit")
    print(f"{'limit':>6s} {'balance':>8s} {'max send':>9s} {'step m=1':>9s} {'step m=8':>9s}")
    for share in (0.0, 0.01, 0.03, 0.05, 0.075, 0.1):
        found = fewest_bytes(chain, bound * (1 + share) * (1 + 1e-12), float("inf"))
        if found is None:
            continue
        split = chain.stage_costs(found[1])
        balance = max(c.time_s for c in split) / (chain.prefix[-1] / k)
        print(
            f"{1 + share:6.3f} {balance:8.3f} {max(c.send_bytes for c in split) / 2**20:5.2f} MiB "
            f"{steps[1](split) * 1e3:6.3f} ms {steps[8](split) * 1e3:6.3f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["balance", "speed", "llama3", "all"], default="all")
    parser.add_argument("--models", nargs="+", default=["llama", "gpt2", "opt", "bloom"])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    args = parser.parse_args()
    if args.part in ("balance", "all"):
        balance(args.models, args.layers, args.stages)
    if args.part in ("speed", "all"):
        speed(args.sizes, max(args.stages))
    if args.part == "llama3":
        llama3(args.stages)


if __name__ == "__main__":
    main()
