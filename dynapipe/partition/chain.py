"""The compute nodes as a chain of cut positions, with what the balance search and the min-cut need.

**Chain.** Compute nodes in graph order (Dynamo's order is Python's, a topological order), each
``getitem`` moved next to the node it unpacks (codegen keeps the two in one stage). Per position p:
the prefix time, and ``cross[p]``: bytes of the tensors live across a cut after p (every rank reads
placeholders and parameters itself, so they are free). A cut is *not allowed* where a non-tensor is
live, inside an ``unsplittable`` module, inside a ``torch.no_grad()`` region, or between a node and
its ``getitem``. ``torch.cond`` and other higher-order ops are single nodes, so never cut inside.
A ``torch.autocast()`` region may be cut: its enter's context, read only by its exit, is no value a
stage sends (codegen re-enters the region in each stage), so the pair neither blocks a cut nor moves.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
import torch.fx as fx

from ..cost import GraphCosts, NodeCost
from ..errors import ConfigError
from ..graph import CapturedGraph, carries_gradient, compute_nodes, is_autocast_node, prefixes, unpacked_by
from ..schedules import StageCost
from .manual import _inside, layer_boundaries

__all__ = ["Chain"]

# A node costing at least this share of an average stage never moves during min-cut refinement.
_HEAVY_SHARE = 0.01
_INF = math.inf


class Chain:
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
        self.grad = [int(carries_gradient(node)) for node in self.nodes]
        weight = [x.time_s for x in c]
        self.timed = any(weight)
        # per position, the forward, input-gradient and weight-gradient seconds of the nodes before it
        self.phase_prefix = [(0.0, 0.0, 0.0)]
        for x in c:
            f, i, w = self.phase_prefix[-1]
            self.phase_prefix.append((f + x.forward, i + x.backward_input, w + x.backward_weight))
        if not self.timed:  # nothing has FLOPs (or was timed): balance node counts instead
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
        self.last_busy = _last_busy(c, weight)

    # ---------------------------------------------------------------------------------- set-up

    def _pinned(self, c: list, groups: list[list[int]]) -> list[bool]:
        share = self.prefix[-1] / self.k * _HEAVY_SHARE
        pinned = [
            x.forward_flops > 0 or (share > 0 and w >= share) or not node.users or is_autocast_node(node)
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
                elif self.users[i]:  # returned only (a cache): sent once to the last stage from any stage
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

    def stage_costs(self, cuts: list[int]) -> list[StageCost]:
        """What the simulator needs of each stage of a split at chain positions ``cuts``: its F, I and W
        seconds and the bytes and tensors it sends each later stage (each value once to each stage that
        reads it, as codegen sends skips: straight from producer to consumer)."""
        ends = [*cuts, len(self.nodes) - 1]
        stage = [bisect.bisect_left(ends, i) for i in range(len(self.nodes))]
        last = len(ends) - 1
        sends: list[dict[int, float]] = [{} for _ in ends]
        messages: list[dict[int, int]] = [{} for _ in ends]
        grad_messages: list[dict[int, int]] = [{} for _ in ends]
        for i, s in enumerate(stage):
            readers = {stage[u] for u in self.users[i]} | ({last} if self.to_output[i] else set())
            for d in readers - {s}:
                sends[s][d] = sends[s].get(d, 0) + self.out_bytes[i]
                messages[s][d] = messages[s].get(d, 0) + 1
                grad_messages[s][d] = grad_messages[s].get(d, 0) + self.grad[i]
        out, start = [], 0
        for s, end in enumerate(ends):
            a, b = self.phase_prefix[start], self.phase_prefix[end + 1]
            sent = {d: int(v) for d, v in sends[s].items()}
            out.append(
                StageCost(
                    b[0] - a[0],
                    b[1] - a[1],
                    b[2] - a[2],
                    send_bytes=max(sent.values(), default=0),
                    index=s,
                    sends=sent,
                    messages=messages[s],
                    grad_messages=grad_messages[s],
                )
            )
            start = end + 1
        return out

    def set_memory(self, positions: set[int]) -> float:
        state = {j: None for i in positions for j in self.state[i]}
        acts = {j: None for i in positions for j in self.saves[i]}
        return self._stage_memory(state, acts)


def _last_busy(c: Sequence[NodeCost], weight: Sequence[float]) -> list[int]:
    """Per position, the last position up to it that computes. A stage must compute: hold a node with
    FLOPs (where the graph has any). A stage of one relu or mask takes time under the roofline, but all
    it does is relay its neighbours' tensors."""
    work = [x.forward_flops > 0 for x in c] if any(x.forward_flops for x in c) else [w > 0 for w in weight]
    last_busy, last = [], -1
    for i, busy in enumerate(work):
        last = i if busy else last
        last_busy.append(last)
    return last_busy


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
