"""The contract between capture and every later step: one microbatch of the step as a flat FX graph.

* placeholders are the microbatched inputs, each tagged with its Dynamo source (``L['x']``);
* parameters, buffers and other tensors the code reads are ``get_attr`` nodes whose attributes are the
  user's own tensor objects (so gradients land where the user's optimizer looks);
* sizes stay symbolic: each size the graph uses is computed from the inputs (a *size node*,
  :func:`~dynapipe.graph.nodes.is_size_node`), and ``shapes`` says at which sizes the graph holds; each
  node's ``meta["example_value"]`` keeps its symbolic shape for the cost model;
* ``meta["module_path"]`` is the dotted name of the innermost user module that produced the node, and
  ``state_names`` the names of parameters and buffers: the user's own names, found by identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .shapes import CaptureShapes

__all__ = ["CapturedGraph"]


@dataclass
class CapturedGraph:
    """One microbatch of the step as a flat FX graph (see the module docstring for the contract)."""

    gm: fx.GraphModule
    input_sources: list[str]  # Dynamo source name of each placeholder, in placeholder order
    state_names: dict[str, str]  # get_attr target -> qualified name in the user's model ("layers.0.weight")
    batch_size: int
    n_microbatches: int
    shapes: CaptureShapes
    split_markers: list[int] = field(default_factory=list)  # compute-node positions of pipe_split() calls
    number: int = 1  # 1 for the first capture of a compiled call, 2 for the one after it, ...
    one_trace: bool = False  # built from Dynamo's own batch-symbolic graph, without tracing the frame again

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.n_microbatches
