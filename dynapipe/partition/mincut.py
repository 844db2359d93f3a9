"""Balanced automatic stages: per-node costs -> networkx min-cut -> the stage of every compute node.

A k-stage partition is a chain of k-1 *cuts*. Each cut is a set of compute nodes closed under "inputs
of" (an ideal of the DAG): stage s is what cut s holds and cut s-1 does not. Closed cuts make every
stage a contiguous, topologically closed piece of the graph, so no activation ever travels backwards.

How the cuts are chosen
-----------------------
1. **Chain.** Compute nodes in graph order (Dynamo's order is Python's, a topological order), each
   ``getitem`` moved next to the node it unpacks (codegen keeps the two in one stage). Per position p:
   the prefix time, and ``cross[p]``: bytes of the tensors live across a cut after p (every rank reads
   placeholders and parameters itself, so they are free). A cut is *not allowed* where a non-tensor is
   live, inside an ``unsplittable`` module, inside a ``torch.no_grad()`` region, or between a node and
   its ``getitem``. ``torch.cond`` and other higher-order ops are single nodes, so never cut inside.
   A ``torch.autocast()`` region may be cut: its enter's context, read only by its exit, is no value a
   stage sends (codegen re-enters the region in each stage), so the pair neither blocks a cut nor moves.
2. **Balance.** Binary search the smallest bottleneck B (slowest stage time) that a greedy
   farthest-cut sweep reaches in k stages under ``max_stage_memory`` -- exact, as both limits are
   monotone in a stage's extent. O(k log n) per probe without a memory limit, O(n) with one.
3. **Fewest bytes among near-balanced cuts.** A dynamic program picks k-1 allowed positions that
   minimise the bytes crossing, every stage within ``B * (1 + slack)`` (slack 25%) but never slower than
   the best cut at layer boundaries (the split a person would make), and every stage doing some work.
   Then, among the splits sending at most 5% more than that fewest, the best balance (binary search on
   the limit, the same DP). The slack is what lets a Llama/GPT-2/OPT/Bloom cut slide from inside
   attention or the MLP (q, k, v or the 4h intermediate live: 3-5 hidden states) to the residual stream
   (one); with 8 layers per 8 stages that costs up to 25% balance, with 4 layers per stage 5-7%.
   Between equal bytes, the outermost module boundary wins (after a whole layer, not after its norm's
   first op). O(k n) per DP with a sliding-window minimum.
4. **Min-cut refinement** (the functorch way, ``torch/_functorch/partitioners.py``). For each cut,
   nodes that carry FLOPs (or much time) stay on their side (infinite edges from the source / to the
   sink), as do side-effect nodes and the members of every group above; FLOP-free nodes (views,
   elementwise, masks, label shifting) may move. Each node is split into ``_in -> _out`` halves with
   capacity = the bytes it would send, data edges ``u_out -> v_in`` and reverse edges ``v_in -> u_in``
   are infinite, so the source side of the min cut is a closed cut that sends the fewest bytes for the
   same heavy nodes -- stage times do not change. This moves, e.g., a mask computed early but read late
   to where it is read. Only the neighbourhood of each cut enters the flow graph: nodes whose side
   follows from the pinned ones (ancestors of source-side, descendants of sink-side) are left out.

Determinism: everything iterates lists in graph order; networkx's minimum_cut returns the unique cut
whose sink side is what can still reach the sink in the residual graph, whatever flow it found; byte
capacities are integers. So every rank computes the same partition from the same graph.
"""

from __future__ import annotations

import bisect
import math
import os
import tempfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..capture import CapturedGraph, compute_nodes, is_autocast_node, unpacked_by
from ..config import Optimizer
from ..cost import GraphCosts, graph_costs
from ..errors import ConfigError, PartitionError
from ..module_paths import prefixes
from ..units import format_bytes
from .manual import _inside, layer_boundaries

__all__ = ["BalancedPartition", "assign_balanced", "balanced_partition"]

