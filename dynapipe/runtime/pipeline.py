"""One rank's pipeline for one captured graph: the single-device call semantics on top of the executor.

A training call runs the whole schedule, forward and backward of every microbatch, inside the call (1F1B
interleaves them, so the backward cannot wait for ``loss.backward()``). The parameter gradients it
produces are held, not written to ``.grad``; the returned loss is tied to this rank's parameters by an
autograd Function whose backward hands them out scaled by the incoming gradient. So ``loss.backward()``,
``(loss * 0.5).backward()``, gradient accumulation and ``zero_grad()`` behave as on one device, and a
call whose loss is never back-propagated leaves ``.grad`` untouched.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..codegen import StagePlan
from ..compiled_stage import CompiledStage
from ..errors import ConfigError, PipelineError
from ..graph import Sizes, SymbolicShape
from ..microbatch import merge_outputs, split_inputs
from ..schedules import Action, Timeline
from .comm import Comm
from .executor import Executor, device_of
from .grad_norm import register_pipeline_params
from .mesh import PipelineMesh
from .rehearsal import rehearse
from .stage_times import time_stages
from .state import allocate_read_inputs, refresh_state, state_readers

__all__ = ["OutputSpec", "Pipeline", "StepRecord"]

_SERIALS = itertools.count()  # pipelines are built in the same order on every rank


class _HeldGradients(torch.autograd.Function):
    """Identity on the loss value whose backward hands over the held parameter gradients times grad_output.

    They are scaled in place and no reference is kept, so autograd moves each into an empty ``.grad``
    instead of copying it: a rank never holds its stage's gradients twice."""

    @staticmethod
    def forward(ctx, loss, grads, anchor, *params):  # noqa: ARG004 - params only connect the graph
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise PipelineError(
                "dynapipe: this loss was back-propagated already; its gradients went to .grad the first "
                "time. Call the compiled step again for another backward."
            )
        scaled = [None if g is None else g.mul_(grad_output) for g in grads]
        grads.clear()
        return (None, None, None, *scaled)


class _NoGradient(torch.autograd.Function):
    """Marks an output that requires grad in the user's graph but is not the loss: the step's backward
    already ran from the loss, so a backward through this output fails loudly instead of adding nothing."""

    @staticmethod
    def forward(ctx, value, anchor, index, loss_index):  # noqa: ARG004 - anchor only connects the graph
        ctx.index, ctx.loss_index = index, loss_index
        return value.view_as(value)  # no copy: logits can be large

    @staticmethod
    def backward(ctx, grad_output):
        raise PipelineError(
            f"dynapipe: output {ctx.index} of the compiled call is not the loss. The pipeline runs the backward "
            f"inside the call, from the loss only (output {ctx.loss_index}: the first scalar output that "
            "requires grad), so no gradient can flow through other outputs. Return the total loss (e.g. "
            "`loss + aux_loss`) as the first scalar output and .detach() the outputs you only log."
        )


@dataclass(frozen=True)
class StepRecord:
    """What one call did on this rank (``dynapipe.StepReport`` adds the plan)."""

    rank: int
    train: bool
    timeline: Timeline  # the table's actions and the step's named work (event.kind), seconds from its start
    peak_in_flight: dict[int, int]  # stage -> most microbatches whose activations were alive at once
    stages: dict[int, StagePlan]  # this rank's stages (``stages[i].module.code`` is readable)
    actions: list[Action | None] = field(default_factory=list)  # this rank's lowered table, as it ran
    compiled: dict[int, str] = field(default_factory=dict)  # stage -> "inductor", or "eager" and why
    # compiled stage -> how often each of its graphs ran so far ("forward", "input", "weight")
    graph_runs: dict[int, dict[str, int]] = field(default_factory=dict)
    # stage -> global rank holding it in this rank's replica: the sender of a receive (``3RECV_F0<-2``)
    rank_of_stage: dict[int, int] = field(default_factory=dict)


