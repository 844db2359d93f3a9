"""The captured graph's vocabulary, shared by every step after capture: which nodes are work, which
compute sizes, which take a tuple apart, and the grad-mode, autocast and in-place state they run under."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping

import torch
import torch.fx as fx

__all__ = [
    "autocast_regions",
    "carries_gradient",
    "compute_nodes",
    "grad_modes",
    "is_autocast_node",
    "is_size_node",
    "settle_getitems",
    "unpacked_by",
    "written_in_place",
]

_COMPUTE_OPS = ("call_function", "call_method", "call_module")


def is_size_node(node: fx.Node) -> bool:
    """Whether ``node`` computes a size from the graph inputs' sizes (see :func:`_mark_size_nodes`)."""
    return bool(node.meta.get("dynapipe.size"))


def carries_gradient(node: fx.Node) -> bool:
    """Whether ``node``'s value, sent to a later stage, has a gradient sent back (its captured value
    requires grad)."""
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.requires_grad


def compute_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The nodes that stages are made of, in graph order (placeholders, get_attr and size nodes are copied
    into every stage that reads them instead)."""
    return [n for n in graph.nodes if n.op in _COMPUTE_OPS and not is_size_node(n)]


def unpacked_by(node: fx.Node) -> fx.Node | None:
    """The node whose value ``node`` takes apart (``out[0]``, a ``getitem``), or None. The rule, written
    once: a getitem goes with its source, so a tuple (which cannot cross stages) never has to."""
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def settle_getitems(graph: fx.Graph, stage_of: Mapping[fx.Node, int]) -> dict[fx.Node, int]:
    """A copy of ``stage_of`` (compute node -> stage) with each getitem of a non-tensor in its source's
    stage: only tensors cross stages. The stages codegen builds, and the stages the cost model counts."""
    out = dict(stage_of)
    for node in graph.nodes:
        source = unpacked_by(node)
        if source in out and not isinstance(source.meta.get("example_value"), torch.Tensor):
            out[node] = out[source]
    return out


def grad_modes(graph: fx.Graph) -> dict[fx.Node, bool]:
    """Grad mode in force at each node: Dynamo records ``with torch.no_grad()`` as mode-setting calls."""
    mode, modes = torch.is_grad_enabled(), {}
    for node in graph.nodes:
        modes[node] = mode
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            mode = bool(node.args[0])
    return modes


def is_autocast_node(node: fx.Node) -> bool:
    """Whether ``node`` opens or closes a ``torch.autocast`` region: Dynamo records ``with torch.autocast()``
    as an ``_enter_autocast(...)`` call whose result (the context, not a tensor) only the matching
    ``_exit_autocast(ctx)`` reads. Such nodes set state; they compute nothing a stage could send."""
    return node.op == "call_function" and node.target in (
        torch.amp.autocast_mode._enter_autocast,
        torch.amp.autocast_mode._exit_autocast,
    )


def autocast_regions(graph: fx.Graph) -> dict[fx.Node, tuple[fx.Node, ...]]:
    """The ``_enter_autocast`` nodes in force at each node, outermost first (regions nest)."""
    entered: tuple[fx.Node, ...] = ()
    regions = {}
    for node in graph.nodes:
        regions[node] = entered
        if node.op == "call_function" and node.target is torch.amp.autocast_mode._enter_autocast:
            entered = (*entered, node)
        elif node.op == "call_function" and node.target is torch.amp.autocast_mode._exit_autocast:
            entered = tuple(e for e in entered if e is not node.args[0])
    return regions


# ``x += y`` and ``x[i] = y`` (``operator``'s other names that end in "_", like ``and_``, compute new values)
_INPLACE_OPERATORS = frozenset(
    getattr(operator, name)
    for name in (
        "iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imatmul", "imod", "imul", "ior", "ipow",
        "irshift", "isub", "itruediv", "ixor", "setitem", "delitem",
    )
)  # fmt: skip


_INPLACE_DUNDERS = frozenset(f"__{op.__name__}__" for op in _INPLACE_OPERATORS)  # Tensor.__iadd__ ...


def _nodes_in(value: fx.node.Argument) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.map_arg(value, found.append)
    return found


def written_in_place(node: fx.Node) -> list[fx.Node]:
    """The nodes whose tensors ``node`` may modify in place. Conservative: a name that reads as in-place
    counts (``x.add_()``, ``torch.relu_(x)``, ``F.relu(x, inplace=True)``, ``x += y``, ``x[i] = y``)."""
    if node.op not in ("call_function", "call_method"):
        return []
    target = node.target
    first = _nodes_in(node.args[:1])  # the tensor (or, for _foreach_ ops, the tensors) an in-place op writes
    schema = getattr(target, "_schema", None)
    if schema is not None:  # an operator overload says so itself
        return node.all_input_nodes if schema.is_mutable else []
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if getattr(operator, name, None) is target:
        return first if target in _INPLACE_OPERATORS else []
    if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")):
        return first
    inplace = node.kwargs.get("inplace") is True
    if not inplace and callable(target):  # F.dropout(x, p, training, inplace), as nn.Dropout calls it
        try:
            inplace = (
                inspect.signature(target).bind(*node.args, **node.kwargs).arguments.get("inplace") is True
            )
        except (TypeError, ValueError):  # a builtin without a signature, or not these arguments
            pass
    return first if inplace else _nodes_in(node.kwargs.get("out"))
