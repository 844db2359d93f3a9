"""Per-stage costs: a stage assignment and node costs -> one :class:`~dynapipe.schedules.StageCost` per stage."""

from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from ..graph import CapturedGraph, module_counts, modules_of, settle_getitems
from ..schedules.simulate import StageCost
from .records import GraphCosts

__all__ = ["stage_costs"]


def stage_costs(
    captured: CapturedGraph,
    stage_of: Mapping[fx.Node, int],
    costs: GraphCosts,
) -> list[StageCost]:
    """One :class:`StageCost` per stage of the assignment ``stage_of`` (compute node -> stage), summed
    from the node costs the plan was made on."""
    graph = captured.gm.graph
    stage_of = settle_getitems(graph, stage_of)
    n_stages = max(stage_of.values(), default=0) + 1
    last = n_stages - 1
    output = graph.find_nodes(op="output")[0]
    sums = [[0.0] * 6 for _ in range(n_stages)]
    state: list[dict[fx.Node, None]] = [{} for _ in range(n_stages)]
    saved: list[dict[int, None]] = [{} for _ in range(n_stages)]
    sends: list[dict[int, int]] = [{} for _ in range(n_stages)]
    members: list[list[fx.Node]] = [[] for _ in range(n_stages)]
    for node, s in stage_of.items():
        c = costs.nodes[node]
        row = sums[s]
        for i, v in enumerate(
            (
                c.flops,
                c.backward_input_flops,
                c.backward_weight_flops,
                c.forward_s,
                c.backward_input_s,
                c.backward_weight_s,
            )
        ):
            row[i] += v
        members[s].append(node)
        saved[s].update(dict.fromkeys(c.saves))
        for src in node.all_input_nodes:
            if src in costs.state_bytes:
                state[s][src] = None
        for c_stage in sorted({last if u is output else stage_of[u] for u in node.users} - {s}):
            sends[s][c_stage] = sends[s].get(c_stage, 0) + c.out_bytes
    for src in output.all_input_nodes:
        if src in costs.state_bytes:
            state[last][src] = None
    module_count = module_counts(stage_of)
    records = []
    for s in range(n_stages):
        st = [costs.state_bytes[a] for a in state[s]]
        records.append(
            StageCost(
                forward=sums[s][3],
                backward_input=sums[s][4],
                backward_weight=sums[s][5],
                activation_bytes=sum(costs.buffer_bytes[b] for b in saved[s]),
                send_bytes=max(sends[s].values(), default=0),
                index=s,
                forward_flops=int(sums[s][0]),
                backward_input_flops=int(sums[s][1]),
                backward_weight_flops=int(sums[s][2]),
                param_bytes=sum(x[0] for x in st),
                grad_bytes=sum(x[1] for x in st),
                optimizer_bytes=sum(x[2] for x in st),
                sends=sends[s],
                modules=modules_of(members[s], module_count),
                n_nodes=len(members[s]),
            )
        )
    return records
