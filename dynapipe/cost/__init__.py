"""Per-node and per-stage costs of a captured graph: FLOPs, time, state bytes, activation bytes.

Every number is for ONE microbatch, computed without real compute: each compute node's target is run
again on fake tensors (``FakeTensorMode``) shaped like its ``meta["example_value"]`` at the microbatch
size, counting FLOPs with ``torch.utils.flop_counter``'s formulas and watching ``saved_tensors_hooks``.
That gives

* **FLOPs** -- forward, and backward split into the input-gradient and weight-gradient parts (the
  backward of compute-bearing nodes is run on fake tensors too, so attention's 2.5x and a linear's 1x +
  1x come from the counter, not from a rule of thumb);
* **activation bytes** -- what autograd keeps for backward, per buffer: a tensor saved by several nodes,
  or views of one tensor, count once (buffers are identified by storage, so ``x.t()`` saved by a matmul
  is ``x``); parameters saved by their readers are state, not activations;
* **output bytes** -- what the node would send if a stage boundary fell after it, as a sympy expression
  in the batch symbol (``8192*s0``) evaluated at the microbatch size.

* **bytes moved** -- what the node's ops read and write (views none; a lookup such as an embedding reads
  the rows it gathers, not its whole table).

Time: without profiling, the roofline ``seconds = max(FLOPs / flop_rate, bytes moved /
memory_bandwidth)`` for the forward and for each half of the backward, so memory-bound work (norms,
masks, rotary, softmax, the loss over a large vocabulary, a matmul over few tokens) costs what reading
and writing its tensors takes; with ``profile=True`` each node is instead timed on the real device with real (random) tensors -- forward,
input-gradient and weight-gradient separately, the fastest of a few repetitions (other processes only
ever add time) -- and that time is used. Ranks that profile separately must agree on the times before
partitioning: see :meth:`GraphCosts.with_times`.

State: a parameter costs its bytes, its gradient (same size, when it requires grad and the graph trains)
and ``OPTIMIZER_STATES[optimizer]`` more copies (Adam: two moments). A stage holds the state of every
``get_attr`` it reads, so a tied weight counts on each stage that reads it.

:func:`stage_costs` sums them per stage into :class:`dynapipe.schedules.StageCost`, the one per-stage
record that the partitioner, the schedule simulator and :func:`dynapipe.explain` read.

Files: :mod:`.records` (the per-node records), :mod:`.sizes` (symbolic sizes), :mod:`.runner` (running one
node on stand-in tensors), :mod:`.counter` (FLOPs and bytes moved per op), :mod:`.fake` (FLOPs and saved
activations on fake tensors), :mod:`.profile`
(timing on the device), :mod:`.graph` (:func:`graph_costs`, the entry point), :mod:`.stages` (per-stage
records). A node's and a stage's phase seconds and FLOPs are one record,
:class:`~dynapipe.schedules.simulate.PhaseCost`, that :class:`NodeCost` and ``StageCost`` both extend.
"""

from .graph import graph_costs
from .profile import fit_roofline, time_ops
from .rates import NOMINAL_RATES, Rates, fit_link
from .records import NOMINAL_FLOP_RATE, NOMINAL_MEMORY_BANDWIDTH, OPTIMIZER_STATES, GraphCosts, NodeCost
from .stages import stage_costs

__all__ = [
    "NOMINAL_FLOP_RATE",
    "NOMINAL_MEMORY_BANDWIDTH",
    "NOMINAL_RATES",
    "OPTIMIZER_STATES",
    "GraphCosts",
    "NodeCost",
    "Rates",
    "fit_link",
    "fit_roofline",
    "graph_costs",
    "stage_costs",
    "time_ops",
]
