"""A stage's graph compiled by inductor, forward and backward, once, with its backward split in two.

``compile_fx`` compiles the stage as ``torch.compile`` compiles any graph: AOTAutograd traces the joint
forward and backward with the stage's own symbolic sizes (the capture's), the min-cut partitioner chooses
what to save, inductor compiles both halves. The result is one autograd node per stage call whose inputs
are the stage's parameters (AOTAutograd lifts them, so gradients land on the model's own tensors) and the
received boundaries.

Two things the stage graph lacks for that, added here:

* **Size symbols as inputs.** A Dynamo graph takes every size symbol of its inputs as a ``SymInt``
  placeholder; a stage graph reads sizes with ``x.size(d)`` where it uses them. Inductor needs a binding
  for every symbol a backward input's shape mentions (a loss over ``labels`` of length ``s96`` saves a
  tensor of length ``s96 + 1``), so the compiled graph takes them first and the wrapper reads them from
  the inputs at each call.
* **The backward in two graphs.** Zero-bubble schedules run a stage's input gradients (``I``) as soon as
  the next stage sends its gradient, and its weight gradients (``W``) later. The backward graph is split
  at graph level: the input-gradient graph computes the received inputs' gradients and returns what the
  weight-gradient graph reads; the weight-gradient graph computes the parameters' gradients from that
  alone. Each is compiled by inductor; every node runs in exactly one of them, so nothing runs twice.
  Under :attr:`CompiledStage.defer_weights` the autograd node returns no parameter gradients and leaves
  the weight work in :meth:`CompiledStage.take_weight_work`; the runtime runs it at the ``W`` slot and
  hands the gradients to the parameters' ``AccumulateGrad`` nodes, so DDP's hooks fire as they would.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import find_symbol_binding_fx_nodes

__all__ = ["CompiledStage", "compile_stage"]

log = logging.getLogger(__name__)
# stages compiled ("compiled") and left eager after inductor failed ("eager") in this process: a test
# counts them (a compile per step or per length would be a bug)
stats: Counter[str] = Counter()

WeightWork = Callable[[], list[torch.Tensor | None]]


class CompiledStage:
    """Called like the stage module: ``stage(*inputs, *received) -> outputs``."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.symbol_sources = _symbol_sources(module)  # (input index, dim) of each size symbol
        self.defer_weights = False
        self.pending: list[WeightWork] = []
        self.runs: Counter[str] = Counter()  # graph runs by kind: "forward", "input", "weight"
        self.fn: Callable[..., Any] | None = None
        # what inductor assumed about the sizes while compiling (``s0 * s1 <= 4096``): nothing checks them
        # at a call, so the capture takes them as its own guards and a call outside them captures again
        self.guards: list[sympy.Expr] = []
        # the tensors AOTAutograd lifts to inputs, in its order (duplicates once): the weight graph's outputs
        state = {
            **dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False)),
        }
        self.weights = list({id(t): t for t in state.values()}.values())

    def __call__(self, *args: Any) -> Any:
        assert self.fn is not None  # compile_stage sets it
        self.runs["forward"] += 1
        sizes = [args[i].size(d) for i, d in self.symbol_sources]
        # compiled for contiguous inputs (a received buffer is one; a slice of the batch may not be)
        return self.fn(*sizes, *[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])

    def take_weight_work(self) -> Callable[[], None] | None:
        """What the last deferred backward left: a call that runs the weight-gradient graph and hands each
        gradient to its parameter's ``AccumulateGrad`` node (where DDP's hooks wait). None if the backward
        never reached the stage's graph."""
        if not self.pending:
            return None
        work = self.pending.pop()

        def accumulate() -> None:
            grads = work()
            pairs = [
                (t, g) for t, g in zip(self.weights, grads, strict=True) if g is not None and t.requires_grad
            ]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])

        return accumulate


