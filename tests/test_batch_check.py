"""A step whose microbatch graph would compute something else than the full batch is refused, naming the
line: a branch on the batch size, slicing along the batch dimension, squeeze() at one row per microbatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dynapipe.errors import CaptureError
from dynapipe.explain import capture


class BranchOnBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= 4:  # BRANCH
            x = x * 2
        return self.fc(x).sum()


class SliceBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x[: x.shape[0] // 2]  # SLICE
        return self.fc(half).sum()


class SqueezeAll(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = self.fc(x).squeeze()  # SQUEEZE
        return nn.functional.mse_loss(pred, y)


class Fine(nn.Module):
    """Per-row work, reshapes that flatten the batch, a full slice and a per-token mean loss: all allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)[: x.shape[0], 1:]
        return (h.reshape(-1) - y[:, 1:].reshape(-1)).square().mean() + self.fc(x).squeeze(-1).mean()


@pytest.mark.parametrize(
    ("model", "args", "n_microbatches", "marker", "words"),
    [
        (BranchOnBatch(), (torch.randn(8, 4),), 4, "# BRANCH", "different path at the full batch of 8 rows"),
        (SliceBatch(), (torch.randn(8, 4),), 2, "# SLICE", "slices along the batch dimension"),
        (SqueezeAll(), (torch.randn(4, 4), torch.randn(4)), 4, "# SQUEEZE", "drops the batch dimension"),
    ],
    ids=["branch", "slice", "squeeze"],
)
def test_batch_dependent_code_is_refused_naming_the_line(model, args, n_microbatches, marker, words) -> None:
    with pytest.raises(CaptureError) as err:
        capture(model, args, n_microbatches=n_microbatches)
    assert words in str(err.value)
    assert marker in str(err.value) and "test_batch_check.py" in str(err.value)


def test_the_same_code_is_fine_where_it_cannot_differ() -> None:
    capture(
        SqueezeAll(), (torch.randn(4, 4), torch.randn(4)), n_microbatches=2
    )  # two rows: no squeeze of dim 0
    capture(BranchOnBatch(), (torch.randn(2, 4),), n_microbatches=1)  # the microbatch is the batch
    capture(Fine(), (torch.randn(8, 4), torch.randn(8, 4)), n_microbatches=8)
    capture(Fine(), (torch.randn(8, 4), torch.randn(8, 4)), n_microbatches=2)


def test_one_row_microbatches_trace_the_frame_once(monkeypatch) -> None:
    """At one row per microbatch the frame is traced once, at two rows (where the batch checks can read the
    batch dimension), and that graph re-run at one row is the graph a second trace at one row gives."""
    from torch._dynamo.callback import callback_handler

    from dynapipe.capture import trace

    def captured(model: nn.Module) -> tuple[int, object]:
        torch._dynamo.reset()
        traces: list[int] = []  # every trace of a frame by Dynamo (reset() drops the callback)
        callback_handler.register_start_callback(lambda *_: traces.append(1))
        graph = capture(model, (torch.randn(8, 4), torch.randn(8, 4)), n_microbatches=8)
        return len(traces), graph

    n_folded, folded = captured(Fine())
    monkeypatch.setattr(trace, "at_one_row", lambda *_: None)  # the fallback: a second trace, at one row
    n_traced, traced = captured(Fine())
    assert (n_folded, n_traced) == (1, 2)
    ops = [[(n.op, str(n.target)) for n in g.gm.graph.nodes] for g in (folded, traced)]
    assert ops[0] == ops[1]  # the same graph (node names may differ: the two traces number them apart)
    assert folded.shapes.guards == traced.shapes.guards
