"""Actions, the words of a schedule, and their text forms.

A schedule is a table ``{rank: [Action | None, ...]}``: each rank runs its list in order, ``None`` is an
idle slot (kept only to line tables up for people; nothing waits on it). The same table feeds the
runtime, the simulator, the validator and the timeline picture, so it has one compact, lossless text form:

* compute actions ``<stage><kind><microbatch>``: ``2F0`` (stage 2, forward, microbatch 0), ``1B3`` (full
  backward), ``1I3`` (backward for inputs only), ``0W1`` (backward for weights only);
* communication actions, added by :func:`dynapipe.schedules.lower`, name the local stage first and the
  peer stage after an arrow that points the way the tensor travels: ``2SEND_F0->3`` (stage 2 sends the
  activation of microbatch 0 to stage 3), ``3RECV_F0<-2``, ``3SEND_B0->2`` (input-gradient back to stage
  2), ``2RECV_B0<-3``;
* ``1REDUCE3`` arms stage 1's data-parallel gradient reduction (DDP's bucket all-reduces, started by
  autograd hooks) for the weight-gradient work on microbatch 3 that follows it: the stage's last;
* a table is one line per rank, ``rank 0: 0F0 0F1 _ 0B0 0B1``, with ``_`` or ``-`` for an idle slot;
  ``#`` starts a comment. A CSV file holds one row per rank and one cell per action (an optional first
  cell ``rank 0``; empty cells are idle slots, trailing empty cells are dropped). torch.distributed.pipelining's
  CSV (cells such as ``1SEND_F0``, no peer) reads too, for chains of stages: see :func:`dump_torch_csv`.
"""

from __future__ import annotations

import csv
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ScheduleError

__all__ = [
    "Action",
    "Kind",
    "ScheduleError",
    "Table",
    "dump_torch_csv",
    "format_schedule",
    "load_schedule",
    "normalize_table",
    "parse_schedule",
]


class Kind(str, enum.Enum):
    """What an action does. ``B`` = ``I`` + ``W``: a schedule uses either ``B`` or both halves per (stage, mb)."""

    F = "F"  # forward
    B = "B"  # full backward: input and weight gradients
    I = "I"  # noqa: E741 -- backward for the input gradient only (the part on the critical path)
    W = "W"  # backward for the weight gradient only (can fill bubbles)
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    REDUCE = "REDUCE"  # data-parallel gradient reduction armed for the weight-gradient work that follows

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE

    @property
    def is_p2p(self) -> bool:
        """A send or receive between two stages: the only kinds that name a peer stage."""
        return self in _P2P

    @property
    def is_backward(self) -> bool:
        """B or I: the actions that produce a stage's input gradient."""
        return self in (Kind.B, Kind.I)

    def __str__(self) -> str:
        return self.value


_COMPUTE = frozenset({Kind.F, Kind.B, Kind.I, Kind.W})
_SENDS = frozenset({Kind.SEND_F, Kind.SEND_B})
_P2P = _SENDS | {Kind.RECV_F, Kind.RECV_B}
# Longest names first so that "SEND_F" is not read as stage, "S"...
_ACTION_RE = re.compile(
    r"^(?P<stage>\d+)(?P<kind>SEND_F|SEND_B|RECV_F|RECV_B|REDUCE|F|B|I|W)(?P<mb>\d+)"
    r"(?:(?P<arrow>->|<-)(?P<peer>\d+))?$"
)
_IDLE = frozenset({"_", "-", ""})