def compile_stage(module: fx.GraphModule) -> CompiledStage:
    """Compile ``module`` (a stage) with inductor; raises whatever inductor raises (the caller falls back)."""
    from torch._inductor.compile_fx import compile_fx

    stage = CompiledStage(module)
    graph_module, example = _with_size_inputs(module, stage.symbol_sources)
    n_inputs = len(example)
    failures: list[BaseException] = []

    def inner(gm: fx.GraphModule, inputs: Sequence[Any], **kwargs: Any) -> Any:
        try:
            if kwargs.get("is_backward"):
                return _compile_split_backward(stage, gm, inputs, n_inputs, kwargs)
            return _inner_compile(gm, inputs, **kwargs)
        except BaseException as e:  # AOTAutograd hides a failed backward compile until the backward
            failures.append(e)
            raise

    shape_env = next((v.fake_mode.shape_env for v in example if hasattr(v, "fake_mode")), None)
    known = len(shape_env.guards) if shape_env is not None else 0
    # AOTAutograd's cache would hand back a whole backward, unsplit: compile it here (inductor's own
    # cache of each compiled graph still applies)
    with torch._functorch.config.patch(enable_autograd_cache=False):
        stage.fn = compile_fx(graph_module, example, inner_compile=inner)  # type: ignore[assignment]
    if failures:
        raise failures[0]
    if shape_env is not None:
        stage.guards = [g.expr for g in shape_env.guards[known:]]
    stats["compiled"] += 1
    return stage


def _inner_compile(gm: fx.GraphModule, inputs: Sequence[Any], **kwargs: Any) -> Any:
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner(gm, inputs, **kwargs)


def _symbol_sources(module: fx.GraphModule) -> list[tuple[int, int]]:
    """Where each size symbol of the stage's inputs can be read: (placeholder index, dimension)."""
    sources: dict[sympy.Symbol, tuple[int, int]] = {}
    for i, node in enumerate(module.graph.find_nodes(op="placeholder")):
        value = node.meta.get("example_value")
        if not isinstance(value, torch.Tensor):
            continue
        for d, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                sources.setdefault(size.node.expr, (i, d))
    return list(sources.values())


def _with_size_inputs(
    module: fx.GraphModule, sources: list[tuple[int, int]]
) -> tuple[fx.GraphModule, list[Any]]:
    """A copy of ``module`` that takes the size symbols first, as a Dynamo graph does, and its example inputs."""
    graph = fx.Graph()
    old = list(module.graph.find_nodes(op="placeholder"))
    values = [n.meta["example_value"] for n in old]
    example: list[Any] = []
    for k, (i, d) in enumerate(sources):
        size = graph.placeholder(f"size_{k}")
        size.meta["example_value"] = size.meta["val"] = values[i].size(d)
        example.append(values[i].size(d))
    env: dict[fx.Node, fx.Node] = {}
    for node in module.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor):
            env[node].meta["example_value"] = _contiguous(node.meta["example_value"])
    example += [_contiguous(v) if isinstance(v, torch.Tensor) else v for v in values]
    return fx.GraphModule(module, graph, class_name=type(module).__name__), example


def _contiguous(value: torch.Tensor) -> torch.Tensor:
    """A fake tensor like ``value`` (same symbolic sizes) but contiguous: what the compiled stage gets."""
    with value.fake_mode:  # type: ignore[attr-defined]  # example values are fake tensors
        fresh = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    return fresh.requires_grad_(value.requires_grad)


