"""A pipeline step as a picture: one row per rank, one box per action, time running left to right.

    from dynapipe.schedules import StageCost, get_schedule, simulate
    from dynapipe.viz import timeline_svg
    table = get_schedule("1f1b").build(n_ranks=4, n_stages=4, n_microbatches=8)
    timeline = simulate(table, StageCost(1.0, 1.0, 1.0), n_ranks=4, n_stages=4, placement="loop")
    timeline_svg(timeline, "1f1b.svg", title="1F1B, 4 ranks, 8 microbatches")

Works the same on a measured step: the runtime hands each rank's :class:`~dynapipe.schedules.Timeline` to
``options["on_step"]`` (``report.timeline``); gather them on one rank and :func:`merge_timelines` them.
Each rank's times count from its own start of the step, so ranks are aligned at the moment each entered
the step, which the launch of the step makes nearly simultaneous.

Reading the picture: gaps in a row are that rank's bubble; the box colour is the kind of work (forward,
full backward, the input-gradient half, the weight-gradient half of a split backward); the number in a
box is its microbatch; a rank that holds several stages (interleaved 1F1B, ZB-V) draws its later stages
in lighter shades; communication is a thin grey bar at the bottom of a row; the step's own work outside
the table (``kind="step"`` events: refreshing shared state, waiting for sends) is a dashed box with
its name. Every box carries a tooltip with its action, stage and times, and ``data-*``
attributes (rank, action, start, end) for tools and tests.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..schedules import Action, Kind, Timeline, TimelineEvent
from ._svg import COLORS, TEXT_WIDTH, Canvas, format_seconds, lighten, nice_ticks, text_width

__all__ = ["KIND_NAMES", "merge_timelines", "timeline_svg", "write_chrome_trace"]

KIND_NAMES = {
    Kind.F: "forward",
    Kind.B: "backward (full)",
    Kind.I: "backward, input grad",
    Kind.W: "backward, weight grad",
}

_ROW, _GAP, _LEFT, _RIGHT = 30, 8, 78, 96
_STEP_LABEL = "the step's own work (named)"


def merge_timelines(timelines: Iterable[Timeline]) -> Timeline:
    """One timeline holding every event of ``timelines`` (e.g. each rank's ``StepReport.timeline``).

    Recorded steps (each counting from its own rank's start) are lined up by when each began
    (``Timeline.started``), so that the merged step starts with the first rank's and a message's wait
    lines up with its send; the result's ``n_ranks`` is the largest of the inputs' when that covers every
    rank seen, otherwise 0 (the ranks that appear).
    """
    timelines = list(timelines)
    starts = [t.started for t in timelines if t.events]
    first = min(starts) if starts and all(starts) else None
    shifted = (
        (
            dataclasses.replace(e, start=e.start + t.started - first, end=e.end + t.started - first)
            for e in t.events
        )
        if first is not None
        else t.events
        for t in timelines
    )
    events = sorted((e for es in shifted for e in es), key=lambda e: (e.start, e.rank, e.end))
    n_ranks = max((t.n_ranks for t in timelines), default=0)
    if any(e.rank >= n_ranks for e in events):
        n_ranks = 0
    return Timeline(events=events, n_ranks=n_ranks, started=first or 0.0)


def write_chrome_trace(timeline: Timeline, path: str | Path) -> None:
    """Write ``timeline`` as chrome://tracing / Perfetto JSON (open it at ui.perfetto.dev)."""
    Path(path).write_text(json.dumps(timeline.to_chrome_trace(), indent=1), encoding="utf-8")


def _ink_on(color: str) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 150 else COLORS["ink"]


@dataclass(frozen=True)
class _Layout:
    """Where a timeline's parts go: rows from ``top``, ``scale`` pixels per second, and per rank the
    stages it computes (later ones drawn lighter)."""

    width: int
    top: float
    rows_h: float
    plot_w: float
    scale: float
    makespan: float
    chunks: dict[int, list[int]]
    n_chunks: int

    def x(self, t: float) -> float:
        return _LEFT + t * self.scale


def timeline_svg(
    timeline: Timeline, path: str | Path | None = None, *, title: str | None = None, width: int = 1100
) -> str:
    """An SVG Gantt chart of ``timeline``; written to ``path`` when given, and returned as text.

    The title states the makespan and the bubble fraction (idle share of all ranks' time).
    """
    if not timeline.events:
        raise ConfigError("the timeline has no events to draw; simulate() a schedule or record a step first")
    pairs = [(e, a) for e in timeline.events if (a := _compute_action(e)) is not None]
    computed = [a for _, a in pairs]
    chunks = {r: sorted({a.stage for e, a in pairs if e.rank == r}) for r in timeline.ranks}
    makespan = timeline.makespan
    rows_h = len(timeline.ranks) * (_ROW + _GAP) - _GAP
    plot_w = width - _LEFT - _RIGHT
    layout = _Layout(
        width=width,
        top=96,
        rows_h=rows_h,
        plot_w=plot_w,
        scale=plot_w / makespan if makespan > 0 else 0.0,
        makespan=makespan,
        chunks=chunks,
        n_chunks=max((len(c) for c in chunks.values()), default=1),
    )
    svg = Canvas(width, int(layout.top + rows_h + 58))
    _draw_heading(svg, layout, timeline, computed, title)
    _draw_axis(svg, layout)
    for i, rank in enumerate(timeline.ranks):
        _draw_row(svg, layout, timeline, rank, layout.top + i * (_ROW + _GAP))
    return svg.save(path)


def _compute_action(event: TimelineEvent) -> Action | None:
    """The compute action (F, B, I, W) an event ran; None for communication and the step's own work."""
    action = event.action
    return action if action is not None and action.kind.is_compute else None


def _draw_heading(
    svg: Canvas, layout: _Layout, timeline: Timeline, computed: list[Action], title: str | None
) -> None:
    """Title (makespan, bubble), subtitle (ranks, stages, microbatches) and the legend of what is drawn."""
    makespan = layout.makespan
    head = f"{title or 'Pipeline step'} — makespan {format_seconds(makespan)}, bubble {timeline.bubble_fraction:.1%}"
    size = max(
        11.0, min(17.0, (layout.width - _LEFT - 12) / (len(head) * TEXT_WIDTH * 1.05))
    )  # bold runs wider
    svg.text(_LEFT, 26, head, size=round(size, 1), weight="bold")
    n_mb = max((a.mb for a in computed), default=-1) + 1
    sub = f"{len(timeline.ranks)} ranks · {len({a.stage for a in computed})} stages · {n_mb} microbatches"
    ideal = timeline.ideal_step_time
    if ideal > 0:
        sub += f" · busiest rank computes {format_seconds(ideal)} ({ideal / makespan:.0%} of the step)"
    svg.text(_LEFT, 46, sub, size=12, fill=COLORS["muted"])
    kinds = [k for k in (Kind.F, Kind.B, Kind.I, Kind.W) if any(a.kind is k for a in computed)]
    legend = [(KIND_NAMES[k] + f" ({k.value})", COLORS[k.value]) for k in kinds]
    legend.append(("idle (bubble)", COLORS["idle"]))
    if layout.n_chunks > 1:
        legend.append(("lighter: the rank's later stages", lighten(COLORS[kinds[0].value], 0.5)))
    if any(e.action is not None and not e.action.kind.is_compute for e in timeline.events):
        legend.append(("communication", COLORS["comm"]))
    if any(e.kind == "step" for e in timeline.events):
        legend.append((_STEP_LABEL, COLORS["step"]))
    x: float = _LEFT
    for label, color in legend:
        svg.element(
            "rect",
            x=float(x),
            y=58.0,
            width=14.0,
            height=14.0,
            fill=color,
            stroke="#BBBBBB",
            stroke_width=0.5,
            class_="legend",
            data_label=label,
        )
        svg.text(x + 19, 70, label, size=12)
        x += 19 + text_width(label, 12) * 0.92 + 16


def _draw_axis(svg: Canvas, layout: _Layout) -> None:
    """Time grid, tick labels and a dashed line at the end of the step."""
    ticks = nice_ticks(layout.makespan)
    step = ticks[1] if len(ticks) > 1 else layout.makespan
    top, axis_y = layout.top, layout.top + layout.rows_h + 8
    for t in ticks:
        tx = layout.x(t)
        svg.line(tx, top - 4, tx, axis_y, stroke=COLORS["grid"], stroke_width=1)
        label = format_seconds(t, step) if t else "0"
        svg.text(tx, axis_y + 16, label, size=11, anchor="middle", fill=COLORS["muted"])
    svg.line(_LEFT, axis_y, _LEFT + layout.plot_w, axis_y, stroke=COLORS["muted"], stroke_width=1)
    end_x = layout.x(layout.makespan)
    svg.line(end_x, top - 8, end_x, axis_y, stroke=COLORS["ink"], stroke_width=1.2, stroke_dasharray="4 3")
    svg.text(
        _LEFT + layout.plot_w / 2,
        axis_y + 36,
        "time from the start of the step",
        size=12,
        anchor="middle",
        fill=COLORS["muted"],
    )


def _draw_row(svg: Canvas, layout: _Layout, timeline: Timeline, rank: int, y: float) -> None:
    """One rank: its idle background, its label and busy share, and a box per event."""
    makespan = layout.makespan
    svg.rect(_LEFT, y, layout.plot_w, _ROW, fill=COLORS["idle"], class_="row", data_rank=rank)
    svg.text(_LEFT - 10, y + _ROW / 2 + 5, f"rank {rank}", size=13, anchor="end", weight="bold")
    busy = timeline.busy_time(rank) / makespan if makespan > 0 else 0.0
    svg.text(_LEFT + layout.plot_w + 10, y + _ROW / 2 + 5, f"busy {busy:.0%}", size=12, fill=COLORS["muted"])
    for event in timeline.events:
        if event.rank != rank:
            continue
        x0, w = layout.x(event.start), (event.end - event.start) * layout.scale
        times = f"{format_seconds(event.start)} – {format_seconds(event.end)}"
        action = event.action
        if action is None:
            _draw_step(svg, event, x0, y, w, times)
        elif not action.kind.is_compute:
            svg.rect(
                x0,
                y + _ROW - 5,
                w,
                5,
                fill=COLORS["comm"],
                class_="comm",
                data_rank=rank,
                data_action=event.name,
                tooltip=f"rank {rank}: {event.name} (communication), {times}",
            )
        else:
            _draw_compute(svg, layout, event, action, x0, y, w, times)


def _box(svg: Canvas, event: TimelineEvent, x0: float, y: float, w: float, **attrs: Any) -> None:
    """One event's box on its rank's row (at least half a pixel wide), with its rank and times as data."""
    svg.element(
        "rect",
        x=float(x0),
        y=float(y),
        width=float(max(w, 0.5)),
        height=float(_ROW),
        stroke_width=0.8,
        data_rank=event.rank,
        data_start=repr(event.start),
        data_end=repr(event.end),
        **attrs,
    )


def _draw_step(svg: Canvas, event: TimelineEvent, x0: float, y: float, w: float, times: str) -> None:
    """The step's own named work (``refresh shared state``): a hatched box across the row, labelled
    with its name where it fits, so it is not mistaken for an action of the table."""
    _box(
        svg, event, x0, y, w,
        fill=COLORS["step"], stroke=COLORS["muted"], stroke_dasharray="3 2", class_="step", data_step=event.name,
        tooltip=f"rank {event.rank}: {event.name} (the step's own work, outside the schedule's table), {times}",
    )  # fmt: skip
    if text_width(event.name, 10) + 4 <= w:
        svg.text(
            x0 + w / 2,
            y + _ROW / 2 + 4,
            event.name,
            size=10,
            anchor="middle",
            fill=COLORS["ink"],
            class_="step-name",
        )


def _draw_compute(
    svg: Canvas,
    layout: _Layout,
    event: TimelineEvent,
    action: Action,
    x0: float,
    y: float,
    w: float,
    times: str,
) -> None:
    """A compute action: a box in its kind's colour (lighter for the rank's later stages), its
    microbatch number inside where it fits."""
    rank = event.rank
    chunk = layout.chunks[rank].index(action.stage)
    color = lighten(COLORS[action.kind.value], 0.5 * chunk / max(1, layout.n_chunks - 1))
    tip = (
        f"rank {rank}: {event.name} = {KIND_NAMES[action.kind]} of microbatch {action.mb} "
        f"on stage {action.stage}, {times}"
    )
    _box(
        svg, event, x0, y, w,
        fill=color, stroke="white", class_=f"op op-{action.kind.value}",
        data_action=event.name, data_stage=action.stage, data_mb=action.mb, tooltip=tip,
    )  # fmt: skip
    label = str(action.mb)
    if text_width(label, 11) + 3 <= w:
        svg.text(
            x0 + w / 2, y + _ROW / 2 + 4, label, size=11, anchor="middle", fill=_ink_on(color), class_="mb"
        )
