"""Pipeline schedules as data: generate, lower, validate and simulate per-rank action tables.

    table = get_schedule("1f1b").build(n_ranks=4, n_stages=4, n_microbatches=8)
    lowered = lower(table, 4, 4, "loop")                # adds SEND/RECV (and REDUCE for reduce_stages)
    validate(lowered, 4, 4, 8, "loop")                  # raises ScheduleError unless it runs to the end
    timeline = simulate(table, StageCost(forward=1.0, backward_input=1.0, backward_weight=1.0),
                        n_ranks=4, n_stages=4, placement="loop")
    in_flight_per_stage(table, placement_map("loop", n_ranks=4, n_stages=4))  # {stage: peak microbatches}

Pure Python: nothing here imports torch.
"""

from .actions import (
    Action,
    Kind,
    ScheduleError,
    Table,
    dump_torch_csv,
    format_schedule,
    load_schedule,
    normalize_table,
    parse_schedule,
)
from .builtin import (
    SCHEDULES,
    ScheduleFn,
    ScheduleSpec,
    get_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zb_h1,
    zbv,
)
from .in_flight import in_flight_per_stage
from .lowering import lower
from .placement import Placement, StageGraph, infer_placement, placement_map, stage_graph, stage_to_rank
from .simulate import StageCost, Timeline, TimelineEvent, simulate
from .transforms import split_last_backward
from .validate import validate

__all__ = [
    "SCHEDULES",
    "Action",
    "Kind",
    "Placement",
    "ScheduleError",
    "ScheduleFn",
    "ScheduleSpec",
    "StageCost",
    "StageGraph",
    "Table",
    "Timeline",
    "TimelineEvent",
    "dump_torch_csv",
    "format_schedule",
    "get_schedule",
    "gpipe",
    "in_flight_per_stage",
    "infer_placement",
    "interleaved_1f1b",
    "load_schedule",
    "lower",
    "normalize_table",
    "one_f_one_b",
    "parse_schedule",
    "placement_map",
    "simulate",
    "split_last_backward",
    "stage_graph",
    "stage_to_rank",
    "validate",
    "zb_h1",
    "zbv",
]
