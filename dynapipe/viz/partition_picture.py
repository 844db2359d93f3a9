"""The partition as an SVG picture: one card per stage with its modules and its compute and memory bars
(see :mod:`.partition` for what the picture shows and how module lists are chosen).

    import dynapipe
    from dynapipe.viz import partition_svg
    partition_svg(dynapipe.explain(model, dict(input_ids=ids, labels=ids), n_stages=4), "partition.svg")
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..formatting import format_bytes
from ._svg import COLORS, Canvas, format_seconds, text_width, wrap
from .partition import crossing_tensors, memory_of, names_of, shared_state, stage_modules, title_of

if TYPE_CHECKING:
    from ..plan.explanation import Explanation
    from ..schedules import StageCost

__all__ = ["partition_svg"]

_BAR_W = 58  # pixels, each of a stage's two bars


def partition_svg(
    explanation: Explanation, path: str | Path | None = None, *, title: str | None = None
) -> str:
    """An SVG picture of the partition (see the module docstring); written to ``path`` when given."""
    stages = explanation.stages
    skips = sorted(
        ((s.index, d, b) for s in stages for d, b in s.sends.items() if d > s.index + 1 and b),
        key=lambda e: (e[1] - e[0], e[0]),
    )
    frame = _Frame.of(explanation, skips)
    svg = Canvas(frame.width, frame.height)
    svg.text(frame.margin, 28, title or f"Partition into {title_of(explanation)}", size=17, weight="bold")
    svg.text(frame.margin, 48, _subtitle(explanation), size=12, fill=COLORS["muted"])
    crossing = crossing_tensors(explanation)
    _draw_skips(svg, frame, skips, crossing)
    slowest = max(range(len(stages)), key=lambda i: stages[i].time_s)
    for i, s in enumerate(stages):
        _draw_card(svg, frame, s, i, highlight=i == slowest and len(stages) > 1)
        _draw_bars(svg, frame, s, i, highlight=i == slowest and len(stages) > 1)
        if i + 1 < len(stages) and s.sends.get(s.index + 1, 0):
            _draw_send(svg, frame, s, i, crossing)
    _draw_legend(svg, frame)
    return svg.save(path)


def _subtitle(explanation: Explanation) -> str:
    return (
        f"per microbatch of {explanation.captured.microbatch_size} · compute is forward + "
        "backward · arrows carry activations forward; their gradients return the same size"
    )


_LEGEND = [
    ("forward", "F"),
    ("backward, input grad", "I"),
    ("backward, weight grad", "W"),
    ("parameters", "params"),
    ("gradients", "grads"),
    ("optimizer state", "optimizer"),
    ("activations of 1 microbatch", "activations"),
]


def _legend_width() -> float:
    """The legend's width: its swatches and labels, then the mean compute's dashed line and label."""
    items = sum(18 + text_width(label, 11.5) * 0.95 + 16 for label, _ in _LEGEND)
    return items + 30 + text_width("mean compute", 11.5)


@dataclass(frozen=True)
class _Frame:
    """Where everything goes: one column (card) per stage, skip arcs above, bars on a common baseline."""

    n: int
    col_w: int
    gap: int
    margin: int
    width: float
    height: float
    col_x: list[float]
    cards_y: float
    card_h: float
    base: float  # the common baseline of all bars
    bar_h: int
    texts: list[list[tuple[str, str]]]  # per stage: (line, style), style "" (held), "bits" or "shared"
    peak_t: float
    peak_m: float
    mean_t: float

    @classmethod
    def of(cls, explanation: Explanation, skips: list[tuple[int, int, int]]) -> _Frame:
        stages = explanation.stages
        n = len(stages)
        col_w, gap, margin = 220, 100, 28
        text_w = max(_legend_width(), text_width(_subtitle(explanation), 12))  # neither is cut off
        width = max(760, 2 * margin + n * col_w + (n - 1) * gap, 2 * margin + text_w)
        left = (width - (n * col_w + (n - 1) * gap)) / 2
        arc_h = (34 + 26 * max(e[1] - e[0] - 1 for e in skips)) if skips else 0
        cards_y = 76 + arc_h + (18 if skips else 0)
        texts = _card_texts(explanation, int((col_w - 20) / (11.5 * 0.6)))
        text_h = 20 + 16 * max(len(t) for t in texts)
        bars_y = cards_y + 30 + text_h  # top of the bar area
        bar_h = 160
        base = bars_y + 30 + bar_h
        card_h = base - cards_y + 62
        return cls(
            n=n,
            col_w=col_w,
            gap=gap,
            margin=margin,
            width=width,
            height=cards_y + card_h + 70,
            col_x=[left + i * (col_w + gap) for i in range(n)],
            cards_y=cards_y,
            card_h=card_h,
            base=base,
            bar_h=bar_h,
            texts=texts,
            peak_t=max(s.time_s for s in stages) or 1.0,
            peak_m=max(memory_of(s) for s in stages) or 1,
            mean_t=sum(s.time_s for s in stages) / n,
        )


def _card_texts(explanation: Explanation, chars: int) -> list[list[tuple[str, str]]]:
    """Per stage, the lines of its card: modules held, bits of others, tied state it shares."""
    shared = shared_state(explanation)
    texts = []
    for index, (held, bits) in enumerate(stage_modules(explanation)):
        lines = [(line, "") for line in wrap(held, chars)]
        if bits:
            lines += [
                ("+ bits of " + line if i == 0 else line, "bits")
                for i, line in enumerate(wrap(bits, chars - 10))
            ]
        for name, readers in shared.items():
            if index in readers:
                others = ", ".join(str(o) for o in readers if o != index)
                lines += [
                    (line, "shared") for line in wrap([f"⇄ {name}", f"(tied, also on stage {others})"], chars)
                ]
        texts.append(lines[:14])
    return texts


def _draw_skips(
    svg: Canvas, f: _Frame, skips: list[tuple[int, int, int]], crossing: dict[tuple[int, int], list[str]]
) -> None:
    """Skip connections: arcs over the cards, longer spans higher, labels drawn after every arc."""
    out_n = Counter(e[0] for e in skips)
    in_n = Counter(e[1] for e in skips)
    seen_out: Counter = Counter()
    seen_in: Counter = Counter()
    labels = []
    for src, dst, nbytes in skips:
        seen_out[src] += 1
        seen_in[dst] += 1
        x1 = f.col_x[src] + f.col_w * (0.55 + 0.4 * seen_out[src] / (out_n[src] + 1))
        x2 = f.col_x[dst] + f.col_w * (0.05 + 0.4 * seen_in[dst] / (in_n[dst] + 1))
        h = (34 + 26 * (dst - src - 1)) / 0.75
        y = f.cards_y - 2
        svg.path(
            f"M{x1:.1f},{y:.1f} C{x1:.1f},{y - h:.1f} {x2:.1f},{y - h:.1f} {x2:.1f},{y:.1f}",
            fill="none",
            stroke=COLORS["muted"],
            stroke_width=1.4,
            marker_end="url(#arrow)",
            class_="skip",
            data_src=src,
            data_dst=dst,
            data_bytes=nbytes,
            tooltip=f"stage {src} sends {format_bytes(nbytes)} straight to stage {dst}: "
            + ", ".join(crossing.get((src, dst), [])),
        )
        label = f"{format_bytes(nbytes)} skip {src}→{dst} ({names_of(crossing.get((src, dst), []))})"
        labels.append(((x1 + x2) / 2, y - 0.75 * h, label))
    for mid, apex, label in labels:  # after every arc, so that no arc crosses a label
        svg.rect(mid - text_width(label, 11) / 2 - 3, apex - 13, text_width(label, 11) + 6, 16, fill="white")
        svg.text(mid, apex - 1, label, size=11, anchor="middle", fill=COLORS["ink"], class_="bytes")


def _draw_card(svg: Canvas, f: _Frame, s: StageCost, i: int, *, highlight: bool) -> None:
    """The stage's card: its number, op count and module lines (the bars are drawn on it afterwards)."""
    x = f.col_x[i]
    svg.rect(
        x,
        f.cards_y,
        f.col_w,
        f.card_h,
        fill="#FAFAFA",
        stroke="#CCCCCC",
        rx=6,
        class_="stage",
        data_stage=s.index,
    )
    svg.text(x + 12, f.cards_y + 24, f"stage {s.index}", size=15, weight="bold")
    svg.text(
        x + f.col_w - 12, f.cards_y + 24, f"{s.n_nodes} ops", size=11, anchor="end", fill=COLORS["muted"]
    )
    for k, (line, style) in enumerate(f.texts[i]):
        fill = {"": COLORS["ink"], "bits": COLORS["muted"], "shared": COLORS["params"]}[style]
        svg.text(
            x + 12,
            f.cards_y + 48 + 16 * k,
            line,
            size=11.5,
            class_=f"module {style}".strip(),
            fill=fill,
            font_style="italic" if style else None,
        )


