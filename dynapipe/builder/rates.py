"""The rates a pipeline is planned at (``options["rates"]``): measured on this machine by its ranks
and cached per machine, nominal, or loaded from a saved set.

Measuring times each distinct operation of the captured graph at its microbatch shapes (every rank a share
of them, on a core of its own: ranks that share cores take turns, and the simulator charges what they cost
one another where they compute at once), how the operations compose (one rank runs a window of the graph),
and the link between pipeline neighbours over the real process group, all ranks at once. The ranks
exchange what they measured, so all plan with the same numbers. The cache (``$XDG_CACHE_HOME/dynapipe``,
else ``~/.cache/dynapipe``) is keyed by the device, the torch version, the world's layout and
:data:`RATES_FORMAT`; a cache from another machine, torch, layout or way of measuring is never read, and a
restart or a second script only times the operations the cache lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import PipelineConfig
from ..cost import NOMINAL_RATES, GraphCosts, Rates, fit_link, fit_roofline, graph_costs, time_ops
from ..cost.calibrate import composition
from ..cost.profile import backward_entry_s, graph_device
from ..cost.rates import OpTimes
from ..errors import ConfigError
from ..graph import CapturedGraph
from ..runtime import Comm, PipelineMesh
from ..runtime.link import time_link

__all__ = ["cache_path", "machine", "plan_rates", "read_cache", "write_cache", "writes_cache"]

# Sizes the link is timed at: a small message (its latency) and one large enough for its bandwidth.
_LINK_SIZES = (4 << 10, 1 << 20)
_LINK_ROUNDS = 8
# Part of the cache's key: raised whenever what is measured, or how, changes, so that a cache written by
# another version of dynapipe is never read as this one's numbers.
RATES_FORMAT = "7"


def plan_rates(
    config: PipelineConfig, captured: CapturedGraph, comm: Comm, mesh: PipelineMesh, device: torch.device
) -> Rates:
    """The rates every rank plans ``captured`` at (see the module docstring)."""
    if config.rates == "nominal":
        return NOMINAL_RATES
    if config.rates != "measure":
        try:
            return Rates.load(config.rates)
        except ValueError as err:
            raise ConfigError(f"options['rates']: {err}; give 'measure', 'nominal' or a saved set") from None
    key = machine(device, mesh)
    cached = None if config.profile else _read_cache(cache_path(key), key)
    wanted = {s for s in graph_costs(captured, optimizer=config.optimizer).signatures.values() if s}
    complete = _digest(cached) if cached is not None and wanted <= set(cached.op_times) else None
    views = comm.gather_objects(complete, "the cached rates")
    if cached is not None and complete is not None and views.count(complete) == len(views):
        return cached  # every rank holds the same complete set
    # rank 0's cache (if any) is everyone's base: the ranks time what it lacks, all at once
    base = comm.gather_objects(cached.to_json() if cached is not None else None, "the cached rates")[0]
    # measuring draws random tensors, each rank its own share: the user's random stream must not see it
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        rates = _measure(
            captured, config, comm, mesh, device, wanted, base and Rates.from_json(base, ""), key
        )
    if writes_cache():
        write_cache(cache_path(key), rates.to_json())
    return rates


def _measure(
    captured: CapturedGraph,
    config: PipelineConfig,
    comm: Comm,
    mesh: PipelineMesh,
    device: torch.device,
    wanted: set[str],
    base: Rates | None,
    key: dict[str, str],
) -> Rates:
    """Time the operations ``base`` lacks (every rank a share of them) and the link (without a base),
    and fit the roofline to this graph's operations."""
    estimate = graph_costs(captured, optimizer=config.optimizer)
    cores = _shared_cores(device, mesh)
    mine, my_entry = _time_my_share(
        captured, estimate, sorted(wanted - set(base.op_times) if base else wanted), cores, comm
    )
    link = []
    if base is None:  # together: a rank still timing its operations would be timed as the link
        comm.gather_objects(None, "starting to time the link together")
        link = time_link(mesh, device, _LINK_SIZES, _LINK_ROUNDS, timedelta(seconds=config.timeout_s))
    everyone = comm.gather_objects((mine, link, my_entry), "the measured rates")
    all_ops = {
        **(base.op_times if base else {}),
        **{s: t for times, _, _ in everyone for s, t in times.items()},
    }
    flop_rate, memory_bandwidth, overhead = fit_roofline(estimate, all_ops)
    if base is not None:
        latency, bandwidth, message = base.link_latency_s, base.link_bandwidth, base.message_s
        entry = base.backward_entry_s
        extra = (base.forward_extra_s, base.backward_extra_s)
    else:
        samples = [s for _, samples, _ in everyone for s in samples]
        latency, bandwidth, message = (
            fit_link(samples) if samples else (0.0, NOMINAL_RATES.link_bandwidth, 0.0)
        )
        message = message if device.type == "cpu" else 0.0  # a GPU computes while its host posts messages
        entry = statistics.median(e for _, _, e in everyone)
        # one rank, while the others wait: how operations compose, not how ranks share cores (the
        # simulator charges that where they compute at once)
        composed = composition(captured, estimate, all_ops, entry) if dist.get_rank() == 0 else None
        extra = comm.gather_objects(composed, "how the operations compose")[0]
    return Rates(
        flop_rate=flop_rate,
        memory_bandwidth=memory_bandwidth,
        op_overhead_s=overhead,
        link_latency_s=latency,
        link_bandwidth=bandwidth,
        backward_entry_s=entry,
        message_s=message,
        cores=cores,
        forward_extra_s=extra[0],
        backward_extra_s=extra[1],
        op_times=all_ops,
        source=f"measured on this machine by {dist.get_world_size()} ranks, cached in {cache_path(key)}",
        machine=key,
    )