@dataclass
class OutputSpec:
    shape: SymbolicShape  # merged over microbatches
    dtype: torch.dtype
    merge: str  # over microbatches: "cat" (batched), "last" (state updated in place) or "reduce"
    requires_grad: bool  # in the user's graph (only the loss carries a gradient back)


@dataclass
class Pipeline:
    """One rank's part of a pipeline; :meth:`run` is the one entry per step."""

    stages: list[StagePlan]  # every stage (all ranks hold the same list); only local ones run here
    rank_of_stage: dict[int, int]  # global rank holding each stage, in this rank's data-parallel replica
    actions: list[Action | None]  # this rank's lowered training table, as validate() proved it
    inference_actions: list[Action | None]  # and its lowered forward-only table
    comm: Comm
    mesh: PipelineMesh
    input_sources: list[str]  # Dynamo source of each graph input (``L['x']``), read by the caller
    n_microbatches: int
    outputs: list[OutputSpec]
    loss_index: int | None
    loss_reduction: str
    tied: list[tuple[torch.nn.Parameter, dist.ProcessGroup, str]] = field(default_factory=list)
    on_step: Callable[[StepRecord], None] | None = None
    ddp_comm_hook: Callable | None = None
    watchdog_s: float = 0.0  # a step without progress for this long stops every rank (0: never)
    compiled: dict[int, CompiledStage] = field(default_factory=dict)  # local stage -> inductor's version
    how_compiled: dict[int, str] = field(default_factory=dict)  # local stage -> "inductor" or "eager (why)"

    def __post_init__(self) -> None:
        self.rank = dist.get_rank()
        self.local_stages = sorted(s for s, r in self.rank_of_stage.items() if r == self.rank)
        self.last_rank = self.rank_of_stage[len(self.stages) - 1]
        self.params = [
            p for s in self.local_stages for p in self.stages[s].module.parameters() if p.requires_grad
        ]
        self.params = list({id(p): p for p in self.params}.values())
        scale = 1.0 / self.n_microbatches if self.loss_reduction == "mean" else 1.0
        reducers = {}
        if self.mesh.dp_degree > 1:
            for s in self.local_stages:
                if any(p.requires_grad for p in self.stages[s].module.parameters()):
                    # a parameter whose every use the stage detaches gets no gradient; DDP must then look
                    # for such parameters at every step, or it waits for them and its bucket never completes
                    reducers[s] = DistributedDataParallel(
                        self.stages[s].module,
                        process_group=self.mesh.dp_group,
                        forward_sync_buffers=False,
                        find_unused_parameters=bool(_params_without_gradient(self.stages[s].module)),
                    )
                    if self.ddp_comm_hook is not None:
                        reducers[s].register_comm_hook(self.mesh.dp_group, self.ddp_comm_hook)
        not_counted = {
            id(p) for p, group, _ in self.tied if min(dist.get_process_group_ranks(group)) != self.rank
        }
        register_pipeline_params(self.params, self.mesh.pp_group, not_counted)
        self.serial = next(_SERIALS)
        self.state_readers = state_readers(self.stages, self.rank_of_stage)
        self.executor = Executor(
            self.stages,
            self.rank_of_stage,
            self.comm,
            self.n_microbatches,
            self.loss_index,
            scale,
            reducers,
            gpu_timeline=self.on_step is not None,
            watchdog_s=self.watchdog_s,
            compiled=self.compiled,
        )

    def time_stages(
        self, inputs: Sequence[Any], sizes: Sizes, rounds: int, cores: float
    ) -> dict[int, tuple[float, float]] | str:
        """Every stage's (forward, backward) seconds as it runs (:mod:`.stage_times`) on the microbatch
        graph inputs ``inputs``, each rank timing its own (where the ranks share ``cores`` cores, as many
        at a time; 0: all at once); or why some rank could not. Every rank calls it."""

        def timed() -> dict[int, tuple[float, float]] | str:
            try:
                return time_stages(self.executor, inputs, sizes, self.local_stages, rounds)
            except Exception as err:  # noqa: BLE001 - the plan's own times stand in, and say why
                return f"rank {dist.get_rank()}: {type(err).__name__}: {str(err)[:200]}"

        mine = self.comm.in_turns(cores, timed, "timing the stages")
        every = self.comm.gather_objects(mine, "the stages' measured times")
        failed = [m for m in every if isinstance(m, str)]
        return failed[0] if failed else {s: t for m in every if isinstance(m, dict) for s, t in m.items()}

    def rehearse(self, microbatches: list[list[Any]], sizes: Sizes, rounds: int) -> list[float]:
        """The slowest rank's step in each of ``rounds`` when this pipeline's training table runs on the
        microbatch graph inputs ``microbatches``, leaving nothing behind (:mod:`.rehearsal`); every rank of
        the pipeline calls it."""
        with self._peers_told():
            return rehearse(
                self.executor, self.actions, microbatches, sizes, rounds, self._shared_gradients()
            )

    @contextmanager
    def _peers_told(self) -> Iterator[None]:
        """This rank's own error in a step reaches its peers at once (a peer's names itself)."""
        try:
            yield
        except Exception as err:
            if not isinstance(err, PipelineError):
                self.comm.report_failure(f"raised {type(err).__name__}: {str(err)[:200]}", learn=False)
            raise

    def agree(self, values: dict[str, str], what: str) -> None:
        """Fail on every rank, naming the difference, unless every rank of the pipeline has ``values``."""
        self.comm.agree(values, what)

    def run(self, values: list[Any], *, sizes: Sizes, batch_size: int) -> tuple[Any, ...]:
        """Run one step on the full-batch ``values`` of the graph inputs, whose size symbols are ``sizes``
        (receive and output buffers take their shapes at them) and batch size ``batch_size``."""
        for v in values:
            if isinstance(v, torch.Tensor) and v.requires_grad:
                raise ConfigError(
                    "an input of the pipelined call requires grad; dynapipe returns gradients for parameters "
                    "only. Detach the input, or make it an nn.Parameter of the model."
                )
        allocate_read_inputs(self.stages, self.local_stages, values)  # a PipelineCache's own layers
        inputs = split_inputs(values, self.n_microbatches, batch_size)
        train = torch.is_grad_enabled()
        if train and self.loss_index is None:
            raise ConfigError(
                "with gradients enabled the compiled call must return a scalar loss that requires grad "
                "(e.g. `loss = F.cross_entropy(model(x), y)` or a HuggingFace model called with labels); "
                "for inference call it under torch.no_grad()"
            )
        table = self.actions if train else self.inference_actions
        held = {p: p.grad for p in self.params}
        for p in self.params:
            p.grad = None
        delivery = _OutputDelivery(self, device_of(inputs), sizes)
        outputs: list[torch.Tensor] = []
        prologue = [
            # after another pipeline over this model: fetch the values it left on other ranks
            ("refresh shared state", lambda: refresh_state(self.state_readers, self.serial, self.comm)),
            ("post output receives", delivery.post),
        ]
        epilogue = [
            *(self._shared_gradients() if train else []),
            ("receive outputs", lambda: outputs.extend(delivery.receive())),
        ]
        try:
            with self._peers_told():
                step = self.executor.run(table, inputs, sizes, train, delivery.send, prologue, epilogue)
            grads = [p.grad for p in self.params]
        finally:
            for p, g in held.items():
                p.grad = g
        if self.on_step is not None:
            self.on_step(self._record(step, train, table))
        if train:
            anchor = torch.zeros((), requires_grad=True)
            for k, spec in enumerate(self.outputs):
                if k == self.loss_index:
                    outputs[k] = _HeldGradients.apply(outputs[k], grads, anchor, *self.params)
                elif spec.requires_grad:
                    outputs[k] = _NoGradient.apply(outputs[k], anchor, k, self.loss_index)
        return tuple(outputs)

    def _record(self, step: Any, train: bool, table: list[Action | None]) -> StepRecord:
        return StepRecord(
            self.rank,
            train,
            step.timeline(),
            step.peak_in_flight,
            {s: self.stages[s] for s in self.local_stages},
            list(table),
            self.how_compiled,
            {s: dict(c.runs) for s, c in self.compiled.items()},
            dict(self.rank_of_stage),
        )

    def _shared_gradients(self) -> list[tuple[str, Callable[[], None]]]:
        """A training step's work after its table where parameters are shared across ranks."""
        return [("all-reduce shared gradients", self._reduce_tied)] if self.tied else []

    def _reduce_tied(self) -> None:
        """Sum the gradient of each parameter used by stages on several ranks over just those ranks."""
        for param, group, name in self.tied:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            self.comm.all_reduce(param.grad, group, f"the gradient of shared parameter {name}")