def _draw_bars(svg: Canvas, f: _Frame, s: StageCost, i: int, *, highlight: bool) -> None:
    """Compute and memory bars on the common baseline, the mean compute as a dashed line."""
    x, base = f.col_x[i], f.base
    compute = [("F", s.forward), ("I", s.backward_input), ("W", s.backward_weight)]
    memory = [
        ("params", s.param_bytes),
        ("grads", s.grad_bytes),
        ("optimizer", s.optimizer_bytes),
        ("activations", s.activation_bytes),
    ]
    _draw_stack(svg, f, s, x + 34, "compute", f.peak_t, compute, format_seconds(s.time_s), slow=highlight)
    _draw_stack(svg, f, s, x + 34 + 92, "memory", f.peak_m, memory, format_bytes(memory_of(s)), slow=False)
    if highlight:
        svg.text(
            x + f.col_w / 2,
            base + 52,
            "slowest stage",
            size=11.5,
            anchor="middle",
            fill="#C0392B",
            weight="bold",
        )
    svg.line(x + 24, base, x + f.col_w - 24, base, stroke=COLORS["muted"])
    y_mean = base - f.bar_h * f.mean_t / f.peak_t
    svg.line(
        x + 26,
        y_mean,
        x + 34 + _BAR_W + 8,
        y_mean,
        stroke=COLORS["ink"],
        stroke_width=1.2,
        stroke_dasharray="5 3",
        class_="mean",
    )


