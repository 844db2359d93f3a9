"""Between the backend and the runtime: a captured call -> one rank's runnable pipeline.

``pipeline`` holds the steps in order, ``models`` checks the models and fills their empty tensors,
``outputs`` says how outputs come back, ``report`` is the public :class:`StepReport`."""

from .pipeline import build_pipeline, input_shapes
from .report import StepReport

__all__ = ["StepReport", "build_pipeline", "input_shapes"]
