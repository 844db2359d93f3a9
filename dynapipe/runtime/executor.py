"""Runs one rank's lowered action table, the table that ``validate()`` proved, action by action.

Each action kind has one handler: ``RECV_*`` posts a receive into a fresh buffer and returns at once;
the compute action that needs the message waits for it; ``F``/``B``/``I``/``W`` run the stage module or
its backward; ``SEND_*`` posts the send of a result computed before it; ``REDUCE`` arms the stage's DDP
reduction for the weight-gradient work that follows. What a send or receive carries is worked out once
(:class:`~dynapipe.runtime.routes.Routes`); what is in flight during a step lives in a :class:`Step`,
made anew for each. Stages on the same rank hand tensors over in memory. Every action of the table
becomes an event of the step's timeline: a receive's event is the time its compute action waited for
it, so a picture shows where a rank stood idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.graph import _engine_run_backward

from ..codegen import Boundary, StagePlan
from ..compiled_stage import CompiledStage
from ..errors import PipelineError
from ..graph import Sizes
from ..schedules import Action, Kind, Timeline, TimelineEvent
from .comm import Comm
from .routes import BWD, FWD, Message, Routes
from .split_backward import backward_input, backward_weight
from .watchdog import PROGRESS, watching

__all__ = ["Executor", "Step", "device_of"]

NamedWork = Sequence[tuple[str, Callable[[], None]]]


def device_of(inputs: list[list[torch.Tensor]]) -> torch.device:
    """Where a step runs: the device of its first input."""
    return inputs[0][0].device if inputs and inputs[0] else torch.device("cpu")


@dataclass
class _InFlight:
    """What a forward leaves for its backward."""

    leaves: list[torch.Tensor]  # received boundary inputs that need a gradient
    leaf_boundaries: list[Boundary]
    outputs: list[torch.Tensor]  # outputs that carry a gradient back
    output_boundaries: list[Boundary | None]  # None: the loss
    weight_work: Callable[[], None] | None = None  # kept between I and W


def _run_backward(outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``torch.autograd.backward(outputs, grads)`` into every leaf (the stage's parameters and received
    inputs), without its Python-side re-checking of ``grads``, which costs as much as a small stage's
    backward: these gradients have the outputs' shapes by construction, and the engine checks them
    again anyway. Tensor subclasses take the public path, which dispatches on them."""
    if all(type(t) is torch.Tensor for t in outputs):
        _engine_run_backward(
            tuple(outputs), tuple(grads), False, False, (), allow_unreachable=True, accumulate_grad=True
        )
    else:
        torch.autograd.backward(outputs, grads)


def _backward_input_compiled(
    compiled: CompiledStage,
    outputs: list[torch.Tensor],
    grads: list[torch.Tensor],
    leaves: list[torch.Tensor],
) -> tuple[list[torch.Tensor | None], Callable[[], None] | None]:
    """The received inputs' gradients from a compiled stage's input-gradient graph, and the work that runs
    its weight-gradient graph into the parameters' ``.grad`` later."""
    if not outputs:
        return [None] * len(leaves), None
    compiled.defer_weights = True
    try:
        _run_backward(outputs, grads)
    finally:
        compiled.defer_weights = False
    work = compiled.take_weight_work()
    return [leaf.grad for leaf in leaves], work


class _Clock:
    """Event times of one step: the host's clock, or on CUDA (when asked) the stream's, so that a
    timeline shows when the GPU ran each action rather than when the host queued it."""

    def __init__(self, device: torch.device, gpu: bool) -> None:
        self.gpu = gpu and device.type == "cuda"
        self.origin = time.perf_counter()
        self.started = time.time()  # the same moment on the wall clock, which every rank's host shares
        if self.gpu:
            self.first = torch.cuda.Event(enable_timing=True)
            self.first.record()

    def now(self) -> Any:
        if not self.gpu:
            return time.perf_counter() - self.origin
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, mark: Any) -> float:
        return mark if not self.gpu else self.first.elapsed_time(mark) / 1e3


