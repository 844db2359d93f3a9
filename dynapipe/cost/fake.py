"""FLOPs and saved activations of every node, by running each once on fake tensors (FakeTensorMode)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from ..config import Optimizer
from ..graph import CapturedGraph, autocast_regions, grad_modes
from .records import OPTIMIZER_STATES, GraphCosts, NodeCost
from .runner import Runner, backward_to, call_node
from .sizes import bytes_expr, concrete, evaluate, has_tensor, hint, shape_values

__all__ = ["fake_costs"]


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_aten = torch.ops.aten
# Ops that move no data: aliases the schema does not mark as views, allocations, and the gradient seeds
# (``ones_like``) the replay's backward starts from.
_NO_TRAFFIC = frozenset(
    {
        _aten._unsafe_view.default,
        _aten.empty.memory_format,
        _aten.empty_strided.default,
        _aten.new_empty.default,
        _aten.new_empty_strided.default,
        _aten.ones_like.default,
    }
)
# Lookups read the rows they gather, not the whole table (argument index of the table).
_LOOKUPS = {
    _aten.embedding.default: 0,
    _aten.index_select.default: 0,
    _aten.gather.default: 0,
    _aten.index.Tensor: 0,
}


def _tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def _moved_bytes(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes an aten op reads and writes: its tensor arguments and results (a lookup's table: the rows
    it reads). Views, metadata queries and allocations move none."""
    if getattr(func, "namespace", None) != "aten" or func.is_view or func in _NO_TRAFFIC:
        return 0
    written = _tensor_bytes(out)
    if not written:  # a size, a scalar read back
        return 0
    table = _LOOKUPS.get(func)
    if table is not None:
        return 2 * written + _tensor_bytes((args[:table], args[table + 1 :], kwargs))
    return written + _tensor_bytes((args, kwargs))


