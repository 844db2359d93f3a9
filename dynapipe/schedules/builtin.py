"""The builtin schedules as pure functions, and the registry that names them.

Every generator has the signature ``fn(n_ranks, n_stages, n_microbatches) -> {rank: [Action, ...]}`` and
emits compute actions only (F, B, I, W); :func:`dynapipe.schedules.lower` adds the communication. Lists
hold no idle slots: when an action starts is decided by its inputs (see :mod:`.simulate`), the list only
fixes the order. Notation below: ``p`` ranks, ``m`` microbatches, ``v`` stages per rank.

=================  =========  ==============  =============================================================
name               placement  stages / rank   order on rank ``r``
=================  =========  ==============  =============================================================
gpipe              loop       1               all F (mb 0..m-1), then all B in the same order
1f1b               loop       1               ``p-1-r`` warm-up F, then F/B pairs, then the remaining B
interleaved-1f1b   loop       v (any)         1F1B over "virtual" microbatches that visit all v chunks
zb-h1              loop       1               1F1B with B split; W deferred until ``p`` are in flight
zbv                v          2               the V of Qi et al. (2024); at most ``2p`` chunk activations
=================  =========  ==============  =============================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from ._zbv import zbv_order
from .actions import Action, Kind, ScheduleError, Table, load_schedule, normalize_table, parse_schedule
from .placement import Placement, infer_placement

__all__ = [
    "SCHEDULES",
    "ScheduleFn",
    "ScheduleSpec",
    "get_schedule",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "zb_h1",
    "zbv",
]

ScheduleFn = Callable[[int, int, int], Mapping[int, Sequence["Action | str | None"]]]


def _require(n_ranks: int, n_stages: int, n_microbatches: int, *, name: str, per_rank: int | None) -> int:
    """Check the sizes once, at the edge, and return stages per rank."""
    if n_ranks < 1 or n_microbatches < 1:
        raise ScheduleError(f"{name}: n_ranks ({n_ranks}) and n_microbatches ({n_microbatches}) must be >= 1")
    if n_stages < n_ranks or n_stages % n_ranks:
        raise ScheduleError(
            f"{name}: n_stages ({n_stages}) must be a positive multiple of n_ranks ({n_ranks})"
        )
    v = n_stages // n_ranks
    if per_rank is not None and v != per_rank:
        raise ScheduleError(
            f"{name} runs {per_rank} stage(s) per rank: use n_stages={per_rank * n_ranks} for {n_ranks} ranks "
            f"(got {n_stages})"
        )
    return v


def gpipe(n_ranks: int, n_stages: int, n_microbatches: int) -> Table:
    """Fill-drain (GPipe): every forward, then every backward, backwards in microbatch order 0..m-1.

    Forward order for the backward frees the oldest activations first; either order gives the same
    ``(m + p - 1) (f + b)`` step with uniform costs, and all ``m`` activations are held at the peak.
    """
    _require(n_ranks, n_stages, n_microbatches, name="gpipe", per_rank=1)
    mbs = range(n_microbatches)
    table: Table = {
        r: [*(Action(r, Kind.F, k) for k in mbs), *(Action(r, Kind.B, k) for k in mbs)]
        for r in range(n_ranks)
    }
    return table


def one_f_one_b(n_ranks: int, n_stages: int, n_microbatches: int) -> Table:
    """1F1B (PipeDream-flush): ``p-1-r`` warm-up forwards, alternate F/B, then drain the backwards.

    Same bubble as GPipe, but rank ``r`` holds at most ``p - r`` activations instead of ``m``.
    """
    _require(n_ranks, n_stages, n_microbatches, name="1f1b", per_rank=1)
    table: Table = {}
    for r in range(n_ranks):
        warmup = min(n_ranks - 1 - r, n_microbatches)
        ops: list[Action | None] = [Action(r, Kind.F, k) for k in range(warmup)]
        for k in range(n_microbatches - warmup):
            ops += [Action(r, Kind.F, warmup + k), Action(r, Kind.B, k)]
        ops += [Action(r, Kind.B, k) for k in range(n_microbatches - warmup, n_microbatches)]
        table[r] = ops
    return table


def interleaved_1f1b(n_ranks: int, n_stages: int, n_microbatches: int) -> Table:
    """Interleaved 1F1B (Megatron-LM virtual stages): rank ``r`` holds chunks ``r, r+p, ...`` (v of them).

    Microbatches go through in groups of ``p``: a group runs chunk 0 on every rank, then chunk 1, ...,
    which is why ``m`` must be a multiple of ``p``. Each rank runs the resulting ``v*m`` "virtual"
    forwards and backwards as 1F1B after Megatron's ``(v-1)p + 2(p-1-r)`` warm-up forwards. ``(v-1)p +
    p-1-r`` would be just enough for the first backward of the last chunk to come round; the other
    ``p-1-r`` give every later backward a forward's worth of slack, so a gradient that is still on the
    wire does not stall the rank (in the simulator with link latency, the shorter warm-up is up to 10%
    slower at p=4). They cost ``p-1-r`` more activations held. The bubble shrinks by ``v`` against 1F1B.
    For ``v = 2`` and ``m`` a multiple of ``p`` the order is torch.distributed.pipelining's
    ``ScheduleInterleaved1F1B``.
    """
    v = _require(n_ranks, n_stages, n_microbatches, name="interleaved-1f1b", per_rank=None)
    p, m = n_ranks, n_microbatches
    if m % p:
        fits = ", ".join(str(p * i) for i in range(max(1, m // p), m // p + 3))
        raise ScheduleError(
            f"interleaved-1f1b needs n_microbatches ({m}) to be a multiple of n_ranks ({p}); use {fits}"
        )

    def virtual(r: int, index: int, *, backward: bool) -> Action:
        group, within = divmod(index, p * v)
        chunk = within // p
        if backward:
            chunk = v - 1 - chunk
        return Action(chunk * p + r, Kind.B if backward else Kind.F, group * p + within % p)

    table: Table = {}
    total = v * m
    for r in range(p):
        warmup = min((v - 1) * p + 2 * (p - 1 - r), total)
        ops: list[Action | None] = [virtual(r, i, backward=False) for i in range(warmup)]
        for i in range(total - warmup):
            ops += [virtual(r, warmup + i, backward=False), virtual(r, i, backward=True)]
        ops += [virtual(r, i, backward=True) for i in range(total - warmup, total)]
        table[r] = ops
    return table


def zb_h1(n_ranks: int, n_stages: int, n_microbatches: int) -> Table:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 3.1): 1F1B with B split in I+W.

    Only I is on the critical path, so backward reaches rank 0 sooner. Rank ``r`` starts like 1F1B
    (``p-1-r`` warm-up forwards, then F/I pairs) but defers each W until it holds ``p`` activations --
    rank 0's 1F1B peak, so no rank exceeds it -- and in the cool-down alternates I and W so the
    deferred W fill the tail bubbles. The bubble is ``(p-1)(f + i - w)`` against 1F1B's ``(p-1)(f + i + w)``.
    """
    _require(n_ranks, n_stages, n_microbatches, name="zb-h1", per_rank=1)
    p, m = n_ranks, n_microbatches
    cap = min(p, m)
    table: Table = {}
    for r in range(p):
        nf = min(p - 1 - r, m)
        ni = nw = 0
        ops: list[Action | None] = [Action(r, Kind.F, k) for k in range(nf)]
        while nf < m:
            ops += [Action(r, Kind.F, nf), Action(r, Kind.I, ni)]
            nf, ni = nf + 1, ni + 1
            if nf - nw >= cap:
                ops.append(Action(r, Kind.W, nw))
                nw += 1
        while ni < m:
            ops.append(Action(r, Kind.I, ni))
            ni += 1
            if nw < ni:
                ops.append(Action(r, Kind.W, nw))
                nw += 1
        ops += [Action(r, Kind.W, k) for k in range(nw, m)]
        table[r] = ops
    return table