@dataclass
class Executor:
    """What every step of a pipeline on this rank shares: the stages, routes and reducers."""

    stages: list[StagePlan]  # every stage (all ranks hold the same list); only local ones run here
    rank_of_stage: dict[int, int]
    comm: Comm
    n_microbatches: int
    loss_index: int | None  # which final output is the loss (training only)
    loss_scale: float  # d(step loss) / d(microbatch loss): 1/M for a mean, 1 for a sum
    reducers: dict[int, Any] = field(default_factory=dict)  # stage -> its DDP wrapper (data parallel)
    gpu_timeline: bool = False  # on CUDA, time events on the stream (costs a synchronize per step)
    compiled: dict[int, CompiledStage] = field(default_factory=dict)  # stage -> inductor's version of it
    watchdog_s: float = 0.0  # a step without progress for this long stops every rank (0: never)

    def __post_init__(self) -> None:
        self.rank = dist.get_rank()
        self.last = len(self.stages) - 1
        self.routes = Routes(self.stages, self.rank_of_stage, self.n_microbatches)
        self.params = {
            s: [p for p in plan.module.parameters() if p.requires_grad]
            for s, plan in enumerate(self.stages)
            if self.rank_of_stage[s] == self.rank
        }

    def run(
        self,
        table: Sequence[Action | None],
        inputs: list[list[torch.Tensor]],
        sizes: Sizes,
        train: bool,
        on_results: Callable[[dict[int, tuple]], None] | None = None,
        prologue: NamedWork = (),
        epilogue: NamedWork = (),
    ) -> Step:
        """Execute this rank's lowered ``table`` on the microbatches ``inputs`` at ``sizes``; the returned
        step holds the last stage's outputs per microbatch (if it is here). ``on_results`` gets them as
        soon as the last microbatch's forward is done, so they can travel to the other ranks while the
        backward drains. ``prologue`` and ``epilogue`` are the step's named work outside the table (the
        caller's), run before and after it and timed with it."""
        step = Step(self, inputs, sizes, train, on_results)
        with watching(self.watchdog_s):
            step.run(table, prologue, epilogue)
        return step