def _ancestors(roots: list[Any]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [r for r in roots if isinstance(r, fx.Node)]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _split_backward(gm: fx.GraphModule, n_input_grads: int) -> tuple[fx.GraphModule, fx.GraphModule, int]:
    """The backward as an input-gradient graph (same inputs; returns the input gradients, then what the
    weight graph reads) and a weight-gradient graph (returns the parameter gradients); and how many
    values the first passes to the second."""
    output = gm.graph.find_nodes(op="output")[0]
    outs = list(output.args[0])
    weight_outs, input_outs = outs[: len(outs) - n_input_grads], outs[len(outs) - n_input_grads :]
    for_inputs = _ancestors(input_outs) | set(gm.graph.find_nodes(op="placeholder"))
    weight_only = [n for n in gm.graph.nodes if n in _ancestors(weight_outs) and n not in for_inputs]
    only = set(weight_only)
    carried = list(
        dict.fromkeys(
            [a for n in weight_only for a in n.all_input_nodes if a not in only]
            + [o for o in weight_outs if isinstance(o, fx.Node) and o not in only]
        )
    )
    bindings = find_symbol_binding_fx_nodes(gm.graph)  # every symbol a carried shape needs, carried too
    symbols = {s for n in carried if "val" in n.meta for s in _free_symbols(n.meta["val"])}
    carried = [bindings[s] for s in sorted(symbols, key=str) if s in bindings] + carried
    carried = list(dict.fromkeys(carried))

    input_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            input_graph.output(tuple(env[o] if isinstance(o, fx.Node) else o for o in input_outs + carried))
        elif node not in only:
            env[node] = input_graph.node_copy(node, lambda n: env[n])
    input_graph.eliminate_dead_code()

    weight_graph = fx.Graph()
    wenv = {n: weight_graph.placeholder(n.name) for n in carried}
    for n in carried:
        wenv[n].meta = dict(n.meta)
    for node in weight_only:
        wenv[node] = weight_graph.node_copy(node, lambda n: wenv[n])
    weight_graph.output(tuple(wenv[o] if isinstance(o, fx.Node) else o for o in weight_outs))
    return fx.GraphModule(gm, input_graph), fx.GraphModule(gm, weight_graph), len(carried)


def _free_symbols(value: Any) -> set[sympy.Symbol]:
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return set(free_symbols(value)) if isinstance(value, (torch.Tensor, torch.SymInt)) else set()


def _compile_split_backward(
    stage: CompiledStage, gm: fx.GraphModule, inputs: Sequence[Any], n_inputs: int, kwargs: dict[str, Any]
) -> Any:
    """Compile the backward as two graphs and return one boxed callable that runs them."""
    input_gm, weight_gm, n_carried = _split_backward(gm, n_inputs)
    input_fn = _inner_compile(input_gm, inputs, **kwargs)
    weight_inputs = [n.meta["val"] for n in weight_gm.graph.find_nodes(op="placeholder")]
    weight_fn = _inner_compile(weight_gm, weight_inputs, **{**kwargs, "static_input_idxs": []})
    n_weights = len(gm.graph.find_nodes(op="output")[0].args[0]) - n_inputs
    if n_weights != len(stage.weights):
        raise RuntimeError(
            f"the backward returns {n_weights} weight gradients for {len(stage.weights)} weights"
        )

    def backward(args: list[Any]) -> list[Any]:
        outs = input_fn(args)
        stage.runs["input"] += 1
        input_grads, carried = list(outs[: len(outs) - n_carried]), list(outs[len(outs) - n_carried :])

        def weight_work() -> list[torch.Tensor | None]:
            stage.runs["weight"] += 1
            with torch.no_grad():  # as AOTAutograd runs its graphs: the carried values include parameters
                return list(weight_fn(list(carried)))

        if stage.defer_weights:
            stage.pending.append(weight_work)
            return [None] * n_weights + input_grads
        return weight_work() + input_grads

    backward._boxed_call = True  # type: ignore[attr-defined]  # AOTAutograd passes one list of args
    return backward


def compile_stages(
    modules: dict[int, fx.GraphModule], enabled: bool
) -> tuple[dict[int, CompiledStage], dict[int, str]]:
    """Inductor's version of each stage in ``modules``, and how each stage runs: ``"inductor"``, or
    ``"eager"`` with the reason (not asked for, or a one-line reason inductor gave: the stage then runs
    eagerly, as it would without the option, instead of failing the step)."""
    compiled: dict[int, CompiledStage] = {}
    how: dict[int, str] = {}
    for s, module in sorted(modules.items()):
        if not enabled:
            how[s] = "eager"
            continue
        try:
            compiled[s] = compile_stage(module)
            how[s] = "inductor"
        except Exception as e:  # noqa: BLE001 - any failure of inductor means: run this stage eagerly
            lines = str(e).strip().splitlines()
            how[s] = f"eager ({type(e).__name__}: {lines[0][:200] if lines else 'no message'})"
            stats["eager"] += 1
            log.warning("dynapipe: stage %d runs eagerly: inductor could not compile it: %s", s, how[s])
    return compiled, how
