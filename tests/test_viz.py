"""dynapipe.viz: the timeline and partition pictures hold what they claim, in one process.

Each SVG is parsed as XML and read back: one row per rank, one box per compute action at the place its
times say, the legend's kinds, the bytes on the partition's arrows and arcs.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynapipe import explain
from dynapipe.schedules import Action, StageCost, Timeline, TimelineEvent, get_schedule, simulate
from dynapipe.viz import (
    merge_timelines,
    partition_svg,
    partition_text,
    shared_state,
    stage_modules,
    timeline_svg,
    write_chrome_trace,
)
from dynapipe.viz.__main__ import main as cli

SVG = "{http://www.w3.org/2000/svg}"
UNIT = StageCost(1.0, 1.0, 1.0)


def _sim(
    name: str, ranks: int = 4, microbatches: int = 8, stages: int | None = None, cost: StageCost = UNIT
) -> Timeline:
    spec = get_schedule(name)
    n_stages = stages or spec.n_stages(ranks)
    table = spec.build(n_ranks=ranks, n_stages=n_stages, n_microbatches=microbatches)
    return simulate(table, cost, n_ranks=ranks, n_stages=n_stages, placement=spec.placement)


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def _by_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if cls in (e.get("class") or "").split()]


def _texts(root: ET.Element) -> list[str]:
    return ["".join(e.itertext()) for e in root.iter(f"{SVG}text")]


# ------------------------------------------------------------------------------------------- timeline


def test_timeline_has_a_row_per_rank_and_a_box_per_action_where_its_times_say():
    timeline = _sim("1f1b", ranks=4, microbatches=8, cost=StageCost(1.0, 1.5, 0.5))
    root = _parse(timeline_svg(timeline, title="1F1B"))
    rows = _by_class(root, "row")
    assert [int(r.get("data-rank")) for r in rows] == [0, 1, 2, 3]
    boxes = _by_class(root, "op")
    assert len(boxes) == len(timeline.events) == 4 * 8 * 2
    assert sorted((int(b.get("data-rank")), b.get("data-action")) for b in boxes) == sorted(
        (e.rank, e.name) for e in timeline.events
    )
    # x is affine in start time with one scale for every box, and width is duration at that scale.
    left = float(rows[0].get("x"))
    scale = float(rows[0].get("width")) / timeline.makespan
    for box in boxes:
        start, end = float(box.get("data-start")), float(box.get("data-end"))
        assert float(box.get("x")) == pytest.approx(left + start * scale, abs=0.01)
        assert float(box.get("width")) == pytest.approx((end - start) * scale, abs=0.01)
        row = rows[int(box.get("data-rank"))]
        assert box.get("y") == row.get("y")  # the box sits on its rank's row
        kind = Action.parse(box.get("data-action")).kind.value
        assert f"op-{kind}" in box.get("class")
    title = _texts(root)[0]
    assert (
        "1F1B" in title and f"{timeline.bubble_fraction:.1%}" in title and "makespan 33 s" in title
    )  # (m + p - 1)(f + b + w)
    # Forward boxes show their microbatch number.
    assert sorted(int(t) for t in (("".join(e.itertext())) for e in _by_class(root, "mb"))) == sorted(
        e.action.mb for e in timeline.events
    )


def test_timeline_legend_names_the_kinds_present():
    legend = lambda t: {e.get("data-label") for e in _by_class(_parse(timeline_svg(t)), "legend")}  # noqa: E731
    assert {"forward (F)", "backward (full) (B)", "idle (bubble)"} == legend(_sim("gpipe"))
    zb = legend(_sim("zb-h1"))
    assert {"forward (F)", "backward, input grad (I)", "backward, weight grad (W)"} <= zb
    assert "backward (full) (B)" not in zb


def test_interleaved_ranks_shade_their_later_stages_lighter():
    timeline = _sim("interleaved-1f1b", ranks=2, microbatches=4, stages=4)
    root = _parse(timeline_svg(timeline))
    forwards = [b for b in _by_class(root, "op-F") if b.get("data-rank") == "0"]
    fills = {b.get("data-stage"): b.get("fill") for b in forwards}
    assert set(fills) == {"0", "2"} and fills["0"] != fills["2"]
    assert any("later stages" in (e.get("data-label") or "") for e in _by_class(root, "legend"))


def test_merge_per_rank_recordings_and_draw_communication():
    timeline = _sim("1f1b", ranks=2, microbatches=4)
    per_rank = [Timeline([e for e in timeline.events if e.rank == r]) for r in (1, 0)]  # as gathered
    merged = merge_timelines(per_rank)
    assert merged.ranks == [0, 1]
    assert sorted(merged.events, key=lambda e: (e.rank, e.start)) == sorted(
        timeline.events, key=lambda e: (e.rank, e.start)
    )
    assert merged.makespan == timeline.makespan and merged.bubble_fraction == pytest.approx(
        timeline.bubble_fraction
    )
    merged.events.append(TimelineEvent(0, "0SEND_F0->1", 1.0, 1.2))
    root = _parse(timeline_svg(merged))
    assert [c.get("data-action") for c in _by_class(root, "comm")] == ["0SEND_F0->1"]
    assert len(_by_class(root, "row")) == 2


def test_recorded_steps_are_lined_up_by_when_each_rank_began():
    # each rank's recording counts from its own start; rank 1 began 2 ms after rank 0
    first = Timeline(
        [TimelineEvent(0, "0F0", 0.0, 0.001), TimelineEvent(0, "0SEND_F0->1", 0.001, 0.0011)], started=100.0
    )
    second = Timeline(
        [TimelineEvent(1, "1RECV_F0<-0", 0.0, 0.0005), TimelineEvent(1, "1F0", 0.0005, 0.0015)],
        started=100.002,
    )
    merged = merge_timelines([second, first])
    assert merged.started == 100.0
    starts = {e.name: e.start for e in merged.events}
    assert starts["0F0"] == 0.0 and starts["1RECV_F0<-0"] == pytest.approx(0.002)
    assert starts["1F0"] == pytest.approx(0.0025) and merged.makespan == pytest.approx(0.0035)
    # a timeline without a start (simulated) is merged as it is
    assert merge_timelines([Timeline(first.events), Timeline(second.events)]).makespan == pytest.approx(
        0.0015
    )


def test_step_events_are_drawn_as_named_work_not_actions():
    timeline = _sim("1f1b", ranks=2, microbatches=4)
    end = timeline.makespan
    timeline.events.append(TimelineEvent(1, "refresh shared state", end, 2 * end, kind="step"))
    root = _parse(timeline_svg(timeline))
    (step,) = _by_class(root, "step")
    assert step.get("data-step") == "refresh shared state" and step.get("data-rank") == "1"
    assert step.get("data-action") is None and "op" not in step.get("class").split()
    assert "the step's own work" in "".join(step.itertext())  # its tooltip
    assert ["refresh shared state"] == ["".join(e.itertext()) for e in _by_class(root, "step-name")]
    assert not _by_class(root, "comm")
    assert any("own work" in (e.get("data-label") or "") for e in _by_class(root, "legend"))
    assert len(_by_class(root, "op")) == len(timeline.events) - 1


def test_chrome_trace_and_empty_timeline(tmp_path):
    timeline = _sim("gpipe", ranks=2, microbatches=2)
    write_chrome_trace(timeline, tmp_path / "trace.json")
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == len(timeline.events)
    with pytest.raises(ValueError, match="no events"):
        timeline_svg(Timeline())


def test_cli_schedule_writes_svg_and_trace(tmp_path, capsys):
    out, trace = tmp_path / "zbv.svg", tmp_path / "zbv.json"
    cli(
        [
            "schedule",
            "zbv",
            "--ranks",
            "2",
            "--microbatches",
            "4",
            "--w",
            "0.5",
            "-o",
            str(out),
            "--trace",
            str(trace),
        ]
    )
    root = _parse(out.read_text())
    assert len(_by_class(root, "row")) == 2 and len(_by_class(root, "op")) == 2 * 2 * 4 * 3
    assert json.loads(trace.read_text())["traceEvents"]
    assert "bubble" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ partition


class _SkipNet(nn.Module):
    """embed -> 4 residual blocks -> head that reads the embedding again (a skip over the middle)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(4))
        self.head = nn.Linear(64, 3)

    def forward(self, x, target):
        e = self.embed(x)
        h = e
        for block in self.blocks:
            h = block(h) + h
        return F.mse_loss(self.head(torch.cat([h, e], dim=-1)), target)


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

    def forward(self, ids, labels):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + torch.relu(layer(h))
        return F.cross_entropy((h @ self.embed.weight.t()).flatten(0, 1), labels.flatten())


