"""Balanced automatic stages: per-node costs -> the stage of every compute node.

A k-stage partition is a chain of k-1 *cuts*. Each cut is a set of compute nodes closed under "inputs
of" (an ideal of the DAG): stage s is what cut s holds and cut s-1 does not. Closed cuts make every
stage a contiguous, topologically closed piece of the graph, so no activation ever travels backwards.

How the cuts are chosen, one file per step:

1. :mod:`.chain` -- compute nodes in cut order, the bytes live across each position, where a cut is
   not allowed (a non-tensor live, an ``unsplittable`` module, a ``no_grad`` region, a getitem);
2. :mod:`.bottleneck` -- the smallest slowest-stage time, then the fewest bytes crossing among
   near-balanced splits;
3. :mod:`.step_search` -- given a step objective (the simulated step of the schedule that will run),
   the shortest step among those splits and their neighbours, balance breaking near-ties;
4. :mod:`.mincut` -- a networkx min-cut around each cut moves FLOP-free nodes to where their values
   are read, for fewer bytes at the same stage times.

Determinism: everything iterates lists in graph order; networkx's minimum_cut returns the unique cut
whose sink side is what can still reach the sink in the residual graph, whatever flow it found; byte
capacities are integers. So every rank computes the same partition from the same graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx

from ..cost import GraphCosts
from ..errors import PartitionError
from ..graph import CapturedGraph, compute_nodes
from ..schedules import StageCost
from .bottleneck import fewest_bytes, greedy, memory_error, min_bottleneck
from .chain import Chain
from .mincut import refine
from .step_search import StepObjective, shortest_step

__all__ = ["BALANCE_SLACK", "BalancedPartition", "StepObjective", "balanced_partition"]

# Stages may be this much slower than the best balance if that lets the cuts send fewer bytes.
BALANCE_SLACK = 0.25
# The even split a plan is compared with (balance_slack=0.03's limit).
EVEN = 0.03
# Splits sending this much more than the fewest bytes count as equal (a mask sent to one more stage).
_BYTES_TOLERANCE = 0.05
# Relative precision of the bottleneck searches.
_BALANCE_TOLERANCE = 1e-4
_INF = math.inf


@dataclass(frozen=True)
class BalancedPartition:
    """The stage of each compute node, with the numbers the choice was made on (seconds, bytes)."""

    stage_of: dict[fx.Node, int]
    cuts: tuple[int, ...]  # chain position after which each cut falls (before refinement)
    bottleneck_s: float  # the smallest achievable slowest-stage time
    layer_bottleneck_s: float | None  # the same, cutting only at layer boundaries (None: no layers found)
    refined: bool  # whether min-cut refinement moved the cuts off the chain order
    even_stages: tuple[StageCost, ...] = ()  # the even split's stages (within EVEN of the best balance)


def balanced_partition(
    captured: CapturedGraph,
    n_stages: int,
    *,
    costs: GraphCosts,
    unsplittable: Sequence[str] = (),
    max_stage_memory: int | None = None,
    in_flight: int | None = None,
    slack: float = BALANCE_SLACK,
    step: StepObjective | None = None,
    step_slack: float | None = None,
) -> BalancedPartition:
    """The balanced stage of every compute node (see the module docstring), with the bottlenecks found.

    costs: the node costs (estimated or profiled; the optimizer's state counts against memory there).
    unsplittable: module names (as in ``named_modules()``) kept inside one stage.
    max_stage_memory: hard limit in bytes on a stage's parameters + gradients + optimizer state +
        ``in_flight`` microbatches of saved activations.
    in_flight: microbatches whose activations a stage holds at its peak (default: all of them).
    slack: how much slower than the best balance a stage may be when that lets the cuts send fewer bytes.
    step: the step time of a split (per-stage costs -> seconds, e.g. a simulated step of the schedule
        that will run); the split it finds shortest among the fewest-bytes splits at a few balance limits
        wins over the fewest-bytes near-balanced one (see the module docstring).
    step_slack: how much slower than the best balance a stage may be in the step search; None: as for
        the fewest bytes (``slack``, and never worse than the best split at layer boundaries). Give a
        slack only where the step depends on balance (more than one microbatch).
    """
    chain = Chain(captured, costs, unsplittable, n_stages, in_flight or captured.n_microbatches)
    if n_stages == 1:
        return BalancedPartition(dict.fromkeys(chain.nodes, 0), (), chain.prefix[-1], None, False)
    _check_enough_cuts(chain, n_stages, unsplittable)
    memory = float(max_stage_memory) if max_stage_memory is not None else _INF
    fewest = greedy(chain, _INF, memory, chain.allowed)
    if fewest is None or len(fewest) >= n_stages:
        raise PartitionError(memory_error(chain, memory))
    bound = min_bottleneck(chain, memory, chain.allowed)
    layer_bound = (
        min_bottleneck(chain, memory, chain.layer_cuts) if len(chain.layer_cuts) >= n_stages - 1 else None
    )
    limit = bound * (1 + slack)
    if layer_bound is not None:
        limit = min(limit, max(bound, layer_bound))
    # with too few busy nodes for every stage to get one, allow idle stages
    busy = fewest_bytes(chain, limit * (1 + 1e-12), memory) is not None
    cuts = _few_bytes_best_balance(chain, n_stages, bound, limit, memory, busy)
    even_stages: tuple[StageCost, ...] = ()
    if step is not None and chain.timed:
        step_limit = limit if step_slack is None else bound * (1 + step_slack)
        cuts = shortest_step(chain, cuts, step, bound, step_limit, memory, busy)
        even = fewest_bytes(chain, bound * (1 + EVEN) * (1 + 1e-12), memory, busy=busy)
        even_stages = tuple(chain.stage_costs(even[1])) if even is not None else ()
    ideals, refined = refine(chain, cuts, memory)
    stage_of = {node: sum(1 for ideal in ideals if i not in ideal) for i, node in enumerate(chain.nodes)}
    order = {n: i for i, n in enumerate(compute_nodes(captured.gm.graph))}
    stage_of = dict(sorted(stage_of.items(), key=lambda item: order[item[0]]))
    return BalancedPartition(stage_of, tuple(cuts), bound, layer_bound, refined, even_stages)


def _check_enough_cuts(chain: Chain, n_stages: int, unsplittable: Sequence[str]) -> None:
    if len(chain.allowed) < n_stages - 1:
        raise PartitionError(
            f"cannot make {n_stages} stages: the graph has only {len(chain.allowed)} places where a cut is "
            f"allowed ({chain.why_few()}); use at most {len(chain.allowed) + 1} stages"
            + (" or fewer unsplittable modules" if unsplittable else "")
        )


def _few_bytes_best_balance(
    chain: Chain, n_stages: int, bound: float, limit: float, memory: float, busy: bool
) -> list[int]:
    """The cuts sending the fewest bytes with no stage over ``limit``, then the best balance (by
    bisection down to ``bound``) among the splits sending about as few."""
    best = fewest_bytes(chain, limit * (1 + 1e-12), memory, busy=busy)
    if best is None:  # cannot happen: the bottleneck search found a split within ``bound <= limit``
        raise PartitionError(
            f"no {n_stages}-stage split within {limit:.3g} s per stage; this is a dynapipe bug"
        )
    sent, cuts = best
    lo, hi = bound, limit
    while hi - lo > _BALANCE_TOLERANCE * hi:
        mid = (lo + hi) / 2
        found = fewest_bytes(chain, mid * (1 + 1e-12), memory, busy=busy)
        if found is not None and found[0] <= sent * (1 + _BYTES_TOLERANCE):
            hi, cuts = mid, found[1]
        else:
            lo = mid
    return cuts
