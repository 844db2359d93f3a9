"""FLOPs and saved activations of every node, by running each once on fake tensors (FakeTensorMode)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import _get_qualified_name
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten

from ..config import Optimizer
from ..graph import CapturedGraph, autocast_regions, grad_modes
from .counter import FlopCounter
from .rates import Rates
from .records import OPTIMIZER_STATES, GraphCosts, NodeCost
from .runner import Runner, backward_to, call_node
from .sizes import bytes_expr, concrete, evaluate, has_tensor, hint, shape_values

__all__ = ["fake_costs", "signature"]


def fake_costs(
    captured: CapturedGraph, nodes: list[fx.Node], optimizer: Optimizer, rates: Rates
) -> GraphCosts:
    """Cost ``nodes`` (see :mod:`dynapipe.cost`) by replaying each once on fake tensors; times by the
    roofline at ``rates`` (the caller applies the times ``rates`` measured: :meth:`GraphCosts.timed`)."""
    graph = captured.gm.graph
    values = shape_values(graph)
    modes = grad_modes(graph)
    # autocast in force at each node, as the arguments of each torch.amp.autocast entered (outermost first)
    regions = {n: tuple(e.args for e in entered) for n, entered in autocast_regions(graph).items()}
    runner = _fake_runner(captured)
    buffers = _Buffers()
    for node in graph.nodes:
        value = node.meta.get("example_value") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            buffers.new((node, 0), evaluate(bytes_expr(value), values))
    costs: dict[fx.Node, NodeCost] = {}
    signatures: dict[fx.Node, str | None] = {}
    uncosted: list[str] = []
    replays: dict[str, _Replay] = {}  # nodes of the same signature (layer after layer) replay alike
    with FlopCounter() as counter:
        for node in nodes:
            value = node.meta.get("example_value")
            expr = bytes_expr(value)
            out = dict(
                out_bytes=evaluate(expr, values),
                out_bytes_expr=expr,
                crossable=isinstance(value, torch.Tensor),
            )
            if not has_tensor(value):  # sizes, side effects (grad mode, logging): no tensor work
                costs[node] = NodeCost(**out)
                continue
            key = signatures[node] = signature(node, captured.gm, modes[node], regions[node])
            replay = replays.get(key) if key is not None else None
            if replay is None:
                try:
                    replay = _replay(node, runner, counter, modes[node], regions[node])
                except Exception:  # noqa: BLE001 - an op the fake run cannot replay is costed as free
                    uncosted.append(node.name)
                    replay = _Replay.free(value, values)
                else:
                    if key is not None:
                        replays[key] = replay
            saves = buffers.place(node, replay)
            costs[node] = _node_cost(replay, rates, saves=saves, **out)
    state = _state_bytes(captured, OPTIMIZER_STATES[optimizer])
    return GraphCosts(costs, buffers.bytes, buffers.names, state, optimizer, rates, signatures, uncosted)


def _node_cost(replay: _Replay, rates: Rates, **rest: Any) -> NodeCost:
    """A replayed node's cost: each phase timed by the roofline, max(FLOPs / flop rate, bytes moved /
    memory bandwidth), plus launching an operation for each phase that does work."""
    f, i, w = (
        max(flops / rates.flop_rate, moved / rates.memory_bandwidth) + (rates.op_overhead_s if moved else 0.0)
        for flops, moved in zip(replay.flops, replay.moved, strict=True)
    )
    return NodeCost(
        forward=f,
        backward_input=i,
        backward_weight=w,
        forward_flops=replay.flops[0],
        backward_input_flops=replay.flops[1],
        backward_weight_flops=replay.flops[2],
        moved_bytes=sum(replay.moved),
        **rest,
    )


def _fake_runner(captured: CapturedGraph) -> Runner:
    """A :class:`Runner` whose stand-ins are fake tensors shaped like each value at the microbatch size."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def make(value: torch.Tensor, grad: bool) -> torch.Tensor:
        shape, stride = concrete(value)
        with fake_mode:
            t = torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device)
        return t.requires_grad_(grad and value.requires_grad and (t.is_floating_point() or t.is_complex()))

    return Runner(captured, make, lambda attr: make(attr, True))


def _state_bytes(captured: CapturedGraph, n_states: int) -> dict[fx.Node, tuple[int, int, int]]:
    """(parameter, gradient, optimizer state) bytes of each tensor ``get_attr``: a gradient only for a
    trainable parameter of a graph that trains (returns a value that requires grad)."""
    graph = captured.gm.graph
    training = any(
        isinstance(v, torch.Tensor) and v.requires_grad
        for n in graph.find_nodes(op="output")[0].all_input_nodes
        for v in tree_flatten(n.meta.get("example_value"))[0]
    )
    state: dict[fx.Node, tuple[int, int, int]] = {}
    for node in graph.nodes:  # graph order: the partitioner numbers state by it
        attr = getattr(captured.gm, str(node.target)) if node.op == "get_attr" else None
        if isinstance(attr, torch.Tensor):
            nbytes = attr.numel() * attr.element_size()
            trains = training and isinstance(attr, torch.nn.Parameter) and attr.requires_grad
            grad = nbytes if trains else 0
            state[node] = (nbytes, grad, n_states * grad)
    return state


