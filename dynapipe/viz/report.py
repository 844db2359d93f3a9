"""A run as one self-contained HTML page: the partition, every rank's measured step and the plan beside it.

    reports = []
    step = torch.compile(fn, backend="dynapipe", options={"on_step": reports.append, ...})
    ...                                              # after a step, on every rank:
    dynapipe.viz.write_report("run.html", reports[-1], options=options)   # rank 0 writes the page

or, from a saved run: ``python -m dynapipe.viz report run.json -o run.html``.

:func:`write_report` is called on every rank: a ``StepReport`` holds one rank's timeline, so the call
gathers them all (a collective over the default process group, bounded by ``timeout_s``); it also takes
a merged :class:`~dynapipe.schedules.Timeline` (with ``plan=``) or a list of reports, and then gathers
nothing. Beside the page it saves the run as JSON (``run.json``; the format is :mod:`.run`'s docstring).

The page needs no network and no server (its script and style are inline) and shows, linked:

- the partition: the stage cards of :func:`~dynapipe.viz.partition_svg`; clicking a card lists the
  stage's modules, parameters, the tensors it sends and receives with their sizes, its compute and memory
  by kind, and marks its actions on the timeline (clicking an action selects its stage);
- the measured step: one lane per rank, an action's kind, microbatch, start and duration on hover; a
  receive's span is the time its rank waited for it, named with the sender; idle time is hatched;
- the plan beside the run: predicted and measured time per stage and for the step, the options, the
  schedule and the versions of Python, torch, transformers and dynapipe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from ..errors import ConfigError
from ..schedules import Kind, Timeline, TimelineEvent
from ._svg import COLORS
from .run import run_data, save_run, timeline_data, timeline_of
from .timeline import KIND_NAMES, merge_timelines

if TYPE_CHECKING:
    from ..builder.report import StepReport
    from ..plan.explanation import Explanation

__all__ = ["report_html", "write_report"]

NO_TIMELINE = (
    "the run has no timeline to draw{where}: pass options={{'on_step': reports.append}} to torch.compile "
    "and call write_report(path, reports[-1]) on every rank after a step"
)
_P2P_NAMES = {
    Kind.SEND_F: "send of activations",
    Kind.SEND_B: "send of gradients",
    Kind.RECV_F: "receive of activations",
    Kind.RECV_B: "receive of gradients",
}


def write_report(
    path: str | Path,
    reports: StepReport | Sequence[StepReport] | Timeline | None,
    *,
    plan: Explanation | None = None,
    options: Mapping[str, Any] | None = None,
    title: str | None = None,
    save: bool = True,
    timeout_s: float = 300.0,
) -> Path | None:
    """Write the run page to ``path`` (and the saved run beside it, ``.json``, unless ``save=False``).

    ``reports`` is this rank's ``StepReport`` (call on every rank: they are gathered, and rank 0 writes;
    the others return None), a list of reports, or an already merged ``Timeline`` (give ``plan=``).
    ``options`` are those given to ``torch.compile`` (the page lists them and names the schedule)."""
    if isinstance(reports, Timeline):
        timeline, ranks = reports, []
    else:
        payloads = _gather(reports, timeout_s)
        if payloads is None:
            return None
        timeline = merge_timelines(
            Timeline([TimelineEvent(**e) for e in p["events"]], started=p["started"]) for p in payloads
        )
        ranks = [{k: v for k, v in p.items() if k not in ("events", "started")} for p in payloads]
        if plan is None:
            plan = _first(reports).plan
    if not timeline.events:
        raise ConfigError(NO_TIMELINE.format(where=""))
    run = run_data(timeline, ranks, plan=plan, options=options, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if save:
        save_run(run, path.with_suffix(".json"))
    path.write_text(report_html(run), encoding="utf-8")
    return path


def _first(reports: StepReport | Sequence[StepReport] | None) -> StepReport:
    return reports[0] if isinstance(reports, Sequence) else reports  # type: ignore[return-value]


def _payload(report: StepReport | None) -> dict | None:
    """What one rank sends: its timeline's events and stage map (plain data, a few KB)."""
    if report is None or not report.timeline.events:
        return None
    return {
        "rank": report.rank,
        "stages": sorted(report.stages),
        "rank_of_stage": {str(s): r for s, r in sorted(report.rank_of_stage.items())},
        "events": timeline_data(report.timeline)["events"],
        "started": report.timeline.started,
    }


def _gather(reports: StepReport | Sequence[StepReport] | None, timeout_s: float) -> list[dict] | None:
    """Every rank's payload, by rank, on rank 0 (None on the others); a list of reports is gathered
    already. Every rank fails alike when one has no timeline, so none waits for a rank that gave up."""
    collective = False
    if reports is None or isinstance(reports, Sequence):
        payloads = [_payload(r) for r in reports or ()] or [None]
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from ..runtime.comm import Comm

        comm = Comm(timedelta(seconds=timeout_s))  # a failed exchange names the rank that went silent
        payloads = comm.gather_objects(_payload(reports), "the timelines of the run report")
        collective = True
    else:
        payloads = [_payload(reports)]
    missing = [r for r, p in enumerate(payloads) if p is None]
    if missing:
        where = f" on rank {', '.join(map(str, missing))}" if collective else ""
        raise ConfigError(NO_TIMELINE.format(where=where))
    if collective and dist.get_rank() != 0:
        return None
    return sorted((p for p in payloads if p is not None), key=lambda p: p["rank"])


