"""Per-stage costs: a stage assignment and node costs -> one :class:`~dynapipe.schedules.StageCost` per stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch.fx as fx

from ..graph import CapturedGraph, carries_gradient, module_counts, modules_of, settle_getitems
from ..schedules.simulate import PhaseCost, StageCost
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
    members: list[list[fx.Node]] = [[] for _ in range(n_stages)]
    for node, s in stage_of.items():
        members[s].append(node)
    output = graph.find_nodes(op="output")[0]
    sends, messages, grad_messages = _sends(stage_of, costs, output, n_stages)
    module_count = module_counts(stage_of)
    records = []
    for s, nodes in enumerate(members):
        # a stage reads the parameters its nodes read; the last also those the graph returns
        readers = [*nodes, output] if s == n_stages - 1 else nodes
        state = [costs.state_bytes[a] for a in dict.fromkeys(_state_read(readers, costs))]
        saved = dict.fromkeys(b for node in nodes for b in costs.nodes[node].saves)
        work = PhaseCost.total(costs.nodes[node] for node in nodes)
        records.append(
            StageCost(
                **dataclasses.asdict(work),
                activation_bytes=sum(costs.buffer_bytes[b] for b in saved),
                send_bytes=max(sends[s].values(), default=0),
                index=s,
                param_bytes=sum(x[0] for x in state),
                grad_bytes=sum(x[1] for x in state),
                optimizer_bytes=sum(x[2] for x in state),
                sends=sends[s],
                messages=messages[s],
                grad_messages=grad_messages[s],
                modules=modules_of(nodes, module_count),
                n_nodes=len(nodes),
            )
        )
    return records


def _state_read(nodes: list[fx.Node], costs: GraphCosts) -> list[fx.Node]:
    return [src for node in nodes for src in node.all_input_nodes if src in costs.state_bytes]


def _sends(
    stage_of: Mapping[fx.Node, int], costs: GraphCosts, output: fx.Node, n_stages: int
) -> tuple[list[dict[int, int]], list[dict[int, int]], list[dict[int, int]]]:
    """Per stage, the bytes it sends each other stage, a value once to each stage that reads it (what the
    graph returns goes to the last stage); the tensors; and those of them whose gradient comes back."""
    last = n_stages - 1
    sends: list[dict[int, int]] = [{} for _ in range(n_stages)]
    messages: list[dict[int, int]] = [{} for _ in range(n_stages)]
    grad_messages: list[dict[int, int]] = [{} for _ in range(n_stages)]
    for node, s in stage_of.items():
        for reader in sorted({last if u is output else stage_of[u] for u in node.users} - {s}):
            sends[s][reader] = sends[s].get(reader, 0) + costs.nodes[node].out_bytes
            messages[s][reader] = messages[s].get(reader, 0) + 1
            grad_messages[s][reader] = grad_messages[s].get(reader, 0) + carries_gradient(node)
    return sends, messages, grad_messages