@pytest.fixture(scope="module")
def skip_explained():
    torch.manual_seed(0)
    return explain(
        _SkipNet(),
        (torch.randn(8, 12), torch.randn(8, 3)),
        n_stages=3,
        split_points=["blocks.1", "blocks.3"],
        n_microbatches=1,  # the default (one per stage: 3) does not divide the batch of 8
    )


def test_partition_svg_shows_stages_bytes_and_skips(skip_explained):
    e = skip_explained
    root = _parse(partition_svg(e))
    assert [int(c.get("data-stage")) for c in _by_class(root, "stage")] == [0, 1, 2]
    sends = {
        (int(a.get("data-src")), int(a.get("data-dst"))): int(a.get("data-bytes"))
        for a in _by_class(root, "send")
    }
    assert sends == {(s.index, s.index + 1): s.sends[s.index + 1] for s in e.stages[:-1]}
    skips = {
        (int(a.get("data-src")), int(a.get("data-dst"))): int(a.get("data-bytes"))
        for a in _by_class(root, "skip")
    }
    assert skips == {(0, 2): e.stages[0].sends[2]}  # the embedding, read again by the head
    assert skips[(0, 2)] == 8 * 32 * 4  # one microbatch (8) of the 32-wide embedding, float32
    labels = ["".join(t.itertext()) for t in _by_class(root, "bytes")]
    assert "1.0 KiB skip 0→2 (e)" in labels and labels.count("1.0 KiB") == 2  # e: the embedding's output
    assert ["".join(t.itertext()) for t in _by_class(root, "tensors")] == ["h", "h"]  # residual stream
    texts = _texts(root)
    assert f"imbalance {e.imbalance:.2f}" in texts[0]
    modules = ["".join(t.itertext()) for t in _by_class(root, "module")]
    assert any("blocks.1-2" in m for m in modules)
    # Compute bars stack F, I, W per stage, scaled to the slowest stage.
    bars = _by_class(root, "bar-compute")
    assert len(bars) == 3 * 3
    heights = [sum(float(b.get("height")) for b in bars[3 * i : 3 * i + 3]) for i in range(3)]
    peak = max(s.time_s for s in e.stages)
    assert heights == pytest.approx([160 * s.time_s / peak for s in e.stages], abs=0.05)


def test_stage_modules_fold_numbered_blocks(skip_explained):
    top = "(top level)"  # the residual adds sit in forward itself
    assert stage_modules(skip_explained) == [
        (["embed", "blocks.0", top], []),
        (["blocks.1-2", top], []),
        (["blocks.3", "head", top], []),
    ]


def test_partition_text_rows(skip_explained):
    text = partition_text(skip_explained)
    lines = text.splitlines()
    assert lines[0].startswith("partition into 3 stages, imbalance")
    rows = [line for line in lines if re.match(r"^\s+\d  ", line)]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2]
    assert "→1 1.0 KiB, →2 1.0 KiB" in rows[0]
    assert "blocks.1-2" in text


def test_tied_weight_is_shown_on_both_stages():
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (4, 6))
    e = explain(_TiedLM(), (ids, ids), n_stages=2, split_points=["layers.2"])
    assert shared_state(e) == {"embed.weight": [0, 1]}
    root = _parse(partition_svg(e))
    shared = ["".join(t.itertext()) for t in _by_class(root, "shared")]
    assert sum("embed.weight" in line for line in shared) == 2
    assert "shares embed.weight with stage 1" in partition_text(e)
