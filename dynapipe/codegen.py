"""Stage assignment -> one readable ``torch.fx.GraphModule`` per stage, and its calling convention.

Calling convention (the contract between this module and the runtime)
---------------------------------------------------------------------
``stage.module(*inputs, *received) -> tuple(outputs)``

* **inputs** — the microbatched graph inputs this stage reads, in the order of ``StagePlan.inputs``
  (indices into ``CapturedGraph.input_sources``). Every stage reads its inputs straight from the
  microbatch; inputs are never forwarded from stage to stage.
* **received** — boundary values produced by earlier stages, in the order of ``StagePlan.receives``.
  Their shapes are symbolic (``Boundary.shape``, a :class:`~dynapipe.graph.SymbolicShape`): a receiver
  allocates ``b.shape.at(sizes)`` with the call's :class:`~dynapipe.graph.Sizes`, read from the inputs.
* **sizes** — a size the stage uses (``s27``, ``s27 * 8``) is never received: the stage computes it from
  the sizes of the inputs it reads (``s27 = l_ids_.size(1)``), so one stage module serves every length.
* **outputs** — for every stage but the last, the boundary values it produces (``StagePlan.sends``); a
  value goes straight to every later stage that reads it (skip connections jump over stages). The last
  stage returns the graph's own outputs (the loss first among them when training).

Glossary: a *boundary* is a tensor computed by one stage and read by later ones; its ``consumers`` are
those stages. Parameters and buffers never cross a boundary: a stage owns attributes that alias the
user's tensors, and a tensor read by several stages (tied weights) is an attribute of each of them.

A stage module sets up the state its nodes ran under and leaves none behind: a stage that starts inside a
``torch.no_grad()`` or ``torch.autocast()`` region re-opens it first (autocast with the arguments of the
region's own enter, outermost first), and one that ends inside such a region closes it last. A received
boundary that the stage modifies in place is cloned first (``x_clone = x.clone()``): the runtime makes
every received boundary that needs a gradient an autograd leaf, which an in-place op may not touch. A write
that a reader on another copy of the value would miss (another stage, an input every stage reads itself) is
a ``PartitionError`` naming both nodes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .errors import PartitionError
from .graph import (
    CapturedGraph,
    SymbolicShape,
    autocast_regions,
    grad_modes,
    is_autocast_node,
    is_size_node,
    settle_getitems,
    written_in_place,
)

__all__ = ["Boundary", "StagePlan", "build_stages", "partition_digest"]


@dataclass(frozen=True)
class Boundary:
    """A tensor that crosses stages. Its shape is symbolic in the size symbols, and every rank knows their
    values at each call from the inputs, so no shape handshake: the receiver allocates ``shape.at(sizes)``."""

    name: str
    producer: int
    consumers: tuple[int, ...]
    shape: SymbolicShape
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
    # per entry of ``inputs``: whether the stage reads the input's data, not only its size (a stage that
    # reads another layer's PipelineCache length holds none of that layer's cache)
    reads_data: list[bool] = field(default_factory=list)


def _size_nodes_read(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    """The size nodes ``nodes`` read, directly or through other size nodes, in graph order."""
    found: set[fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes if is_size_node(a)]
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(a for a in node.all_input_nodes if is_size_node(a))
    return [n for n in graph.nodes if n in found]


def _check_order(graph: fx.Graph, stage_of: dict[fx.Node, int]) -> None:
    """No node reads from a later stage."""
    for node in graph.nodes:
        for user in node.users:
            if is_autocast_node(user):  # an autocast exit reads its enter's context: codegen re-enters
                continue
            if node in stage_of and user in stage_of and stage_of[user] < stage_of[node]:
                raise PartitionError(
                    f"node {user.name} (stage {stage_of[user]}) reads {node.name} from the later stage "
                    f"{stage_of[node]}; stages must follow the graph's order"
                )


def _storage(node: fx.Node) -> int | None:
    """Which storage the node's traced value lives in: views share it, so equal keys mean the nodes alias
    (None: not a tensor, or a tensor without a storage, like a sparse one)."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _roots(target: fx.Node, s: int, stage_of: dict[fx.Node, int], storage: dict) -> set[fx.Node]:
    """The values made outside stage ``s`` that ``target``, made on it or not, is a view of."""
    roots, stack, seen = set(), [target], set()
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            if stage_of.get(node) != s:
                roots.add(node)
            else:
                stack.extend(a for a in node.all_input_nodes if storage[a] == storage[target])
    return roots