def _time_my_share(
    captured: CapturedGraph, estimate: GraphCosts, wanted: list[str], cores: float, comm: Comm
) -> tuple[dict[str, OpTimes], float]:
    """This rank's share of the operations to time (every rank times others) and the autograd engine's
    entry (timed once, and the same number the operation times leave out), each timed on a core of its
    own: where the ranks share fewer cores than there are of them, they take turns, as many at once as
    there are cores (ranks that time at once on one core would each see the other's time too, and the
    simulator already charges the ranks that compute at once)."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def timed() -> tuple[dict[str, OpTimes], float]:
        entry = backward_entry_s(graph_device(captured.gm.graph))
        return time_ops(captured, estimate, set(wanted[rank::world]), entry=entry), entry

    return comm.in_turns(cores, timed, "timing the operations") or ({}, 0.0)


def _shared_cores(device: torch.device, mesh: PipelineMesh) -> float:
    """Cores one pipeline's ranks share (0: none, each rank has its own device or cores enough): on CPU,
    the cores this process may run on, counted in ranks' worth of threads, in the proportion of this
    host's ranks that are one pipeline's."""
    if device.type != "cpu":
        return 0.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    shared = cores / max(torch.get_num_threads(), 1) * min(mesh.n_pp, local) / local
    return shared if shared < mesh.n_pp else 0.0


def machine(device: torch.device, mesh: PipelineMesh) -> dict[str, str]:
    """What measured rates hold for: how they were measured, the device, the torch version and the
    world's layout."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads per rank"
    world = dist.get_world_size()
    return {
        "rates format": RATES_FORMAT,
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "layout": (
            f"{world} ranks ({mesh.n_pp} pipeline x {mesh.dp_degree} data parallel), "
            f"{os.environ.get('LOCAL_WORLD_SIZE', world)} on this host, over {dist.get_backend()}"
        ),
    }


def cache_path(key: dict[str, str], kind: str = "rates") -> Path:
    """Where what was measured under ``key`` is cached: one file per key and kind."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dynapipe"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{kind}-{digest}.json"


def _read_cache(path: Path, key: dict[str, str]) -> Rates | None:
    """The cached rates of exactly this machine, torch and layout; anything else (none, damaged,
    another machine's) is not used."""
    data = read_cache(path)
    try:
        rates = Rates.from_json(data, f"cached on this machine ({path})") if data is not None else None
    except (ValueError, TypeError):
        return None
    return rates if rates is not None and dict(rates.machine) == key else None


def read_cache(path: Path) -> dict | None:
    """A cache file's contents; None where there is none or it is damaged (it is measured again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def writes_cache() -> bool:
    """Whether this rank writes (and deletes) its host's cache files: the first rank on each host, so that
    a file has one writer."""
    return int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0


def write_cache(path: Path, data: dict) -> None:
    """Write atomically (a rank of another script may be reading); a cache that cannot be written only
    costs the next run its measuring."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def _digest(rates: Rates) -> str:
    """The numbers, whatever file they were read from."""
    numbers = {k: v for k, v in rates.to_json().items() if k != "source"}
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
