"""Timing a graph's operations on the real device: each distinct signature once, on random tensors.

Transformer graphs repeat a few dozen signatures layer after layer, so timing one node of each takes
seconds where timing every node took minutes. Parameters are random too, so a model built under
``dynapipe.empty_init()`` (no weights yet) is timed as well. Each time is the median of a few rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from ..graph import CapturedGraph, grad_modes
from .rates import OpTimes
from .records import GraphCosts, NodeCost
from .runner import Runner, backward_to, call_node, output_grads
from .sizes import concrete, has_tensor

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

__all__ = ["backward_entry_s", "fit_roofline", "graph_device", "random_like", "stand_in", "time_ops", "timed"]


def graph_device(graph: fx.Graph) -> torch.device:
    for node in graph.nodes:
        for leaf in tree_flatten(node.meta.get("example_value"))[0]:
            if isinstance(leaf, torch.Tensor):
                return leaf.device
    return torch.device("cpu")


def time_ops(
    captured: CapturedGraph,
    costs: GraphCosts,
    wanted: Collection[str],
    rounds: int = 10,
    entry: float | None = None,
) -> dict[str, OpTimes]:
    """Forward, input-gradient and weight-gradient seconds of one node of each signature in ``wanted``,
    each backward without the autograd engine's entry (``entry``, else timed here: :func:`backward_entry_s`;
    an action pays it once).

    Each phase runs ``rounds`` times in a row, its time the median of the calls that page-faulted least
    (:func:`_steady`): its own time, as if it had a core to itself (ranks that share cores are
    descheduled now and then; the simulator charges that where they compute at once, :mod:`dynapipe.
    schedules.sharing`)."""
    device = graph_device(captured.gm.graph)
    modes = grad_modes(captured.gm.graph)
    first: dict[str, fx.Node] = {}
    for node, sig in costs.signatures.items():
        if sig is not None and sig in wanted and sig not in first:
            first[sig] = node
    # timing runs dropout too: leave the user's random streams as they were
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        runs = {
            sig: _runs(captured, node, costs.nodes[node], modes[node], device) for sig, node in first.items()
        }
        entry = backward_entry_s(device) if entry is None else entry
        samples = {
            sig: [_steady(fn, rounds, device) for fn in fns] for sig, fns in runs.items() if fns is not None
        }
    out: dict[str, OpTimes] = {}
    for sig, node in first.items():
        if sig not in samples:  # an op that will not run on random inputs keeps its estimate
            cost = costs.nodes[node]
            out[sig] = (cost.forward, cost.backward_input, cost.backward_weight)
            continue
        f, i, w, both = (samples[sig] + [0.0] * 4)[:4]
        i, w = max(i - f - entry, 0.0) if i else 0.0, max(w - f - entry, 0.0) if w else 0.0
        if both and i + w > 0:  # a full backward computes both at once: its time, split as the halves'
            full = max(both - f - entry, 0.0)
            i, w = full * i / (i + w), full * w / (i + w)
        out[sig] = (f, i, w)
    return out


def _steady(fn: Callable[[], Any], rounds: int, device: torch.device) -> float:
    """Median seconds of ``rounds`` calls of ``fn`` in a row, of those that page-faulted least.

    A running stage allocates the same sizes every microbatch and its allocator reuses the memory (a
    2-rank Llama pays no page faults in most steps). Timed among other operations, a large output lands
    in memory the allocator had handed back to the system and pays a fault per page (here a 32 MB LM
    head took 35 ms instead of 24): calls in a row let the allocator settle on ``fn``'s sizes, and a call
    that still faulted more than the fewest is dropped."""
    samples = []
    for _ in range(rounds):  # fn ran once already (_runs): warm
        before = _faults()
        seconds = timed(fn, device)
        samples.append((_faults() - before, seconds))
    fewest = min(f for f, _ in samples)
    return statistics.median(t for f, t in samples if f == fewest)


def _faults() -> int:
    """Page faults of this thread so far (0 where the platform does not count them)."""
    if resource is None:
        return 0
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


def _runs(
    captured: CapturedGraph, node: fx.Node, cost: NodeCost, grad_mode: bool, device: torch.device
) -> list[Callable[[], Any]] | None:
    """What to time of ``node`` on random inputs: its forward, then forward and input gradient, forward
    and weight gradient, forward and both (those it has); None if it will not run on them."""
    if not has_tensor(node.meta.get("example_value")):
        return []
    runner = Runner(
        captured, lambda meta, grad: random_like(meta, grad, meta.device), lambda a: stand_in(a, device)
    )
    try:
        args, kwargs, inputs, params = runner.inputs(node)
        activations = [
            t
            for src, v in inputs.items()
            if src.op != "get_attr"
            for t in tree_flatten(v)[0]
            if isinstance(t, torch.Tensor)
        ]

        def forward() -> Any:
            with torch.set_grad_enabled(grad_mode):
                return call_node(node, captured.gm, args, kwargs)

        out = forward()
        runs = [forward]
        # every op autograd records has a backward to run, views and casts too (not FLOPs, but time)
        # the output's gradient is made once: a stage's comes from the operations after it
        grads = output_grads(out) if grad_mode else []
        if grads:
            runs.append(lambda: backward_to(forward(), activations, retain=False, grads=grads))
            if params:
                runs.append(lambda: backward_to(forward(), params, retain=False, grads=grads))
                runs.append(lambda: backward_to(forward(), [*activations, *params], False, grads))
            for run in runs[1:]:
                run()
        return runs
    except Exception:  # noqa: BLE001 - an op that will not run on random inputs keeps its estimate
        return None


def backward_entry_s(device: torch.device, rounds: int = 20) -> float:
    """What a backward costs beyond its operations' own backward: entering the autograd engine once.
    Timed as the backward of a chain of one multiplication less what each link of a chain of eight
    adds, so that no operation's own backward is in it."""
    x = torch.ones(1, device=device, requires_grad=True)

    def chain(links: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            y = x
            for _ in range(links):
                y = y * 1.0
            return y

        return run

    def backward(links: int) -> float:
        forward = chain(links)
        grads = output_grads(forward())
        alone = statistics.median(timed(forward, device) for _ in range(rounds))
        both = statistics.median(
            timed(lambda: backward_to(forward(), [x], False, grads), device) for _ in range(rounds)
        )
        return both - alone

    one, eight = backward(1), backward(8)
    return max(one - (eight - one) / 7, 0.0)


def fit_roofline(costs: GraphCosts, op_times: dict[str, OpTimes]) -> tuple[float, float, float]:
    """(FLOP/s, bytes/s, seconds per operation) that best describe the timed operations, for those the
    timing has not seen (another model's, with the same saved rates): the overhead is the median
    forward of the operations that do no FLOPs; the rates are work over time beyond it."""
    timed = [(costs.nodes[n], op_times[s]) for n, s in costs.signatures.items() if s in op_times]
    light = [t[0] for c, t in timed if not c.forward_flops and c.moved_bytes]
    overhead = statistics.median(light) if light else 0.0
    flops = seconds = moved = moved_seconds = 0.0
    for cost, times in timed:
        beyond = max(sum(times) - overhead * (1 + bool(times[1]) + bool(times[2])), 0.0)
        if cost.flops:
            flops, seconds = flops + cost.flops, seconds + beyond
        elif cost.moved_bytes:
            moved, moved_seconds = moved + cost.moved_bytes, moved_seconds + beyond
    return (flops / seconds if seconds else 1e12, moved / moved_seconds if moved_seconds else 1e11, overhead)


def random_like(meta: torch.Tensor, grad: bool, device: torch.device) -> torch.Tensor:
    shape, _ = concrete(meta)
    if meta.is_floating_point() or meta.is_complex():
        t = torch.randn(shape, dtype=meta.dtype, device=device)
    elif meta.dtype is torch.bool:
        t = torch.ones(shape, dtype=meta.dtype, device=device)
    else:  # indices: zero is valid for every embedding, gather and index
        t = torch.zeros(shape, dtype=meta.dtype, device=device)
    return t.requires_grad_(grad and meta.requires_grad and (t.is_floating_point() or t.is_complex()))


def stand_in(attr: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A stand-in of a parameter or buffer: a copy (in-place ops must not touch the user's tensors), or
    random values of its shape where it holds none (built under ``empty_init``, or freed)."""
    if attr.device.type == "meta" or (attr.numel() and not attr.untyped_storage().nbytes()):
        return random_like(attr, attr.requires_grad, device)
    return attr.detach().clone().requires_grad_(attr.requires_grad)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    return time.perf_counter() - start