def _missed_write(
    write: fx.Node, value: fx.Node, reader: fx.Node, s: int, t: int, roots: set[fx.Node], stage_of: dict
) -> str:
    if t != s:
        why = f"{reader.name} reads {value.name} after it on stage {t}, which holds its own copy"
    else:
        root = min(roots, key=lambda n: n.name)
        why = (
            f"stage {s} receives {value.name} and {root.name} as separate copies, so {reader.name} misses it"
        )
    fix = (
        f"are on the stage that makes {value.name} (stage {stage_of[value]})"
        if value in stage_of
        else "share a stage"
    )
    return (
        f"{write.name} (stage {s}) modifies {value.name} in place, but {why}; move the split point (or "
        f"mark the module unsplittable) so that {write.name} and {reader.name} {fix}"
    )


def _in_place_writes(graph: fx.Graph, stage_of: dict[fx.Node, int]) -> dict[int, set[fx.Node]]:
    """Per stage, the values of earlier stages that it modifies in place, directly or through a view (all of
    them where the storage of what it writes is unknown).

    Each stage holds its own copy of a value made on another stage, so a reader after a write that reads
    another copy (on another stage, or a second received view of the same storage) would miss the change:
    an error naming both nodes, rather than a result that differs from one process.
    """
    storage = {n: _storage(n) for n in graph.nodes}
    aliases: dict[int, list[fx.Node]] = {}
    for node, key in storage.items():
        if key is not None:
            aliases.setdefault(key, []).append(node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(stage_of.values())
    written: dict[int, set[fx.Node]] = {}
    for write in [n for n in graph.nodes if n in stage_of]:
        s = stage_of[write]
        for target in written_in_place(write):
            key = storage[target]
            if key is None:
                written.setdefault(s, set()).update(n for n, at in stage_of.items() if at < s)
                continue
            roots = _roots(target, s, stage_of, storage)
            written.setdefault(s, set()).update(r for r in roots if r in stage_of)
            for value in aliases[key]:
                if order[value] >= order[write] or stage_of.get(value, -1) >= s:
                    continue  # made on the write's stage (later stages receive it written) or after it
                for reader in value.users:
                    t = last if reader.op == "output" else stage_of.get(reader, s)
                    if order[reader] < order[write] or reader is write or is_autocast_node(reader):
                        continue
                    if t != s or (value in stage_of and value not in roots):
                        raise PartitionError(_missed_write(write, value, reader, s, t, roots, stage_of))
    return written


def _enter_regions(
    new: fx.Graph, env: dict[fx.Node, fx.Node], open_: list[fx.Node], want: tuple[fx.Node, ...]
) -> None:
    """Exit and enter autocast regions in ``new`` so that ``open_`` (enter nodes of the captured graph,
    outermost first) becomes ``want``; a region enters again with the arguments of its original enter."""
    while open_ and tuple(open_) != tuple(want[: len(open_)]):
        new.call_function(torch.amp.autocast_mode._exit_autocast, (env[open_.pop()],))
    for enter in want[len(open_) :]:
        env[enter] = new.node_copy(enter, lambda n: env[n])
        open_.append(enter)


def build_stages(captured: CapturedGraph, stage_of: dict[fx.Node, int], n_stages: int) -> list[StagePlan]:
    """Cut ``captured.gm`` into ``n_stages`` GraphModules following ``stage_of`` (compute node -> stage)."""
    graph = captured.gm.graph
    stage_of = settle_getitems(graph, stage_of)  # a copy: the caller's assignment stays as it was
    _check_order(graph, stage_of)
    used = {s for n, s in stage_of.items() if not is_autocast_node(n)}
    if used != set(range(n_stages)):
        missing = sorted(set(range(n_stages)) - used)
        raise PartitionError(
            f"stages {missing} received no graph nodes; use fewer stages or other split points"
        )
    cut = _Cut(captured, stage_of, n_stages)
    return [cut.stage(s) for s in range(n_stages)]


def _boundaries(captured: CapturedGraph, stage_of: dict[fx.Node, int], last: int) -> dict[fx.Node, Boundary]:
    """Every value a later stage reads (the graph's outputs count as read by the last stage)."""
    boundaries: dict[fx.Node, Boundary] = {}
    for node in captured.gm.graph.nodes:
        if node not in stage_of or is_autocast_node(node):  # autocast regions re-open in every stage
            continue
        later = sorted({last if u.op == "output" else stage_of[u] for u in node.users} - {stage_of[node]})
        if not later:
            continue
        value = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor):
            raise PartitionError(
                f"{node.name} ({type(value).__name__}) would cross from stage {stage_of[node]} to {later}; "
                "only tensors can cross stages: move the split point"
            )
        shape = captured.shapes.shape_of(value)
        boundaries[node] = Boundary(
            node.name, stage_of[node], tuple(later), shape, value.dtype, bool(value.requires_grad)
        )
    return boundaries


