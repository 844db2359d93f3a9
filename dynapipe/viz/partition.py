"""A partition as a picture (and as a compact terminal table), from :func:`dynapipe.explain`.

    import dynapipe
    from dynapipe.viz import partition_svg, partition_text
    explanation = dynapipe.explain(model, dict(input_ids=ids, labels=ids), n_stages=4)
    print(partition_text(explanation))
    partition_svg(explanation, "partition.svg")

The picture (drawn by :mod:`.partition_picture`) has one column per stage, left to right in pipeline
order. Each column lists the modules the stage computes, then two bars on a common baseline: compute
time of one microbatch (forward, input-gradient and weight-gradient backward stacked) and memory
(parameters, gradients, optimizer state, and the activations one microbatch keeps for backward). A dashed line marks the mean compute time, so
the slowest stage's overshoot -- the imbalance in the title -- is visible at a glance. Arrows between
columns carry the bytes of activations sent per microbatch (their gradients return the same size);
arcs over the columns are skip connections, tensors sent past the next stage.

Module lists name the largest modules a stage holds (at least 90% of their graph nodes; runs of
numbered blocks folded, ``layers.0-3``), in grey the modules it holds only a few nodes of, and in purple
the parameters it shares with other stages (tied weights: each reading stage holds a copy).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

from ..formatting import format_bytes
from ._svg import format_seconds, wrap

if TYPE_CHECKING:
    from ..plan.explanation import Explanation
    from ..schedules import StageCost

__all__ = ["crossing_tensors", "partition_text", "shared_state", "stage_modules"]

_WHOLE, _BITS = 0.9, 0.1  # share of a module's nodes that makes it "held" / "a few bits" by a stage


def _fold(names: list[str]) -> list[str]:
    """``a.layers.0``, ``a.layers.1``, ``a.layers.2`` -> ``a.layers.0-2`` (consecutive numbers only)."""
    out: list[tuple[str, int, int] | str] = []
    for name in names:
        head, _, tail = name.rpartition(".")
        last = out[-1] if out else None
        if tail.isdigit() and isinstance(last, tuple) and last[0] == head and last[2] + 1 == int(tail):
            out[-1] = (head, last[1], int(tail))
        elif tail.isdigit() and head:
            out.append((head, int(tail), int(tail)))
        else:
            out.append(name)
    return [o if isinstance(o, str) else f"{o[0]}.{o[1]}" + (f"-{o[2]}" if o[2] > o[1] else "") for o in out]


def stage_modules(explanation: Explanation) -> list[tuple[list[str], list[str]]]:
    """Per stage: (modules it holds, modules it holds only bits of), in graph order, numbered runs folded.

    A module is held when the stage computes at least 90% of its graph nodes; below 10% it is "bits"
    (e.g. a constant the partitioner placed with its consumer's producer); in between, its submodules
    are examined. A module's own operations outside any submodule show as ``name (part)``, the model's
    as ``(top level)``.
    """
    stage_of = explanation.stage_of
    nodes = [n for n in explanation.captured.gm.graph.nodes if n in stage_of]
    counts: dict[str, Counter] = {}
    own: dict[str, Counter] = {}
    children: dict[str, dict[str, None]] = {}
    for node in nodes:
        path = node.meta.get("module_path", "") or ""
        parts = path.split(".") if path else []
        prefixes = [""] + [".".join(parts[: i + 1]) for i in range(len(parts))]
        for parent, child in zip(prefixes, prefixes[1:], strict=False):
            children.setdefault(parent, {})[child] = None
        for p in prefixes:
            counts.setdefault(p, Counter())[stage_of[node]] += 1
        own.setdefault(path, Counter())[stage_of[node]] += 1

    def describe(module: str, stage: int, held: list[str], bits: list[str]) -> None:
        mine, total = counts[module][stage], sum(counts[module].values())
        if mine == 0:
            return
        if module and mine >= _WHOLE * total:
            held.append(module)
            return
        if module and mine <= _BITS * total:
            bits.append(module)
            return
        for child in children.get(module, {}):
            describe(child, stage, held, bits)
        if own.get(module, Counter())[stage]:
            held.append(f"{module} (part)" if module else "(top level)")

    result = []
    for stage in range(len(explanation.stages)):
        held: list[str] = []
        bits: list[str] = []
        describe("", stage, held, bits)
        result.append((_fold(held), _fold(bits)))
    return result


def shared_state(explanation: Explanation) -> dict[str, list[int]]:
    """Parameters and buffers read by more than one stage (tied weights) -> the stages that read them.

    Each of those stages holds a copy; their gradients are summed across the copies by the runtime."""
    stage_of = explanation.stage_of
    last = len(explanation.stages) - 1
    names = explanation.captured.state_names
    shared = {}
    for node in explanation.captured.gm.graph.find_nodes(op="get_attr"):
        readers = sorted({stage_of.get(u, last) for u in node.users})
        if len(readers) > 1:
            shared[names.get(node.target, str(node.target))] = readers
    return shared


def crossing_tensors(explanation: Explanation) -> dict[tuple[int, int], list[str]]:
    """(producer stage, consumer stage) -> the graph names of the tensors sent between them (an output of
    the whole call counts as read by the last stage)."""
    stage_of = explanation.stage_of
    last = len(explanation.stages) - 1
    crossing: dict[tuple[int, int], list[str]] = {}
    for node in explanation.captured.gm.graph.nodes:
        if node not in stage_of:
            continue
        src = stage_of[node]
        for dst in sorted({stage_of.get(u, last) for u in node.users} - {src}):
            crossing.setdefault((src, dst), []).append(node.name)
    return crossing


def names_of(names: list[str], limit: int = 2) -> str:
    """``["attention_mask", "cos_2", "sin_2"]`` -> ``"attention_mask, cos +1"`` (graph-name suffixes dropped)."""
    short = list(dict.fromkeys(re.sub(r"_\d+$", "", n) for n in names))
    return ", ".join(short[:limit]) + (f" +{len(short) - limit}" if len(short) > limit else "")


def title_of(explanation: Explanation) -> str:
    """How many stages, and how balanced (against the best split at layer boundaries)."""
    text = f"{len(explanation.stages)} stages, imbalance {explanation.imbalance:.2f}"
    if explanation.layer_imbalance is not None:
        text += f" (best split at layer boundaries: {explanation.layer_imbalance:.2f})"
    return text


def memory_of(record: StageCost) -> int:
    """Bytes a stage holds with one microbatch's activations."""
    return record.state_bytes + record.activation_bytes


def _bar(value: float, peak: float, width: int) -> str:
    eighths = round(8 * width * value / peak) if peak > 0 else 0
    full, part = divmod(eighths, 8)
    return ("█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")).ljust(width)