class _Buffers:
    """Saved-activation buffers: each tensor value (node, leaf) maps to the buffer whose storage it
    views, so a tensor saved by several nodes, or views of one tensor, count once."""

    def __init__(self) -> None:
        self.of: dict[tuple[fx.Node, int], int] = {}
        self.bytes: list[int] = []
        self.names: list[str] = []

    def new(self, key: tuple[fx.Node, int], nbytes: int) -> int:
        """A buffer for leaf ``key[1]`` of ``key[0]`` (a negative leaf: the node's own temporary)."""
        node, leaf = key
        self.of[key] = len(self.bytes)
        self.bytes.append(int(nbytes))
        self.names.append(
            node.name if leaf == 0 else f"{node.name}[{leaf}]" if leaf > 0 else f"{node.name}.saved{-leaf}"
        )
        return self.of[key]

    def place(self, node: fx.Node, replay: _Replay) -> tuple[int, ...]:
        """Record ``node``'s outputs (a view of an input shares its buffer) and return the buffers it
        saves for backward; parameters it saves are state, not activations."""
        inputs = [None if src.op == "get_attr" else self.of.get((src, i)) for src, i in _input_leaves(node)]
        for i, kind, n in replay.outputs:
            viewed = inputs[n] if kind == "input" else None
            if viewed is not None:
                self.of[(node, i)] = viewed
            elif kind == "new":
                self.new((node, i), n)
        saves: dict[int, None] = {}
        for j, (kind, n) in enumerate(replay.saved, start=1):
            if kind == "input":
                buffer = inputs[n]
            elif kind == "output":
                buffer = self.of.get((node, n))
            else:
                buffer = self.new((node, -j), n)
            if buffer is not None:
                saves[buffer] = None
        return tuple(saves)


@dataclass(frozen=True)
class _Replay:
    """What re-running a node showed, in terms of its input leaves (see :func:`_input_leaves`)."""

    flops: tuple[int, int, int]  # forward, input-gradient, weight-gradient
    moved: tuple[int, int, int]  # bytes read and written, the same three
    outputs: tuple[
        tuple[int, str, int], ...
    ]  # (output leaf, "input", input leaf it views) or (leaf, "new", bytes)
    saved: tuple[tuple[str, int], ...]  # ("input", input leaf), ("output", output leaf) or ("temp", bytes)

    @staticmethod
    def free(value: Any, values: Mapping[sympy.Symbol, sympy.Integer]) -> _Replay:
        """What an op the fake run cannot execute is taken to do: no work, every output a new buffer."""
        leaves = tree_flatten(value)[0]
        outputs = tuple(
            (i, "new", evaluate(bytes_expr(leaf), values))
            for i, leaf in enumerate(leaves)
            if isinstance(leaf, torch.Tensor)
        )
        return _Replay((0, 0, 0), (0, 0, 0), outputs, ())


def _input_leaves(node: fx.Node) -> list[tuple[fx.Node, int]]:
    """Every tensor an op reads, as (input node, leaf index), in a fixed order."""
    leaves = []
    for src in node.all_input_nodes:
        value = src.meta.get("example_value") if src.op != "get_attr" else None
        if src.op == "get_attr":
            leaves.append((src, 0))
        else:
            leaves += [(src, i) for i, v in enumerate(tree_flatten(value)[0]) if isinstance(v, torch.Tensor)]
    return leaves


def signature(node: fx.Node, gm: fx.GraphModule, grad_mode: bool, autocast: tuple) -> str | None:
    """Everything a replay (and an operation's time) depends on: the op, its constant arguments, and
    each input's shape, strides, dtype and grad flag, the grad mode and autocast in force; the same text
    in every process (measured times are cached by it). None for ops reading subgraphs (their code is
    not part of the signature)."""

    def leaf(v: Any) -> tuple:
        if isinstance(v, torch.Tensor):
            return (concrete(v), v.dtype, v.device, v.requires_grad, isinstance(v, torch.nn.Parameter))
        return (repr(hint(v)),)

    described = []
    for src in node.all_input_nodes:
        if src.op == "get_attr":
            attr = getattr(gm, str(src.target))
            if not isinstance(attr, torch.Tensor):
                return None
            described.append(leaf(attr))
        else:
            described.append(tuple(leaf(v) for v in tree_flatten(src.meta.get("example_value"))[0]))
    index = {src: i for i, src in enumerate(node.all_input_nodes)}
    structure = fx.map_arg((node.args, node.kwargs), lambda n: f"<input {index[n]}>")
    return repr((node.op, _target_name(node, gm), structure, described, grad_mode, autocast))


