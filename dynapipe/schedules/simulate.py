"""Replay a schedule against per-stage costs, and the timeline format real runs are recorded in.

The replay (the loop of :mod:`.replay`) is event-driven: each rank runs its list in order; an action
starts when its rank is free and its inputs have arrived -- a producer on the same rank when it
finished, on another rank after ``link_latency + bytes / link_bandwidth`` more, where ``bytes`` is what
that edge carries
(:meth:`StageCost.bytes_to`: a skip connection's mask is not charged as the hidden state next to it).
Sends never block and links never contend, which is the runtime's contract (asynchronous sends) and an
optimistic model of a real network: a transfer costs time only where its receiver waits for it.

:class:`Timeline` is deliberately plain data (a list of events, seconds from step start) so the runtime
records real steps in the same form and everything computed here -- makespan, bubble, in-flight
activations, Chrome trace -- works on measured runs too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

from .actions import Action, Kind, ScheduleError, normalize_table
from .placement import Placement, StageGraph, backward_kinds, inputs_of, placement_map
from .placement import stage_graph as _chain_plus
from .replay import replay

__all__ = ["PhaseCost", "StageCost", "Timeline", "TimelineEvent", "simulate"]


@dataclass(frozen=True)
class PhaseCost:
    """Seconds and FLOPs of one microbatch's three phases: forward (``F``), backward-input (``I``) and
    backward-weight (``W``; a full ``B`` is both). Defined once: a node's cost
    (:class:`dynapipe.cost.NodeCost`) and a stage's (:class:`StageCost`) are this record plus what each
    adds, and a stage's phases are the sum of its nodes' (:meth:`total`)."""

    forward: float = 0.0
    backward_input: float = 0.0
    backward_weight: float = 0.0
    forward_flops: int = 0
    backward_input_flops: int = 0
    backward_weight_flops: int = 0

    @staticmethod
    def total(costs: Iterable[PhaseCost]) -> PhaseCost:
        """The phases of work done one after another: each field summed."""
        items = list(costs)
        return PhaseCost(*(sum(getattr(c, f.name) for c in items) for f in fields(PhaseCost)))

    def duration(self, kind: Kind) -> float:
        return {
            Kind.F: self.forward,
            Kind.B: self.backward_input + self.backward_weight,
            Kind.I: self.backward_input,
            Kind.W: self.backward_weight,
        }[kind]

    @property
    def time_s(self) -> float:
        """Forward plus backward seconds of one microbatch."""
        return self.forward + self.backward_input + self.backward_weight

    @property
    def flops(self) -> int:
        """FLOPs of one training step of one microbatch (forward + backward)."""
        return self.forward_flops + self.backward_input_flops + self.backward_weight_flops


@dataclass(frozen=True)
class StageCost(PhaseCost):
    """Cost of one microbatch on one stage: the one record the cost model fills, the partitioner
    compares, the simulator replays and :func:`dynapipe.explain` prints. Times in seconds, sizes in bytes.

    ``send_bytes`` is the most the stage sends to any one other stage (its output activation; its
    gradient travels back with the same size); ``sends`` maps each later stage to what this one sends
    it (a tensor read by two later stages goes to each); the simulator charges each edge its own bytes
    (:meth:`bytes_to`). ``messages`` counts the tensors sent each later stage, ``grad_messages`` those
    of them whose gradient comes back (each a message of its own, whose CPU a caller may charge). The
    simulator reads the phase seconds and the sends; the cost model fills the rest too (``modules`` names the modules the stage covers, ``(part)`` marking one shared with another
    stage).
    """

    activation_bytes: int = 0
    send_bytes: int = 0
    index: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    sends: Mapping[int, int] = field(default_factory=dict, hash=False)
    messages: Mapping[int, int] = field(default_factory=dict, hash=False)
    grad_messages: Mapping[int, int] = field(default_factory=dict, hash=False)
    modules: tuple[str, ...] = ()
    n_nodes: int = 0

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def bytes_to(self, stage: int) -> int:
        """Bytes this stage sends ``stage`` (and gets back as gradients): ``sends[stage]``, or
        ``send_bytes`` on every edge of a hand-made cost without ``sends``."""
        return self.sends.get(stage, 0) if self.sends else self.send_bytes

    @property
    def next_bytes(self) -> int:
        """Bytes sent to the next stage."""
        return self.sends.get(self.index + 1, 0)

    def memory_bytes(self, in_flight: int = 1) -> int:
        """Peak bytes with ``in_flight`` microbatches' activations held (GPipe: all; 1F1B: stages - index)."""
        return self.state_bytes + in_flight * self.activation_bytes