def zbv(n_ranks: int, n_stages: int, n_microbatches: int) -> Table:
    """ZB-V (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory"): two chunks per rank in a V.

    Rank ``r`` holds stages ``r`` and ``2p-1-r``, so the loss and the first backward sit on rank 0 next to
    the input. The order is the paper's V construction (:mod:`._zbv`; torch's ``ScheduleZBVZeroBubble``
    runs the same), which holds at most ``2p`` chunk activations per rank (the memory of 1F1B's ``p``
    whole-stage activations). With fewer than ``2p`` microbatches a list schedule (:mod:`._greedy`)
    replaces it where the simulator finds that faster.
    """
    _require(n_ranks, n_stages, n_microbatches, name="zbv", per_rank=2)
    return zbv_order(n_ranks, n_microbatches)


@dataclass(frozen=True)
class ScheduleSpec:
    """A named schedule: how to build its table and what the runtime must set up for it.

    ``stages_per_rank`` is ``None`` when any count works (interleaved: the user's ``v``; user tables and
    callables), and ``default_stages_per_rank`` is then the count used when the user gives none;
    ``splits_backward`` is ``None`` when only the built table can tell (then look for I/W).
    """

    name: str
    fn: ScheduleFn
    placement: Placement
    stages_per_rank: int | None
    splits_backward: bool | None
    default_stages_per_rank: int = 1

    def n_stages(self, n_ranks: int, *, stages_per_rank: int | None = None) -> int:
        """The stage count to partition into for ``n_ranks`` ranks."""
        fixed = self.stages_per_rank
        if fixed is not None and stages_per_rank not in (None, fixed):
            raise ScheduleError(
                f"schedule {self.name!r} runs {fixed} stage(s) per rank, not {stages_per_rank}; use "
                "'interleaved-1f1b' for any number of stages per rank (or 'zbv' for 2)"
            )
        return n_ranks * (fixed or stages_per_rank or self.default_stages_per_rank)

    def build(self, *, n_ranks: int, n_stages: int, n_microbatches: int) -> Table:
        """The compute table, with strings parsed and ranks sorted (not yet validated)."""
        return normalize_table(self.fn(n_ranks, n_stages, n_microbatches))


