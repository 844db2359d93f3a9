"""Runs one rank's action list (F, B, I, W per stage and microbatch) over its stage modules.

Communication follows from the stage plans, not from the schedule: before a forward the stage receives
its boundary inputs, after it sends its outputs to every consumer stage; a backward receives the gradient
of each output from its consumers and sends the gradient of each received input to its producer. Receives
for the next action are posted before the current one computes, so transfers overlap compute; sends are
asynchronous and their buffers are held until the step ends. Stages on the same rank hand tensors over
in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

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


@dataclass
class Executor:
    plans: list[StagePlan]  # every stage (all ranks compute the same plans); only local ones run here
    rank_of_stage: dict[int, int]
    comm: Comm
    n_microbatches: int
    loss_index: int | None  # which final output is the loss (training only)
    loss_scale: float  # d(step loss) / d(microbatch loss): 1/M for a mean, 1 for a sum
    reducers: dict[int, Any] = field(default_factory=dict)  # stage -> its DDP wrapper (data parallel)
    peak_inflight: dict[int, int] = field(default_factory=dict)
    timeline: Timeline = field(default_factory=Timeline)  # the last run's
    sizes: Sizes = field(default_factory=lambda: Sizes({}))  # this call's size symbols (set per call)
    _tags: dict[tuple[str, int], int] = field(default_factory=dict)
    _local: dict[tuple[str, int, int, int], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.plans)
        for k, b in enumerate(b for p in self.plans for b in p.sends):
            for c in b.consumers:
                self._tags[(b.name, c)] = k * n + c
        self.last = n - 1
        self.rank = dist.get_rank()

    # -- tags and peers ---------------------------------------------------------------------------
    def _tag(self, b: Boundary, consumer: int, mb: int, direction: int) -> int:
        return (self._tags[(b.name, consumer)] * self.n_microbatches + mb) * 2 + direction

    def _local_stage(self, stage: int) -> bool:
        return self.rank_of_stage[stage] == self.rank

    # -- receives ---------------------------------------------------------------------------------
    def _post(self, action: Action) -> list[tuple[torch.Tensor, dist.Work | None, str, int | None]]:
        """Receives ``action`` needs, posted now; each is (buffer, work or None if local, what, peer)."""
        plan = self.plans[action.stage]
        posted = []
        if action.kind is Kind.F:
            for b in plan.receives:
                posted.append(self._recv(b, b.producer, action.stage, action.mb, _FWD, "activation"))
        elif action.kind in (Kind.B, Kind.I) and action.stage != self.last:
            for b in plan.sends:
                if b.requires_grad:
                    for c in b.consumers:
                        posted.append(self._recv(b, c, action.stage, action.mb, _BWD, "gradient"))
        return posted

    def _recv(self, b: Boundary, peer_stage: int, me: int, mb: int, direction: int, kind: str):
        consumer = me if direction == _FWD else peer_stage
        what = f"{kind} {b.name} of microbatch {mb} (stage {peer_stage} -> {me})"
        if self._local_stage(peer_stage):  # handed over in memory; taken when the action runs
            return (b.name, consumer, mb, direction), None, what, None
        peer = self.rank_of_stage[peer_stage]
        buffer = torch.empty(b.shape.at(self.sizes), dtype=b.dtype, device=self.device)
        return buffer, self.comm.irecv(buffer, peer, self._tag(b, consumer, mb, direction)), what, peer

    def _send(
        self, tensor: torch.Tensor, b: Boundary, consumer: int, to_stage: int, mb: int, direction: int
    ) -> None:
        if self._local_stage(to_stage):
            self._local[(b.name, consumer, mb, direction)] = tensor.detach()
            return
        what = f"{'activation' if direction == _FWD else 'gradient'} {b.name} of microbatch {mb}"
        self.comm.isend(tensor, self.rank_of_stage[to_stage], self._tag(b, consumer, mb, direction), what)

    def _wait(self, posted) -> list[torch.Tensor]:
        out = []
        for buffer, work, what, peer in posted:
            if work is None:
                buffer = self._local.pop(buffer)
            else:
                self.comm.wait(work, f"receiving {what}", peer)
            out.append(buffer)
        return out

    # -- the step ---------------------------------------------------------------------------------
    @property
    def free_tag(self) -> int:
        """The first tag no transfer between stages uses."""
        return (max(self._tags.values(), default=-1) + 1) * self.n_microbatches * 2

    def run(
        self,
        actions: Sequence[Action | None],
        inputs: list[list[torch.Tensor]],
        train: bool,
        on_results: Callable[[dict[int, tuple]], None] | None = None,
    ) -> dict[int, tuple]:
        """Execute this rank's actions; return the last stage's outputs per microbatch (if it is here).

        ``on_results`` gets them as soon as the last microbatch's forward is done, so they can travel to
        the other ranks while the backward drains."""
        self.device = device_of(inputs)
        compute = [a for a in actions if a is not None and a.kind.is_compute]
        inflight: dict[tuple[int, int], _InFlight] = {}
        results: dict[int, tuple] = {}
        self.peak_inflight = {}
        events = []
        start = time.perf_counter()
        last_weight_work = {a.stage: i for i, a in enumerate(compute) if a.kind in (Kind.B, Kind.W)}
        posted = self._post(compute[0]) if compute else []
        for i, action in enumerate(compute):
            if train and action.stage in self.reducers and last_weight_work[action.stage] == i:
                # DDP all-reduces the gradients, accumulated over every microbatch, exactly once per step:
                # armed only for the stage's last weight-gradient work (a B, or a W of zero-bubble schedules)
                reducer = self.reducers[action.stage].reducer
                reducer._rebuild_buckets()  # as DDP's forward does: buckets in gradient-ready order, once
                # from these outputs DDP finds the parameters that get no gradient (if it looks for them)
                reducer.prepare_for_backward(inflight[(action.stage, action.mb)].outputs)
            upcoming = self._post(compute[i + 1]) if i + 1 < len(compute) else []
            received = self._wait(posted)
            t0 = time.perf_counter()
            if action.kind is Kind.F:
                self._forward(action, inputs[action.mb], received, train, inflight, results)
                live = sum(1 for (s, _) in inflight if s == action.stage)
                self.peak_inflight[action.stage] = max(self.peak_inflight.get(action.stage, 0), live)
                if (
                    on_results is not None
                    and len(results) == self.n_microbatches
                    and action.stage == self.last
                ):
                    on_results(results)
            elif action.kind in (Kind.B, Kind.I):
                self._backward_input(action, received, inflight, weights_too=action.kind is Kind.B)
            else:
                self._backward_weight(action, inflight)
            events.append(TimelineEvent(self.rank, str(action), t0 - start, time.perf_counter() - start))
            posted = upcoming
        self.comm.flush()
        self.timeline = Timeline(events)
        if inflight:
            raise PipelineError(
                f"the schedule left backward work undone for (stage, microbatch) {sorted(inflight)}; give every "
                "forward its backward (validate() names the missing action)"
            )
        return results

    def _forward(self, action, mb_inputs, received, train, inflight, results) -> None:
        plan = self.plans[action.stage]
        leaves, leaf_bs = [], []
        for tensor, b in zip(received, plan.receives, strict=True):
            if train and b.requires_grad:
                tensor.requires_grad_(True)
                leaves.append(tensor)
                leaf_bs.append(b)
        outputs = plan.module(*[mb_inputs[i] for i in plan.inputs], *received)
        if action.stage == self.last:
            results[action.mb] = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)
            if train:
                loss = outputs[self.loss_index]
                inflight[(action.stage, action.mb)] = _InFlight(leaves, leaf_bs, [loss], [None])
            return
        for tensor, b in zip(outputs, plan.sends, strict=True):
            for c in b.consumers:
                self._send(tensor, b, c, c, action.mb, _FWD)
        if train:
            keep = [
                (o, b)
                for o, b in zip(outputs, plan.sends, strict=True)
                if b.requires_grad and o.requires_grad
            ]
            inflight[(action.stage, action.mb)] = _InFlight(
                leaves, leaf_bs, [o for o, _ in keep], [b for _, b in keep]
            )

    def _output_grads(self, action, state: _InFlight, received: list[torch.Tensor]) -> list[torch.Tensor]:
        if action.stage == self.last:
            return [torch.full_like(state.outputs[0], self.loss_scale)]
        plan, grads, it = self.plans[action.stage], [], iter(received)
        per_boundary = {
            b.name: sum_of
            for b in plan.sends
            if b.requires_grad
            for sum_of in [[next(it) for _ in b.consumers]]
        }
        for b in state.output_boundaries:
            assert b is not None  # only the last stage's loss has no boundary, and it returned above
            parts = per_boundary[b.name]
            total = parts[0]
            for p in parts[1:]:
                total = total + p
            grads.append(total)
        return grads

    def _backward_input(self, action, received, inflight, weights_too: bool) -> None:
        state = inflight[(action.stage, action.mb)]
        grads = self._output_grads(action, state, received)
        params = [p for p in self.plans[action.stage].module.parameters() if p.requires_grad]
        if weights_too:
            if state.outputs:
                torch.autograd.backward(state.outputs, grads, inputs=params + state.leaves)
            del inflight[(action.stage, action.mb)]
            leaf_grads = [leaf.grad for leaf in state.leaves]
        else:
            leaf_grads, state.weight_work = backward_input(state.outputs, grads, state.leaves)
        for leaf, g, b in zip(state.leaves, leaf_grads, state.leaf_boundaries, strict=True):
            self._send(
                g if g is not None else torch.zeros_like(leaf), b, action.stage, b.producer, action.mb, _BWD
            )

    def _backward_weight(self, action, inflight) -> None:
        state = inflight.pop((action.stage, action.mb))
        params = [p for p in self.plans[action.stage].module.parameters() if p.requires_grad]
        backward_weight(state.weight_work, params)