class _FlopCounter(TorchDispatchMode):
    """Adds up FLOPs with ``torch.utils.flop_counter``'s formulas (plus the CPU flash-attention kernel,
    which the counter does not know) and the bytes every op moves. Unlike ``FlopCounterMode`` it tracks
    no modules (faster), and lets higher-order ops through uncounted (``torch.cond`` is costed branch by
    branch in :func:`_replay`)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.moved = 0
        aten = torch.ops.aten
        self.formulas = {
            **flop_registry,
            aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_sdpa_cpu_flop),
            aten._scaled_dot_product_flash_attention_for_cpu_backward: shape_wrapper(_sdpa_cpu_backward_flop),
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(getattr(func, "_overloadpacket", None))
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        self.moved += _moved_bytes(func, args, kwargs, out)
        return out

    def counts(self) -> tuple[int, int]:
        return self.total, self.moved


def fake_costs(
    captured: CapturedGraph,
    nodes: list[fx.Node],
    optimizer: Optimizer,
    flop_rate: float,
    memory_bandwidth: float,
) -> GraphCosts:
    graph = captured.gm.graph
    training = any(
        isinstance(v, torch.Tensor) and v.requires_grad
        for n in graph.find_nodes(op="output")[0].all_input_nodes
        for v in tree_flatten(n.meta.get("example_value"))[0]
    )
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def make(value: torch.Tensor, grad: bool) -> torch.Tensor:
        shape, stride = concrete(value)
        with fake_mode:
            t = torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device)
        return t.requires_grad_(grad and value.requires_grad and (t.is_floating_point() or t.is_complex()))

    runner = Runner(captured, make, lambda attr: make(attr, True))
    values = shape_values(graph)
    modes = grad_modes(graph)
    # autocast in force at each node, as the arguments of each torch.amp.autocast entered (outermost first)
    regions = {n: tuple(e.args for e in entered) for n, entered in autocast_regions(graph).items()}

    # Saved-activation buffers: each tensor value (node, leaf) maps to the buffer whose storage it views.
    buffer_of: dict[tuple[fx.Node, int], int] = {}
    buffer_bytes: list[int] = []
    buffer_names: list[str] = []
    state_bytes: dict[fx.Node, tuple[int, int, int]] = {}
    n_states = OPTIMIZER_STATES[optimizer]

    def new_buffer(key: tuple[fx.Node, int], nbytes: int) -> int:
        buffer_of[key] = len(buffer_bytes)
        buffer_bytes.append(int(nbytes))
        buffer_names.append(
            key[0].name
            if key[1] == 0
            else f"{key[0].name}[{key[1]}]"
            if key[1] > 0
            else f"{key[0].name}.saved{-key[1]}"
        )
        return buffer_of[key]

    for node in graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                new_buffer((node, 0), evaluate(bytes_expr(value), values))
        elif node.op == "get_attr":
            attr = getattr(captured.gm, str(node.target))
            if isinstance(attr, torch.Tensor):
                nbytes = attr.numel() * attr.element_size()
                grad = (
                    nbytes if training and isinstance(attr, torch.nn.Parameter) and attr.requires_grad else 0
                )
                state_bytes[node] = (nbytes, grad, n_states * grad)

    costs: dict[fx.Node, NodeCost] = {}
    uncosted: list[str] = []
    replays: dict[str, _Replay] = {}  # nodes of the same signature (layer after layer) replay alike
    with _FlopCounter() as counter:
        for node in nodes:
            value = node.meta.get("example_value")
            expr = bytes_expr(value)
            base = dict(
                out_bytes=evaluate(expr, values),
                out_bytes_expr=expr,
                crossable=isinstance(value, torch.Tensor),
            )
            if not has_tensor(value):  # sizes, side effects (grad mode, logging): no tensor work
                costs[node] = NodeCost(**base)
                continue
            key = _signature(node, captured.gm, modes[node], regions[node])
            try:
                replay = replays.get(key) if key is not None else None
                if replay is None:
                    replay = _replay(node, runner, counter, modes[node], regions[node])
                    if key is not None:
                        replays[key] = replay
            except Exception:  # noqa: BLE001 - an op the fake run cannot replay is costed as free
                uncosted.append(node.name)
                replay = _Replay(
                    (0, 0, 0),
                    (0, 0, 0),
                    tuple(
                        (i, "new", evaluate(bytes_expr(leaf), values))
                        for i, leaf in enumerate(tree_flatten(value)[0])
                        if isinstance(leaf, torch.Tensor)
                    ),
                    (),
                )
            inputs = [
                None if src.op == "get_attr" else buffer_of.get((src, i)) for src, i in _input_leaves(node)
            ]
            for i, kind, n in replay.outputs:
                viewed = inputs[n] if kind == "input" else None
                if viewed is not None:  # a view of an input shares its buffer
                    buffer_of[(node, i)] = viewed
                elif kind == "new":
                    new_buffer((node, i), n)
            saves: dict[int, None] = {}
            for j, (kind, n) in enumerate(replay.saved, start=1):
                buffer = (
                    inputs[n]
                    if kind == "input"
                    else buffer_of.get((node, n))
                    if kind == "output"
                    else new_buffer((node, -j), n)
                )
                if buffer is not None:  # None: a parameter or buffer of the model (state, not activation)
                    saves[buffer] = None
            seconds = [
                max(flops / flop_rate, moved / memory_bandwidth)
                for flops, moved in zip(replay.flops, replay.moved, strict=True)
            ]
            costs[node] = NodeCost(
                flops=replay.flops[0],
                backward_input_flops=replay.flops[1],
                backward_weight_flops=replay.flops[2],
                forward_s=seconds[0],
                backward_input_s=seconds[1],
                backward_weight_s=seconds[2],
                moved_bytes=sum(replay.moved),
                saves=tuple(saves),
                **base,
            )
    return GraphCosts(
        costs,
        buffer_bytes,
        buffer_names,
        state_bytes,
        optimizer,
        False,
        flop_rate,
        uncosted,
        memory_bandwidth,
    )


@dataclass(frozen=True)
class _Replay:
    """What re-running a node showed, in terms of its input leaves (see :func:`_input_leaves`)."""

    flops: tuple[int, int, int]  # forward, input-gradient, weight-gradient
    moved: tuple[int, int, int]  # bytes read and written, the same three
    outputs: tuple[
        tuple[int, str, int], ...
    ]  # (output leaf, "input", input leaf it views) or (leaf, "new", bytes)
    saved: tuple[tuple[str, int], ...]  # ("input", input leaf), ("output", output leaf) or ("temp", bytes)


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


def _signature(node: fx.Node, gm: fx.GraphModule, grad_mode: bool, autocast: tuple) -> str | None:
    """Everything a replay depends on: the op, its constant arguments, and each input's shape, strides,
    dtype and grad flag, the grad mode and autocast in force. None for ops reading subgraphs (their code is not part of the signature)."""

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
    return repr((node.op, node.target, structure, described, grad_mode, autocast))


def _replay(
    node: fx.Node, runner: Runner, counter: _FlopCounter, grad_mode: bool, autocast: tuple
) -> _Replay:
    """Run ``node`` once on fake inputs: FLOPs, which outputs view which inputs, what autograd saves.
    Inside ``torch.autocast`` regions it runs under the same autocast, so what it saves and returns has
    the region's dtype (a bf16 matmul saves bf16 copies of its inputs)."""
    args, kwargs, inputs, params = runner.inputs(node)
    leaf_of: dict[StorageWeakRef, int] = {}  # storage -> index among the input leaves
    activations: list[torch.Tensor] = []
    for src, value in inputs.items():
        for leaf in tree_flatten(value)[0] if src.op != "get_attr" else [value]:
            if isinstance(leaf, torch.Tensor):
                leaf_of.setdefault(StorageWeakRef(leaf.untyped_storage()), len(leaf_of))
                if src.op != "get_attr":
                    activations.append(leaf)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    before = counter.counts()
    with contextlib.ExitStack() as regions:
        for args_of_region in autocast:
            regions.enter_context(torch.amp.autocast(*args_of_region))
        regions.enter_context(torch.set_grad_enabled(grad_mode))
        regions.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        if node.target is torch.ops.higher_order.cond:  # the more expensive branch, run as plain code
            runs = []
            for branch in args[1:3]:
                first_saved = len(saved)
                result = branch(*args[3])
                runs.append((_since(counter, before), result, saved[first_saved:]))
                counter.total, counter.moved = before
                del saved[first_saved:]
            spent, out, saved[:] = max(runs, key=lambda r: r[0])
            counter.total, counter.moved = before[0] + spent[0], before[1] + spent[1]
        else:
            out = call_node(node, runner.gm, args, kwargs)
    forward = _since(counter, before)

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
    kept: dict[StorageWeakRef, tuple[str, int]] = {}
    for t in saved:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in kept:  # a temporary of the op itself: softmax statistics, a dropout mask
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
        bwd_in = _since(counter, before)
        before = counter.counts()
        backward_to(out, params, retain=False)
        bwd_w = _since(counter, before)
    return _Replay(
        (forward[0], bwd_in[0], bwd_w[0]),
        (forward[1], bwd_in[1], bwd_w[1]),
        tuple(outputs),
        tuple(kept.values()),
    )


def _since(counter: _FlopCounter, before: tuple[int, int]) -> tuple[int, int]:
    """FLOPs and bytes moved since ``before`` (a :meth:`_FlopCounter.counts`)."""
    return counter.total - before[0], counter.moved - before[1]
