"""``pipe_split()``: a stage boundary written in the model's code, recorded by the capture as a graph node."""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["is_split_marker", "pipe_split"]

torch.library.define("dynapipe::pipe_split", "() -> ()")


@torch.library.impl("dynapipe::pipe_split", "CompositeExplicitAutograd")
def _pipe_split_impl() -> None:
    return None


@torch.library.register_fake("dynapipe::pipe_split")
def _pipe_split_fake() -> None:
    return None


def pipe_split() -> None:
    """Mark a stage boundary inside ``forward``; a no-op when the model runs eagerly."""
    torch.ops.dynapipe.pipe_split()


def is_split_marker(node: fx.Node) -> bool:
    """Whether ``node`` is a ``pipe_split()`` call (ours, or torch.distributed.pipelining's)."""
    markers: list[object] = [torch.ops.dynapipe.pipe_split.default, torch.ops.dynapipe.pipe_split]
    if hasattr(torch.ops, "pippy") and hasattr(torch.ops.pippy, "_pipe_split"):
        markers += [torch.ops.pippy._pipe_split.default, torch.ops.pippy._pipe_split]
    return node.target in markers
