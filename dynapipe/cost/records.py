"""The cost of each compute node of a graph, for one microbatch: the records the cost model produces."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import sympy
import torch.fx as fx

from ..config import Optimizer
from ..schedules.simulate import PhaseCost
from .rates import NOMINAL_RATES, OpTimes, Rates

__all__ = ["NOMINAL_FLOP_RATE", "NOMINAL_MEMORY_BANDWIDTH", "OPTIMIZER_STATES", "GraphCosts", "NodeCost"]

# Extra per-parameter copies each optimizer keeps (SGD counted with a momentum buffer: the worst case).
OPTIMIZER_STATES: dict[Optimizer, int] = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}
# The nominal accelerator's rates (see :data:`dynapipe.cost.rates.NOMINAL_RATES`): a node's estimated
# time is the roofline max(FLOPs / flop rate, bytes moved / memory bandwidth), 50 FLOPs per byte
# between the two: norms, masks, rotary, softmax and the loss over a large vocabulary move memory and do
# few FLOPs, and a matmul over few tokens is bound by reading its weight.
NOMINAL_FLOP_RATE = NOMINAL_RATES.flop_rate
NOMINAL_MEMORY_BANDWIDTH = NOMINAL_RATES.memory_bandwidth


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
    """Costs of every compute node of one captured graph, and the bytes each piece of state costs;
    times at ``rates`` (a node whose signature ``rates`` timed takes that time, the others the roofline)."""

    nodes: dict[fx.Node, NodeCost]
    buffer_bytes: list[int]  # per saved-activation buffer
    buffer_names: list[str]
    state_bytes: dict[fx.Node, tuple[int, int, int]]  # get_attr -> (parameter, gradient, optimizer state)
    optimizer: Optimizer
    rates: Rates = NOMINAL_RATES
    signatures: dict[fx.Node, str | None] = field(default_factory=dict)  # what an operation's time depends on
    uncosted: list[str] = field(default_factory=list)  # nodes the fake run could not execute (0 FLOPs)

    @property
    def profiled(self) -> bool:
        """Whether any node's time was measured rather than estimated."""
        return any(c.measured for c in self.nodes.values())

    def timed(self, rates: Rates) -> GraphCosts:
        """The same costs at ``rates``: each node whose signature ``rates`` has timed takes that time, as a
        stage runs it (with what composing operations adds); the roofline estimates stay for the others."""
        nodes = {}
        for node, cost in self.nodes.items():
            times: OpTimes | None = rates.op_times.get(self.signatures.get(node) or "")
            nodes[node] = cost if times is None else _as_run(cost, times, rates)
        return dataclasses.replace(self, nodes=nodes, rates=rates)

    def times(self) -> list[tuple[float, float, float]]:
        return [(c.forward, c.backward_input, c.backward_weight) for c in self.nodes.values()]


def _as_run(cost: NodeCost, times: OpTimes, rates: Rates) -> NodeCost:
    """``cost`` with an operation's timed phases as a stage runs them: its own time plus what each phase
    adds per operation (a backward's share split as its halves)."""
    f, i, w = times
    extra = rates.backward_extra_s
    return dataclasses.replace(
        cost,
        forward=max(f + rates.forward_extra_s, 0.0) if f else 0.0,
        backward_input=max(i + extra * i / (i + w), 0.0) if i + w else 0.0,
        backward_weight=max(w + extra * w / (i + w), 0.0) if i + w else 0.0,
        measured=True,
    )
