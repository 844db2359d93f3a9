"""The compiled call's arguments as the user passed them: their names, and inputs a pipeline cannot cut.

Dynamo names a graph input by where it found it in the frame (``L['ids']``, ``L['kwargs']['labels']``,
``L['args'][1]`` under a decorator that takes ``*args``); tables and messages show the name the user
wrote instead (``ids``, ``labels``, the wrapped function's parameter, or ``args[1]``).
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .frame import FrameCall

__all__ = ["check_no_foreign_cache", "input_names"]

_ARGUMENT = re.compile(r"L\['(\w+)'\](.*)")
_INDEX = re.compile(r"\[(\d+)\]")
_KEY = re.compile(r"\['([^']+)'\]")
_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), tuple, list, dict)


def input_names(frame: FrameCall, sources: Sequence[str]) -> dict[str, str]:
    """Each Dynamo source of an argument of ``frame`` -> the name the user knows it by."""
    code = frame.code
    n_named = code.co_argcount + code.co_kwonlyargcount
    star = code.co_varnames[n_named] if code.co_flags & inspect.CO_VARARGS else None
    n_named += bool(star)
    double_star = code.co_varnames[n_named] if code.co_flags & inspect.CO_VARKEYWORDS else None
    positional: list[str] | None = None  # the wrapped function's, looked up once, when needed
    names = {}
    for source in sources:
        match = _ARGUMENT.fullmatch(source)
        if match is None:
            names[source] = source
            continue
        name, rest = match.groups()
        key, index = _KEY.match(rest), _INDEX.match(rest)
        if name == double_star and key:
            name, rest = key.group(1), rest[key.end() :]
        elif name == star and index:
            if positional is None:
                positional = _wrapped_positional(frame)
            at = code.co_argcount + int(index.group(1))  # a wrapper passes its own positionals first
            name = positional[at] if at < len(positional) else f"{name}[{index.group(1)}]"
            rest = rest[index.end() :]
        names[source] = name + rest
    return names


def _wrapped_positional(frame: FrameCall) -> list[str]:
    """The positional parameters of the function a decorator wraps, when the frame is its wrapper (what
    ``inspect.signature`` shows through ``__wrapped__``); [] when the frame's function is not found."""
    function = _function_of(frame)
    if function is None:
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a signature inspect cannot read
        return []
    return [p.name for p in parameters if p.kind in kinds]


def _function_of(frame: FrameCall) -> types.FunctionType | None:
    """The function object the frame runs: a method of one of its argument objects (``forward`` of the
    module) or a global. A decorator's wrappers share one code object, so the closure tells them apart."""
    values = list(frame.arguments.values())
    values += [v[0] for v in frame.arguments.values() if isinstance(v, tuple) and v]  # self in *args
    objects = [v for v in values if not isinstance(v, _PLAIN)]
    candidates: list[Any] = [f for o in objects for c in type(o).__mro__ for f in vars(c).values()]
    candidates += frame.globals.values()
    cells = [_contents(c) for c in frame.closure or ()]
    for candidate in candidates:
        if (
            isinstance(candidate, types.FunctionType)
            and candidate.__code__ is frame.code
            and [_contents(c) for c in candidate.__closure__ or ()] == cells
        ):
            return candidate
    return None


def _contents(cell: Any) -> int | None:
    try:
        return id(cell.cell_contents)
    except ValueError:  # an empty cell
        return None


def check_no_foreign_cache(frame: FrameCall) -> None:
    """Refuse a HuggingFace KV cache among the arguments (what ``generate()`` passes unless given a
    :class:`dynapipe.PipelineCache`): it grows in place at the full batch inside the forward, so it cannot
    be cut into microbatches, and Dynamo fails deep in the trace on a size mismatch."""
    found = next(_caches(frame.arguments), None)
    if found is None:
        return
    source, cache = found
    raise ConfigError(
        f"the compiled call's argument {input_names(frame, [source])[source]!r} is a HuggingFace "
        f"{type(cache).__name__} (what generate() makes when it is given no cache): dynapipe cuts every "
        "input into microbatches and cannot cut HF's own caches, which grow in place at the full batch. To "
        "generate through the pipeline, pass a cache built for it, a new one per generate() call: "
        "model.generate(ids, ..., cache=dynapipe.PipelineCache(model, batch_size=<number of prompts>, "
        "max_cache_len=<prompt length + max_new_tokens>)) (past_key_values=... on transformers before "
        "5.24); or generate without a cache, recomputing the sequence each step: "
        "model.generate(ids, ..., use_cache=False)"
    )


def _caches(arguments: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(Dynamo-style source, cache) of every HF cache among the arguments that is not a PipelineCache."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    if cache_utils is None:  # transformers never imported: no cache can exist
        return
    from ..kv_cache import PipelineCache

    stack: list[tuple[str, Any, int]] = [(f"L[{n!r}]", v, 0) for n, v in arguments.items()]
    while stack:
        source, value, depth = stack.pop()
        if isinstance(value, cache_utils.Cache) and not isinstance(value, PipelineCache):
            yield source, value
        elif isinstance(value, dict) and depth < 3:
            stack += [(f"{source}[{k!r}]", v, depth + 1) for k, v in value.items() if isinstance(k, str)]
        elif isinstance(value, (list, tuple)) and depth < 3:
            stack += [(f"{source}[{i}]", v, depth + 1) for i, v in enumerate(value)]
