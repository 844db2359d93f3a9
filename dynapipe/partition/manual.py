"""Stage assignment from split points a person chose: module names, or ``pipe_split()`` markers in code."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping

import torch.fx as fx

from ..errors import ConfigError, PartitionError
from ..graph import CapturedGraph, compute_nodes

__all__ = ["assign_by_owners", "assign_by_split_points", "layer_boundaries"]


def _inside(path: str, name: str) -> bool:
    """Whether module ``path`` is ``name`` or inside it; ``name`` may omit the captured root variable
    (``layers.2`` matches ``model.layers.2`` when the compiled function reads a global ``model``)."""
    for candidate in (path, path.partition(".")[2]):
        if candidate == name or candidate.startswith(name + "."):
            return True
    return False


def _module_start(nodes: list[fx.Node], name: str) -> int:
    """Index of the first compute node produced inside module ``name`` (dotted, as in named_modules())."""
    for i, node in enumerate(nodes):
        if _inside(node.meta.get("module_path", ""), name):
            return i
    paths = {n.meta.get("module_path", "") for n in nodes}
    known = sorted((paths | {p.partition(".")[2] for p in paths}) - {""})
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; modules in the graph include {known[:8]}"
    raise ConfigError(
        f"split point {name!r} names no module that runs in the compiled call{hint} (a module that runs "
        "only inside torch.cond is never split: split before or after the cond)"
    )


def assign_by_split_points(
    captured: CapturedGraph, split_points: list[str] | list[int]
) -> dict[fx.Node, int]:
    """Stage of each compute node: a split goes right before each named module (or marker position)."""
    nodes = compute_nodes(captured.gm.graph)
    starts = [p if isinstance(p, int) else _module_start(nodes, p) for p in split_points]
    for a, b, name in zip(starts, starts[1:], split_points[1:], strict=False):
        if b <= a:
            raise ConfigError(
                f"split points must follow execution order and enclose work: {name!r} starts at node {b}, "
                f"not after the previous split at node {a}; list split points in the order the modules run"
            )
    if starts and (starts[0] == 0 or starts[-1] >= len(nodes)):
        raise PartitionError(f"split point {split_points[0]!r} leaves stage 0 empty; drop it or split later")
    stage_of, stage = {}, 0
    for i, node in enumerate(nodes):
        while stage < len(starts) and i >= starts[stage]:
            stage += 1
        stage_of[node] = stage
    return stage_of


def assign_by_owners(
    captured: CapturedGraph, owners: Mapping[int, frozenset[int]]
) -> dict[fx.Node, int] | None:
    """Stage of each compute node such that every node reading a parameter or buffer runs on a stage that
    already holds it (``owners``: ``id(tensor)`` -> stages), so a later pipeline over a model (evaluation,
    a new input shape) keeps each module on the rank that owns it. Other nodes run as early as their inputs
    allow. None when the graph cannot be cut that way (it reads owned tensors out of stage order)."""
    gm = captured.gm
    stage_of: dict[fx.Node, int] = {}
    for node in compute_nodes(gm.graph):
        earliest = max((stage_of[i] for i in node.all_input_nodes if i in stage_of), default=0)
        allowed = None
        for arg in node.all_input_nodes:
            stages = owners.get(id(getattr(gm, str(arg.target)))) if arg.op == "get_attr" else None
            if stages is not None:
                allowed = stages if allowed is None else allowed & stages
        if allowed is None:
            stage_of[node] = earliest
            continue
        fits = sorted(s for s in allowed if s >= earliest)
        if not fits:
            return None
        stage_of[node] = fits[0]
    return stage_of


_LAYER = re.compile(r"^(.*\.)?\d+$")


def layer_boundaries(captured: CapturedGraph) -> list[str]:
    """Names of the repeated blocks (``layers.0``, ``layers.1`` …) in execution order: even-split candidates."""
    seen, blocks = set(), []
    for node in compute_nodes(captured.gm.graph):
        path = node.meta.get("module_path", "")
        parts = path.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if _LAYER.match(prefix):
                if prefix not in seen:
                    seen.add(prefix)
                    blocks.append(prefix)
                break
    return blocks