def _params_without_gradient(module: torch.fx.GraphModule) -> list[str]:
    """Trainable parameters of a stage from which no gradient-carrying path reaches the stage's outputs
    (their uses are detached or under no_grad): read from the captured tensors' ``requires_grad``."""
    output = module.graph.find_nodes(op="output")[0]

    def carries_grad(node: torch.fx.Node) -> bool:
        value = node.meta.get("example_value")
        return not isinstance(value, torch.Tensor) or value.requires_grad  # unknown: assume it does

    stack = [n for n in output.all_input_nodes if carries_grad(n)]
    reached: set[torch.fx.Node] = set()
    while stack:
        node = stack.pop()
        if node not in reached:
            reached.add(node)
            stack.extend(n for n in node.all_input_nodes if carries_grad(n))
    used = {n.target for n in reached if n.op == "get_attr"}
    return [name for name, p in module.named_parameters() if p.requires_grad and name not in used]


class _OutputDelivery:
    """The step's merged outputs, from the rank with the last stage to every rank of the pipeline.

    The receives are posted before the schedule starts and the sends leave right after the last
    microbatch's forward, so the outputs travel while the backward drains and no rank waits for them
    at the end of the step."""

    def __init__(self, pipeline: Pipeline, device: torch.device, sizes: Sizes) -> None:
        self.pipeline = pipeline
        self.sizes = sizes
        self.merged: list[torch.Tensor] | None = None
        self.others = sorted(set(pipeline.rank_of_stage.values()) - {pipeline.last_rank})
        self.tag = pipeline.executor.routes.free_tag
        self.device = device
        self.posted: list[tuple[torch.Tensor, dist.Work]] = []

    def post(self) -> None:
        p = self.pipeline
        if p.rank != p.last_rank:
            for k, spec in enumerate(p.outputs):
                buffer = torch.empty(spec.shape.at(self.sizes), dtype=spec.dtype, device=self.device)
                self.posted.append((buffer, p.comm.irecv(buffer, p.last_rank, self.tag + k)))

    def send(self, results: dict[int, tuple]) -> None:
        p = self.pipeline
        self.merged = [
            merge_outputs([results[mb][k] for mb in range(p.n_microbatches)], p.loss_reduction, spec.merge)
            for k, spec in enumerate(p.outputs)
        ]
        for peer in self.others:
            for k, value in enumerate(self.merged):
                p.comm.isend(value, peer, self.tag + k, f"output {k} of the step")

    def receive(self) -> list[torch.Tensor]:
        p = self.pipeline
        merged: list[torch.Tensor] = []
        if p.rank == p.last_rank:
            assert self.merged is not None  # the executor handed the last stage's results to send()
            merged = self.merged
        else:
            for k, (buffer, work) in enumerate(self.posted):
                p.comm.wait(work, f"receiving output {k} of the step from rank {p.last_rank}", p.last_rank)
                merged.append(buffer)
        if p.loss_index is not None and p.mesh.dp_degree > 1:  # the global loss: mean over replicas
            loss = merged[p.loss_index]
            p.comm.all_reduce(loss, p.mesh.dp_group, "the loss over data-parallel replicas")
            loss /= p.mesh.dp_degree
        return merged