def _target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """The op by name (``torch.nn.functional.linear``; a module by its class), never an address."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__qualname__
    if isinstance(node.target, str):
        return node.target
    try:
        return _get_qualified_name(node.target)
    except (RuntimeError, AttributeError, TypeError):
        return getattr(node.target, "__qualname__", type(node.target).__qualname__)


def _replay(node: fx.Node, runner: Runner, counter: FlopCounter, grad_mode: bool, autocast: tuple) -> _Replay:
    """Run ``node`` once on fake inputs: FLOPs, which outputs view which inputs, what autograd saves.
    Inside ``torch.autocast`` regions it runs under the same autocast, so what it saves and returns has
    the region's dtype (a bf16 matmul saves bf16 copies of its inputs)."""
    args, kwargs, inputs, params = runner.inputs(node)
    leaf_of = _storages(inputs)
    activations = [
        t
        for src, v in inputs.items()
        if src.op != "get_attr"
        for t in tree_flatten(v)[0]
        if isinstance(t, torch.Tensor)
    ]
    saved: list[torch.Tensor] = []
    before = counter.counts()
    with _running_as_traced(autocast, grad_mode, saved):
        if node.target is torch.ops.higher_order.cond:
            out = _costlier_branch(args, counter, saved)
        else:
            out = call_node(node, runner.gm, args, kwargs)
    forward = counter.since(before)
    outputs, out_leaf = _outputs(out, leaf_of)
    kept: dict[StorageWeakRef, tuple[str, int]] = {}
    for t in saved:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in kept:  # neither input nor output: a temporary of the op (softmax statistics, a mask)
            kept[ref] = (
                ("input", leaf_of[ref])
                if ref in leaf_of
                else ("output", out_leaf[ref])
                if ref in out_leaf
                else ("temp", t.untyped_storage().nbytes())
            )
    bwd_in = bwd_w = (0, 0)
    if any(forward) and grad_mode:
        before = counter.counts()
        backward_to(out, activations, retain=True)
        bwd_in = counter.since(before)
        before = counter.counts()
        backward_to(out, params, retain=False)
        bwd_w = counter.since(before)
    return _Replay(
        (forward[0], bwd_in[0], bwd_w[0]),
        (forward[1], bwd_in[1], bwd_w[1]),
        tuple(outputs),
        tuple(kept.values()),
    )


def _storages(inputs: dict[fx.Node, Any]) -> dict[StorageWeakRef, int]:
    """Each input leaf's storage -> its index among the input leaves (see :func:`_input_leaves`)."""
    leaf_of: dict[StorageWeakRef, int] = {}
    for src, value in inputs.items():
        for leaf in tree_flatten(value)[0] if src.op != "get_attr" else [value]:
            if isinstance(leaf, torch.Tensor):
                leaf_of.setdefault(StorageWeakRef(leaf.untyped_storage()), len(leaf_of))
    return leaf_of


@contextlib.contextmanager
def _running_as_traced(autocast: tuple, grad_mode: bool, saved: list[torch.Tensor]) -> Iterator[None]:
    """The node's autocast regions and grad mode, with every tensor autograd saves appended to ``saved``."""

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with contextlib.ExitStack() as regions:
        for args_of_region in autocast:
            regions.enter_context(torch.amp.autocast(*args_of_region))
        regions.enter_context(torch.set_grad_enabled(grad_mode))
        regions.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        yield


def _costlier_branch(args: tuple, counter: FlopCounter, saved: list[torch.Tensor]) -> Any:
    """Run both branches of a ``torch.cond`` as plain code and keep the counts, result and saved tensors
    of the more expensive one: the stage must budget for either."""
    before, first_saved = counter.counts(), len(saved)
    runs = []
    for branch in args[1:3]:
        result = branch(*args[3])
        runs.append((counter.since(before), result, saved[first_saved:]))
        counter.reset(before)
        del saved[first_saved:]
    spent, out, saved[first_saved:] = max(runs, key=lambda r: r[0])
    counter.reset((before[0] + spent[0], before[1] + spent[1]))
    return out


def _outputs(
    out: Any, leaf_of: dict[StorageWeakRef, int]
) -> tuple[list[tuple[int, str, int]], dict[StorageWeakRef, int]]:
    """Each output leaf as a view of an input leaf or a new buffer, and the new buffers' storages."""
    outputs: list[tuple[int, str, int]] = []
    out_leaf: dict[StorageWeakRef, int] = {}
    for i, leaf in enumerate(tree_flatten(out)[0]):
        if isinstance(leaf, torch.Tensor):
            ref = StorageWeakRef(leaf.untyped_storage())
            if ref in leaf_of:
                outputs.append((i, "input", leaf_of[ref]))
            else:
                outputs.append((i, "new", leaf.untyped_storage().nbytes()))
                out_leaf.setdefault(ref, i)
    return outputs, out_leaf
