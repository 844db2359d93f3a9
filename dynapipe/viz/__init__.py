"""Pictures of dynapipe's decisions: the schedule timeline and the partition (pure-Python SVG), and a
run as one self-contained HTML page (:func:`write_report`: the partition, every rank's measured step and
the plan beside it, linked).

    python -m dynapipe.viz schedule 1f1b --ranks 4 --microbatches 8 -o 1f1b.svg
    python -m dynapipe.viz partition llama --stages 4 -o llama.svg
    python -m dynapipe.viz report run.json -o run.html     # a run saved by write_report

Nothing in dynapipe imports this package; it reads the library's plain data (:class:`Timeline`,
:class:`~dynapipe.plan.Explanation`).
"""

from .partition import partition_text, shared_state, stage_modules
from .partition_picture import partition_svg
from .report import report_html, write_report
from .run import load_run, save_run
from .timeline import KIND_NAMES, merge_timelines, timeline_svg, write_chrome_trace

__all__ = [
    "KIND_NAMES",
    "load_run",
    "merge_timelines",
    "partition_svg",
    "partition_text",
    "report_html",
    "save_run",
    "shared_state",
    "stage_modules",
    "timeline_svg",
    "write_chrome_trace",
    "write_report",
]