@dataclass(frozen=True, order=True, repr=False)
class Action:
    """One step of one rank: ``kind`` of microbatch ``mb`` on ``stage``; ``peer`` is the remote stage of a
    send or receive (``None`` otherwise)."""

    stage: int
    kind: Kind
    mb: int
    peer: int | None = None

    def __post_init__(self) -> None:
        # Accept Kind("F") and "F" alike; a frozen dataclass needs object.__setattr__ to coerce.
        object.__setattr__(self, "kind", Kind(self.kind))
        if not self.kind.is_p2p and self.peer is not None:
            raise ScheduleError(f"action {self.stage}{self.kind}{self.mb} cannot have a peer ({self.peer})")
        if self.kind.is_p2p and self.peer is None:
            raise ScheduleError(
                f"communication action {self.stage}{self.kind}{self.mb} needs peer=<remote stage>"
            )

    def __str__(self) -> str:
        text = f"{self.stage}{self.kind.value}{self.mb}"
        if self.peer is None:
            return text
        return f"{text}{'->' if self.kind in _SENDS else '<-'}{self.peer}"

    def __repr__(self) -> str:
        return f"Action.parse({str(self)!r})"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Inverse of ``str(action)``: ``Action.parse("2F0") == Action(2, Kind.F, 0)``."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ScheduleError(
                f"cannot read action {text!r}: write <stage><kind><microbatch> such as '2F0', '1B3', "
                "'1I3', '0W1', or a communication action such as '2SEND_F0->3', '3RECV_F0<-2'"
            )
        kind = Kind(match["kind"])
        peer = None if match["peer"] is None else int(match["peer"])
        if kind.is_p2p:
            want = "->" if kind in _SENDS else "<-"
            if match["arrow"] != want:
                raise ScheduleError(f"cannot read action {text!r}: {kind.value} takes '{want}<peer stage>'")
        elif peer is not None:
            raise ScheduleError(f"cannot read action {text!r}: only sends and receives take a peer stage")
        return cls(int(match["stage"]), kind, int(match["mb"]), peer)


Table = dict[int, list[Action | None]]
"""A schedule: each rank's actions in the order it runs them (``None`` = idle slot)."""


def _coerce(item: Action | str | None) -> Action | None:
    if item is None or isinstance(item, Action):
        return item
    if isinstance(item, str):
        return None if item.strip() in _IDLE else Action.parse(item)
    raise ScheduleError(f"schedule entry {item!r} is neither an Action, a string such as '0F1', nor None")


def normalize_table(table: Mapping[int, Iterable[Action | str | None]]) -> Table:
    """Copy a user table into canonical form: int ranks in order, strings parsed into Actions."""
    try:
        items = sorted((int(rank), actions) for rank, actions in table.items())
    except (TypeError, ValueError) as err:
        raise ScheduleError(f"schedule ranks must be integers, got {list(table)}") from err
    return {rank: [_coerce(item) for item in actions] for rank, actions in items}


def format_schedule(table: Mapping[int, Iterable[Action | None]]) -> str:
    """The text form, one line per rank: ``rank 0: 0F0 0F1 _ 0B0``; columns are padded to line up."""
    rows = {rank: ["_" if a is None else str(a) for a in acts] for rank, acts in sorted(table.items())}
    width = max((len(cell) for cells in rows.values() for cell in cells), default=1)
    return "\n".join(
        f"rank {rank}: " + " ".join(cell.ljust(width) for cell in cells).rstrip()
        for rank, cells in rows.items()
    )


_RANK_RE = re.compile(r"^\s*rank\s+(\d+)\s*:?\s*(.*)$", re.IGNORECASE)


def parse_schedule(text: str) -> Table:
    """Inverse of :func:`format_schedule`. Lines may omit ``rank N:``; they then take the next rank number."""
    table: Table = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _RANK_RE.match(line)
        rank, body = (int(match[1]), match[2]) if match else (len(table), line)
        if rank in table:
            raise ScheduleError(f"line {lineno}: rank {rank} appears twice; give each rank one line")
        try:
            table[rank] = [_coerce(token) for token in body.split()]
        except ScheduleError as err:
            raise ScheduleError(f"line {lineno}: {err}") from None
    if not table:
        raise ScheduleError("schedule text has no ranks: write one line per rank, e.g. 'rank 0: 0F0 0B0'")
    return dict(sorted(table.items()))