# Stages may be this much slower than the best balance if that lets the cuts send fewer bytes.
BALANCE_SLACK = 0.25
# A node costing at least this share of an average stage never moves during min-cut refinement.
_HEAVY_SHARE = 0.01
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


def assign_balanced(
    captured: CapturedGraph,
    n_stages: int,
    *,
    unsplittable: Sequence[str] = (),
    max_stage_memory: int | None = None,
    profile: bool = False,
    optimizer: Optimizer = "adamw",
    in_flight: int | None = None,
    costs: GraphCosts | None = None,
) -> dict[fx.Node, int]:
    """Stage of every compute node of ``captured``, balanced over ``n_stages`` (see the module docstring).

    unsplittable: module names (as in ``named_modules()``) kept inside one stage.
    max_stage_memory: hard limit in bytes on a stage's parameters + gradients + optimizer state +
        ``in_flight`` microbatches of saved activations.
    profile: time every node on the real device instead of estimating time from FLOPs.
    optimizer: kind of optimizer whose state counts against memory ("adamw", "adam", "sgd", "none").
    in_flight: microbatches whose activations a stage holds at its peak (default: all of them, as GPipe
        does; 1F1B holds at most n_stages).
    costs: precomputed node costs (e.g. profiled on one rank and broadcast to the others).
    """
    return balanced_partition(
        captured,
        n_stages,
        unsplittable=unsplittable,
        max_stage_memory=max_stage_memory,
        profile=profile,
        optimizer=optimizer,
        in_flight=in_flight,
        costs=costs,
    ).stage_of


def balanced_partition(
    captured: CapturedGraph,
    n_stages: int,
    *,
    unsplittable: Sequence[str] = (),
    max_stage_memory: int | None = None,
    profile: bool = False,
    optimizer: Optimizer = "adamw",
    in_flight: int | None = None,
    costs: GraphCosts | None = None,
    slack: float = BALANCE_SLACK,
) -> BalancedPartition:
    """:func:`assign_balanced` with the bottlenecks it found (for :func:`dynapipe.explain` and benchmarks)."""
    costs = costs or graph_costs(captured, optimizer=optimizer, profile=profile)
    chain = _Chain(captured, costs, unsplittable, n_stages, in_flight or captured.n_microbatches)
    if n_stages == 1:
        return BalancedPartition(dict.fromkeys(chain.nodes, 0), (), chain.prefix[-1], None, False)
    if len(chain.allowed) < n_stages - 1:
        raise PartitionError(
            f"cannot make {n_stages} stages: the graph has only {len(chain.allowed)} places where a cut is "
            f"allowed ({chain.why_few()}); use at most {len(chain.allowed) + 1} stages"
            + (" or fewer unsplittable modules" if unsplittable else "")
        )
    memory = float(max_stage_memory) if max_stage_memory is not None else _INF
    fewest = chain.greedy(_INF, memory, chain.allowed)
    if fewest is None or len(fewest) >= n_stages:
        raise PartitionError(chain.memory_error(memory))
    bound = chain.min_bottleneck(memory, chain.allowed)
    layer_bound = (
        chain.min_bottleneck(memory, chain.layer_cuts) if len(chain.layer_cuts) >= n_stages - 1 else None
    )
    limit = bound * (1 + slack)
    if layer_bound is not None:
        limit = min(limit, max(bound, layer_bound))
    # with too few busy nodes for every stage to get one, allow idle stages
    busy = chain.fewest_bytes(limit * (1 + 1e-12), memory) is not None
    best = chain.fewest_bytes(limit * (1 + 1e-12), memory, busy=busy)
    if best is None:  # cannot happen: the bottleneck search found a split within ``bound <= limit``
        raise PartitionError(
            f"no {n_stages}-stage split within {limit:.3g} s per stage; this is a dynapipe bug"
        )
    sent, cuts = best
    lo, hi = bound, limit  # the best balance among the splits that send about that few bytes
    while hi - lo > _BALANCE_TOLERANCE * hi:
        mid = (lo + hi) / 2
        found = chain.fewest_bytes(mid * (1 + 1e-12), memory, busy=busy)
        if found is not None and found[0] <= sent * (1 + _BYTES_TOLERANCE):
            hi, cuts = mid, found[1]
        else:
            lo = mid
    ideals, refined = chain.refine(cuts, memory)
    stage_of = {}
    for i, node in enumerate(chain.nodes):
        stage_of[node] = sum(1 for ideal in ideals if i not in ideal)
    order = {n: i for i, n in enumerate(compute_nodes(captured.gm.graph))}
    stage_of = dict(sorted(stage_of.items(), key=lambda item: order[item[0]]))
    return BalancedPartition(stage_of, tuple(cuts), bound, layer_bound, refined)


