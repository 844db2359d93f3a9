"""Runs one rank's lowered action table, the table that ``validate()`` proved, action by action.

Each action kind has one handler: ``RECV_*`` posts a receive into a fresh buffer and returns at once;
the compute action that needs the message waits for it; ``F``/``B``/``I``/``W`` run the stage module or
its backward; ``SEND_*`` posts the send of a result computed before it; ``REDUCE`` arms the stage's DDP
reduction for the weight-gradient work that follows. Which boundary tensors a send or receive carries,
their tags and peers, and each stage's parameters are worked out once, when the executor is built, so a
step does no per-action planning. Stages on the same rank hand tensors over in memory. Every action of
the table becomes an event of the step's timeline: a receive's event is the time its compute action
waited for it, so a picture shows where a rank stood idle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.graph import _engine_run_backward

from ..codegen import Boundary, StagePlan
from ..errors import PipelineError
from ..schedules import Action, Kind, Timeline, TimelineEvent
from ..shapes import Sizes
from .comm import Comm
from .split_backward import WeightWork, backward_input, backward_weight

__all__ = ["Executor", "device_of"]

_FWD, _BWD = 0, 1


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
    weight_work: WeightWork | None = None  # kept between I and W


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


@dataclass(frozen=True)
class _Route:
    """One boundary tensor that a send or receive action carries."""

    boundary: Boundary
    key: tuple[str, int]  # (boundary name, consumer stage): with microbatch and direction, names a message
    tag: int  # the message's tag for microbatch 0; microbatch k adds 2 k
    peer_rank: int


@dataclass(frozen=True)
class _Message:
    """Names a message in an error: formatted only if one happens, not on every send."""

    action: Action | None
    boundary: str
    mb: int
    direction: int

    def __str__(self) -> str:
        what = "activation" if self.direction == _FWD else "gradient"
        return f"the {what} {self.boundary} of microbatch {self.mb} ({self.action})"


class _Clock:
    """Event times of one step: the host's clock, or on CUDA (when asked) the stream's, so that a
    timeline shows when the GPU ran each action rather than when the host queued it."""

    def __init__(self, device: torch.device, gpu: bool) -> None:
        self.gpu = gpu and device.type == "cuda"
        self.origin = time.perf_counter()
        self.marks: list[Any] = []
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

    def timeline(self, rank: int, spans: list[tuple[Action | str, Any, Any]]) -> Timeline:
        if self.gpu:
            torch.cuda.synchronize()
        events = [TimelineEvent(rank, str(what), self.seconds(a), self.seconds(b)) for what, a, b in spans]
        return Timeline(sorted(events, key=lambda e: (e.start, e.end)))


@dataclass
class Executor:
    plans: list[StagePlan]  # every stage (all ranks compute the same plans); only local ones run here
    rank_of_stage: dict[int, int]
    comm: Comm
    n_microbatches: int
    loss_index: int | None  # which final output is the loss (training only)
    loss_scale: float  # d(step loss) / d(microbatch loss): 1/M for a mean, 1 for a sum
    reducers: dict[int, Any] = field(default_factory=dict)  # stage -> its DDP wrapper (data parallel)
    gpu_timeline: bool = False  # on CUDA, time events on the stream (costs a synchronize per step)
    peak_inflight: dict[int, int] = field(default_factory=dict)
    sizes: Sizes = field(default_factory=lambda: Sizes({}))  # this call's size symbols (set per call)

    def __post_init__(self) -> None:
        n = len(self.plans)
        self.rank = dist.get_rank()
        self.spans: list[tuple[Action | str, Any, Any]] = []  # the last run's (see run)
        self.last = n - 1
        tags: dict[tuple[str, int], int] = {}
        for k, b in enumerate(b for p in self.plans for b in p.sends):
            for c in b.consumers:
                tags[(b.name, c)] = k * n + c
        self._tag_space = (max(tags.values(), default=-1) + 1) * self.n_microbatches * 2
        self._routes: dict[tuple[Kind, int, int], list[_Route]] = {}
        for plan in self.plans:
            s = plan.index
            for b in plan.receives:  # forward messages into s, gradients back out of s
                key = (b.name, s)
                base = tags[key] * self.n_microbatches * 2
                peer = self.rank_of_stage[b.producer]
                self._add(Kind.RECV_F, s, b.producer, _Route(b, key, base + _FWD, peer))
                if b.requires_grad:
                    self._add(Kind.SEND_B, s, b.producer, _Route(b, key, base + _BWD, peer))
            for b in plan.sends:  # forward messages out of s, gradients back into s
                for c in b.consumers:
                    key = (b.name, c)
                    base = tags[key] * self.n_microbatches * 2
                    peer = self.rank_of_stage[c]
                    self._add(Kind.SEND_F, s, c, _Route(b, key, base + _FWD, peer))
                    if b.requires_grad:
                        self._add(Kind.RECV_B, s, c, _Route(b, key, base + _BWD, peer))
        # how many send actions (one per peer stage on another rank) each result of a stage goes out in
        self._peers = {(kind, plan.index): 0 for kind in (Kind.SEND_F, Kind.SEND_B) for plan in self.plans}
        for kind, stage, _ in self._routes:
            if kind in (Kind.SEND_F, Kind.SEND_B):
                self._peers[(kind, stage)] += 1
        self._send_index = {(plan.index, b.name): i for plan in self.plans for i, b in enumerate(plan.sends)}
        self._handlers: dict[Kind, Callable[[Action], None]] = {
            Kind.RECV_F: self._post_receives,
            Kind.RECV_B: self._post_receives,
            Kind.SEND_F: self._send_activations,
            Kind.SEND_B: self._send_gradients,
            Kind.F: self._forward,
            Kind.B: self._backward,
            Kind.I: self._backward,
            Kind.W: self._weight_backward,
            Kind.REDUCE: self._arm_reduction,
        }

    def _add(self, kind: Kind, stage: int, peer: int, route: _Route) -> None:
        if self.rank_of_stage[stage] != self.rank_of_stage[peer]:
            self._routes.setdefault((kind, stage, peer), []).append(route)

    @property
    def timeline(self) -> Timeline:
        """The last run's events (built when asked: most steps have no one to hand them to)."""
        return self.clock.timeline(self.rank, self.spans) if self.spans else Timeline()

    @property
    def free_tag(self) -> int:
        """The first tag no transfer between stages uses."""
        return self._tag_space

    # -- the step ---------------------------------------------------------------------------------
    def run(
        self,
        table: Sequence[Action | None],
        inputs: list[list[torch.Tensor]],
        train: bool,
        on_results: Callable[[dict[int, tuple]], None] | None = None,
        prologue: Sequence[tuple[str, Callable[[], None]]] = (),
        epilogue: Sequence[tuple[str, Callable[[], None]]] = (),
    ) -> dict[int, tuple]:
        """Execute this rank's lowered ``table``; return the last stage's outputs per microbatch (if it is
        here). ``on_results`` gets them as soon as the last microbatch's forward is done, so they can
        travel to the other ranks while the backward drains. ``prologue`` and ``epilogue`` are the step's
        named work outside the table (the caller's), run before and after it and timed with it."""
        self.device = device_of(inputs)
        self.inputs, self.train, self.on_results = inputs, train, on_results
        # what is in flight between actions, keyed by message, by (stage, mb) or by action
        self.inbox: dict[tuple[str, int, int, int], tuple[torch.Tensor, Any, Action | None]] = {}
        self.outbox: dict[tuple[int, int, int], Any] = {}
        self.sends_left: dict[tuple[int, int, int], int] = {}
        self.inflight: dict[tuple[int, int], _InFlight] = {}
        self.results: dict[int, tuple] = {}
        self.peak_inflight = {}
        self.params = {
            s: [p for p in plan.module.parameters() if p.requires_grad]
            for s, plan in enumerate(self.plans)
            if self.rank_of_stage[s] == self.rank
        }
        clock = _Clock(self.device, self.gpu_timeline)
        self.clock = clock
        # (action or named work, start, end): labels are formatted only if the timeline is asked for
        self.spans = []
        self.receive_spans: dict[Action, list[Any]] = {}  # [first wait's start, last wait's end, waited]
        handlers, spans = self._handlers, self.spans
        for name, work in prologue:
            start = clock.now()
            work()
            spans.append((name, start, clock.now()))
        receives = (Kind.RECV_F, Kind.RECV_B)
        # over NCCL the sends and receives between two compute actions go out as one batch (see Comm)
        batching = self.comm.in_issue_order
        for action in table:
            if action is None:
                continue
            if batching and action.kind.is_p2p:
                self.comm.open_batch()
            elif batching:
                self.comm.close_batch()
            start = self.waited_until = clock.now()
            handlers[action.kind](action)
            if action.kind not in receives:  # a receive's event is the wait for it (see _take)
                spans.append((action, self.waited_until, clock.now()))
        self.comm.close_batch()
        spans += [(a, span[0], span[1]) for a, span in self.receive_spans.items()]
        for name, work in [("wait for sends", self.comm.flush), *epilogue]:
            start = clock.now()
            work()
            spans.append((name, start, clock.now()))
        if self.inflight:
            raise PipelineError(
                f"the schedule left backward work undone for (stage, microbatch) {sorted(self.inflight)}; give "
                "every forward its backward (validate() names the missing action)"
            )
        results, self.results, self.inbox, self.outbox = self.results, {}, {}, {}
        return results

    # -- communication ----------------------------------------------------------------------------
    def _post_receives(self, action: Action) -> None:
        direction = _FWD if action.kind is Kind.RECV_F else _BWD
        assert action.peer is not None  # a receive names its peer stage
        posted = self.clock.now()
        self.receive_spans[action] = [posted, posted, False]
        for route in self._routes.get((action.kind, action.stage, action.peer), ()):
            b = route.boundary
            buffer = torch.empty(b.shape.at(self.sizes), dtype=b.dtype, device=self.device)
            work = self.comm.irecv(buffer, route.peer_rank, route.tag + 2 * action.mb)
            self.inbox[(*route.key, action.mb, direction)] = (buffer, work, action)

    def _take(self, key: tuple[str, int], mb: int, direction: int) -> torch.Tensor:
        """A message for the running action: handed over in memory, or received (waited for here)."""
        try:
            tensor, work, recv = self.inbox.pop((*key, mb, direction))
        except KeyError:
            what = "activation" if direction == _FWD else "gradient"
            raise PipelineError(
                f"rank {self.rank}: the {what} {key[0]} of microbatch {mb} for stage {key[1]} was never received: "
                "the table lacks its RECV action before the action that needs it (validate() checks this)"
            ) from None
        if work is not None:
            assert recv is not None and recv.peer is not None  # a posted receive names its action
            start = self.clock.now()
            self.comm.wait(work, _Message(recv, key[0], mb, direction), self.rank_of_stage[recv.peer])
            self.waited_until = self.clock.now()
            span = self.receive_spans[recv]
            if not span[2]:
                span[0], span[2] = start, True
            span[1] = self.waited_until
        return tensor

    def _send_activations(self, action: Action) -> None:
        routes = self._routes.get((Kind.SEND_F, action.stage, action.peer), ())  # type: ignore[arg-type]
        if not routes:  # the stage graph's edge carries nothing here (no tensor, or none with a gradient)
            return
        key = (action.stage, action.mb, _FWD)
        outputs = self.outbox[key]
        for route in routes:
            name = route.boundary.name
            tensor = outputs[self._send_index[(action.stage, name)]]
            self.comm.isend(
                tensor, route.peer_rank, route.tag + 2 * action.mb, _Message(action, name, action.mb, _FWD)
            )
        self._sent(key)

    def _send_gradients(self, action: Action) -> None:
        routes = self._routes.get((Kind.SEND_B, action.stage, action.peer), ())  # type: ignore[arg-type]
        if not routes:
            return
        key = (action.stage, action.mb, _BWD)
        grads = self.outbox[key]
        for route in routes:
            name = route.boundary.name
            self.comm.isend(
                grads[name],
                route.peer_rank,
                route.tag + 2 * action.mb,
                _Message(action, name, action.mb, _BWD),
            )
        self._sent(key)

    def _sent(self, key: tuple[int, int, int]) -> None:
        """Count one send action of a result; the last one releases it (Comm holds what is in flight)."""
        self.sends_left[key] -= 1
        if not self.sends_left[key]:
            del self.outbox[key], self.sends_left[key]

    # -- compute ----------------------------------------------------------------------------------
    def _forward(self, action: Action) -> None:
        stage, mb = action.stage, action.mb
        plan = self.plans[stage]
        received = [self._take((b.name, stage), mb, _FWD) for b in plan.receives]
        leaves, leaf_bs = [], []
        if self.train:
            for tensor, b in zip(received, plan.receives, strict=True):
                if b.requires_grad:
                    tensor.requires_grad_(True)
                    leaves.append(tensor)
                    leaf_bs.append(b)
        mb_inputs = self.inputs[mb]
        outputs = plan.module(*[mb_inputs[i] for i in plan.inputs], *received)
        if stage == self.last:
            self.results[mb] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)
            if self.train:
                loss = outputs[self.loss_index]
                self.inflight[(stage, mb)] = _InFlight(leaves, leaf_bs, [loss], [None])
            if self.on_results is not None and len(self.results) == self.n_microbatches:
                self.on_results(self.results)
        else:
            if self._peers[(Kind.SEND_F, stage)]:
                self.outbox[(stage, mb, _FWD)] = outputs
                self.sends_left[(stage, mb, _FWD)] = self._peers[(Kind.SEND_F, stage)]
            for tensor, b in zip(outputs, plan.sends, strict=True):
                for c in b.consumers:
                    if self.rank_of_stage[c] == self.rank:
                        self.inbox[(b.name, c, mb, _FWD)] = (tensor.detach(), None, None)
            if self.train:
                keep = [
                    (o, b)
                    for o, b in zip(outputs, plan.sends, strict=True)
                    if b.requires_grad and o.requires_grad
                ]
                self.inflight[(stage, mb)] = _InFlight(
                    leaves, leaf_bs, [o for o, _ in keep], [b for _, b in keep]
                )
        live = sum(1 for (s, _) in self.inflight if s == stage)
        self.peak_inflight[stage] = max(self.peak_inflight.get(stage, 0), live)

    def _output_grads(self, action: Action, state: _InFlight) -> list[torch.Tensor]:
        if action.stage == self.last:
            return [torch.full_like(state.outputs[0], self.loss_scale)]
        summed = {}  # every gradient that came back, also for outputs whose forward value needed none
        for b in self.plans[action.stage].sends:
            if b.requires_grad:
                parts = [self._take((b.name, c), action.mb, _BWD) for c in b.consumers]
                total = parts[0]
                for p in parts[1:]:
                    total = total + p
                summed[b.name] = total
        return [summed[b.name] for b in state.output_boundaries if b is not None]

    def _backward(self, action: Action) -> None:
        """B (input and weight gradients) or I (input gradients only; the weight half waits for W)."""
        stage, mb = action.stage, action.mb
        state = self.inflight[(stage, mb)]
        grads = self._output_grads(action, state)
        if action.kind is Kind.B:
            if state.outputs:
                _run_backward(state.outputs, grads)
            del self.inflight[(stage, mb)]
            leaf_grads = [leaf.grad for leaf in state.leaves]
        else:
            leaf_grads, state.weight_work = backward_input(state.outputs, grads, state.leaves)
        to_send = {}
        for leaf, g, b in zip(state.leaves, leaf_grads, state.leaf_boundaries, strict=True):
            g = g if g is not None else torch.zeros_like(leaf)
            if self.rank_of_stage[b.producer] == self.rank:
                self.inbox[(b.name, stage, mb, _BWD)] = (g.detach(), None, None)
            else:
                to_send[b.name] = g
        if to_send:
            self.outbox[(stage, mb, _BWD)] = to_send
            self.sends_left[(stage, mb, _BWD)] = self._peers[(Kind.SEND_B, stage)]

    def _weight_backward(self, action: Action) -> None:
        state = self.inflight.pop((action.stage, action.mb))
        assert state.weight_work is not None  # its I ran first (the table is validated)
        backward_weight(state.weight_work, self.params[action.stage])

    def _arm_reduction(self, action: Action) -> None:
        """DDP all-reduces the gradients, accumulated over every microbatch, once per step: from hooks
        inside the weight-gradient work that follows (the table puts this right before it)."""
        if not self.train or action.stage not in self.reducers:
            return
        reducer = self.reducers[action.stage].reducer
        reducer._rebuild_buckets()  # as DDP's forward does: buckets in gradient-ready order, once
        # from these outputs DDP finds the parameters that get no gradient (if it looks for them)
        reducer.prepare_for_backward(self.inflight[(action.stage, action.mb)].outputs)
