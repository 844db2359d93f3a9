"""Stage assignment -> one readable ``torch.fx.GraphModule`` per stage, and its calling convention.

Calling convention (the contract between this module and the runtime)
---------------------------------------------------------------------
``stage.module(*inputs, *received) -> tuple(outputs)``

* **inputs** — the microbatched graph inputs this stage reads, in the order of ``StagePlan.inputs``
  (indices into ``CapturedGraph.input_sources``). Every stage reads its inputs straight from the
  microbatch; inputs are never forwarded from stage to stage.
* **received** — boundary values produced by earlier stages, in the order of ``StagePlan.receives``.
* **outputs** — for every stage but the last, the boundary values it produces (``StagePlan.sends``); a
  value goes straight to every later stage that reads it (skip connections jump over stages). The last
  stage returns the graph's own outputs (the loss first among them when training).

Glossary: a *boundary* is a tensor computed by one stage and read by later ones; its ``consumers`` are
those stages. Parameters and buffers never cross a boundary: a stage owns attributes that alias the
user's tensors, and a tensor read by several stages (tied weights) is an attribute of each of them.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .capture import CapturedGraph, grad_modes
from .errors import PartitionError

__all__ = ["Boundary", "StagePlan", "build_stages", "partition_digest"]


@dataclass(frozen=True)
class Boundary:
    """A tensor that crosses stages; its shape is fixed at the microbatch size, so no shape handshake."""

    name: str
    producer: int
    consumers: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass
class StagePlan:
    index: int
    module: fx.GraphModule
    inputs: list[int]
    receives: list[Boundary]
    sends: list[Boundary]
    state_names: dict[str, str] = field(default_factory=dict)  # attribute -> qualified name in the model

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters())


def _concrete(value: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, bool]:
    shape = tuple(int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in value.shape)
    return shape, value.dtype, bool(value.requires_grad)


def _settle_stages(graph: fx.Graph, stage_of: dict[fx.Node, int]) -> None:
    """Keep ``getitem`` of a tuple with the node that makes the tuple (only tensors cross stages), and
    check that no node reads from a later stage."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
            if (
                isinstance(source, fx.Node)
                and source in stage_of
                and not isinstance(source.meta.get("example_value"), torch.Tensor)
            ):
                stage_of[node] = stage_of[source]
    for node in graph.nodes:
        for user in node.users:
            if node in stage_of and user in stage_of and stage_of[user] < stage_of[node]:
                raise PartitionError(
                    f"node {user.name} (stage {stage_of[user]}) reads {node.name} from the later stage "
                    f"{stage_of[node]}; stages must follow the graph's order"
                )


def build_stages(captured: CapturedGraph, stage_of: dict[fx.Node, int], n_stages: int) -> list[StagePlan]:
    """Cut ``captured.gm`` into ``n_stages`` GraphModules following ``stage_of`` (compute node -> stage)."""
    graph = captured.gm.graph
    _settle_stages(graph, stage_of)
    last = n_stages - 1
    output = graph.find_nodes(op="output")[0]
    placeholders = list(graph.find_nodes(op="placeholder"))
    used = {s for s in stage_of.values()}
    if used != set(range(n_stages)):
        missing = sorted(set(range(n_stages)) - used)
        raise PartitionError(
            f"stages {missing} received no graph nodes; use fewer stages or other split points"
        )

    def stage_reading(user: fx.Node) -> int:
        return last if user is output else stage_of[user]

    consumers: dict[fx.Node, set[int]] = {}
    for node in graph.nodes:
        if node in stage_of:
            later = {stage_reading(u) for u in node.users} - {stage_of[node]}
            if later:
                consumers[node] = later
    boundaries: dict[fx.Node, Boundary] = {}
    for node, cons in consumers.items():
        value = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor):
            raise PartitionError(
                f"{node.name} ({type(value).__name__}) would cross from stage {stage_of[node]} to {sorted(cons)}; "
                "only tensors can cross stages: move the split point"
            )
        shape, dtype, requires_grad = _concrete(value)
        boundaries[node] = Boundary(
            node.name, stage_of[node], tuple(sorted(cons)), shape, dtype, requires_grad
        )

    modes = grad_modes(graph)
    plans = []
    for s in range(n_stages):
        body = [n for n in graph.nodes if stage_of.get(n) == s]
        reads = {a for n in body + ([output] if s == last else []) for a in n.all_input_nodes}
        inputs = [i for i, p in enumerate(placeholders) if p in reads]
        receives = [boundaries[n] for n in graph.nodes if n in reads and n in boundaries and stage_of[n] < s]
        sends = [b for n, b in boundaries.items() if b.producer == s]
        new = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i in inputs:
            env[placeholders[i]] = new.placeholder(placeholders[i].name)
            env[placeholders[i]].meta = dict(placeholders[i].meta)
        by_name = {n.name: n for n in graph.nodes}
        for b in receives:
            env[by_name[b.name]] = new.placeholder(b.name)
            env[by_name[b.name]].meta = dict(by_name[b.name].meta)
        for attr in [n for n in graph.find_nodes(op="get_attr") if n in reads]:
            env[attr] = new.node_copy(attr)
        if body and modes[body[0]] != torch.is_grad_enabled():
            new.call_function(torch._C._set_grad_enabled, (modes[body[0]],))
        for node in body:
            env[node] = new.node_copy(node, lambda n: env[n])
        if body and modes.get(body[-1].next, modes[body[-1]]) != torch.is_grad_enabled():
            new.call_function(torch._C._set_grad_enabled, (torch.is_grad_enabled(),))
        if s == last:
            new.output(fx.map_arg(output.args[0], lambda n: env[n]))
        else:
            new.output(tuple(env[by_name[b.name]] for b in sends))
        module = fx.GraphModule(captured.gm, new, class_name=f"Stage{s}")
        names = {
            t: captured.state_names[t]
            for t in (n.target for n in new.find_nodes(op="get_attr"))
            if t in captured.state_names
        }
        plans.append(StagePlan(s, module, inputs, receives, sends, names))
    return plans


def partition_digest(plans: list[StagePlan]) -> str:
    """A hash of every stage's code and boundaries: ranks compare it before running anything."""
    h = hashlib.sha256()
    for plan in plans:
        h.update(plan.module.code.encode())
        h.update(
            repr([(b.name, b.producer, b.consumers, b.shape, str(b.dtype)) for b in plan.sends]).encode()
        )
    return h.hexdigest()
