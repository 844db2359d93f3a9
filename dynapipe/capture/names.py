"""The user's own names for the modules and tensors a compiled function reaches, found by identity.

Dynamo names what it traces by the path it took to reach it (``L['self'].layers[2]``,
``L['args'][0].model.embed_tokens``); that path changes with a decorator, a closure, a lambda or a new
library release. dynapipe shows and accepts the names users see in ``named_modules()`` and
``named_parameters()`` instead, so it looks objects up by identity in the models the compiled function
can reach:

* a **root** is an ``nn.Module`` reachable from the frame (its arguments, closure cells and the globals its
  code names, through dicts, lists, tuples, ``functools.partial``, bound methods, functions and plain
  objects' attributes) that is not a submodule of another reachable module;
* when the graph reads the parameters or buffers of one root only (or the function reaches one root),
  that root's names are used as they are (``model.layers.2``); a stateless root (a loss module) is named
  by the variable that reaches it;
* when it reads the state of several roots, every name starts with the variable through which the function
  reaches its root: ``gen.layers.0``, ``disc.head.weight``, ``models.0.fc`` for a list, ``self.fc`` for
  the module whose method was compiled.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModelNames", "reachable_modules", "root_modules"]

_MAX_DEPTH = 4
_MAX_ITEMS = 256  # a container longer than this holds data, not models


def reachable_modules(
    arguments: dict[str, Any], code: types.CodeType, closure: tuple | None, globals_: dict[str, Any]
) -> list[tuple[str, torch.nn.Module]]:
    """(label, module) for every module the frame can reach, outermost first, each object once."""
    found: list[tuple[str, torch.nn.Module]] = []
    seen: set[int] = set()
    starts: list[tuple[str, Any]] = list(arguments.items())
    starts += list(zip(code.co_freevars, (_cell(c) for c in closure or ()), strict=False))
    starts += [(name, globals_[name]) for name in _global_names(code) if name in globals_]
    for label, value in starts:
        found.extend(_walk(value, label, 0, seen))
    return found


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # a lambda or nested function defined in the frame
            yield from _global_names(const)


def _walk(value: Any, label: str, depth: int, seen: set[int]) -> Iterator[tuple[str, torch.nn.Module]]:
    if depth > _MAX_DEPTH or id(value) in seen or value is None:
        return
    if isinstance(value, (str, bytes, int, float, bool, torch.Tensor, type, types.ModuleType)):
        return
    seen.add(id(value))
    if isinstance(value, torch.nn.Module) and isinstance(getattr(value, "_orig_mod", None), torch.nn.Module):
        value = value._orig_mod  # what torch.compile(model) returns wraps the model itself
    if isinstance(value, torch.nn.Module):
        yield label, value
        return
    children: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())[:_MAX_ITEMS]
        children = [(f"{label}.{k}", v) for k, v in items if isinstance(k, (str, int))]
    elif isinstance(value, (list, tuple)):
        children = [(f"{label}.{i}", v) for i, v in enumerate(value[:_MAX_ITEMS])]
    elif isinstance(value, functools.partial):
        children = [(label, value.func), *((label, a) for a in value.args), *value.keywords.items()]
    elif isinstance(value, types.MethodType):
        children = [(label, value.__self__), (label, value.__func__)]
    elif isinstance(value, types.FunctionType):
        cells = (_cell(c) for c in value.__closure__ or ())
        children = list(zip(value.__code__.co_freevars, cells, strict=False))
        children += [
            (name, value.__globals__[name])
            for name in _global_names(value.__code__)
            if name in value.__globals__
        ]
        if hasattr(value, "__wrapped__"):  # functools.wraps
            children.append((label, value.__wrapped__))
    elif hasattr(value, "__dict__") and not callable(value) and type(value).__module__ != "builtins":
        children = [(f"{label}.{k}", v) for k, v in vars(value).items() if not k.startswith("__")]
    for child_label, child in children:
        yield from _walk(child, child_label, depth + 1, seen)


@dataclass(frozen=True)
class ModelNames:
    """Names of modules and tensors by ``id()``; built once per capture, while the objects are alive."""

    modules: dict[int, str]
    tensors: dict[int, str]

    @classmethod
    def build(
        cls, reachable: list[tuple[str, torch.nn.Module]], used_tensors: list[torch.Tensor]
    ) -> ModelNames:
        roots = root_modules(reachable)
        used = {id(t) for t in used_tensors}
        owners = [
            i
            for i, (_, root) in enumerate(roots)
            if any(id(t) in used for t in (*root.parameters(), *root.buffers()))
        ]
        modules: dict[int, str] = {}
        tensors: dict[int, str] = {}
        bare = owners[0] if len(owners) == 1 else 0 if len(roots) == 1 else None
        for i, (label, root) in enumerate(roots):
            own = i == bare
            prefix = "" if own else f"{label}."
            for name, module in root.named_modules(remove_duplicate=False):
                modules.setdefault(id(module), f"{prefix}{name}" if name else ("" if own else label))
            for name, t in (
                *root.named_parameters(remove_duplicate=False),
                *root.named_buffers(remove_duplicate=False),
            ):
                tensors.setdefault(id(t), f"{prefix}{name}")
        return cls(modules, tensors)


def root_modules(reachable: list[tuple[str, torch.nn.Module]]) -> list[tuple[str, torch.nn.Module]]:
    """The reachable modules that are no other reachable module's submodule, in the order reached."""
    inside: set[int] = set()
    for _, module in reachable:
        inside.update(id(m) for m in module.modules() if m is not module)
    return [(label, module) for label, module in reachable if id(module) not in inside]
