"""Compiled stages (``options["compile_stages"]``) on a HuggingFace Llama, 2 ranks: eager against inductor.

    python benchmarks/bench_compiled.py           # hidden 256, 4 layers, sequence 128; 1F1B and zb-h1
    python benchmarks/bench_compiled.py --quick   # 4 timed steps, no warm-cache rebuild: ~4-5 min, 2 cores

Every row trains the same randomly initialised ``LlamaForCausalLM`` (seed 0, no download) on the same global
batch with the same loss, split before ``model.layers.<layers/2>``, 4 microbatches:

* **dynapipe eager / inductor**: ``torch.compile(step, backend="dynapipe")`` with ``compile_stages`` False
  and True, schedules 1F1B and zb-h1 (whose compiled backward is split at graph level into input- and
  weight-gradient graphs).
* **torch-pp blocks compiled**: torch.distributed.pipelining as torchtitan uses it: each rank builds its stage
  module by hand (embedding and its half of the decoder blocks; the other half with norm and head), replaces
  every decoder block by ``torch.compile(block, fullgraph=True)`` (torchtitan's ``apply_compile``), and runs
  ``PipelineStage`` with ``Schedule1F1B`` or ``ScheduleInterleavedZeroBubble``. torch 2.13 refuses the
  zero-bubble one on compiled blocks (``_check_torch_compile_compatibility``): that row prints the reason.
  (Compiling the blocks before ``pipeline()``, as bench_llama.py builds it, compiles nothing: torch.export
  traces through the compiled blocks and the stage runs the exported graph eagerly.)
* **1 process eager / torch.compile**: the whole model and batch in one process (rank 0, one thread, while
  rank 1 waits), eagerly and under ``torch.compile(model)`` (inductor): the reference without a pipeline.

**First step** is everything from the model in memory to the first step's loss and gradients (the slowest
rank's): for dynapipe ``torch.compile`` + the first call + its backward, inductor included; for torch-pp
building the stage, compiling the blocks and the first ``schedule.step`` (inductor compiles there, lazily).
It is **cold**: before each build every rank points ``TORCHINDUCTOR_CACHE_DIR`` (and ``TRITON_CACHE_DIR``)
at a fresh temporary folder and clears inductor's in-memory caches, so nothing compiled for another row is
reused; starting Dynamo and inductor (its compile workers) and a first Dynamo trace of the model (eager
backend) are paid once beforehand, outside every row. **compile s** is the time spent inside ``dynapipe.compiled_stage.compile_stages`` during the build
(wrapped on every rank; the slowest rank's), which is inside the first step; the inductor graphs compiled
after it (a backward AOTAutograd compiles lazily) are counted and shown too. Without ``--quick`` the
dynapipe inductor rows are built once more on a **warm** cache (same folder, in-memory caches cleared: a
restarted job): first step and compile time again. **Step** is the median (min-max) of the timed steps
after one untimed step each, all rows of both schedules alternating step by step (the order rotating each
round), each step from a barrier, the slowest rank's time; ratios are medians of the per-round ratios.

Checks (the script exits 1 if one fails): dynapipe inductor's first loss matches eager's within rtol 1e-4
and its gradients within rtol 1e-4, atol 1e-5 (tests/test_compiled_stages.py's tolerances); every stage
reports ``"inductor"``; each compiled graph ran once per microbatch and step (zb-h1: the input- and
weight-gradient graphs as often as the forward, so no backward ran twice).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from bench_llama import loss_fn, timed
from hf_models import bench_llama_model
from torch import nn

from dynapipe import launch

WORLD, BATCH, MICRO, VOCAB, HIDDEN = 2, 8, 4, 8000, 256
SCHEDULES = ("1f1b", "zb-h1")
RTOL, ATOL = 1e-4, 1e-5  # loss rtol; gradients rtol and atol (inductor reorders float32 sums)


def _model(layers: int, seq: int) -> nn.Module:
    return bench_llama_model(layers, seq)


class Logits(nn.Module):
    """``ids -> logits`` of the whole model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


