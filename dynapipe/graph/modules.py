"""Which modules a set of graph nodes covers, named the way ``named_modules()`` names them."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch.fx as fx

__all__ = ["module_counts", "modules_of", "prefixes"]


def prefixes(path: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: the module and every module it sits in."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def module_counts(stage_of: Mapping[fx.Node, int]) -> dict[str, int]:
    """Nodes run inside each module (directly or deeper): a stage holds a module whole when it has them all."""
    counts: dict[str, int] = {}
    for node in stage_of:
        for p in prefixes(node.meta.get("module_path", "")):
            counts[p] = counts.get(p, 0) + 1
    return counts


_NUMBERED = re.compile(r"^(.*\.)(\d+)$")


def modules_of(members: list[fx.Node], total: dict[str, int]) -> tuple[str, ...]:
    """The largest modules wholly inside ``members`` (``(part)`` when only some of a module is), runs of
    numbered siblings folded: ``layers.0``, ``layers.1``, ``layers.2`` -> ``layers.0-2``."""
    here: dict[str, int] = {}
    for node in members:
        for p in prefixes(node.meta.get("module_path", "")):
            here[p] = here.get(p, 0) + 1
    names: dict[str, None] = {}
    for node in members:
        paths = prefixes(node.meta.get("module_path", ""))
        whole = next((p for p in paths if here[p] == total[p]), None)
        if whole is not None:
            names[whole] = None
        elif paths:
            names[f"{paths[-1]} (part)"] = None
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
