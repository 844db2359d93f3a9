"""A run saved as JSON: what the run page (:mod:`.report`) shows and ``python -m dynapipe.viz report`` reads.

:func:`dynapipe.viz.write_report` writes one beside each page (``page.json`` beside ``page.html``);
:func:`save_run` / :func:`load_run` write and read one. The format is one JSON object:

- ``format``: ``"dynapipe-run"``; ``version``: 1; ``title``; ``created`` (ISO time, UTC)
- ``versions``: ``python``, ``torch``, ``transformers`` (null where it is not installed), ``dynapipe``
- ``options``: the options given to ``torch.compile`` (a value JSON cannot hold as its ``repr``), or null;
  ``schedule``: the schedule's name (the options', else the default), or null where not known
- ``ranks``: per rank ``{"rank", "stages": [...], "rank_of_stage": {"stage": rank}}``: the stages it ran
  and, in its data-parallel replica, the rank holding each stage (the sender of its receives)
- ``timeline``: ``{"n_ranks", "events": [{"rank", "name", "start", "end", "kind"}]}``, the measured step as
  :class:`~dynapipe.schedules.Timeline` holds it: seconds from each rank's start of the step; ``kind``
  ``"action"`` (``name`` is an action: ``1F0``, ``1RECV_F0<-0``, whose span is the rank's wait for it) or
  ``"step"`` (the step's own named work)
- ``plan``: null, or the plan that ran: ``title``, ``partition_svg`` (the picture of
  :func:`~dynapipe.viz.partition_svg`), ``n_microbatches``, ``microbatch_size``, ``predicted_step_s`` and
  ``predicted_bubble`` (null where the plan simulated no step), ``beside`` (``Explanation.beside``'s line),
  ``rates`` (``Rates.describe()``: what the predicted seconds are in; absent in older runs) and ``stages``: per stage ``index``, ``n_nodes``, ``modules``, ``bits`` (modules it holds a few nodes of),
  ``shared`` (tied state -> the stages reading it), ``params`` and the tensors it ``sends`` and
  ``receives`` (``[{"stage", "bytes", "tensors": [{"name", "shape", "dtype", "bytes"}]}]``, per
  microbatch; the receiver's ``stage`` is the sender), ``compute_s`` (``forward``, ``backward_input``,
  ``backward_weight`` per microbatch) and ``memory_bytes`` (``params``, ``grads``, ``optimizer``,
  ``activations`` of one microbatch), as the plan estimated them
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..schedules import Timeline, TimelineEvent
from .partition import crossing_tensors, shared_state, stage_modules, title_of
from .partition_picture import partition_svg

if TYPE_CHECKING:
    import torch.fx as fx

    from ..plan.explanation import Explanation
    from ..schedules import StageCost

__all__ = ["FORMAT", "load_run", "run_data", "save_run", "timeline_of"]

FORMAT, VERSION = "dynapipe-run", 1


def versions() -> dict[str, str | None]:
    """The versions a run's page names: Python, torch, transformers (None where not installed), dynapipe."""

    def installed(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "dynapipe": installed("dynapipe"),
    }


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        text = repr(value)
        return text if len(text) <= 200 else text[:199] + "…"


def timeline_data(timeline: Timeline) -> dict:
    events = [
        {"rank": e.rank, "name": e.name, "start": e.start, "end": e.end, "kind": e.kind}
        for e in timeline.events
    ]
    return {"n_ranks": timeline.n_ranks, "events": events}


def timeline_of(run: Mapping[str, Any]) -> Timeline:
    """The measured step of a saved run, as a :class:`~dynapipe.schedules.Timeline`."""
    data = run["timeline"]
    return Timeline([TimelineEvent(**e) for e in data["events"]], n_ranks=data["n_ranks"])