_TORCH_P2P_RE = re.compile(r"^(?P<stage>\d+)(?P<kind>SEND_F|SEND_B|RECV_F|RECV_B)(?P<mb>\d+)$")
_TORCH_ONLY = ("UNSHARD", "RESHARD", "REDUCE_GRAD", "OVERLAP_F_B")
# where a chain's message goes, by direction of travel: a forward send goes down, a gradient up
_CHAIN_PEER = {Kind.SEND_F: 1, Kind.RECV_F: -1, Kind.SEND_B: -1, Kind.RECV_B: 1}


def _csv_cell(text: str) -> Action | None:
    """A cell of our CSV, or of torch.distributed.pipelining's, whose sends and receives name no peer:
    on a chain of stages the peer is the next stage down (forward) or up (gradient)."""
    text = text.strip()
    match = _TORCH_P2P_RE.match(text)
    if match is None:
        if any(kind in text for kind in _TORCH_ONLY):
            raise ScheduleError(
                f"{text!r}: torch.distributed.pipelining's {', '.join(_TORCH_ONLY)} actions (FSDP and fused "
                "F+B) have no dynapipe counterpart; remove them (data parallelism is dynapipe's dp_degree)"
            )
        return _coerce(text)
    kind = Kind(match["kind"])
    stage = int(match["stage"])
    return Action(stage, kind, int(match["mb"]), stage + _CHAIN_PEER[kind])


def dump_torch_csv(table: Mapping[int, Iterable[Action | None]], path: str | Path) -> None:
    """Write ``table`` as torch.distributed.pipelining's CSV (``schedule._load_csv(path)`` reads it): one row
    per rank, ``0F1``-style cells, sends and receives without their peer, so only between neighbouring
    stages of a chain. A REDUCE has no counterpart there (torch's REDUCE_GRAD reduces after the backward,
    for FSDP): such a table, or one with a skip connection, is refused rather than written wrong."""
    rows = []
    for rank in range(max(table, default=-1) + 1):
        cells = []
        for action in table.get(rank, []):
            if action is None:
                cells.append("")
            elif action.kind is Kind.REDUCE:
                raise ScheduleError(
                    f"{action} on rank {rank}: torch.distributed.pipelining's CSV has no action that arms DDP; "
                    "export the table without data parallelism (its DDP wrappers reduce on their own)"
                )
            elif action.kind.is_p2p:
                assert action.peer is not None
                if action.peer != action.stage + _CHAIN_PEER[action.kind]:
                    raise ScheduleError(
                        f"{action} on rank {rank}: torch's CSV names no peer stage, so it holds only messages "
                        "between neighbouring stages; this one skips stages"
                    )
                cells.append(f"{action.stage}{action.kind.value}{action.mb}")
            else:
                cells.append(str(action))
        rows.append(cells)
    with Path(path).open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def _parse_csv(path: Path) -> Table:
    table: Table = {}
    with path.open(newline="") as handle:
        for lineno, row in enumerate(csv.reader(handle), start=1):
            cells = [cell.strip() for cell in row]
            while cells and not cells[-1]:
                cells.pop()
            if not cells or cells[0].startswith("#"):
                continue
            match = _RANK_RE.match(cells[0])
            if match and not match[2]:
                rank, cells = int(match[1]), cells[1:]
            else:
                rank = len(table)
            if rank in table:
                raise ScheduleError(f"{path}:{lineno}: rank {rank} appears twice; give each rank one row")
            try:
                table[rank] = [_csv_cell(cell) for cell in cells]
            except ScheduleError as err:
                raise ScheduleError(f"{path}:{lineno}: {err}") from None
    if not table:
        raise ScheduleError(f"{path} has no rows: write one row per rank, one cell per action")
    return dict(sorted(table.items()))


def load_schedule(path: str | Path) -> Table:
    """Read a table from a ``.csv`` file (one row per rank) or a text file in :func:`format_schedule` form."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"schedule file {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        return _parse_csv(path)
    try:
        return parse_schedule(path.read_text())
    except ScheduleError as err:
        raise ScheduleError(f"{path}: {err}") from None
