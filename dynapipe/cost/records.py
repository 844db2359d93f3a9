"""The cost of each compute node of a graph, for one microbatch: the records the cost model produces."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import sympy
import torch.fx as fx

from ..config import Optimizer
from ..schedules.simulate import PhaseCost

__all__ = ["NOMINAL_FLOP_RATE", "NOMINAL_MEMORY_BANDWIDTH", "OPTIMIZER_STATES", "GraphCosts", "NodeCost"]

# Extra per-parameter copies each optimizer keeps (SGD counted with a momentum buffer: the worst case).
OPTIMIZER_STATES: dict[Optimizer, int] = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}
# FLOP/s that turns FLOPs into seconds without profiling: a nominal accelerator at a realistic fraction
# of peak. Only ratios matter to the partitioner; the simulator compares it with link bandwidth.
NOMINAL_FLOP_RATE = 100e12
# Bytes/s of memory traffic on the same nominal accelerator (HBM3 at about 60% of 3.35 TB/s). A node's
# estimated time is the roofline max(FLOPs / NOMINAL_FLOP_RATE, bytes moved / NOMINAL_MEMORY_BANDWIDTH):
# norms, masks, rotary, softmax and the loss over a large vocabulary move memory and do few FLOPs, and a
# matmul over few tokens is bound by reading its weight. 50 FLOPs per byte between the two.
NOMINAL_MEMORY_BANDWIDTH = 2e12


@dataclass(frozen=True)
class NodeCost(PhaseCost):
    """Cost of one compute node for one microbatch (times in seconds, sizes in bytes): its phases'
    seconds and FLOPs (:class:`~dynapipe.schedules.simulate.PhaseCost`, which a stage sums), and what
    the partitioner needs to place it."""

    out_bytes: int = 0
    out_bytes_expr: sympy.Expr = sympy.Integer(0)
    crossable: bool = True  # its value is a tensor; only tensors may cross a stage boundary
    moved_bytes: int = 0  # bytes its ops read and write, forward + backward (views move none)
    saves: tuple[int, ...] = ()  # activation buffers (indices into GraphCosts.buffer_bytes) kept for backward
    measured: bool = False


@dataclass
class GraphCosts:
    """Costs of every compute node of one captured graph, and the bytes each piece of state costs."""

    nodes: dict[fx.Node, NodeCost]
    buffer_bytes: list[int]  # per saved-activation buffer
    buffer_names: list[str]
    state_bytes: dict[fx.Node, tuple[int, int, int]]  # get_attr -> (parameter, gradient, optimizer state)
    optimizer: Optimizer
    profiled: bool
    flop_rate: float
    uncosted: list[str] = field(default_factory=list)  # nodes the fake run could not execute (0 FLOPs)
    memory_bandwidth: float = NOMINAL_MEMORY_BANDWIDTH  # bytes/s the estimated times assume

    def with_times(self, times: Sequence[tuple[float, float, float]]) -> GraphCosts:
        """The same costs with measured (forward, backward-input, backward-weight) seconds per node, in the
        order of :attr:`nodes`: ranks that profile separately agree by broadcasting one rank's times."""
        nodes = {
            n: dataclasses.replace(c, forward=t[0], backward_input=t[1], backward_weight=t[2], measured=True)
            for (n, c), t in zip(self.nodes.items(), times, strict=True)
        }
        return GraphCosts(
            nodes,
            self.buffer_bytes,
            self.buffer_names,
            self.state_bytes,
            self.optimizer,
            True,
            self.flop_rate,
            self.uncosted,
            self.memory_bandwidth,
        )

    def times(self) -> list[tuple[float, float, float]]:
        return [(c.forward, c.backward_input, c.backward_weight) for c in self.nodes.values()]