# --------------------------------------------------------------------------------------------- the page


def report_html(run: Mapping[str, Any]) -> str:
    """The page of a saved run (:func:`~dynapipe.viz.run.load_run`'s, or :func:`run_data`'s)."""
    timeline = timeline_of(run)
    if not timeline.events:
        raise ConfigError(NO_TIMELINE.format(where=" in this saved run"))
    page = {"run": run, "view": _view(run, timeline), "colors": COLORS}
    data = json.dumps(page).replace("</", "<\\/")  # no "</script>" inside the script element
    template = resources.files(__package__).joinpath("report.html").read_text(encoding="utf-8")
    title = str(run.get("title", "dynapipe run")).replace("&", "&amp;").replace("<", "&lt;")
    return template.replace("{{TITLE}}", title).replace("{{DATA}}", data)


def _view(run: Mapping[str, Any], timeline: Timeline) -> dict:
    """What the page derives from the run: each event described, per-stage and per-rank measures."""
    sender = _senders(run, timeline)
    events = [_describe(e, sender) for e in timeline.events]
    ranks = timeline.ranks
    step = timeline.makespan
    per_stage: dict[int, list[float]] = {}
    holders: dict[int, set[int]] = {}  # a stage's ranks: one per data-parallel replica
    for e in events:
        if e["group"] == "compute":
            per_stage.setdefault(e["stage"], []).append(e["end"] - e["start"])
            holders.setdefault(e["stage"], set()).add(e["rank"])
    plan = run.get("plan") or {}
    n_mb = plan.get("n_microbatches") or max(
        (e["mb"] + 1 for e in events if e["group"] == "compute"), default=1
    )
    return {
        "events": events,
        "ranks": [
            {
                "rank": r,
                "busy": timeline.busy_time(r),
                "stages": sorted({e["stage"] for e in events if e["rank"] == r and e["group"] == "compute"}),
            }
            for r in ranks
        ],
        "step_s": step,
        "bubble": timeline.bubble_fraction,
        "n_microbatches": n_mb,
        # measured compute per microbatch of each stage (summed over its actions, averaged over replicas)
        "stage_s": {str(s): sum(d) / (n_mb * len(holders[s])) for s, d in sorted(per_stage.items())},
    }


def _senders(run: Mapping[str, Any], timeline: Timeline) -> dict[tuple[int, int], int]:
    """(receiving rank, sending stage) -> the sending rank: the receiver's own replica map where the run
    has it, else the rank that computed that stage."""
    computed: dict[int, int] = {}
    for e in timeline.events:
        if e.action is not None and e.action.kind.is_compute:
            computed.setdefault(e.action.stage, e.rank)
    out = {}
    for rank in timeline.ranks:
        mine = next((r.get("rank_of_stage") or {} for r in run.get("ranks", []) if r["rank"] == rank), {})
        for stage, holder in computed.items():
            out[(rank, stage)] = int(mine.get(str(stage), holder))
    return out


def _describe(event: TimelineEvent, sender: dict[tuple[int, int], int]) -> dict:
    """An event as the page draws it: its group (compute, recv, send, step), kind, stage, microbatch, text."""
    base = {"rank": event.rank, "name": event.name, "start": event.start, "end": event.end}
    action = event.action
    if action is None:
        return base | {"group": "step", "kind": "step", "what": f"{event.name} (the step's own work)"}
    base |= {"kind": action.kind.value, "stage": action.stage, "mb": action.mb}
    if action.kind.is_compute:
        what = f"{KIND_NAMES[action.kind]} of microbatch {action.mb} on stage {action.stage}"
        return base | {"group": "compute", "what": what}
    if action.peer is None:  # REDUCE: the stage's data-parallel gradient reduction, armed
        return base | {"group": "send", "what": f"gradient reduction of stage {action.stage} armed"}
    what = f"{_P2P_NAMES[action.kind]} of microbatch {action.mb}"
    peer_rank = sender.get((event.rank, action.peer))
    where = f"stage {action.peer}" + ("" if peer_rank is None else f" (rank {peer_rank})")
    if action.kind in (Kind.RECV_F, Kind.RECV_B):
        what += f" for stage {action.stage} from {where}"
        return base | {"group": "recv", "what": what, "peer": action.peer, "sender": peer_rank,
                       "waited": event.end - event.start}  # fmt: skip
    return base | {
        "group": "send",
        "what": what + f" from stage {action.stage} to {where}",
        "peer": action.peer,
    }
