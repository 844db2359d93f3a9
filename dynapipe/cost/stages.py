"""Per-stage records: a stage assignment and node costs -> one :class:`StageRecord` per stage."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch.fx as fx

from ..capture import CapturedGraph, settle_getitems
from ..config import Optimizer
from ..module_paths import module_counts, modules_of
from ..schedules.simulate import StageCost
from .graph import graph_costs
from .records import GraphCosts

__all__ = ["StageRecord", "stage_costs"]


@dataclass(frozen=True)
class StageRecord:
    """Cost of one stage for one microbatch: the record the partitioner, simulator and explain share.

    Times in seconds, sizes in bytes. ``sends`` maps each later stage to the bytes this stage sends it
    (a tensor read by two later stages is sent to each); ``modules`` names the modules the stage covers,
    ``(part)`` marking one it shares with another stage.
    """

    index: int
    forward_flops: int
    backward_input_flops: int
    backward_weight_flops: int
    forward_s: float
    backward_input_s: float
    backward_weight_s: float
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    sends: dict[int, int]
    modules: tuple[str, ...]
    n_nodes: int

    @property
    def flops(self) -> int:
        """FLOPs of one training step of one microbatch (forward + backward)."""
        return self.forward_flops + self.backward_input_flops + self.backward_weight_flops

    @property
    def time_s(self) -> float:
        return self.forward_s + self.backward_input_s + self.backward_weight_s

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def send_bytes(self) -> int:
        """Bytes sent to the next stage."""
        return self.sends.get(self.index + 1, 0)

    def memory_bytes(self, in_flight: int = 1) -> int:
        """Peak bytes with ``in_flight`` microbatches' activations held (GPipe: all; 1F1B: stages - index)."""
        return self.state_bytes + in_flight * self.activation_bytes

    def to_stage_cost(self) -> StageCost:
        """The simulator's record; a transfer is taken as the largest this stage makes to any one stage."""
        return StageCost(
            self.forward_s,
            self.backward_input_s,
            self.backward_weight_s,
            self.activation_bytes,
            max(self.sends.values(), default=0),
        )


def stage_costs(
    captured: CapturedGraph,
    stage_of: Mapping[fx.Node, int],
    *,
    costs: GraphCosts | None = None,
    optimizer: Optimizer = "adamw",
) -> list[StageRecord]:
    """One :class:`StageRecord` per stage of the assignment ``stage_of`` (compute node -> stage)."""
    graph = captured.gm.graph
    costs = costs or graph_costs(captured, optimizer=optimizer)
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
            StageRecord(
                index=s,
                forward_flops=int(sums[s][0]),
                backward_input_flops=int(sums[s][1]),
                backward_weight_flops=int(sums[s][2]),
                forward_s=sums[s][3],
                backward_input_s=sums[s][4],
                backward_weight_s=sums[s][5],
                param_bytes=sum(x[0] for x in st),
                grad_bytes=sum(x[1] for x in st),
                optimizer_bytes=sum(x[2] for x in st),
                activation_bytes=sum(costs.buffer_bytes[b] for b in saved[s]),
                sends=sends[s],
                modules=modules_of(members[s], module_count),
                n_nodes=len(members[s]),
            )
        )
    return records
