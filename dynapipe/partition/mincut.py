"""Min-cut refinement of chain cuts (networkx), the functorch way.

**Min-cut refinement** (the functorch way, ``torch/_functorch/partitioners.py``). For each cut, nodes that
carry FLOPs (or much time) stay on their side (infinite edges from the source / to the sink), as do
side-effect nodes and the members of every group above; FLOP-free nodes (views, elementwise, masks, label
shifting) may move. Each node is split into ``_in -> _out`` halves with capacity = the bytes it would send
and a message's worth (:data:`_MESSAGE_BYTES`), data edges ``u_out -> v_in`` and reverse edges ``v_in ->
u_in`` are infinite, so the source side of the min cut is a closed cut that sends the fewest bytes for the
same heavy nodes -- stage times do not change. This moves, e.g., a mask computed early but read late to
where it is read. Only the neighbourhood of each cut enters the flow graph: nodes whose side follows from
the pinned ones (ancestors of source-side, descendants of sink-side) are left out.

Determinism: everything iterates lists in graph order; networkx's minimum_cut returns the unique cut
whose sink side is what can still reach the sink in the residual graph, whatever flow it found; byte
capacities are integers. So every rank computes the same partition from the same graph.
"""

from __future__ import annotations

import math
import os
import tempfile

from ..errors import PartitionError
from .chain import Chain

__all__ = ["refine"]

_INF = math.inf
# What one more tensor crossing a cut costs beyond its bytes, as bytes (its own message to post and wait
# for): a value made from nothing, such as an empty cache tensor, is then made where it is read instead
# of being sent there for free (the demo's Llama sent 12 of them from its first stage to every other).
_MESSAGE_BYTES = 4096


def refine(chain: Chain, cuts: list[int], memory: float) -> tuple[list[set[int]], bool]:
    """Closed cuts (sets of positions) sending the fewest bytes with the same heavy nodes on each side."""
    try:
        import networkx as nx
    except ImportError as err:  # a dependency of dynapipe; only a broken install lands here
        raise PartitionError("dynapipe's automatic partitioner needs networkx: pip install networkx") from err
    chain_cuts = [set(range(p + 1)) for p in cuts]
    ideals: list[set[int]] = []
    for p in cuts:
        ideal = _min_cut(chain, nx, p, ideals[-1] if ideals else set())
        if ideal is None:
            return chain_cuts, False
        ideals.append(ideal)
    bounds = [set(), *ideals, set(range(len(chain.nodes)))]
    stages = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    if not all(stages) or (memory < _INF and any(chain.set_memory(s) > memory for s in stages)):
        return chain_cuts, False  # the chain cuts satisfy every limit by construction
    return ideals, ideals != chain_cuts


def _min_cut(chain: Chain, nx, p: int, previous: set[int]) -> set[int] | None:
    n = len(chain.nodes)
    source_side = [(chain.pinned[i] and i <= p) or i in previous for i in range(n)]
    sink_side = [chain.pinned[i] and i > p and i not in previous for i in range(n)]
    for i in range(n - 1, -1, -1):  # ancestors of the source side are on it
        if not source_side[i] and any(source_side[u] for u in chain.users[i]):
            source_side[i] = True
    for i in range(n):  # descendants of the sink side are on it
        if not sink_side[i] and any(sink_side[a] for a in chain.inputs[i]):
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
        return f"{chain.names[i]}_{part}"

    def add(u: str, v: str, capacity: float, reason: str) -> None:
        if u != v and u != "sink" and v != "source":
            g.add_edge(u, v, capacity=capacity, reason=reason)

    is_free = set(free)
    feeding = sorted({a for i in free for a in chain.inputs[i] if source_side[a]})
    for i in feeding + free:
        sent = chain.out_bytes[i] + _MESSAGE_BYTES
        add(half(i, "in"), half(i, "out"), sent, "bytes sent if a later stage reads it, and a message")
        if i in is_free:
            add(half(i, "out"), half(i, "in"), _INF, "an output exists only where its node runs")
        for u in chain.users[i]:
            add(half(i, "out"), half(u, "in"), _INF, "data dependency")
            add(half(u, "in"), half(i, "in"), _INF, "a stage holds the inputs of its nodes (closed cut)")
        if chain.to_output[i]:
            add(half(i, "out"), "sink", _INF, "graph output, returned by the last stage")
    g.add_nodes_from(("source", "sink"))
    try:
        _, (reachable, _) = nx.minimum_cut(g, "source", "sink")
    except nx.NetworkXUnbounded as err:
        path = _dump(nx, g)
        raise PartitionError(
            f"no finite cut near position {p} ({chain.names[p]}): a non-tensor value would have to cross; "
            f"flow graph written to {path}"
        ) from err
    return fixed | {i for i in free if f"{chain.names[i]}_in" in reachable}


def _dump(nx, g) -> str:
    fd, path = tempfile.mkstemp(prefix="dynapipe_min_cut_", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(nx.readwrite.edgelist.generate_edgelist(g)))
    return path
