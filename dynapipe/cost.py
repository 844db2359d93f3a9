"""Per-node and per-stage costs of a captured graph: FLOPs, time, state bytes, activation bytes.

Every number is for ONE microbatch, computed without real compute: each compute node's target is run
again on fake tensors (``FakeTensorMode``) shaped like its ``meta["example_value"]`` at the microbatch
size, counting FLOPs with ``torch.utils.flop_counter``'s formulas and watching ``saved_tensors_hooks``.
That gives

* **FLOPs** -- forward, and backward split into the input-gradient and weight-gradient parts (the
  backward of compute-bearing nodes is run on fake tensors too, so attention's 2.5x and a linear's 1x +
  1x come from the counter, not from a rule of thumb);
* **activation bytes** -- what autograd keeps for backward, per buffer: a tensor saved by several nodes,
  or views of one tensor, count once (buffers are identified by storage, so ``x.t()`` saved by a matmul
  is ``x``); parameters saved by their readers are state, not activations;
* **output bytes** -- what the node would send if a stage boundary fell after it, as a sympy expression
  in the batch symbol (``8192*s0``) evaluated at the microbatch size.

Time: without profiling, ``seconds = FLOPs / flop_rate``. Ops without FLOPs (elementwise, norms, views)
count as free: in transformer blocks they ride along with each block's matmuls, so they move no cut; with
``profile=True`` each node is instead timed on the real device with real (random) tensors -- forward,
input-gradient and weight-gradient separately, the fastest of a few repetitions (other processes only
ever add time) -- and that time is used. Ranks that profile separately must agree on the times before
partitioning: see :meth:`GraphCosts.with_times`.

State: a parameter costs its bytes, its gradient (same size, when it requires grad and the graph trains)
and ``OPTIMIZER_STATES[optimizer]`` more copies (Adam: two moments). A stage holds the state of every
``get_attr`` it reads, so a tied weight counts on each stage that reads it.

:class:`StageRecord` is the one per-stage record that the partitioner, the schedule simulator
(:meth:`StageRecord.to_stage_cost`) and :func:`dynapipe.explain` read.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from .capture import CapturedGraph, compute_nodes, grad_modes
from .config import Optimizer
from .schedules.simulate import StageCost

__all__ = [
    "NOMINAL_FLOP_RATE",
    "OPTIMIZER_STATES",
    "GraphCosts",
    "NodeCost",
    "StageRecord",
    "format_bytes",
    "graph_costs",
    "stage_costs",
]

# Extra per-parameter copies each optimizer keeps (SGD counted with a momentum buffer: the worst case).
OPTIMIZER_STATES: dict[Optimizer, int] = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}
# FLOP/s that turns FLOPs into seconds without profiling: a nominal accelerator at a realistic fraction
# of peak. Only ratios matter to the partitioner; the simulator compares it with link bandwidth.
NOMINAL_FLOP_RATE = 100e12
_META_KEY = "dynapipe.costs"


@dataclass(frozen=True)
class NodeCost:
    """Cost of one compute node for one microbatch (times in seconds, sizes in bytes)."""

    flops: int = 0
    backward_input_flops: int = 0
    backward_weight_flops: int = 0
    forward_s: float = 0.0
    backward_input_s: float = 0.0
    backward_weight_s: float = 0.0
    out_bytes: int = 0
    out_bytes_expr: sympy.Expr = sympy.Integer(0)
    crossable: bool = True  # its value is a tensor; only tensors may cross a stage boundary
    saves: tuple[int, ...] = ()  # activation buffers (indices into GraphCosts.buffer_bytes) kept for backward
    measured: bool = False

    @property
    def time_s(self) -> float:
        """Forward plus backward time of the node in one training step."""
        return self.forward_s + self.backward_input_s + self.backward_weight_s


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

    def with_times(self, times: Sequence[tuple[float, float, float]]) -> GraphCosts:
        """The same costs with measured (forward, backward-input, backward-weight) seconds per node, in the
        order of :attr:`nodes`: ranks that profile separately agree by broadcasting one rank's times."""
        nodes = {
            n: dataclasses.replace(
                c, forward_s=t[0], backward_input_s=t[1], backward_weight_s=t[2], measured=True
            )
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
        )

    def times(self) -> list[tuple[float, float, float]]:
        return [(c.forward_s, c.backward_input_s, c.backward_weight_s) for c in self.nodes.values()]


# ---------------------------------------------------------------------------------------------- sizes


def _numel_expr(value: torch.Tensor) -> sympy.Expr:
    dims = [d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d)) for d in value.shape]
    return sympy.Mul(*dims) if dims else sympy.Integer(1)