class _Chain:
    """The compute nodes in cut order, with what the balance search and the min-cut need per position."""

    def __init__(
        self,
        captured: CapturedGraph,
        costs: GraphCosts,
        unsplittable: Sequence[str],
        n_stages: int,
        in_flight: int,
    ) -> None:
        graph = captured.gm.graph
        self.k, self.in_flight = n_stages, in_flight
        self.nodes = _chain_order(compute_nodes(graph))
        n = len(self.nodes)
        pos = self.pos = {node: i for i, node in enumerate(self.nodes)}
        output = graph.find_nodes(op="output")[0]
        c = [costs.nodes[node] for node in self.nodes]
        self.out_bytes = [x.out_bytes if x.crossable else _INF for x in c]
        self.names = [node.name for node in self.nodes]
        weight = [x.time_s for x in c]
        if not any(weight):  # nothing has FLOPs (or was timed): balance node counts instead
            weight = [1.0] * n
        self.weight = weight
        self.prefix = [0.0]
        for w in weight:
            self.prefix.append(self.prefix[-1] + w)
        # an autocast exit reads its enter's context, which never crosses a cut: not a data edge
        self.users = [
            [pos[u] for u in node.users if u in pos and not is_autocast_node(u)] for node in self.nodes
        ]
        self.inputs = [
            [pos[a] for a in node.all_input_nodes if a in pos and not is_autocast_node(a)]
            for node in self.nodes
        ]
        self.to_output = [output in node.users for node in self.nodes]
        # memory: state (get_attr read) and saved-activation buffers, as resource ids per position
        state_ids = {a: j for j, a in enumerate(costs.state_bytes)}
        self.state = [[state_ids[a] for a in node.all_input_nodes if a in state_ids] for node in self.nodes]
        self.state_bytes = [sum(b) for b in costs.state_bytes.values()]
        self.saves = [list(x.saves) for x in c]
        self.buffer_bytes = costs.buffer_bytes
        groups = _groups(self.nodes, graph, unsplittable)
        self.pinned = self._pinned(c, groups)
        self.cross, self.reasons = self._sweep(groups)
        self.allowed = [p for p in range(n - 1) if self.cross[p] < _INF]
        # Between cuts that send the same bytes, prefer the outermost module boundary (after a whole layer
        # rather than after its norm's first op): a fraction of a byte per module level the cut is inside.
        paths = [node.meta.get("module_path", "").split(".") for node in self.nodes]
        self.score = [self.cross[p] + _shared_depth(paths[p], paths[p + 1]) / 64 for p in range(n - 1)]
        self.layer_cuts = self._layer_cuts(captured)
        self.suffix_memory = self._suffix_memory()
        self.last_busy, last = [], -1  # per position, the last position up to it that does work
        for i, w in enumerate(weight):
            last = i if w > 0 else last
            self.last_busy.append(last)

    # ---------------------------------------------------------------------------------- set-up

    def _pinned(self, c: list, groups: list[list[int]]) -> list[bool]:
        share = self.prefix[-1] / self.k * _HEAVY_SHARE
        pinned = [
            x.flops > 0 or (share > 0 and w >= share) or not node.users or is_autocast_node(node)
            for x, w, node in zip(c, self.weight, self.nodes, strict=True)
        ]
        for group in groups:
            for i in group:
                pinned[i] = True
        return pinned

    def _sweep(self, groups: list[list[int]]) -> tuple[list[float], list[str]]:
        """Bytes live across a cut after each position; inf where no cut is allowed (with the reason)."""
        n = len(self.nodes)
        delta = [0.0] * (n + 1)
        blocked = [0] * (n + 1)
        for i in range(n):
            last = n if self.to_output[i] else max(self.users[i], default=i)
            if last > i:
                if self.out_bytes[i] == _INF:
                    blocked[i] += 1
                    blocked[last] -= 1
                else:
                    delta[i] += self.out_bytes[i]
                    delta[last] -= self.out_bytes[i]
        grouped = [0] * (n + 1)
        for group in groups:
            grouped[min(group)] += 1
            grouped[max(group)] -= 1
        cross, reasons, live, nb, ng = [], [], 0.0, 0, 0
        for p in range(n - 1):
            live, nb, ng = live + delta[p], nb + blocked[p], ng + grouped[p]
            cross.append(_INF if nb or ng else round(live))
            reasons.append("a non-tensor value is live" if nb else "inside a group" if ng else "")
        return cross, reasons

    def _layer_cuts(self, captured: CapturedGraph) -> list[int]:
        """Cut positions right before each repeated block (``layers.3``): the split a person would make."""
        first: dict[str, int] = dict.fromkeys(layer_boundaries(captured), -1)
        for i, node in enumerate(self.nodes):
            path = node.meta.get("module_path", "")
            for name in {*prefixes(path), *prefixes(path.partition(".")[2])} & first.keys():
                if first[name] < 0:
                    first[name] = i
        return sorted({i - 1 for i in first.values() if i > 0 and self.cross[i - 1] < _INF})

    def why_few(self) -> str:
        blocked = sum(1 for r in self.reasons if r == "a non-tensor value is live")
        grouped = sum(1 for r in self.reasons if r == "inside a group")
        return (
            f"{len(self.nodes)} compute nodes; {blocked} positions have a non-tensor value live, {grouped} lie "
            "inside an unsplittable module, a no_grad region or between a node and its getitem"
        )

    # --------------------------------------------------------------------------------- balance

    def _suffix_memory(self) -> list[float]:
        """Memory of a last stage starting at each position (for the final stage of the DP)."""
        state: dict[int, None] = {}
        acts: dict[int, None] = {}
        used, out = 0.0, [0.0] * (len(self.nodes) + 1)
        for i in range(len(self.nodes) - 1, -1, -1):
            for j in self.state[i]:
                if j not in state:
                    state[j] = None
                    used += self.state_bytes[j]
            for j in self.saves[i]:
                if j not in acts:
                    acts[j] = None
                    used += self.in_flight * self.buffer_bytes[j]
            out[i] = used
        return out

    def _stage_memory(self, state: dict[int, None], acts: dict[int, None]) -> float:
        return sum(self.state_bytes[j] for j in state) + self.in_flight * sum(
            self.buffer_bytes[j] for j in acts
        )

    def _reach(self, start: int, bound: float, memory: float) -> int:
        """The last position a stage starting at ``start`` can hold within ``bound`` seconds and ``memory``."""
        end = bisect.bisect_right(self.prefix, self.prefix[start] + bound, lo=start + 1) - 2
        if memory == _INF or end < start:
            return end
        state: dict[int, None] = {}
        acts: dict[int, None] = {}
        used = 0.0
        for i in range(start, end + 1):
            for j in self.state[i]:
                if j not in state:
                    state[j] = None
                    used += self.state_bytes[j]
            for j in self.saves[i]:
                if j not in acts:
                    acts[j] = None
                    used += self.in_flight * self.buffer_bytes[j]
            if used > memory:
                return i - 1
        return end

    def greedy(self, bound: float, memory: float, allowed: list[int]) -> list[int] | None:
        """Fewest cuts (farthest-first) keeping every stage within the limits; None if a node alone exceeds them."""
        n, start = len(self.nodes), 0
        cuts: list[int] = []
        while True:
            end = self._reach(start, bound, memory)
            if end >= n - 1:
                return cuts
            a = bisect.bisect_right(allowed, end) - 1
            p = allowed[a] if a >= 0 else -1
            if p < start:
                return None
            cuts.append(p)
            start = p + 1
            if len(cuts) >= self.k:  # already too many: stop early
                return cuts

    def min_bottleneck(self, memory: float, allowed: list[int]) -> float:
        lo, hi = max(self.weight) * (1 - 1e-12), self.prefix[-1] * (1 + 1e-12) + 1e-300
        ok = self.greedy(hi, memory, allowed)
        if ok is None or len(ok) >= self.k:
            return _INF
        for _ in range(100):
            if hi - lo <= 1e-9 * hi:
                break
            mid = (lo + hi) / 2
            cuts = self.greedy(mid, memory, allowed)
            if cuts is not None and len(cuts) < self.k:
                hi = mid
            else:
                lo = mid
        return hi

    def memory_error(self, memory: float) -> str:
        lo, hi = 0, int(sum(self.state_bytes) + self.in_flight * sum(self.buffer_bytes)) + 1
        while lo < hi:
            mid = (lo + hi) // 2
            cuts = self.greedy(_INF, mid, self.allowed)
            if cuts is not None and len(cuts) < self.k:
                hi = mid
            else:
                lo = mid + 1
        return (
            f"max_stage_memory={int(memory)} bytes ({format_bytes(memory)}) is below what any {self.k}-stage "
            f"split needs (parameters, gradients and optimizer state, plus saved activations of {self.in_flight} "
            f"microbatches in flight); the smallest feasible value is {lo} bytes ({format_bytes(lo)}). Raise "
            "the limit, use more stages, or fewer microbatches in flight"
        )

    def fewest_bytes(
        self, bound: float, memory: float, *, busy: bool = True
    ) -> tuple[float, list[int]] | None:
        """The fewest bytes crossing k-1 allowed cut positions with every stage within the limits, and the
        positions; None if no such split exists. ``busy``: every stage must do some work (without it, a
        stage holding only ``input_ids.view()`` would win by sending token ids instead of a hidden state)."""
        allowed, k, n = self.allowed, self.k, len(self.nodes)
        # A stage after a cut at q and up to a cut at allowed[a] needs lo[a] <= q <= up[a] (q = -1: the start)
        lo = [bisect.bisect_left(self.prefix, self.prefix[p + 1] - bound) - 1 for p in allowed]
        if memory < _INF:
            lo = [max(a, b) for a, b in zip(lo, self._memory_window(allowed, memory), strict=True)]
        up = [self.last_busy[p] - 1 if busy else p - 1 for p in allowed]
        last_ok = [
            self._fits_last(p + 1, bound, memory) and (not busy or self.last_busy[n - 1] > p) for p in allowed
        ]
        best = [self.score[p] if lo[a] <= -1 <= up[a] else _INF for a, p in enumerate(allowed)]
        back: list[list[int]] = []
        for _ in range(2, k):  # best[a]: fewest bytes of j cuts, the last at allowed[a]
            new, arg, right = [_INF] * len(allowed), [-1] * len(allowed), 0
            window: deque[int] = deque()
            for a, p in enumerate(allowed):
                while right < len(allowed) and allowed[right] <= up[a]:  # sliding-window minimum of best
                    if best[right] < _INF:
                        while window and best[window[-1]] > best[right]:
                            window.pop()
                        window.append(right)
                    right += 1
                while window and allowed[window[0]] < lo[a]:
                    window.popleft()
                if window:
                    new[a], arg[a] = best[window[0]] + self.score[p], window[0]
            back.append(arg)
            best = new
        finals = [(best[a], a) for a in range(len(allowed)) if last_ok[a] and best[a] < _INF]
        if not finals:
            return None
        sent, a = min(finals)
        cuts = [allowed[a]]
        for arg in reversed(back):
            a = arg[a]
            cuts.append(allowed[a])
        return sent, cuts[::-1]

    def _fits_last(self, first: int, bound: float, memory: float) -> bool:
        return self.prefix[-1] - self.prefix[first] <= bound and self.suffix_memory[first] <= memory

    def _memory_window(self, allowed: list[int], memory: float) -> list[int]:
        """Per allowed position p, the smallest q such that positions q+1..p fit in ``memory``."""
        count: dict[tuple[str, int], int] = {}
        used, left, out, a = 0.0, 0, [], 0

        def add(i: int, sign: int) -> float:
            delta = 0.0
            for kind, ids, size in (
                ("s", self.state[i], self.state_bytes),
                ("a", self.saves[i], self.buffer_bytes),
            ):
                scale = 1 if kind == "s" else self.in_flight
                for j in ids:
                    key = (kind, j)
                    before = count.get(key, 0)
                    count[key] = before + sign
                    if (before == 0 and sign > 0) or (before == 1 and sign < 0):
                        delta += sign * scale * size[j]
            return delta

        for p in range(len(self.nodes)):
            used += add(p, 1)
            while used > memory and left <= p:
                used += add(left, -1)
                left += 1
            while a < len(allowed) and allowed[a] == p:
                out.append(left - 1 if used <= memory else p)
                a += 1
        return out

    # ------------------------------------------------------------------------------ refinement

    def refine(self, cuts: list[int], memory: float) -> tuple[list[set[int]], bool]:
        """Closed cuts (sets of positions) sending the fewest bytes with the same heavy nodes on each side."""
        try:
            import networkx as nx
        except ImportError as err:  # a dependency of dynapipe; only a broken install lands here
            raise PartitionError(
                "dynapipe's automatic partitioner needs networkx: pip install networkx"
            ) from err
        chain_cuts = [set(range(p + 1)) for p in cuts]
        ideals: list[set[int]] = []
        for p in cuts:
            ideal = self._min_cut(nx, p, ideals[-1] if ideals else set())
            if ideal is None:
                return chain_cuts, False
            ideals.append(ideal)
        bounds = [set(), *ideals, set(range(len(self.nodes)))]
        stages = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        if not all(stages) or (memory < _INF and any(self._set_memory(s) > memory for s in stages)):
            return chain_cuts, False  # the chain cuts satisfy every limit by construction
        return ideals, ideals != chain_cuts

    def _set_memory(self, positions: set[int]) -> float:
        state = {j: None for i in positions for j in self.state[i]}
        acts = {j: None for i in positions for j in self.saves[i]}
        return self._stage_memory(state, acts)

    def _min_cut(self, nx, p: int, previous: set[int]) -> set[int] | None:
        n = len(self.nodes)
        source_side = [(self.pinned[i] and i <= p) or i in previous for i in range(n)]
        sink_side = [self.pinned[i] and i > p and i not in previous for i in range(n)]
        for i in range(n - 1, -1, -1):  # ancestors of the source side are on it
            if not source_side[i] and any(source_side[u] for u in self.users[i]):
                source_side[i] = True
        for i in range(n):  # descendants of the sink side are on it
            if not sink_side[i] and any(sink_side[a] for a in self.inputs[i]):
                sink_side[i] = True
        if any(a and b for a, b in zip(source_side, sink_side, strict=True)):
            return None  # cannot happen for cuts between chain positions; the caller keeps the chain cut
        free = [i for i in range(n) if not source_side[i] and not sink_side[i]]
        fixed = {i for i in range(n) if source_side[i]}
        if not free:
            return fixed
        g = nx.DiGraph()

        def half(i: int, part: str) -> str:
            if part == "in" and source_side[i]:
                return "source"
            if part == "in" and sink_side[i]:
                return "sink"
            return f"{self.names[i]}_{part}"

        def add(u: str, v: str, capacity: float, reason: str) -> None:
            if u != v and u != "sink" and v != "source":
                g.add_edge(u, v, capacity=capacity, reason=reason)

        is_free = set(free)
        feeding = sorted({a for i in free for a in self.inputs[i] if source_side[a]})
        for i in feeding + free:
            add(half(i, "in"), half(i, "out"), self.out_bytes[i], "bytes sent if a later stage reads it")
            if i in is_free:
                add(half(i, "out"), half(i, "in"), _INF, "an output exists only where its node runs")
            for u in self.users[i]:
                add(half(i, "out"), half(u, "in"), _INF, "data dependency")
                add(half(u, "in"), half(i, "in"), _INF, "a stage holds the inputs of its nodes (closed cut)")
            if self.to_output[i]:
                add(half(i, "out"), "sink", _INF, "graph output, returned by the last stage")
        g.add_nodes_from(("source", "sink"))
        try:
            _, (reachable, _) = nx.minimum_cut(g, "source", "sink")
        except nx.NetworkXUnbounded as err:
            path = _dump(nx, g)
            raise PartitionError(
                f"no finite cut near position {p} ({self.names[p]}): a non-tensor value would have to cross; "
                f"flow graph written to {path}"
            ) from err
        return fixed | {i for i in free if f"{self.names[i]}_in" in reachable}