class Step:
    """One step on this rank: the messages, results and saved activations in flight, and its events."""

    def __init__(
        self,
        executor: Executor,
        inputs: list[list[torch.Tensor]],
        sizes: Sizes,
        train: bool,
        on_results: Callable[[dict[int, tuple]], None] | None,
    ) -> None:
        self.ex, self.comm, self.routes = executor, executor.comm, executor.routes
        self.inputs, self.sizes, self.train, self.on_results = inputs, sizes, train, on_results
        self.device = device_of(inputs)
        self.clock = _Clock(self.device, executor.gpu_timeline)
        # messages keyed by (boundary, consumer stage, mb, direction); results to send keyed by
        # (stage, mb, direction), each with how many send actions still carry it
        self.inbox: dict[tuple[str, int, int, int], tuple[torch.Tensor, Any, Action | None]] = {}
        self.outbox: dict[tuple[int, int, int], dict[str, torch.Tensor]] = {}
        self.sends_left: dict[tuple[int, int, int], int] = {}
        self.in_flight: dict[tuple[int, int], _InFlight] = {}
        self.results: dict[int, tuple] = {}
        self.peak_in_flight: dict[int, int] = {}
        # (action or named work, start, end): labels are formatted only if the timeline is asked for
        self.spans: list[tuple[Action | str, Any, Any]] = []
        self.receive_spans: dict[Action, list[Any]] = {}  # [first wait's start, last wait's end, waited]
        self.waited_until: Any = None

    def timeline(self) -> Timeline:
        """The step's events: table actions (``kind="action"``) and named work (``kind="step"``)."""
        if self.clock.gpu:
            torch.cuda.synchronize()
        seconds = self.clock.seconds
        events = [
            TimelineEvent(
                self.ex.rank,
                str(what),
                seconds(a),
                seconds(b),
                kind="step" if isinstance(what, str) else "action",
            )
            for what, a, b in self.spans
        ]
        return Timeline(sorted(events, key=lambda e: (e.start, e.end)), started=self.clock.started)

    def run(self, table: Sequence[Action | None], prologue: NamedWork, epilogue: NamedWork) -> None:
        handlers: dict[Kind, Callable[[Action], None]] = {
            Kind.RECV_F: self._post_receives,
            Kind.RECV_B: self._post_receives,
            Kind.SEND_F: self._send,
            Kind.SEND_B: self._send,
            Kind.F: self._forward,
            Kind.B: self._backward,
            Kind.I: self._backward,
            Kind.W: self._weight_backward,
            Kind.REDUCE: self._arm_reduction,
        }
        clock, spans = self.clock, self.spans
        self._named(prologue)
        receives = (Kind.RECV_F, Kind.RECV_B)
        batching = (
            self.comm.in_issue_order
        )  # over NCCL the sends and receives between two compute actions go out as one batch
        for action in table:
            if action is None:
                continue
            PROGRESS.at(action)
            if batching and action.kind.is_p2p:
                self.comm.open_batch()
            elif batching:
                self.comm.close_batch()
            self.waited_until = clock.now()
            handlers[action.kind](action)
            if action.kind not in receives:  # a receive's event is the wait for it (see _take)
                spans.append((action, self.waited_until, clock.now()))
        self.comm.close_batch()
        spans += [(a, span[0], span[1]) for a, span in self.receive_spans.items()]
        self._named([("wait for sends", self.comm.flush), *epilogue])
        if self.in_flight:
            raise PipelineError(
                f"the schedule left backward work undone for (stage, microbatch) {sorted(self.in_flight)}; give "
                "every forward its backward (validate() names the missing action)"
            )

    def _named(self, work: NamedWork) -> None:
        for name, fn in work:
            PROGRESS.at(name)
            start = self.clock.now()
            fn()
            self.spans.append((name, start, self.clock.now()))

    # -- communication ----------------------------------------------------------------------------
    def _post_receives(self, action: Action) -> None:
        direction = FWD if action.kind is Kind.RECV_F else BWD
        posted = self.clock.now()
        self.receive_spans[action] = [posted, posted, False]
        for route in self.routes.of(action):
            b = route.boundary
            buffer = torch.empty(b.shape.at(self.sizes), dtype=b.dtype, device=self.device)
            work = self.comm.irecv(buffer, route.peer_rank, route.tag + 2 * action.mb)
            self.inbox[(*route.key, action.mb, direction)] = (buffer, work, action)

    def _take(self, key: tuple[str, int], mb: int, direction: int) -> torch.Tensor:
        """A message for the running action: handed over in memory, or received (waited for here)."""
        try:
            tensor, work, recv = self.inbox.pop((*key, mb, direction))
        except KeyError:
            what = "activation" if direction == FWD else "gradient"
            raise PipelineError(
                f"rank {self.ex.rank}: the {what} {key[0]} of microbatch {mb} for stage {key[1]} was never "
                "received: the table lacks its RECV action before the action that needs it (validate() checks this)"
            ) from None
        if work is not None:
            assert recv is not None and recv.peer is not None  # a posted receive names its action
            start = self.clock.now()
            PROGRESS.wait_for(recv)
            self.comm.wait(work, Message(recv, key[0], mb, direction), self.ex.rank_of_stage[recv.peer])
            PROGRESS.resume()
            self.waited_until = self.clock.now()
            span = self.receive_spans[recv]
            if not span[2]:
                span[0], span[2] = start, True
            span[1] = self.waited_until
        return tensor

    def _send(self, action: Action) -> None:
        """Send a result computed before: a forward's activations or a backward's input gradients. The
        last send action that carries a result releases it (Comm holds what is in flight)."""
        routes = self.routes.of(action)
        if not routes:
            return
        direction = FWD if action.kind is Kind.SEND_F else BWD
        key = (action.stage, action.mb, direction)
        tensors = self.outbox[key]
        for route in routes:
            name = route.boundary.name
            message = Message(action, name, action.mb, direction)
            self.comm.isend(tensors[name], route.peer_rank, route.tag + 2 * action.mb, message)
        self.sends_left[key] -= 1
        if not self.sends_left[key]:
            del self.outbox[key], self.sends_left[key]

    def _post(self, key: tuple[int, int, int], tensors: dict[str, torch.Tensor], kind: Kind) -> None:
        """Hold ``tensors`` for the send actions of ``kind`` that will carry them."""
        sends = self.routes.peers[(kind, key[0])]
        if sends:
            self.outbox[key] = tensors
            self.sends_left[key] = sends

    # -- compute ----------------------------------------------------------------------------------
    def _forward(self, action: Action) -> None:
        stage, mb, ex = action.stage, action.mb, self.ex
        plan = ex.stages[stage]
        received = [self._take((b.name, stage), mb, FWD) for b in plan.receives]
        leaves, leaf_bs = [], []
        if self.train:
            for tensor, b in zip(received, plan.receives, strict=True):
                if b.requires_grad:
                    tensor.requires_grad_(True)
                    leaves.append(tensor)
                    leaf_bs.append(b)
        mb_inputs = self.inputs[mb]
        outputs = ex.compiled.get(stage, plan.module)(*[mb_inputs[i] for i in plan.inputs], *received)
        if stage == ex.last:
            self.results[mb] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)
            if self.train:
                self.in_flight[(stage, mb)] = _InFlight(leaves, leaf_bs, [outputs[ex.loss_index]], [None])
            if self.on_results is not None and len(self.results) == ex.n_microbatches:
                self.on_results(self.results)
        else:
            if self.routes.peers[(Kind.SEND_F, stage)]:  # some other rank reads these outputs
                sent = {b.name: o for o, b in zip(outputs, plan.sends, strict=True)}
                self._post((stage, mb, FWD), sent, Kind.SEND_F)
            for tensor, b in zip(outputs, plan.sends, strict=True):
                for c in b.consumers:
                    if ex.rank_of_stage[c] == ex.rank:
                        self.inbox[(b.name, c, mb, FWD)] = (tensor.detach(), None, None)
            if self.train:
                keep = [
                    (o, b)
                    for o, b in zip(outputs, plan.sends, strict=True)
                    if b.requires_grad and o.requires_grad
                ]
                self.in_flight[(stage, mb)] = _InFlight(
                    leaves, leaf_bs, [o for o, _ in keep], [b for _, b in keep]
                )
        live = sum(1 for (s, _) in self.in_flight if s == stage)
        self.peak_in_flight[stage] = max(self.peak_in_flight.get(stage, 0), live)

    def _output_grads(self, action: Action, state: _InFlight) -> list[torch.Tensor]:
        if action.stage == self.ex.last:
            return [torch.full_like(state.outputs[0], self.ex.loss_scale)]
        summed = {}  # every gradient that came back, also for outputs whose forward value needed none
        for b in self.ex.stages[action.stage].sends:
            if b.requires_grad:
                parts = [self._take((b.name, c), action.mb, BWD) for c in b.consumers]
                total = parts[0]
                for p in parts[1:]:
                    total = total + p
                summed[b.name] = total
        return [summed[b.name] for b in state.output_boundaries if b is not None]

    def _backward(self, action: Action) -> None:
        """B (input and weight gradients) or I (input gradients only; the weight half waits for W)."""
        stage, mb = action.stage, action.mb
        state = self.in_flight[(stage, mb)]
        grads = self._output_grads(action, state)
        compiled = self.ex.compiled.get(stage)
        if action.kind is Kind.B:
            if state.outputs:
                _run_backward(state.outputs, grads)
            del self.in_flight[(stage, mb)]
            leaf_grads = [leaf.grad for leaf in state.leaves]
        elif compiled is not None:  # the compiled backward's input-gradient graph; its weight graph waits
            leaf_grads, state.weight_work = _backward_input_compiled(
                compiled, state.outputs, grads, state.leaves
            )
        else:
            leaf_grads, work = backward_input(state.outputs, grads, state.leaves)
            state.weight_work = partial(backward_weight, work, self.ex.params[stage])
        to_send = {}
        for leaf, g, b in zip(state.leaves, leaf_grads, state.leaf_boundaries, strict=True):
            g = g if g is not None else torch.zeros_like(leaf)
            if self.ex.rank_of_stage[b.producer] == self.ex.rank:
                self.inbox[(b.name, stage, mb, BWD)] = (g.detach(), None, None)
            else:
                to_send[b.name] = g
        if to_send:
            self._post((stage, mb, BWD), to_send, Kind.SEND_B)

    def _weight_backward(self, action: Action) -> None:
        state = self.in_flight.pop((action.stage, action.mb))
        if state.weight_work is not None:  # None: no output of the stage carried a gradient
            state.weight_work()

    def _arm_reduction(self, action: Action) -> None:
        """DDP all-reduces the gradients, accumulated over every microbatch, once per step: from hooks
        inside the weight-gradient work that follows (the table puts this right before it)."""
        if not self.train or action.stage not in self.ex.reducers:
            return
        reducer = self.ex.reducers[action.stage].reducer
        reducer._rebuild_buckets()  # as DDP's forward does: buckets in gradient-ready order, once
        # from these outputs DDP finds the parameters that get no gradient (if it looks for them)
        reducer.prepare_for_backward(self.in_flight[(action.stage, action.mb)].outputs)
