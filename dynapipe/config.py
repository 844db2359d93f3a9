"""Every option of ``torch.compile(..., backend="dynapipe", options={...})``, validated once, here."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import ConfigError

__all__ = ["LossReduction", "Optimizer", "PipelineConfig"]

Optimizer = Literal["adamw", "adam", "sgd", "none"]
LossReduction = Literal["mean", "sum"]
_WATCHDOG_S = 180.0  # the default watchdog_s, when timeout_s leaves room for it


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Options of the dynapipe backend. All are optional.

    n_stages: pipeline stages (default: world size / dp_degree, times virtual_stages).
    virtual_stages: stages per pipeline rank, for "interleaved-1f1b" (default 2; "zbv" runs 2, the
        others 1). With split_points or n_stages it is inferred as stages / ranks.
    n_microbatches: microbatches per step (default: the number of stages, see :meth:`microbatches`).
    schedule: a built-in name ("gpipe", "1f1b", ...), a schedule function, a per-rank action table,
        or the path of a text/CSV file holding one.
    split_points: module names (as in ``model.named_modules()``); a stage starts right before each.
    unsplittable: module names kept whole inside one stage by the automatic partitioner.
    max_stage_memory: bytes a stage may hold (parameters, gradients, optimizer state, activations in
        flight); the automatic partitioner treats it as a hard limit.
    balance_slack: how much slower than the best-balanced split the automatic partitioner lets a stage
        be (0.03: 3%). By default (None) it takes what shortens the schedule's predicted step: up to 25%
        to send fewer bytes, and more where few microbatches make a heavier first stage faster. Set it
        when equal stage times matter more than the estimate, e.g. stages that will run on other devices.
        Automatic partition only: with split points it is an error.
    rates: the seconds the plan is made in. "measure" (default): the machine that runs, measured by its
        ranks when the first pipeline is built (each distinct operation of the graph at its microbatch
        shapes, the link between pipeline neighbours) and cached per machine under
        ``$XDG_CACHE_HOME/dynapipe`` (``~/.cache/dynapipe``); "nominal": a nominal GPU and link (FLOPs
        and bytes at fixed rates); or the path of a saved set (``dynapipe.cost.Rates.save``, or a cache
        file from the target machine).
    profile: measure the rates again, ignoring the cache (which is then rewritten).
    optimizer: optimizer whose state the memory estimate counts: "adamw", "adam", "sgd" or "none".
    loss_reduction: how the per-microbatch losses combine into the step's loss: "mean" (as a loss
        averaged over the batch, HuggingFace's default) or "sum". With "mean", a loss that averages over
        a varying number of non-padded tokens per microbatch differs slightly from one process: the
        microbatch means are averaged with equal weights.
    timeout_s: limit for every collective and point-to-point wait; a dead peer fails the step after it.
    watchdog_s: a rank that makes no progress through a step for this long makes every rank print one
        report of where each stands (the action it last finished, the one it is in or waits for) and
        exit: a hung rank cannot be interrupted. Below timeout_s, so that it speaks first; 0 turns it
        off. Default (None): 180 s, or off with a timeout_s of 180 s or less.
    dp_degree: data-parallel replicas of the pipeline; world size = pipeline ranks x dp_degree. Each rank
        feeds its own data shard (as with DDP); the ranks of one pipeline must get the same shard.
    ddp_comm_hook: a DDP communication hook (``hook(state, bucket) -> Future``, e.g. from
        ``torch.distributed.algorithms.ddp_comm_hooks``) registered on every stage's DDP wrapper, with the
        data-parallel process group as its state.
    mesh: a DeviceMesh with dims ("pp", "dp") to use instead of the default init_device_mesh layout.
    checkpoint: a folder of safetensors weights (``save_pretrained``'s, or ``dynapipe.save_checkpoint``'s)
        to fill a model built under ``dynapipe.empty_init()``: each rank reads only its own stages' tensors,
        once per model (a later pipeline over the model never reloads over trained weights).
    compile_stages: compile each stage's forward and backward with inductor when the pipeline is built
        (as ``torch.compile`` compiles a graph; zero-bubble schedules get the backward split in two graphs).
        Default (None): on CUDA yes, on CPU no. A stage inductor cannot compile runs eagerly; the step
        report says which stages were compiled (``StepReport.compiled``).
    on_step: called after every step with a :class:`dynapipe.runtime.StepReport` (timeline, in-flight
        activations, the stage modules): for logging, timelines and tests.
    """

    n_stages: int | None = None
    virtual_stages: int | None = None
    n_microbatches: int | None = None
    schedule: Any = "1f1b"
    split_points: tuple[str, ...] = ()
    unsplittable: tuple[str, ...] = ()
    max_stage_memory: int | None = None
    balance_slack: float | None = None
    rates: str = "measure"
    profile: bool = False
    optimizer: Optimizer = "adamw"
    loss_reduction: LossReduction = "mean"
    timeout_s: float = 300.0
    watchdog_s: float | None = None
    dp_degree: int = 1
    mesh: Any = None
    ddp_comm_hook: Any = None
    checkpoint: str | None = None
    compile_stages: bool | None = None
    on_step: Any = None

    def summary(self) -> dict[str, str]:
        """Every option as text that is the same in every process for the same value (ranks compare it)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or isinstance(value, (bool, int, float, str, tuple, list, dict)):
                out[f.name] = repr(value)
            elif callable(value):
                out[f.name] = getattr(value, "__qualname__", type(value).__name__)
            else:
                out[f.name] = type(value).__name__
        return out

    def microbatches(self, n_stages: int) -> int:
        """Microbatches per step: ``n_microbatches``, else one per stage (the fewest with which 1F1B keeps
        every stage busy at once). The backend and :func:`dynapipe.explain` both ask here, so the step
        explain() plans for is the step that runs."""
        return self.n_microbatches or n_stages

    def _check_watchdog(self) -> None:
        """Resolve the default; a watchdog_s at or past timeout_s would never fire before a wait fails."""
        if self.watchdog_s is None:
            object.__setattr__(self, "watchdog_s", _WATCHDOG_S if self.timeout_s > _WATCHDOG_S else 0.0)
            return
        value = self.watchdog_s
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            raise ConfigError(f"watchdog_s must be a number of seconds (0: off), got {value!r}")
        if value >= self.timeout_s:
            raise ConfigError(
                f"watchdog_s ({value:g}) must be below timeout_s ({self.timeout_s:g}): a hung rank's peers "
                "would time out first, each naming only its own receive"
            )

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> PipelineConfig:
        """The config of a ``torch.compile(..., options={...})`` dict; unknown keys are an error."""
        options = dict(options or {})
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown dynapipe option(s) {unknown}; valid options are {valid}")
        return cls(**options)

    def __post_init__(self) -> None:
        """Every check of every option, once: the rest of dynapipe trusts a PipelineConfig."""
        for name in ("split_points", "unsplittable"):  # lists from a user's options dict become tuples
            names = getattr(self, name)
            if isinstance(names, str) or not all(isinstance(p, str) for p in names):
                raise ConfigError(f"{name} must be a list of module names, got {names!r}")
            object.__setattr__(self, name, tuple(names))
        for name in ("n_stages", "virtual_stages", "n_microbatches", "dp_degree"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if self.loss_reduction not in get_args(LossReduction):
            raise ConfigError(
                f"loss_reduction must be one of {get_args(LossReduction)}, got {self.loss_reduction!r}"
            )
        if self.balance_slack is not None and not (
            isinstance(self.balance_slack, (int, float))
            and not isinstance(self.balance_slack, bool)
            and self.balance_slack >= 0
        ):
            raise ConfigError(f"balance_slack must be a number >= 0 (0.03: 3%), got {self.balance_slack!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ConfigError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        self._check_watchdog()
        if self.max_stage_memory is not None and not (
            isinstance(self.max_stage_memory, int) and self.max_stage_memory > 0
        ):
            raise ConfigError(
                f"max_stage_memory must be a positive number of bytes, got {self.max_stage_memory!r}"
            )
        if self.optimizer not in get_args(Optimizer):
            raise ConfigError(
                f"optimizer must be one of 'adamw', 'adam', 'sgd', 'none', got {self.optimizer!r}"
            )
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise ConfigError(f"checkpoint must be the path of a folder, got {self.checkpoint!r}")
        if self.compile_stages is not None and not isinstance(self.compile_stages, bool):
            raise ConfigError(
                f"compile_stages must be True, False or None (auto), got {self.compile_stages!r}"
            )
        if not isinstance(self.rates, (str, os.PathLike)):
            raise ConfigError(
                f"rates must be 'measure', 'nominal' or the path of a saved set, got {self.rates!r}"
            )
        if self.on_step is not None and not callable(self.on_step):
            raise ConfigError(f"on_step must be a callable taking a StepReport, got {self.on_step!r}")
        if self.n_stages is not None and self.split_points and len(self.split_points) != self.n_stages - 1:
            raise ConfigError(
                f"{len(self.split_points)} split_points make {len(self.split_points) + 1} stages, but "
                f"n_stages is {self.n_stages}; give n_stages - 1 split points or drop n_stages"
            )