def _draw_stack(
    svg: Canvas,
    f: _Frame,
    s: StageCost,
    bx: float,
    caption: str,
    peak: float,
    parts: Sequence[tuple[str, float]],
    value: str,
    *,
    slow: bool,
) -> None:
    """One bar of stacked ``parts`` scaled to ``peak``, its caption and its total (red on the slowest)."""
    base = f.base
    top: float = base
    for key, amount in parts:
        h = f.bar_h * amount / peak
        top -= h
        svg.rect(
            bx,
            top,
            _BAR_W,
            h,
            fill=COLORS[key],
            class_=f"bar bar-{caption}",
            data_part=key,
            data_value=amount,
            tooltip=f"stage {s.index} {caption}: {key} {amount:.4g}",
        )
    svg.text(bx + _BAR_W / 2, base + 16, caption, size=11.5, anchor="middle", fill=COLORS["muted"])
    svg.text(
        bx + _BAR_W / 2,
        base + 32,
        value,
        size=12,
        anchor="middle",
        weight="bold",
        fill="#C0392B" if slow else COLORS["ink"],
        class_="value",
    )


def _fit(text: str, width: float, size: float) -> str:
    """``text`` cut with an ellipsis to about ``width`` pixels at font ``size``."""
    chars = int(width / (size * 0.6))
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "…"


def _draw_send(
    svg: Canvas, f: _Frame, s: StageCost, i: int, crossing: dict[tuple[int, int], list[str]]
) -> None:
    """The arrow to the next stage, labelled with the bytes that cross and the tensors they are."""
    x, y, gap = f.col_x[i], f.cards_y + 20, f.gap
    nbytes = s.sends.get(s.index + 1, 0)
    svg.line(
        x + f.col_w + 6,
        y,
        x + f.col_w + gap - 6,
        y,
        stroke=COLORS["muted"],
        stroke_width=2,
        marker_end="url(#arrow)",
        class_="send",
        data_src=s.index,
        data_dst=s.index + 1,
        data_bytes=nbytes,
        tooltip=f"stage {s.index} sends {format_bytes(nbytes)} to stage {s.index + 1}: "
        + ", ".join(crossing.get((s.index, s.index + 1), [])),
    )
    svg.text(x + f.col_w + gap / 2, y - 7, format_bytes(nbytes), size=11.5, anchor="middle", class_="bytes")
    svg.text(
        x + f.col_w + gap / 2,
        y + 16,
        _fit(names_of(crossing.get((s.index, s.index + 1), []), 1), gap - 4, 9.5),
        size=9.5,
        anchor="middle",
        fill=COLORS["muted"],
        class_="tensors",
    )


def _draw_legend(svg: Canvas, f: _Frame) -> None:
    y = f.height - 26
    x: float = f.margin
    for label, key in _LEGEND:
        svg.rect(x, y - 11, 13, 13, fill=COLORS[key], class_="legend", data_label=label)
        svg.text(x + 18, y, label, size=11.5)
        x += 18 + text_width(label, 11.5) * 0.95 + 16
    svg.line(x, y - 4, x + 24, y - 4, stroke=COLORS["ink"], stroke_width=1.2, stroke_dasharray="5 3")
    svg.text(x + 30, y, "mean compute", size=11.5)