class LlamaStage(nn.Module):
    """One rank's part of the Llama, built by hand as torchtitan builds a pipeline stage: the embedding
    (first stage), the decoder blocks ``layers``, the final norm and head (last stage). Attention is causal
    through SDPA's ``is_causal`` (mask None), as HF's own forward runs it without padding."""

    def __init__(self, model: nn.Module, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        inner = model.model
        self.embed = inner.embed_tokens if first else None
        self.rotary = inner.rotary_emb
        self.layers = nn.ModuleDict({str(i): inner.layers[i] for i in layers})
        self.norm = inner.norm if last else None
        self.head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        rope = self.rotary(h, position_ids=positions)
        for layer in self.layers.values():
            h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
        if self.head is not None:
            h = self.head(self.norm(h))
        return h


# -- compile time: dynapipe.compiled_stage.compile_stages wrapped where the builder calls it ----------------
@dataclass
class CompileLog:
    build_s: float = 0.0  # inside compile_stages
    graphs_in_build: int = 0  # inductor graphs compiled inside it
    graphs_later: int = 0  # and outside it (a lazily compiled backward, in the first step)
    later_s: float = 0.0
    inside: bool = False


COMPILE = CompileLog()


def _instrument() -> None:
    import dynapipe.builder.pipeline as builder
    import dynapipe.compiled_stage as compiled_stage

    compile_stages, inner = builder.compile_stages, compiled_stage._inner_compile

    def timed_compile_stages(*args, **kwargs):
        COMPILE.inside = True
        start = time.perf_counter()
        try:
            return compile_stages(*args, **kwargs)
        finally:
            COMPILE.build_s += time.perf_counter() - start
            COMPILE.inside = False

    def counted_inner(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            if COMPILE.inside:
                COMPILE.graphs_in_build += 1
            else:
                COMPILE.graphs_later += 1
                COMPILE.later_s += time.perf_counter() - start

    builder.compile_stages = timed_compile_stages
    compiled_stage._inner_compile = counted_inner


class FreshCache:
    """A new inductor cache folder (this rank's) and inductor's in-memory caches cleared: a cold compile."""

    def __init__(self) -> None:
        self.dirs: list[str] = []

    def cold(self) -> None:
        self.use(tempfile.mkdtemp(prefix="bench_compiled_"))

    def warm(self) -> None:
        """The last folder again, in-memory caches cleared: what a restarted process finds."""
        self.use(self.dirs[-1])

    def use(self, path: str) -> None:
        from torch._inductor.utils import clear_caches

        if path not in self.dirs:
            self.dirs.append(path)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
        clear_caches()

    def remove(self) -> None:
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


# -- the rows --------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One row on this rank. ``step(keep)`` runs one training step (gradients zeroed unless ``keep``) and
    returns the loss this rank saw (None where it sees none)."""

    name: str
    step: Callable[[bool], float | None] = lambda keep: None  # a refused row never steps
    model: nn.Module | None = None
    reports: list = field(default_factory=list)  # dynapipe's StepReports
    refused: str | None = None
    loss: float | None = None  # of the first step


@dataclass(frozen=True)
class Shape:
    layers: int
    seq: int

    @property
    def split(self) -> int:
        return self.layers // 2


def _setup_dynapipe(shape: Shape, ids: torch.Tensor, schedule: str, compiled: bool) -> Variant:
    net = Logits(_model(shape.layers, shape.seq))
    variant = Variant(f"{schedule} dynapipe {'inductor' if compiled else 'eager'}", model=net)
    step = torch.compile(
        lambda ids, labels: loss_fn(net(ids), labels),
        backend="dynapipe",
        options={
            "schedule": schedule,
            "n_microbatches": MICRO,
            "split_points": [f"model.model.layers.{shape.split}"],
            "compile_stages": compiled,
            "on_step": variant.reports.append,
        },
    )

    def run(keep: bool) -> float:
        loss = step(ids, ids)
        loss.backward()
        if not keep:
            net.zero_grad(set_to_none=True)
        variant.reports[:-1] = []  # keep the last report only
        return loss.item()

    variant.step = run
    return variant


def _setup_torch_pp(shape: Shape, ids: torch.Tensor, schedule: str) -> Variant:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleavedZeroBubble

    variant = Variant(f"{schedule} torch-pp blocks compiled")
    rank = dist.get_rank()
    first, last = rank == 0, rank == WORLD - 1
    layers = range(0, shape.split) if first else range(shape.split, shape.layers)
    module = LlamaStage(_model(shape.layers, shape.seq), layers, first=first, last=last)
    for name, block in list(module.layers.named_children()):  # torchtitan's apply_compile
        module.layers.register_module(name, torch.compile(block, fullgraph=True))
    stage = PipelineStage(module, rank, WORLD, torch.device("cpu"))
    cls = {"1f1b": Schedule1F1B, "zb-h1": ScheduleInterleavedZeroBubble}[schedule]
    try:
        sched = cls(stage if schedule == "1f1b" else [stage], n_microbatches=MICRO, loss_fn=loss_fn)
    except RuntimeError as e:  # torch refuses zero-bubble on compiled stages
        variant.refused = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        return variant
    variant.model = module

    def run(keep: bool) -> float | None:
        losses: list[torch.Tensor] = []
        if first:
            sched.step(ids)
        elif last:
            sched.step(target=ids, losses=losses)
        else:
            sched.step()
        if not keep:
            module.zero_grad(set_to_none=True)
        return torch.stack(losses).mean().item() if losses else None

    variant.step = run
    return variant


def _setup_one_process(shape: Shape, ids: torch.Tensor, compiled: bool) -> Variant:
    net = Logits(_model(shape.layers, shape.seq))
    forward = torch.compile(net) if compiled else net
    variant = Variant(f"1 process {'torch.compile' if compiled else 'eager'}", model=net)
    rank0 = dist.get_rank() == 0

    def run(keep: bool) -> float | None:
        if not rank0:  # rank 1 waits at the barriers
            return None
        loss = loss_fn(forward(ids), ids)
        loss.backward()
        if not keep:
            net.zero_grad(set_to_none=True)
        return loss.item()

    variant.step = run
    return variant


def _warm_up(ids: torch.Tensor, shape: Shape, cache: FreshCache) -> None:
    """Pay once, before any row, what the first row would pay alone: importing and starting Dynamo,
    AOTAutograd and inductor (its compile workers), and the model's code paths, eagerly and under Dynamo."""
    cache.cold()
    x = torch.ones(4, 4, requires_grad=True)
    torch.compile(lambda x: (x.sin() * 2).sum())(x).backward()
    net = Logits(_model(shape.layers, shape.seq))
    with torch.no_grad():
        net(ids[:1])
    torch.compile(lambda ids: loss_fn(net(ids), ids), backend="eager")(ids[:1]).backward()
    torch._dynamo.reset()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's gradients (another rank's parameters hold no storage here)."""
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None and p.untyped_storage().nbytes() > 0
    }


def _grad_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, bool]:
    """Max |got - want| / max |want| over this rank's gradients, and whether all match within RTOL, ATOL."""
    if got.keys() != want.keys() or not want:
        return float("inf"), False
    err = max(((got[n] - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-30)).item() for n in want)
    ok = all(torch.allclose(got[n], want[n], rtol=RTOL, atol=ATOL) for n in want)
    return err, ok


def _first_step(setup: Callable[[], Variant]) -> tuple[float, Variant, float, int]:
    """Build a row on a cold inductor cache and run its first step (keeping its gradients): the slowest
    rank's seconds, the row, and the seconds and inductor graphs compiled after the build on this rank."""
    box: list[Variant] = []
    later_s, later_n = COMPILE.later_s, COMPILE.graphs_later

    def build_and_step() -> None:
        box.append(setup())
        box[0].loss = box[0].step(True)

    seconds = timed(build_and_step)
    return seconds, box[0], COMPILE.later_s - later_s, COMPILE.graphs_later - later_n


def _rows(shape: Shape, ids: torch.Tensor) -> list[tuple[str, Callable[[], Variant]]]:
    rows: list[tuple[str, Callable[[], Variant]]] = []
    for s in SCHEDULES:
        rows += [
            (f"{s} dynapipe eager", lambda s=s: _setup_dynapipe(shape, ids, s, False)),
            (f"{s} dynapipe inductor", lambda s=s: _setup_dynapipe(shape, ids, s, True)),
            (f"{s} torch-pp blocks compiled", lambda s=s: _setup_torch_pp(shape, ids, s)),
        ]
    return rows + [
        ("1 process eager", lambda: _setup_one_process(shape, ids, False)),
        ("1 process torch.compile", lambda: _setup_one_process(shape, ids, True)),
    ]


def _worker(steps: int, warm: bool, shape: Shape) -> dict:
    torch._dynamo.config.recompile_limit = 64  # every dynapipe row compiles the same lambda's code
    dist.init_process_group("gloo")
    _instrument()
    ids = torch.randint(0, VOCAB, (BATCH, shape.seq), generator=torch.Generator().manual_seed(1))
    cache = FreshCache()
    out: dict = {"first": {}, "compile": {}, "later": {}, "loss": {}, "refused": {}, "warm": {}, "checks": {}}
    try:
        _warm_up(ids, shape, cache)
        runs: dict[str, Variant] = {}
        grads: dict[str, dict[str, torch.Tensor]] = {}
        for name, setup in _rows(shape, ids):
            cache.cold()
            build_s = COMPILE.build_s
            out["first"][name], variant, *out["later"][name] = _first_step(setup)
            out["compile"][name] = COMPILE.build_s - build_s
            if variant.refused is not None or variant.model is None:
                out["refused"][name] = variant.refused
                continue
            out["loss"][name] = variant.loss
            if "dynapipe" in name:
                grads[name] = _grads(variant.model)
            variant.model.zero_grad(set_to_none=True)
            runs[name] = variant
            if warm and name.endswith("dynapipe inductor"):  # the same build on the warm cache, then dropped
                cache.warm()
                build_s = COMPILE.build_s
                first, *_ = _first_step(setup)
                out["warm"][name] = (first, COMPILE.build_s - build_s)
        for s in SCHEDULES:
            out["checks"][s] = _grad_error(grads[f"{s} dynapipe inductor"], grads[f"{s} dynapipe eager"])
        del grads
        for variant in runs.values():  # one more untimed step each: all warm
            timed(partial(variant.step, False))
        names = list(runs)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(steps):  # every row once per round, the order rotating
            for name in names[i % len(names) :] + names[: i % len(names)]:
                times[name].append(timed(partial(runs[name].step, False)))
        out["times"] = times
        out["compiled"] = {n: dict(v.reports[-1].compiled) for n, v in runs.items() if v.reports}
        out["graph_runs"] = {n: dict(v.reports[-1].graph_runs) for n, v in runs.items() if v.reports}
        out["n_steps"] = steps + 2  # per row: the first, one untimed and the timed steps
        return out
    finally:
        cache.remove()


def _fmt(t: list[float]) -> str:
    return f"{statistics.median(t) * 1e3:.1f} ({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})"


def _ratio(times: dict[str, list[float]], a: str, b: str) -> str:
    if a not in times or b not in times:
        return "n/a"
    r = [x / y for x, y in zip(times[a], times[b], strict=True)]
    return f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 timed steps, no warm-cache rebuild")
    parser.add_argument("--steps", type=int, help="timed steps per row (default 10, 4 with --quick)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 10)
    shape = Shape(args.layers, args.seq)
    started = time.perf_counter()
    results = launch(_worker, steps, not args.quick, shape, nproc=WORLD)
    r0 = results[0]
    times, first, compile_, warm = r0["times"], r0["first"], r0["compile"], r0["warm"]
    # the slowest rank's compile time; losses from whichever rank saw one
    compile_s = {n: max(results[r]["compile"][n] for r in results) for n in compile_}
    later = {n: max(results[r]["later"][n][1] for r in results) for n in compile_}
    loss = {
        n: next(results[r]["loss"][n] for r in results if results[r]["loss"].get(n) is not None)
        for n in times
    }

    print(
        f"Llama hidden {HIDDEN}, {shape.layers} layers (split at layer {shape.split}), vocabulary {VOCAB}, batch "
        f"{BATCH} x {shape.seq}, {WORLD} ranks (gloo, 1 thread each), {MICRO} microbatches; cold inductor "
        f"cache per build; {steps} timed steps per row"
    )
    head = f"{'':32s} {'loss':>9s} {'first step s':>12s} {'compile s':>9s} {'step ms median (min-max)':>26s}"
    print(head)
    print("-" * len(head))
    for name in first:
        if name in r0["refused"]:
            print(f"{name:32s} refused: {r0['refused'][name]}")
            continue
        comp = f"{compile_s[name]:9.2f}" if "dynapipe inductor" in name else f"{'-':>9s}"
        print(f"{name:32s} {loss[name]:9.5f} {first[name]:12.2f} {comp} {_fmt(times[name]):>26s}")
        if name in warm:
            wfirst = max(results[r]["warm"][name][0] for r in results)
            wcomp = max(results[r]["warm"][name][1] for r in results)
            print(f"{'  same, warm inductor cache':32s} {'':9s} {wfirst:12.2f} {wcomp:9.2f}")
    print()
    print("ratios, step (median (min-max) over rounds) and first step:")
    pairs = []
    for s in SCHEDULES:
        pairs += [
            (f"{s} dynapipe inductor", f"{s} dynapipe eager"),
            (f"{s} dynapipe inductor", f"{s} torch-pp blocks compiled"),
            (f"{s} dynapipe inductor", "1 process torch.compile"),
        ]
    pairs += [("1 process torch.compile", "1 process eager")]
    for a, b in pairs:
        if b in r0["refused"]:
            print(f"  {a} / {b}: n/a ({b} refused)")
            continue
        print(f"  {a} / {b}: step {_ratio(times, a, b)}, first step {first[a] / first[b]:.2f}")
    print()
    failed = []
    print("checks:")
    for s in SCHEDULES:
        eager, compiled = f"{s} dynapipe eager", f"{s} dynapipe inductor"
        rel = abs(loss[compiled] - loss[eager]) / abs(loss[eager])
        grad_err = max(results[r]["checks"][s][0] for r in results)
        grad_ok = all(results[r]["checks"][s][1] for r in results)
        stages = {k: v for r in results for k, v in results[r]["compiled"][compiled].items()}
        runs = {k: v for r in results for k, v in results[r]["graph_runs"][compiled].items()}
        n_calls = r0["n_steps"] * MICRO  # every graph of every stage once per microbatch and step
        runs_ok = bool(runs) and all(
            v.get("forward") == n_calls and set(v.values()) == {n_calls} for v in runs.values()
        )
        ok = rel <= RTOL and grad_ok and all(v == "inductor" for v in stages.values()) and runs_ok
        failed += [] if ok else [s]
        print(
            f"  {s}: loss inductor vs eager rel diff {rel:.1e} (rtol {RTOL:g}); gradients max |diff|/max|eager| "
            f"{grad_err:.1e} ({'within' if grad_ok else 'NOT within'} rtol {RTOL:g}, atol {ATOL:g}); "
            f"stages {stages}; graph runs {runs} after {r0['n_steps']} steps x {MICRO} microbatches"
            f" -> {'OK' if ok else 'FAILED'}"
        )
    by_rank = ", ".join(
        f"{n.split()[0]} " + " / ".join(f"{results[r]['compile'][n]:.1f}" for r in sorted(results))
        for n in compile_s
        if "dynapipe inductor" in n
    )
    print(f"  compile s by rank (0 / 1): {by_rank}")
    for name in compile_s:
        if later[name]:
            print(
                f"  note: {name}: {later[name]} inductor graph(s) compiled after the build (in the first step)"
            )
    print(f"(total {time.perf_counter() - started:.0f} s)")
    if failed:
        sys.exit(f"check failed for {', '.join(failed)}")


if __name__ == "__main__":
    main()
