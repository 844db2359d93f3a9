"""What one machine does per second: the rates a plan turns FLOPs, bytes and actions into seconds with.

A plan is only as good as its seconds. :data:`NOMINAL_RATES` describe a machine that is not there (a
GPU at a realistic share of its peak, a PCIe-class link); a :class:`Rates` measured on the machine that
runs (``options["rates"] = "measure"``, the backend's default) holds what its ranks saw, all at once,
as they will run: each distinct operation of the graph timed at its microbatch shapes
(:attr:`Rates.op_times`), the link between pipeline neighbours, and what every action pays on top of
its operations. Operations the measurement has not seen fall back to the roofline at the fitted
:attr:`Rates.flop_rate` and :attr:`Rates.memory_bandwidth` plus :attr:`Rates.op_overhead_s`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NOMINAL_RATES", "OpTimes", "Rates", "fit_link"]

# (forward, input-gradient, weight-gradient) seconds of one operation at its microbatch shapes.
OpTimes = tuple[float, float, float]


@dataclass(frozen=True)
class Rates:
    """The seconds of a machine; see the module docstring. ``source`` says where they come from,
    ``machine`` what they were measured on (the cache's key)."""

    flop_rate: float = 100e12  # FLOP/s: a nominal accelerator at a realistic fraction of its peak
    memory_bandwidth: float = 2e12  # bytes/s: HBM3 at about 60% of 3.35 TB/s
    op_overhead_s: float = 0.0  # what launching one operation costs (eager dispatch, a kernel launch)
    link_latency_s: float = 20e-6  # a transfer takes link_latency_s + bytes / link_bandwidth
    link_bandwidth: float = 25e9  # PCIe 4/5 or a 200 Gb/s network (NVLink is faster)
    backward_entry_s: float = 0.0  # entering the autograd engine, once per backward action
    # CPU seconds a message costs each end, sender and receiver (posting it, the transport's threads); on
    # CPU processes that time is taken from the rank's compute (0: a GPU, where the host's work overlaps)
    message_s: float = 0.0
    cores: float = 0.0  # cores one pipeline's ranks share (CPU processes); 0: each rank has its own device
    forward_extra_s: float = 0.0  # per operation, what a stage's forward adds to its own time (calibrate)
    backward_extra_s: float = 0.0  # the same for the backward
    op_times: Mapping[str, OpTimes] = field(default_factory=dict, hash=False)
    source: str = "nominal"
    machine: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def measured(self) -> bool:
        return bool(self.op_times)

    def describe(self) -> str:
        """One line: where the rates come from and the numbers a reader can check."""
        link = f"link {_us(self.link_latency_s)} + bytes / {self.link_bandwidth / 1e9:.3g} GB/s"
        if self.message_s:
            link += f", {_us(self.message_s)} CPU per message at each end"
        if self.cores:
            link += f"; the ranks share {self.cores:g} cores"
        if not self.measured:
            return (
                f"rates: {self.source} ({self.flop_rate / 1e12:.0f} TFLOP/s, "
                f"{self.memory_bandwidth / 1e12:.0f} TB/s, {link})"
            )
        return (
            f"rates: {self.source} ({len(self.op_times)} operations timed, {self.flop_rate / 1e9:.3g} GFLOP/s "
            f"and {self.memory_bandwidth / 1e9:.3g} GB/s fitted, {_us(self.op_overhead_s)} per operation, "
            f"{_us(self.forward_extra_s)} forward and {_us(self.backward_extra_s)} backward more each as a stage "
            "runs them, "
            f"{_us(self.backward_entry_s)} per backward, {link})"
        )

    def with_ops(self, op_times: Mapping[str, OpTimes], **changes: Any) -> Rates:
        """These rates with more operations timed (and ``changes``)."""
        merged = {**self.op_times, **op_times}
        return dataclasses.replace(self, op_times=merged, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["op_times"] = {k: list(v) for k, v in self.op_times.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> Rates:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        values = dict(data)
        values["op_times"] = {str(k): tuple(float(t) for t in v) for k, v in data.get("op_times", {}).items()}
        values["machine"] = {str(k): str(v) for k, v in data.get("machine", {}).items()}
        values["source"] = source
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Rates:
        """A saved set (``Rates.save``, or the cache of a run on the target machine)."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()), f"loaded from {path}")
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"cannot read rates from {path}: {err}") from err


NOMINAL_RATES = Rates()


def fit_link(samples: Sequence[tuple[int, float, float]]) -> tuple[float, float, float]:
    """(latency seconds, bytes/s, CPU seconds per message) from (bytes, one-way seconds, CPU seconds)
    samples at a small and a large size, each a round in which a rank sends one message and receives
    one: the line through the medians of the two sizes, and half the small rounds' median CPU."""
    by_size: dict[int, list[tuple[float, float]]] = {}
    for nbytes, seconds, cpu in samples:
        by_size.setdefault(nbytes, []).append((seconds, cpu))
    small, large = min(by_size), max(by_size)
    t_small = statistics.median(s for s, _ in by_size[small])
    t_large = statistics.median(s for s, _ in by_size[large])
    message = statistics.median(c for _, c in by_size[small]) / 2
    if t_large <= t_small:  # noise hid what the bytes take: the large message's whole time is bandwidth
        return t_small, large / t_large, message
    bandwidth = (large - small) / (t_large - t_small)
    return max(t_small - small / bandwidth, 0.0), bandwidth, message


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.3g} us"