def _shared_depth(a: list[str], b: list[str]) -> int:
    depth = 0
    for x, y in zip(a, b, strict=False):
        if x != y or not x:
            break
        depth += 1
    return depth


def _chain_order(nodes: list[fx.Node]) -> list[fx.Node]:
    """Graph order with each ``getitem`` right after the node it unpacks (when its other inputs allow)."""
    index = {node: i for i, node in enumerate(nodes)}
    anchor: dict[fx.Node, int] = {}
    for node in nodes:
        anchor[node] = index[node]
        source = unpacked_by(node)
        if source is not None and source in index:
            if all(a is source or a not in index or index[a] < anchor[source] for a in node.all_input_nodes):
                anchor[node] = anchor[source]
    return sorted(nodes, key=lambda n: (anchor[n], index[n]))


def _groups(nodes: list[fx.Node], graph: fx.Graph, unsplittable: Sequence[str]) -> list[list[int]]:
    """Positions that must share a stage: a node and its getitems, each unsplittable module, each
    region where Dynamo switched grad mode (``with torch.no_grad():`` inside forward)."""
    pos = {node: i for i, node in enumerate(nodes)}
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    for node in nodes:
        source = unpacked_by(node)
        if source is not None and source in pos:
            union(pos[node], pos[source])
    known = sorted({n.meta.get("module_path", "") for n in nodes} - {""})
    for name in unsplittable:
        members = [pos[n] for n in nodes if _inside(n.meta.get("module_path", ""), name)]
        if not members:
            import difflib

            close = difflib.get_close_matches(name, known, n=3)
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else f"; modules in the graph include {known[:8]}"
            )
            raise ConfigError(f"unsplittable module {name!r} runs no code in the compiled call{hint}")
        for i in members[1:]:
            union(members[0], i)
    start, initial = None, torch.is_grad_enabled()
    for node in graph.nodes:  # graph order: regions are delimited by the toggles themselves
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled and node in pos:
            if start is None and bool(node.args[0]) != initial:
                start = pos[node]
            elif start is not None:
                for i in range(min(start, pos[node]), max(start, pos[node]) + 1):
                    union(start, i)
                start = None
    if start is not None:
        for i in range(start, len(nodes)):
            union(start, i)
    by_root: dict[int, list[int]] = {}
    for i in range(len(nodes)):
        by_root.setdefault(find(i), []).append(i)
    return [g for g in by_root.values() if len(g) > 1]


def _dump(nx, g) -> str:
    fd, path = tempfile.mkstemp(prefix="dynapipe_min_cut_", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(nx.readwrite.edgelist.generate_edgelist(g)))
    return path