def run_data(
    timeline: Timeline,
    ranks: list[dict],
    *,
    plan: Explanation | None = None,
    options: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> dict:
    """The saved run (see the module docstring) of the merged ``timeline`` and the ranks' stage maps."""
    schedule = None
    if options is not None:
        schedule = options.get("schedule", "1f1b")  # PipelineConfig's default
        schedule = schedule if isinstance(schedule, str) else _jsonable(schedule)
    n_ranks = len(timeline.ranks)
    return {
        "format": FORMAT,
        "version": VERSION,
        "title": title or f"dynapipe run: {n_ranks} ranks" + (f", {schedule}" if schedule else ""),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "options": None if options is None else {str(k): _jsonable(v) for k, v in options.items()},
        "schedule": schedule,
        "ranks": ranks,
        "timeline": timeline_data(timeline),
        "plan": None if plan is None else plan_data(plan, timeline),
    }


def plan_data(plan: Explanation, measured: Timeline) -> dict:
    """The partition and its estimates, as the page shows them (no graph objects: plain JSON)."""
    crossing = crossing_tensors(plan)
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    shared = shared_state(plan)
    params = _params_of(plan)
    stages = []
    for s, (held, bits) in zip(plan.stages, stage_modules(plan), strict=True):
        stages.append(
            {
                "index": s.index,
                "n_nodes": s.n_nodes,
                "modules": held,
                "bits": bits,
                "shared": {name: readers for name, readers in shared.items() if s.index in readers},
                "params": params.get(s.index, []),
                "sends": _links(crossing, nodes, plan.stages, src=s.index),
                "receives": _links(crossing, nodes, plan.stages, dst=s.index),
                "compute_s": {
                    "forward": s.forward,
                    "backward_input": s.backward_input,
                    "backward_weight": s.backward_weight,
                },
                "memory_bytes": {
                    "params": s.param_bytes,
                    "grads": s.grad_bytes,
                    "optimizer": s.optimizer_bytes,
                    "activations": s.activation_bytes,
                },
            }
        )
    predicted = plan.predicted
    return {
        "title": f"Partition into {title_of(plan)}",
        "partition_svg": partition_svg(plan),
        "n_microbatches": plan.captured.n_microbatches,
        "microbatch_size": plan.captured.microbatch_size,
        "predicted_step_s": None if predicted is None else predicted.makespan,
        "predicted_bubble": None if predicted is None else predicted.bubble_fraction,
        "beside": plan.beside(measured),
        "rates": plan.rates.describe(),  # what the predicted seconds are in (measured, nominal, loaded)
        "stages": stages,
    }


def _tensor(name: str, value: Any) -> dict:
    """A tensor's name, shape, dtype and bytes (None where the graph holds no example of it)."""
    if not isinstance(value, torch.Tensor):
        return {"name": name, "shape": None, "dtype": None, "bytes": None}
    shape = [int(d) if isinstance(d, int) else str(d) for d in value.shape]
    nbytes = value.numel() * value.element_size() if all(isinstance(d, int) for d in shape) else None
    return {"name": name, "shape": shape, "dtype": str(value.dtype).removeprefix("torch."), "bytes": nbytes}


def _links(
    crossing: dict[tuple[int, int], list[str]],
    nodes: dict[str, fx.Node],
    stages: list[StageCost],
    *,
    src: int | None = None,
    dst: int | None = None,
) -> list[dict]:
    """The stages ``src`` sends to (or ``dst`` receives from), each with the tensors that cross and the
    bytes the plan counted for them (a tensor's own bytes are None where its shape is symbolic)."""
    links = []
    for (a, b), names in sorted(crossing.items()):
        if (src is not None and a != src) or (dst is not None and b != dst):
            continue
        tensors = [_tensor(n, nodes[n].meta.get("example_value")) for n in names]
        total = stages[a].sends.get(b) or sum(t["bytes"] or 0 for t in tensors)
        links.append({"stage": b if src is not None else a, "bytes": total, "tensors": tensors})
    return links


def _params_of(plan: Explanation) -> dict[int, list[dict]]:
    """Stage -> the parameters and buffers it reads (by the model's names), a tied one on every reader."""
    gm, stage_of = plan.captured.gm, plan.stage_of
    last = len(plan.stages) - 1
    names = plan.captured.state_names
    out: dict[int, list[dict]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        info = _tensor(names.get(str(node.target), str(node.target)), value)
        for stage in sorted({stage_of.get(u, last) for u in node.users}):
            out.setdefault(stage, []).append(info)
    return out


def save_run(run: Mapping[str, Any], path: str | Path) -> Path:
    """Write a saved run (from :func:`run_data`, or read by :func:`load_run`) as JSON."""
    path = Path(path)
    path.write_text(json.dumps(run, indent=1), encoding="utf-8")
    return path


def load_run(path: str | Path) -> dict:
    """Read a saved run, failing with what to do when the file is not one."""
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the run {path}: {err}") from None
    if not isinstance(run, dict) or run.get("format") != FORMAT:
        raise ConfigError(
            f'{path} is no saved dynapipe run (no "format": "{FORMAT}"); write one with '
            "dynapipe.viz.write_report(...), which saves the run beside the page"
        )
    if run.get("version", 0) > VERSION:
        raise ConfigError(f"{path} is a run of format version {run['version']}; upgrade dynapipe to read it")
    return run