@dataclass(frozen=True)
class TimelineEvent:
    """One span of one rank, seconds from step start. ``kind`` says what ``name`` is, so no reader guesses:
    ``"action"``, an action of the table in text form (``"2F0"``, ``"2SEND_F0->3"``); ``"step"``, a named
    piece of the step's own work outside the table (``"refresh shared state"``, ``"wait for sends"``)."""

    rank: int
    name: str
    start: float
    end: float
    kind: Literal["action", "step"] = "action"

    def __post_init__(self) -> None:
        if self.kind not in ("action", "step"):
            raise ScheduleError(
                f"timeline event {self.name!r}: kind is {self.kind!r}; use 'action' or 'step'"
            )
        _ = self.action  # an action's name must parse: fail where the event is made, not where it is read

    @functools.cached_property
    def action(self) -> Action | None:
        """The parsed action of an ``"action"`` event; None for a ``"step"``."""
        if self.kind == "step":
            return None
        try:
            return Action.parse(self.name)
        except ScheduleError:
            raise ScheduleError(
                f"timeline event {self.name!r} on rank {self.rank} is no action of a table; record it "
                "with kind='step'"
            ) from None


def _compute_action(event: TimelineEvent) -> Action | None:
    """The compute action an event ran; None for communication and the step's own work."""
    action = event.action
    return action if action is not None and action.kind.is_compute else None


def _category(event: TimelineEvent) -> str:
    """A trace slice's category: the compute kind (``F``, ``B``, ``I``, ``W``), ``comm`` or ``step``."""
    action = event.action
    if action is None:
        return "step"
    return action.kind.value if action.kind.is_compute else "comm"


