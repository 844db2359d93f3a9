"""The user's frame -> one batch-symbolic FX graph of a microbatch (:class:`~dynapipe.graph.CapturedGraph`).

``frame`` reads the frame Dynamo compiles, ``trace`` re-traces it at the microbatch size, ``sizes``
turns sizes into nodes computed from the inputs, ``batch_check`` refuses code that would compute
something else on a microbatch, ``markers`` are ``pipe_split()``, ``names`` the user's module names,
``inputs`` the user's names of the call's arguments (and refuses a HuggingFace cache among them),
``recorded`` what a Dynamo trace hands a backend, and ``one_trace`` builds the microbatch graph from
Dynamo's own graph when that is symbolic in the batch size (no second trace).
"""

from .frame import FrameCall, frame_being_compiled, frame_of_call, ignore_logging_in_graphs
from .markers import pipe_split
from .trace import capture_microbatch

__all__ = [
    "FrameCall",
    "capture_microbatch",
    "frame_being_compiled",
    "frame_of_call",
    "ignore_logging_in_graphs",
    "pipe_split",
]