def _hint(x: Any) -> Any:
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint if x.node.hint is not None else x.node.require_hint()
    return x


def _bytes_expr(value: Any) -> sympy.Expr:
    leaves = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return sympy.Add(*[_numel_expr(t) * t.element_size() for t in leaves]) if leaves else sympy.Integer(0)


def _shape_values(graph: fx.Graph) -> dict[sympy.Symbol, sympy.Integer]:
    """Value of every size symbol at the microbatch size (from the graph's ShapeEnv)."""
    for node in graph.nodes:
        for leaf in tree_flatten(node.meta.get("example_value"))[0]:
            if isinstance(leaf, torch.Tensor):
                for d in leaf.shape:
                    if isinstance(d, torch.SymInt):
                        env = d.node.shape_env
                        return dict(getattr(env, "backed_var_to_val", None) or env.var_to_val)
    return {}


def _evaluate(expr: sympy.Expr, values: Mapping[sympy.Symbol, sympy.Integer]) -> int:
    return int(expr.xreplace(values)) if expr.free_symbols else int(expr)


# --------------------------------------------------------------------------------- the fake re-run


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


class _FlopCounter(TorchDispatchMode):
    """Adds up FLOPs with ``torch.utils.flop_counter``'s formulas (plus the CPU flash-attention kernel,
    which the counter does not know). Unlike ``FlopCounterMode`` it tracks no modules (faster), and lets
    higher-order ops through uncounted (``torch.cond`` is costed branch by branch in :func:`_replay`)."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
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
        return out


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in tree_flatten(value)[0])


def _call(node: fx.Node, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    return cast(Callable[..., Any], node.target)(*args, **kwargs)


class _Runner:
    """Re-runs single nodes on stand-in tensors (fake for counting, real for profiling)."""

    def __init__(
        self,
        captured: CapturedGraph,
        make: Callable[[torch.Tensor, bool], torch.Tensor],
        state: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.gm, self.make, self.state = captured.gm, make, state

    def inputs(self, node: fx.Node) -> tuple[tuple, dict, dict[fx.Node, Any], list[torch.Tensor]]:
        """Stand-in args/kwargs for ``node``, the stand-in of each input node, and the parameter stand-ins."""
        values: dict[fx.Node, Any] = {}
        params: list[torch.Tensor] = []
        for src in node.all_input_nodes:
            if src.op == "get_attr":
                attr = getattr(self.gm, str(src.target))
                values[src] = self.state(attr) if isinstance(attr, torch.Tensor) else attr
                if isinstance(attr, torch.Tensor) and values[src].requires_grad:
                    params.append(values[src])
            else:
                values[src] = tree_map(
                    lambda v: self.make(v, True) if isinstance(v, torch.Tensor) else _hint(v),
                    src.meta.get("example_value"),
                )
        args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n: values[n])
        return args, kwargs, values, params


def _concrete(value: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(int(_hint(d)) for d in value.shape), tuple(int(_hint(s)) for s in value.stride())


def _differentiable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and (t.is_floating_point() or t.is_complex())


def _grads(outputs: Any, wrt: list[torch.Tensor], retain: bool) -> None:
    outs = [o for o in tree_flatten(outputs)[0] if _differentiable(o) and o.grad_fn is not None]
    wrt = [w for w in wrt if _differentiable(w)]
    if outs and wrt:
        torch.autograd.grad(
            outs, wrt, [torch.ones_like(o) for o in outs], retain_graph=retain, allow_unused=True
        )


def graph_costs(
    captured: CapturedGraph,
    *,
    optimizer: Optimizer = "adamw",
    profile: bool = False,
    flop_rate: float = NOMINAL_FLOP_RATE,
    repeats: int = 3,
) -> GraphCosts:
    """Cost every compute node of ``captured`` (cached on the graph module for the same options)."""
    nodes = compute_nodes(captured.gm.graph)
    cache = captured.gm.meta.setdefault(_META_KEY, {})
    key = (optimizer, bool(profile), float(flop_rate), repeats if profile else 0)
    if key in cache:
        return cache[key]
    if profile:
        costs = graph_costs(captured, optimizer=optimizer, flop_rate=flop_rate)
        device = _device(captured.gm.graph)
        # profiling runs dropout too: leave the user's random streams as they were
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            costs = costs.with_times([_measure(captured, n, costs.nodes[n], repeats, device) for n in nodes])
    else:
        costs = _fake_costs(captured, nodes, optimizer, flop_rate)
    cache[key] = costs
    return costs


def _fake_costs(
    captured: CapturedGraph, nodes: list[fx.Node], optimizer: Optimizer, flop_rate: float
) -> GraphCosts:
    graph = captured.gm.graph
    training = any(
        isinstance(v, torch.Tensor) and v.requires_grad
        for n in graph.find_nodes(op="output")[0].all_input_nodes
        for v in tree_flatten(n.meta.get("example_value"))[0]
    )
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def make(value: torch.Tensor, grad: bool) -> torch.Tensor:
        shape, stride = _concrete(value)
        with fake_mode:
            t = torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device)
        return t.requires_grad_(grad and value.requires_grad and (t.is_floating_point() or t.is_complex()))

    runner = _Runner(captured, make, lambda attr: make(attr, True))
    values = _shape_values(graph)
    modes = grad_modes(graph)

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
                new_buffer((node, 0), _evaluate(_bytes_expr(value), values))
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
            expr = _bytes_expr(value)
            base = dict(
                out_bytes=_evaluate(expr, values),
                out_bytes_expr=expr,
                crossable=isinstance(value, torch.Tensor),
            )
            if not _has_tensor(value):  # sizes, side effects (grad mode, logging): no tensor work
                costs[node] = NodeCost(**base)
                continue
            key = _signature(node, captured.gm, modes[node])
            try:
                replay = replays.get(key) if key is not None else None
                if replay is None:
                    replay = _replay(node, runner, counter, modes[node])
                    if key is not None:
                        replays[key] = replay
            except Exception:  # noqa: BLE001 - an op the fake run cannot replay is costed as free
                uncosted.append(node.name)
                replay = _Replay(
                    0,
                    0,
                    0,
                    tuple(
                        (i, "new", _evaluate(_bytes_expr(leaf), values))
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
            costs[node] = NodeCost(
                flops=replay.flops,
                backward_input_flops=replay.backward_input_flops,
                backward_weight_flops=replay.backward_weight_flops,
                forward_s=replay.flops / flop_rate,
                backward_input_s=replay.backward_input_flops / flop_rate,
                backward_weight_s=replay.backward_weight_flops / flop_rate,
                saves=tuple(saves),
                **base,
            )
    return GraphCosts(costs, buffer_bytes, buffer_names, state_bytes, optimizer, False, flop_rate, uncosted)


@dataclass(frozen=True)
class _Replay:
    """What re-running a node showed, in terms of its input leaves (see :func:`_input_leaves`)."""

    flops: int
    backward_input_flops: int
    backward_weight_flops: int
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


def _signature(node: fx.Node, gm: fx.GraphModule, grad_mode: bool) -> str | None:
    """Everything a replay depends on: the op, its constant arguments, and each input's shape, strides,
    dtype and grad flag. None for ops reading subgraphs (their code is not part of the signature)."""

    def leaf(v: Any) -> tuple:
        if isinstance(v, torch.Tensor):
            return (_concrete(v), v.dtype, v.device, v.requires_grad, isinstance(v, torch.nn.Parameter))
        return (repr(_hint(v)),)

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
    return repr((node.op, node.target, structure, described, grad_mode))


def _replay(node: fx.Node, runner: _Runner, counter: _FlopCounter, grad_mode: bool) -> _Replay:
    """Run ``node`` once on fake inputs: FLOPs, which outputs view which inputs, what autograd saves."""
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

    before = counter.total
    with torch.set_grad_enabled(grad_mode), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if node.target is torch.ops.higher_order.cond:  # the more expensive branch, run as plain code
            runs = []
            for branch in args[1:3]:
                start, first_saved = counter.total, len(saved)
                result = branch(*args[3])
                runs.append((counter.total - start, result, saved[first_saved:]))
                del saved[first_saved:]
            spent, out, saved[:] = max(runs, key=lambda r: r[0])
            counter.total = before + spent
        else:
            out = _call(node, runner.gm, args, kwargs)
    flops = counter.total - before

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

    bwd_in = bwd_w = 0
    if flops and grad_mode:
        before = counter.total
        _grads(out, activations, retain=True)
        bwd_in = counter.total - before
        _grads(out, params, retain=False)
        bwd_w = counter.total - before - bwd_in
    return _Replay(flops, bwd_in, bwd_w, tuple(outputs), tuple(kept.values()))


# ------------------------------------------------------------------------------------------ profiling


def _device(graph: fx.Graph) -> torch.device:
    for node in graph.nodes:
        for leaf in tree_flatten(node.meta.get("example_value"))[0]:
            if isinstance(leaf, torch.Tensor):
                return leaf.device
    return torch.device("cpu")


def _measure(
    captured: CapturedGraph, node: fx.Node, cost: NodeCost, repeats: int, device: torch.device
) -> tuple[float, float, float]:
    """Forward, input-gradient and weight-gradient seconds of ``node`` on real random tensors."""
    value = node.meta.get("example_value")
    if not _has_tensor(value):
        return (0.0, 0.0, 0.0)

    def make(meta: torch.Tensor, grad: bool) -> torch.Tensor:
        shape, _ = _concrete(meta)
        if meta.is_floating_point() or meta.is_complex():
            t = torch.randn(shape, dtype=meta.dtype, device=meta.device)
        elif meta.dtype is torch.bool:
            t = torch.ones(shape, dtype=meta.dtype, device=meta.device)
        else:  # indices: zero is valid for every embedding, gather and index
            t = torch.zeros(shape, dtype=meta.dtype, device=meta.device)
        return t.requires_grad_(grad and meta.requires_grad and (t.is_floating_point() or t.is_complex()))

    def state(attr: torch.Tensor) -> torch.Tensor:  # a copy: in-place ops must not touch the user's tensors
        return attr.detach().clone().requires_grad_(attr.requires_grad)

    runner = _Runner(captured, make, state)
    grad_mode = grad_modes(captured.gm.graph)[node]
    try:
        args, kwargs, inputs, params = runner.inputs(node)
        activations = [
            t
            for src, v in inputs.items()
            if src.op != "get_attr"
            for t in tree_flatten(v)[0]
            if isinstance(t, torch.Tensor)
        ]

        def forward() -> Any:
            with torch.set_grad_enabled(grad_mode):
                return _call(node, captured.gm, args, kwargs)

        fwd = _timed(forward, repeats, device)
        if not grad_mode or not (cost.backward_input_flops or cost.backward_weight_flops or cost.saves):
            return (fwd, 0.0, 0.0)
        bwd_in = _timed(lambda: _grads(forward(), activations, retain=False), repeats, device) - fwd
        bwd_w = _timed(lambda: _grads(forward(), params, retain=False), repeats, device) - fwd
        return (fwd, max(bwd_in, 0.0), max(bwd_w, 0.0))
    except Exception:  # noqa: BLE001 - an op that will not run on random inputs keeps its FLOP estimate
        return (cost.forward_s, cost.backward_input_s, cost.backward_weight_s)


def _timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    fn()
    samples = []
    for _ in range(max(repeats, 1)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return min(samples)  # the least disturbed run: other processes only ever add time


# ------------------------------------------------------------------------------------- stage records


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


def _settled(graph: fx.Graph, stage_of: Mapping[fx.Node, int]) -> dict[fx.Node, int]:
    """``stage_of`` with each ``getitem`` in the stage of the node it unpacks, as codegen places it."""
    out = dict(stage_of)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
            if isinstance(source, fx.Node) and source in out:
                out[node] = out[source]
    return out


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
    stage_of = _settled(graph, stage_of)
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
    module_count = _module_counts(stage_of)
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
                modules=_modules_of(members[s], module_count),
                n_nodes=len(members[s]),
            )
        )
    return records


# ------------------------------------------------------------------------------------- module names


def _prefixes(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _module_counts(stage_of: Mapping[fx.Node, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in stage_of:
        for p in _prefixes(node.meta.get("module_path", "")):
            counts[p] = counts.get(p, 0) + 1
    return counts


_NUMBERED = re.compile(r"^(.*\.)(\d+)$")


def _modules_of(members: list[fx.Node], total: dict[str, int]) -> tuple[str, ...]:
    """The largest modules wholly inside ``members`` (``(part)`` when only some of a module is), runs of
    numbered siblings folded: ``layers.0``, ``layers.1``, ``layers.2`` -> ``layers.0-2``."""
    here: dict[str, int] = {}
    for node in members:
        for p in _prefixes(node.meta.get("module_path", "")):
            here[p] = here.get(p, 0) + 1
    names: dict[str, None] = {}
    for node in members:
        prefixes = _prefixes(node.meta.get("module_path", ""))
        whole = next((p for p in prefixes if here[p] == total[p]), None)
        if whole is not None:
            names[whole] = None
        elif prefixes:
            names[f"{prefixes[-1]} (part)"] = None
        else:
            names["(top level)"] = None
    return tuple(_fold(list(names)))


def _fold(names: list[str]) -> list[str]:
    out: list[str] = []
    run: tuple[str, int, int] | None = None  # prefix, first, last
    for name in [*names, None]:
        m = _NUMBERED.match(name) if name else None
        if run and m and m.group(1) == run[0] and int(m.group(2)) == run[2] + 1:
            run = (run[0], run[1], run[2] + 1)
            continue
        if run:
            out.append(f"{run[0]}{run[1]}" + (f"-{run[2]}" if run[2] > run[1] else ""))
            run = None
        if m:
            run = (m.group(1), int(m.group(2)), int(m.group(2)))
        elif name:
            out.append(name)
    return out


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