@dataclass
class Timeline:
    """What one training step did, per rank; from :func:`simulate` or recorded by the runtime."""

    events: list[TimelineEvent] = field(default_factory=list)
    n_ranks: int = 0  # 0: the ranks that appear in events (one rank's own recording covers just that rank)
    # when the recorded step began, on the host's wall clock (events count from there): ranks start a step
    # at different times, and merging their recordings lines them up by it; 0.0 for a simulated step
    started: float = 0.0

    @property
    def ranks(self) -> list[int]:
        return list(range(self.n_ranks)) if self.n_ranks else sorted({e.rank for e in self.events})

    @property
    def makespan(self) -> float:
        """Step time: the last action's end (events count from step start)."""
        return max((e.end for e in self.events), default=0.0)

    def busy_time(self, rank: int) -> float:
        """Seconds ``rank`` spent computing (communication events do not count)."""
        return sum(e.end - e.start for e in self.events if e.rank == rank and _compute_action(e))

    @property
    def ideal_step_time(self) -> float:
        """The step time with no bubble: the busiest rank's compute time."""
        return max((self.busy_time(r) for r in self.ranks), default=0.0)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time: ``1 - compute / (n_ranks * makespan)``."""
        span = self.makespan * len(self.ranks)
        return 0.0 if span == 0 else 1.0 - sum(self.busy_time(r) for r in self.ranks) / span

    def in_flight_activations(self, weight: Mapping[int, float] | None = None) -> dict[int, float]:
        """Peak per rank of activations held: a (stage, mb) counts from its F's start until its B or W
        ends. ``weight`` maps stage -> bytes to get bytes instead of a count."""
        peaks: dict[int, float] = {}
        for rank in self.ranks:
            changes = []
            for event in self.events:
                action = _compute_action(event)
                if event.rank != rank or action is None:
                    continue
                size = 1 if weight is None else weight.get(action.stage, 0)
                if action.kind is Kind.F:
                    changes.append((event.start, 1, size))
                elif action.kind in (Kind.B, Kind.W):
                    changes.append((event.end, 0, -size))  # at equal times, release before acquiring
            held: float = 0
            peak: float = 0
            for _, _, delta in sorted(changes):
                held += delta
                peak = max(peak, held)
            peaks[rank] = peak
        return peaks

    @property
    def peak_in_flight_activations(self) -> dict[int, int]:
        """Peak number of (stage, mb) activations each rank held (see :meth:`in_flight_activations`)."""
        return {rank: int(n) for rank, n in self.in_flight_activations().items()}

    def to_chrome_trace(self) -> dict:
        """chrome://tracing / Perfetto JSON: one process per rank, one slice per event (microseconds); its
        category is the compute kind, ``comm`` or ``step``, and ``args.kind`` the event's kind."""
        meta = [
            {"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}} for r in self.ranks
        ]
        slices = [
            {
                "name": e.name,
                "cat": _category(e),
                "ph": "X",
                "pid": e.rank,
                "tid": 0,
                "ts": e.start * 1e6,
                "dur": (e.end - e.start) * 1e6,
                "args": {"kind": e.kind},
            }
            for e in self.events
        ]
        return {"traceEvents": meta + slices, "displayTimeUnit": "ms"}


def _per_stage(
    costs: StageCost | Sequence[StageCost] | Mapping[int, StageCost], n_stages: int
) -> list[StageCost]:
    if isinstance(costs, StageCost):
        return [costs] * n_stages
    by_stage = dict(costs) if isinstance(costs, Mapping) else dict(enumerate(costs))
    missing = [s for s in range(n_stages) if s not in by_stage]
    if missing:
        raise ScheduleError(
            f"costs has no StageCost for stages {missing}; give one per stage 0..{n_stages - 1}"
        )
    return [by_stage[s] for s in range(n_stages)]


def simulate(
    table: Mapping[int, Sequence[Action | str | None]],
    costs: StageCost | Sequence[StageCost] | Mapping[int, StageCost],
    *,
    n_ranks: int,
    n_stages: int,
    placement: Placement,
    link_latency: float = 0.0,
    link_bandwidth: float = math.inf,
    edges: Iterable[tuple[int, int]] | None = None,
    stage_graph: StageGraph | None = None,
    durations: Mapping[Action, float] | None = None,
) -> Timeline:
    """The timeline of one step of ``table`` (compute-only or lowered; comms are modelled by the link).
    Raises :class:`ScheduleError` if the table cannot complete.

    ``costs`` is one :class:`StageCost` for all stages, a list, or a ``{stage: cost}`` dict;
    ``durations`` gives single actions another duration (ranks that share cores: :mod:`.sharing`).
    """
    table = normalize_table(table)
    per_stage = _per_stage(costs, n_stages)
    graph = stage_graph if stage_graph is not None else _chain_plus(n_stages, edges)
    rank_of = placement_map(placement, n_ranks=n_ranks, n_stages=n_stages)
    kinds = backward_kinds(table)
    work = {r: [a for a in table.get(r, []) if a is not None and a.kind.is_compute] for r in range(n_ranks)}
    outside = [a for acts in work.values() for a in acts if not 0 <= a.stage < n_stages]
    if outside:
        raise ScheduleError(f"{outside[0]}: stage {outside[0].stage} is outside 0..{n_stages - 1}")

    def arrival(dep: Action, action: Action, finished: float) -> float:
        if rank_of[dep.stage] == rank_of[action.stage]:
            return finished
        # a value moves producer -> consumer, its gradient back over the same edge with the same size
        producer, consumer = (dep.stage, action.stage) if dep.kind is Kind.F else (action.stage, dep.stage)
        return finished + link_latency + per_stage[producer].bytes_to(consumer) / link_bandwidth

    finish: dict[Action, float] = {}
    free, seconds = dict.fromkeys(work, 0.0), durations or {}
    events: list[TimelineEvent] = []

    def advance(rank: int, action: Action) -> bool:
        deps = inputs_of(action, graph, kinds)
        if any(d not in finish for d in deps):
            return False
        start = max([free[rank], *(arrival(d, action, finish[d]) for d in deps)])
        finish[action] = free[rank] = end = start + seconds.get(
            action, per_stage[action.stage].duration(action.kind)
        )
        events.append(TimelineEvent(rank, str(action), start, end))
        return True

    stuck = replay(work, advance)
    if stuck:
        waits = [
            f"rank {r} waits at {_waiting(work[r][at], graph, kinds, finish)}" for r, at in stuck.items()
        ]
        raise ScheduleError(f"simulation cannot go on: {'; '.join(waits)}, {_NEVER}")
    events.sort(key=lambda e: (e.start, e.rank))
    return Timeline(events=events, n_ranks=n_ranks)


_NEVER = "which never run; validate() names the missing action or the deadlock cycle"


def _waiting(action: Action, graph: StageGraph, kinds: Mapping, finish: Mapping[Action, float]) -> str:
    """``"1F1 for 0F1"``: an action the replay stopped at and the inputs it still lacks."""
    return f"{action} for {', '.join(str(d) for d in inputs_of(action, graph, kinds) if d not in finish)}"
