"""Counting an op's FLOPs and the bytes it moves, as it runs under a dispatch mode."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

__all__ = ["FlopCounter"]


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


class FlopCounter(TorchDispatchMode):
    """Adds up FLOPs with ``torch.utils.flop_counter``'s formulas (plus the CPU flash-attention kernel,
    which the counter does not know) and the bytes every op moves. Unlike ``FlopCounterMode`` it tracks
    no modules (faster), and lets higher-order ops through uncounted (``torch.cond`` is costed branch by
    branch by :mod:`.fake`)."""

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

    def since(self, before: tuple[int, int]) -> tuple[int, int]:
        """FLOPs and bytes moved since ``before`` (a :meth:`counts`)."""
        return self.total - before[0], self.moved - before[1]

    def reset(self, to: tuple[int, int]) -> None:
        self.total, self.moved = to
