"""Sizes that change between calls: the size symbols of a capture, their values at a call, shapes at them.

The capture marks every dimension of the microbatched inputs dynamic, so Dynamo names each size that may
change a symbol (``s23`` the rows of a microbatch, ``s27`` the sequence length) and the stage graphs
compute every size from their inputs (``s27 = l_ids_.size(1)``). What the capture assumed about those
symbols (a dimension it had to fix, a range, a guard such as ``s27 <= 2048``) is a
:class:`CaptureShapes`: a call whose sizes satisfy it runs on the same stage graphs, any other call is
captured again. At a call, :meth:`CaptureShapes.sizes_at` reads every symbol's value from the inputs'
shapes (no communication: every rank holds the same inputs), and each boundary's and output's
:class:`SymbolicShape` gives the buffer a receiver allocates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import sympy
import torch

__all__ = ["CaptureShapes", "Sizes", "SymbolicShape", "dims_of"]

Dim: TypeAlias = int | sympy.Expr  # noqa: UP040 - one name for a fixed or symbolic dimension


def dims_of(value: torch.Tensor) -> tuple[Dim, ...]:
    """A traced tensor's shape: ints where fixed, sympy expressions in the size symbols where not."""
    out: list[Dim] = []
    for d in value.shape:
        expr = d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))
        out.append(int(expr) if expr.is_number else expr)
    return tuple(out)


class Sizes:
    """The value of every size symbol at one call (at the microbatch size); ``key`` identifies them."""

    def __init__(self, values: Mapping[sympy.Symbol, int]) -> None:
        self.values = {s: sympy.Integer(v) for s, v in values.items()}
        self.key = tuple(sorted((str(s), int(v)) for s, v in values.items()))

    def __repr__(self) -> str:
        return ", ".join(f"{s}={v}" for s, v in self.key) or "(no size symbols)"


@dataclass(frozen=True)
class SymbolicShape:
    """A shape whose dimensions may be expressions in the size symbols; :meth:`at` gives it at a call.
    Each distinct :class:`Sizes` is evaluated once (a steady step only looks its shape up)."""

    dims: tuple[Dim, ...]
    _at: dict[tuple, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)

    def at(self, sizes: Sizes) -> tuple[int, ...]:
        shape = self._at.get(sizes.key)
        if shape is None:
            shape = tuple(d if isinstance(d, int) else int(d.xreplace(sizes.values)) for d in self.dims)
            self._at[sizes.key] = shape
        return shape

    def scaled(self, factor: int) -> SymbolicShape:
        """The shape with dim 0 multiplied by ``factor``: a batched output merged over microbatches."""
        return SymbolicShape((self.dims[0] * factor, *self.dims[1:])) if self.dims else self

    def __repr__(self) -> str:
        return f"({', '.join(map(str, self.dims))})"


@dataclass
class CaptureShapes:
    """What a capture assumed about the sizes of its graph inputs (in ``input_sources`` order).

    ``inputs`` holds each tensor input's dimensions at the microbatch size (None for a non-tensor),
    ``batched`` whether the input is cut into microbatches along dim 0, ``ranges`` the values Dynamo let
    each symbol take (it treats 0 and 1 apart, so a dynamic size is at least 2), ``guards`` the sympy
    conditions it recorded, and ``hints`` the symbols' values in the capture (the representative sizes
    the partition was costed at).
    """

    inputs: list[tuple[Dim, ...] | None]
    batched: list[bool]
    guards: list[sympy.Expr]
    ranges: dict[sympy.Symbol, tuple[Any, Any]]
    hints: dict[sympy.Symbol, int]
    names: dict[sympy.Symbol, sympy.Symbol] = field(default_factory=dict)  # Dynamo's symbol -> ours

    @classmethod
    def named(
        cls, sources: Sequence[str], inputs: list[tuple[Dim, ...] | None], **assumed: Any
    ) -> CaptureShapes:
        """The shapes with each symbol named after the first input dimension that has it
        (``L['ids'].size(1)``): Dynamo's names (``s27``) can differ between ranks that traced the same code
        on other data, and every rank must compute the same stages, boundary shapes included."""
        names: dict[sympy.Symbol, sympy.Symbol] = {}
        for source, dims in zip(sources, inputs, strict=True):
            for d, dim in enumerate(dims or ()):
                if isinstance(dim, sympy.Symbol) and dim not in names:
                    names[dim] = sympy.Symbol(f"{source}.size({d})", integer=True, positive=True)
        shapes = cls(inputs, **assumed)
        shapes.names = names
        shapes.inputs = [None if dims is None else shapes.rename(dims) for dims in inputs]
        shapes.guards = [g.xreplace(names) for g in shapes.guards]
        shapes.ranges = {names.get(s, s): r for s, r in shapes.ranges.items()}
        shapes.hints = {names.get(s, s): v for s, v in shapes.hints.items()}
        return shapes

    def rename(self, dims: tuple[Dim, ...]) -> tuple[Dim, ...]:
        return tuple(d if isinstance(d, int) else d.xreplace(self.names) for d in dims)

    def shape_of(self, value: torch.Tensor) -> SymbolicShape:
        """A traced tensor's shape in this capture's symbols."""
        return SymbolicShape(self.rename(dims_of(value)))

    def sizes_at(self, values: Sequence[Any], batch_size: int, n_microbatches: int) -> Sizes | None:
        """The symbols' values at a call whose graph inputs are ``values`` (full batch), or None when the
        capture's assumptions do not hold there (a fixed size changed, a guard fails): capture again."""
        if batch_size % n_microbatches:
            return None
        found: dict[sympy.Symbol, int] = {}
        derived: list[tuple[sympy.Expr, int]] = []
        for value, dims, batched in zip(values, self.inputs, self.batched, strict=True):
            if dims is None:
                continue
            if not isinstance(value, torch.Tensor):
                if dims == () and isinstance(value, (int, float)):
                    continue  # a Python number Dynamo passes as a 0-dim tensor
                return None
            if value.dim() != len(dims):
                return None
            shape = list(value.shape)
            if (bool(shape) and shape[0] == batch_size) != batched:
                return None  # the call would cut another set of inputs into microbatches
            if batched:
                shape[0] //= n_microbatches
            for want, size in zip(dims, shape, strict=True):
                if isinstance(want, int):
                    if want != size:
                        return None
                elif isinstance(want, sympy.Symbol):
                    if found.setdefault(want, size) != size:
                        return None
                else:
                    derived.append((want, size))
        values_at = {**{s: sympy.Integer(v) for s, v in self.hints.items()}, **found}
        for s, v in found.items():
            lo, hi = self.ranges.get(s, (None, None))
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                return None
        for expr, size in derived:
            if expr.xreplace(values_at) != size:
                return None
        for guard in self.guards:
            holds = guard.xreplace(values_at)
            if not holds.free_symbols and not bool(holds):
                return None
        return Sizes(found)

    def representative(self, names: Sequence[str]) -> str:
        """The inputs' microbatch shapes the capture was costed (and partitioned) at, under ``names`` (one
        per graph input): ``ids: (2, 64)``."""
        hints = {s: sympy.Integer(v) for s, v in self.hints.items()}
        return ", ".join(
            f"{name}: {tuple(int(sympy.sympify(d).xreplace(hints)) for d in dims)}"
            for name, dims in zip(names, self.inputs, strict=True)
            if dims is not None
        )
