"""The Python frame Dynamo compiles: read it from inside a backend, or build it from a call."""

from __future__ import annotations

import inspect
import os
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.symbolic_convert import InstructionTranslator

from ..errors import ConfigError, GraphBreakError

__all__ = ["FrameCall", "frame_being_compiled", "frame_of_call", "ignore_logging_in_graphs"]

_LOGGER_METHODS = ("debug", "info", "warning", "warn", "error", "exception", "critical", "log")


def ignore_logging_in_graphs() -> None:
    """Let Dynamo drop ``logger.warning(...)``-style calls instead of breaking the graph on them.

    Libraries log inside forward (HuggingFace's ``logger.warning_once``); on one device a graph break
    there costs little, but a pipeline needs one graph, so such calls are skipped while tracing. The
    methods a library adds to ``logging.Logger`` after this runs (transformers adds ``warning_once`` when
    it is first imported, which can be after the first compile) are skipped too (:class:`_LoggingFunctions`).
    """
    import logging

    names = [n for n in dir(logging.Logger) if n in _LOGGER_METHODS or n.endswith("_once")]
    functions = torch._dynamo.config.ignore_logging_functions
    if not isinstance(functions, _LoggingFunctions):
        torch._dynamo.config.ignore_logging_functions = functions = _LoggingFunctions(functions)
    functions.update(getattr(logging.Logger, n) for n in names)


class _LoggingFunctions(set):
    """Dynamo's set of logging functions to skip, which also holds every logging method of
    ``logging.Logger`` as it is when Dynamo asks, not only as it was when the set was filled."""

    def __contains__(self, fn: object) -> bool:
        import logging

        name = getattr(fn, "__name__", "")
        is_logging = name in _LOGGER_METHODS or name.endswith("_once")
        return super().__contains__(fn) or (is_logging and getattr(logging.Logger, name, None) is fn)


@dataclass(frozen=True)
class FrameCall:
    """The Python call that Dynamo compiled: enough to call the same code again on other arguments."""

    code: types.CodeType
    globals: dict[str, Any]
    closure: tuple[Any, ...] | None
    arguments: dict[str, Any]

    def function(self) -> types.FunctionType:
        return types.FunctionType(self.code, self.globals, self.code.co_name, None, self.closure)

    def bind(self, arguments: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments that reproduce the frame's locals ``arguments``."""
        n_pos = self.code.co_argcount
        names = self.code.co_varnames
        args = [arguments[n] for n in names[:n_pos]]
        kwargs = {n: arguments[n] for n in names[n_pos : n_pos + self.code.co_kwonlyargcount]}
        extra = n_pos + self.code.co_kwonlyargcount
        if self.code.co_flags & inspect.CO_VARARGS:
            args += list(arguments[names[extra]])
            extra += 1
        if self.code.co_flags & inspect.CO_VARKEYWORDS:
            kwargs.update(arguments[names[extra]])
        return args, kwargs

    @property
    def self_name(self) -> str | None:
        """The name of the frame's first argument when it is an nn.Module (``self`` of forward)."""
        if self.code.co_argcount and isinstance(
            self.arguments.get(self.code.co_varnames[0]), torch.nn.Module
        ):
            return self.code.co_varnames[0]
        return None


def frame_being_compiled() -> FrameCall:
    """Read the frame Dynamo is compiling; call only from inside a Dynamo backend."""
    tx = InstructionTranslator.current_tx()
    if tx.f_code.co_name.startswith("torch_dynamo_resume_in_"):
        raise GraphBreakError(
            f"Dynamo broke the graph of {tx.f_code.co_name.split('_in_')[-1]}() before this point, so dynapipe "
            "sees only part of the step. Run the step once with torch.compile(..., fullgraph=True, "
            "backend='eager') to see the break and its source line, then remove it."
        )
    outer = _eager_caller()
    if outer is not None:
        raise GraphBreakError(
            f"Dynamo could not capture {outer.f_code.co_name}() ({outer.f_code.co_filename}:{outer.f_lineno}) as "
            f"one graph and compiled the {tx.f_code.co_name}() it calls on its own, so dynapipe would see only "
            "part of the step. Run the step once with torch.compile(..., fullgraph=True, backend='eager') to see "
            "the break and its source line, then remove it."
        )
    n_args = tx.f_code.co_argcount + tx.f_code.co_kwonlyargcount
    n_args += bool(tx.f_code.co_flags & inspect.CO_VARARGS) + bool(
        tx.f_code.co_flags & inspect.CO_VARKEYWORDS
    )
    names = tx.f_code.co_varnames[:n_args]
    # copies of the argument containers: the call goes on to run and may change its own ``**kwargs``
    # (HuggingFace's wrappers pop ``return_dict``), which are the values every later call is matched against
    arguments = {n: torch.utils._pytree.tree_map(lambda v: v, tx.f_locals[n]) for n in names}
    return FrameCall(tx.f_code, tx.f_globals, tx.closure, arguments)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the dynapipe package


def _eager_caller() -> types.FrameType | None:
    """A frame of code outside torch between ``torch.compile``'s entry and the frame being compiled.

    Dynamo compiles a frame called from code that runs eagerly only when it gave up on that caller (a
    graph break); such a graph is a piece of the step, not the step.
    """
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith((_TORCH_DIR + "_dynamo", _OWN_DIR)):
        frame = frame.f_back  # dynapipe's backend, then Dynamo's own compile machinery
    eager = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.endswith(os.path.join("_dynamo", "eval_frame.py")):
            return eager  # torch.compile's entry
        if eager is None and not filename.startswith(_TORCH_DIR):
            eager = frame
        frame = frame.f_back
    return None


def frame_of_call(fn: Any, args: tuple, kwargs: dict) -> FrameCall:
    """The frame ``torch.compile(fn)(*args, **kwargs)`` hands to a backend, built without tracing."""
    if isinstance(fn, torch.nn.Module):
        fn = fn.forward
    if inspect.ismethod(fn):
        fn, args = fn.__func__, (fn.__self__, *args)
    if not inspect.isfunction(fn):
        raise ConfigError(f"explain needs an nn.Module or a Python function, got {type(fn).__name__}")
    bound = inspect.signature(fn, follow_wrapped=False).bind(*args, **kwargs)
    bound.apply_defaults()
    return FrameCall(fn.__code__, fn.__globals__, fn.__closure__, dict(bound.arguments))