def partition_text(explanation: Explanation, *, width: int = 100) -> str:
    """A compact table for a terminal: per stage, compute and memory as bars, bytes sent, modules."""
    stages = explanation.stages
    modules = stage_modules(explanation)
    shared = shared_state(explanation)
    peak_t = max(s.time_s for s in stages)
    peak_m = max(memory_of(s) for s in stages)
    lines = [
        f"partition into {title_of(explanation)}",
        f"{'stage':>5}  {'compute / microbatch':<25}  {'memory (state + 1 mb act.)':<26}  sends",
    ]
    for s, (held, bits) in zip(stages, modules, strict=True):
        sends = ", ".join(f"→{d} {format_bytes(b)}" for d, b in sorted(s.sends.items()) if b) or "-"
        slow = " ◀ slowest" if s.time_s == peak_t and len(stages) > 1 else ""
        lines.append(
            f"{s.index:>5}  {_bar(s.time_s, peak_t, 14)} {format_seconds(s.time_s):>10}  "
            f"{_bar(memory_of(s), peak_m, 14)} {format_bytes(memory_of(s)):>11}  {sends}{slow}"
        )
        indent = " " * 7
        items = held + ([f"+ bits of {', '.join(bits)}"] if bits else [])
        items += [
            f"shares {name} with stage {', '.join(str(o) for o in readers if o != s.index)}"
            for name, readers in shared.items()
            if s.index in readers
        ]
        lines += [indent + line for line in wrap(items, width - len(indent))]
    lines.append(
        f"per microbatch of {explanation.captured.microbatch_size}; compute is forward + backward; "
        "sends are activations (gradients return the same size)"
    )
    why = explanation.why_uneven()
    return "\n".join([*lines, *([f"uneven: {why}"] if why else []), *explanation.step_lines()])