def _builtin(
    name: str, fn: ScheduleFn, placement: str, per_rank: int | None, splits: bool, default_per_rank: int = 1
) -> ScheduleSpec:
    return ScheduleSpec(name, fn, placement, per_rank, splits, default_per_rank)


SCHEDULES: Mapping[str, ScheduleSpec] = MappingProxyType(
    {
        "gpipe": _builtin("gpipe", gpipe, "loop", 1, False),
        "1f1b": _builtin("1f1b", one_f_one_b, "loop", 1, False),
        "interleaved-1f1b": _builtin("interleaved-1f1b", interleaved_1f1b, "loop", None, False, 2),
        "zb-h1": _builtin("zb-h1", zb_h1, "loop", 1, True),
        "zbv": _builtin("zbv", zbv, "v", 2, True),
    }
)
"""The builtin schedules by name (read-only; pass your own callable or table to :func:`get_schedule`)."""


def _table_spec(name: str, table: Table, placement: Placement | None) -> ScheduleSpec:
    stages = {a.stage for acts in table.values() for a in acts if a is not None}
    n_ranks = len(table)
    per_rank = len(stages) // n_ranks if n_ranks and len(stages) % n_ranks == 0 else None
    splits = any(a is not None and a.kind in (Kind.I, Kind.W) for acts in table.values() for a in acts)

    def fixed(n_ranks: int, n_stages: int, n_microbatches: int) -> Table:
        return {rank: list(actions) for rank, actions in table.items()}

    return ScheduleSpec(
        name=name,
        fn=fixed,
        placement=infer_placement(table) if placement is None else placement,
        stages_per_rank=per_rank,
        splits_backward=splits,
    )


def get_schedule(
    schedule: str | os.PathLike | ScheduleFn | Mapping[int, Sequence[Action | str | None]] | ScheduleSpec,
    *,
    placement: Placement | None = None,
) -> ScheduleSpec:
    """Resolve what a user passed as ``schedule=`` into a :class:`ScheduleSpec`.

    Accepts a builtin name (case and ``_``/``-`` do not matter), a path to a text or ``.csv`` table, the
    text of a table itself, a table ``{rank: [Action | "0F1" | None]}``, a generator with the builtin
    signature, or a spec. ``placement`` overrides the spec's; tables default to the placement they show,
    callables to ``"loop"``.
    """
    if isinstance(schedule, ScheduleSpec):
        return schedule if placement is None else replace(schedule, placement=placement)
    if isinstance(schedule, Mapping):
        return _table_spec("custom", normalize_table(schedule), placement)
    if isinstance(schedule, (str, os.PathLike)):
        text = os.fspath(schedule)
        key = text.strip().lower().replace("_", "-")
        key = {"1f1b-interleaved": "interleaved-1f1b", "one-f-one-b": "1f1b", "zb-v": "zbv"}.get(key, key)
        if key in SCHEDULES:
            spec = SCHEDULES[key]
            return spec if placement is None else replace(spec, placement=placement)
        if "\n" not in text and Path(text).is_file():
            return _table_spec(Path(text).stem, load_schedule(text), placement)
        if "\n" in text or text.lstrip().lower().startswith("rank"):
            return _table_spec("custom", parse_schedule(text), placement)
        raise ScheduleError(
            f"unknown schedule {text!r}: use one of {sorted(SCHEDULES)}, a path to a .txt/.csv table, "
            "a {rank: [actions]} dict, or a callable fn(n_ranks, n_stages, n_microbatches)"
        )
    if callable(schedule):
        name = getattr(schedule, "__name__", "custom")
        return ScheduleSpec(
            name=name,
            fn=schedule,
            placement="loop" if placement is None else placement,
            stages_per_rank=None,
            splits_backward=None,
        )
    raise ScheduleError(
        f"schedule={schedule!r} is not a name, path, table, callable or ScheduleSpec; "
        f"builtin names: {sorted(SCHEDULES)}"
    )