class _Cut:
    """What every stage of one cut shares: the graph, the boundaries, and the state each node runs under."""

    def __init__(self, captured: CapturedGraph, stage_of: dict[fx.Node, int], n_stages: int) -> None:
        self.captured, self.stage_of, self.last = captured, stage_of, n_stages - 1
        self.graph = graph = captured.gm.graph
        self.output = graph.find_nodes(op="output")[0]
        self.placeholders = list(graph.find_nodes(op="placeholder"))
        self.boundaries = _boundaries(captured, stage_of, self.last)
        self.written = _in_place_writes(graph, stage_of)
        self.modes = grad_modes(graph)
        self.regions = autocast_regions(graph)

    def stage(self, s: int) -> StagePlan:
        """Stage ``s`` as a GraphModule with its calling convention (see the module docstring)."""
        graph, stage_of, last = self.graph, self.stage_of, self.last
        body = [n for n in graph.nodes if stage_of.get(n) == s and not is_autocast_node(n)]
        ends = [self.output] if s == last else []
        sizes = _size_nodes_read(graph, body + ends)
        reads = {a for n in body + sizes + ends for a in n.all_input_nodes}
        inputs = [i for i, p in enumerate(self.placeholders) if p in reads]
        received = [n for n in graph.nodes if n in reads and n in self.boundaries and stage_of[n] < s]
        new = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in [self.placeholders[i] for i in inputs] + received:
            env[node] = new.placeholder(node.name)
            env[node].meta = dict(node.meta)
        # A received boundary the stage writes to in place (or through a view) is copied first: the runtime
        # makes it an autograd leaf, which an in-place op may not touch, and between stages of one rank it
        # shares storage with the producer's output. User inputs are not leaves: never copied.
        for node in received:
            if node in self.written.get(s, ()):
                env[node] = new.create_node("call_method", "clone", (env[node],), name=f"{node.name}_clone")
                env[node].meta = dict(node.meta)
        for attr in [n for n in graph.find_nodes(op="get_attr") if n in reads]:
            env[attr] = new.node_copy(attr)
        for size in sizes:
            env[size] = new.node_copy(size, lambda n: env[n])
        self._copy_body(new, env, body)
        sends = [b for b in self.boundaries.values() if b.producer == s]
        if s == last:
            new.output(fx.map_arg(self.output.args[0], lambda n: env[n]))
        else:
            by_name = {n.name: n for n in self.boundaries}
            new.output(tuple(env[by_name[b.name]] for b in sends))
        module = fx.GraphModule(self.captured.gm, new, class_name=f"Stage{s}")
        state_names = self.captured.state_names
        names = {
            t: state_names[t] for t in (n.target for n in new.find_nodes(op="get_attr")) if t in state_names
        }
        reads_data = [any(not is_size_node(u) for u in env[self.placeholders[i]].users) for i in inputs]
        receives = [self.boundaries[n] for n in received]
        return StagePlan(s, module, inputs, receives, sends, names, reads_data)

    def _copy_body(self, new: fx.Graph, env: dict[fx.Node, fx.Node], body: list[fx.Node]) -> None:
        """The stage's nodes, under the grad mode and autocast regions they ran under, none left behind."""
        modes = self.modes
        if body and modes[body[0]] != torch.is_grad_enabled():
            new.call_function(torch._C._set_grad_enabled, (modes[body[0]],))
        entered: list[fx.Node] = []
        for node in body:
            _enter_regions(new, env, entered, self.regions[node])
            env[node] = new.node_copy(node, lambda n: env[n])
        _enter_regions(new, env, entered, ())
        if body and modes.get(body[-1].next, modes[body[-1]]) != torch.is_grad_enabled():
            new.call_function(torch._C._set_grad_enabled, (torch.is_grad_enabled(),))


def partition_digest(plans: list[StagePlan]) -> str:
    """A hash of every stage's code and boundaries: ranks compare it before running anything."""
    h = hashlib.sha256()
    for plan in plans:
        h.update(plan.module.code.encode())
        h.update(
            repr([(b.name, b.producer, b.consumers, b.shape, str(b.dtype)) for b in plan.sends]).encode()
        )
    return h.hexdigest()
