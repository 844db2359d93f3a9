"""Rewrites of a compute table that keep it valid and never make its simulated step longer."""

from __future__ import annotations

from .actions import Action, Kind, Table

__all__ = ["split_last_backward"]


def split_last_backward(table: Table) -> Table:
    """A copy of ``table`` in which each stage's last full backward ``B`` runs as ``I`` then ``W``.

    For data parallelism: DDP all-reduces a stage's gradients during its last weight-gradient work and
    waits for the all-reduce before that autograd call returns. Inside a ``B`` the wait comes before the
    input gradient is sent, so in 1F1B every stage's all-reduce delays the previous stage's last backward,
    and the all-reduces of all stages add up along the critical path. As ``I`` then ``W`` the gradient
    leaves after ``I`` and the all-reduce runs while the previous stages finish. ``I + W`` takes as long
    as ``B`` and the send only moves earlier, so the step is never longer. Stages whose backward is split
    already are left as they are.
    """
    last: dict[int, tuple[int, int]] = {}  # stage -> (rank, position) of its last B
    for rank, actions in table.items():
        for i, action in enumerate(actions):
            if action is not None and action.kind is Kind.B:
                last[action.stage] = (rank, i)
    out: Table = {}
    for rank, actions in table.items():
        ops: list[Action | None] = []
        for i, action in enumerate(actions):
            if action is not None and last.get(action.stage) == (rank, i):
                ops += [Action(action.stage, Kind.I, action.mb), Action(action.stage, Kind.W, action.mb)]
            else:
                ops.append(action)
        out[rank] = ops
    return out
