"""A few lines of SVG writing shared by the pictures: elements, text, nice axis ticks, units, colours.

Nothing here knows about pipelines. Text width is estimated (``TEXT_WIDTH`` ems per character for the
sans-serif font the pictures ask for), which is enough to decide whether a label fits in a box.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

__all__ = [
    "COLORS",
    "FONT",
    "TEXT_WIDTH",
    "Canvas",
    "format_seconds",
    "lighten",
    "nice_ticks",
    "text_width",
    "wrap",
]

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
TEXT_WIDTH = 0.6  # ems per character, a generous average for the sans-serif fonts above

# One colour per kind of work, the same in the timeline and the partition picture (Tableau 10).
COLORS = {
    "F": "#4E79A7",  # forward
    "B": "#F28E2B",  # full backward
    "I": "#E15759",  # backward for the input gradient
    "W": "#59A14F",  # backward for the weight gradient
    "comm": "#9D9D9D",
    "step": "#D9D2C3",  # the step's own named work, outside the schedule's table
    "params": "#6F4E7C",
    "grads": "#9C77B0",
    "optimizer": "#C9B3D6",
    "activations": "#EDC948",
    "ink": "#222222",
    "muted": "#666666",
    "grid": "#E4E4E4",
    "idle": "#F3F3F3",
}


def text_width(text: str, size: float) -> float:
    return len(text) * size * TEXT_WIDTH


def lighten(color: str, amount: float) -> str:
    """Mix ``#rrggbb`` with white: ``amount`` 0 keeps it, 1 gives white."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02X}" for c in rgb)


def nice_ticks(stop: float, target: int = 8) -> list[float]:
    """Ticks 0, step, 2 step, ... <= ``stop`` with step 1, 2 or 5 times a power of ten."""
    if stop <= 0:
        return [0.0]
    raw = stop / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(stop / step + 1e-9) + 1)]


def format_seconds(t: float, scale: float | None = None) -> str:
    """``0.0015`` -> ``1.5 ms``; ``scale`` (a tick step) picks one unit for a whole axis."""
    ref = abs(scale if scale is not None else t)
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if ref >= factor or unit == "ns":
            return f"{t / factor:.4g} {unit}"
    return f"{t:.3g} s"


def _attrs(attrs: dict) -> str:
    parts = []
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.2f}".rstrip("0").rstrip(".")
        parts.append(f" {key.rstrip('_').replace('_', '-')}={quoteattr(str(value))}")
    return "".join(parts)


class Canvas:
    """An SVG document built element by element; ``str()`` is the document."""

    def __init__(self, width: float, height: float, *, background: str = "white"):
        self.width, self.height = width, height
        self.parts: list[str] = []
        self.rect(0, 0, width, height, fill=background)

    def element(self, tag: str, *, body: str | None = None, tooltip: str | None = None, **attrs) -> None:
        inner = (f"<title>{escape(tooltip)}</title>" if tooltip else "") + (body or "")
        if inner:
            self.parts.append(f"<{tag}{_attrs(attrs)}>{inner}</{tag}>")
        else:
            self.parts.append(f"<{tag}{_attrs(attrs)}/>")

    def rect(self, x: float, y: float, w: float, h: float, **attrs) -> None:
        self.element("rect", x=float(x), y=float(y), width=float(max(w, 0.0)), height=float(h), **attrs)

    def line(self, x1: float, y1: float, x2: float, y2: float, **attrs) -> None:
        self.element("line", x1=float(x1), y1=float(y1), x2=float(x2), y2=float(y2), **attrs)

    def path(self, d: str, **attrs) -> None:
        self.element("path", d=d, **attrs)

    def text(
        self,
        x: float,
        y: float,
        text: str,
        *,
        size: float = 12,
        anchor: str = "start",
        weight: str | None = None,
        fill: str = COLORS["ink"],
        **attrs,
    ) -> None:
        self.element(
            "text",
            body=escape(text),
            x=float(x),
            y=float(y),
            font_size=size,
            text_anchor=anchor,
            font_weight=weight,
            fill=fill,
            **attrs,
        )

    def raw(self, svg: str) -> None:
        self.parts.append(svg)

    def __str__(self) -> str:
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width:.0f}" height="{self.height:.0f}" '
            f'viewBox="0 0 {self.width:.0f} {self.height:.0f}" font-family={quoteattr(FONT)}>'
        )
        arrow = (
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{COLORS["muted"]}"/></marker></defs>'
        )
        return "\n".join([head, arrow, *self.parts, "</svg>\n"])

    def save(self, path: str | Path | None) -> str:
        svg = str(self)
        if path is not None:
            Path(path).write_text(svg, encoding="utf-8")
        return svg


def wrap(items: Iterable[str], width_chars: int, sep: str = ", ") -> list[str]:
    """Join ``items`` with ``sep`` into lines of at most ``width_chars`` (an item longer than that keeps
    a line of its own, cut with an ellipsis)."""
    lines: list[str] = []
    line = ""
    for item in items:
        if len(item) > width_chars:
            item = item[: width_chars - 1] + "…"
        candidate = f"{line}{sep}{item}" if line else item
        if len(candidate) + len(sep.rstrip()) <= width_chars or not line:
            line = candidate
        else:
            lines.append(line + sep.rstrip())
            line = item
    if line:
        lines.append(line)
    return lines
