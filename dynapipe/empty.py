"""Parameters with shapes and dtypes but no memory, filled later on the ranks whose stages read them.

A model larger than one process cannot be built whole on every rank. Under :func:`empty_init` each
parameter's storage is resized to zero as soon as a module registers it: the tensor keeps its shape,
dtype, device and identity, so Dynamo traces it, the user's optimizer holds it, and a rank fills it later
in place (``untyped_storage().resize_(nbytes)``, then a copy). This is the representation
``runtime/state.py`` uses for the tensors a rank freed, so a meta tensor (which cannot become real in
place) is never needed. Buffers stay real: they are small and the model's own code computes them (rotary
``inv_freq``, causal masks).

While the model is built, writes into empty tensors (the modules' own initialisers) are skipped and reads
of them give empty results, by a dispatch mode. :func:`initialise` later runs the same initialisers for
the tensors one rank fills, seeded per module from its name so that every rank computes the same values.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from .errors import ConfigError

__all__ = ["empty_init", "is_empty", "allocate", "initialise", "storage_bytes"]


def is_empty(t: torch.Tensor) -> bool:
    """Whether ``t`` has elements but no memory (built under :func:`empty_init`, or freed by a pipeline)."""
    return t.numel() > 0 and t.untyped_storage().nbytes() == 0


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes of storage ``t`` spans (what an empty tensor needs back to hold its values)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return int((t.storage_offset() + extent) * t.element_size())


def allocate(t: torch.Tensor) -> None:
    """Give an empty tensor its memory back, in place (zeros, so that a value never set is visible)."""
    t.untyped_storage().resize_(storage_bytes(t))
    t.data.zero_()


@contextmanager
def empty_init() -> Iterator[None]:
    """Build models whose parameters take no memory until a pipeline rank that reads them fills them.

    ``with dynapipe.empty_init(): model = LlamaForCausalLM(config)``; then compile it with the dynapipe
    backend: each rank fills only its own stages' parameters, from ``options["checkpoint"]``, from
    :func:`dynapipe.load_checkpoint`, or else with the modules' own initialisers (seeded by module name,
    so the values differ from building the model eagerly under the same global seed).
    """
    handle = register_module_parameter_registration_hook(_free_on_registration)
    try:
        with _WriteGate(lambda t: not is_empty(t)), torch.no_grad():
            yield
    finally:
        handle.remove()


def _free_on_registration(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
    if param is None or param.numel() == 0 or is_empty(param):
        return  # a tied parameter registered again is the same, already empty object
    if param.is_meta:
        raise ConfigError(
            f"parameter {name!r} of {type(module).__name__} is on the meta device inside dynapipe.empty_init(); "
            "build the model on a real device (cpu or cuda) there: empty_init already keeps it out of memory"
        )
    param.untyped_storage().resize_(0)


class _WriteGate(TorchDispatchMode):
    """Runs ops as usual, except: an op writing a tensor that ``writable`` refuses does nothing and
    returns its target, and an op reading an empty tensor returns empty tensors of the right shape."""

    def __init__(self, writable: Callable[[torch.Tensor], bool]) -> None:
        super().__init__()
        self.writable = writable

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ARG002 - dispatch signature
        kwargs = kwargs or {}
        written = _written(func, args, kwargs)
        if written and not all(self.writable(t) for t in written):
            return written[0] if len(func._schema.returns) == 1 else tuple(written)
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if not any(is_empty(t) for t in tensors):
            return func(*args, **kwargs)
        device = tensors[0].device
        on_meta = tree_map(
            lambda a: (
                torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
                if isinstance(a, torch.Tensor)
                else a
            ),
            (args, kwargs),
        )
        out = func(*on_meta[0], **on_meta[1])
        return tree_map(lambda o: _empty_like(o, device) if isinstance(o, torch.Tensor) else o, out)


def _written(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments that ``func`` writes (``self`` of ``normal_``, ``out=``), from its schema."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
            if isinstance(value, torch.Tensor):
                written.append(value)
    return written


def _empty_like(meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=device)
    if out.numel():
        out.untyped_storage().resize_(0)
    return out


def initialise(tensors: list[torch.Tensor], roots: list[torch.nn.Module]) -> None:
    """Fill ``tensors`` (empty parameters of ``roots``) with their modules' own initialisers.

    Each module that directly holds one of them runs, seeded from its name: ``reset_parameters()``, or in
    a HuggingFace model ``_init_weights`` on it and then on each enclosing module (GPT-2 scales
    ``c_proj`` from its block, as HuggingFace's own initialisation does). Only ``tensors`` are written.
    """
    wanted = {id(t) for t in tensors}
    for t in tensors:
        allocate(t)
    writable = {t.untyped_storage().data_ptr() for t in tensors}
    done: set[int] = set()
    for root in roots:
        chain: list[tuple[str, torch.nn.Module]] = []
        for name, module in _modules_with_parents(root, "", [], chain):
            mine = [p for p in module._parameters.values() if p is not None and id(p) in wanted]
            mine = [p for p in mine if id(p) not in done]
            if not mine:
                continue
            done.update(id(p) for p in mine)
            seed = zlib.crc32(name.encode())
            with torch.random.fork_rng(devices=_cuda_devices(mine)), torch.no_grad():
                torch.manual_seed(seed)
                with _WriteGate(lambda t: t.untyped_storage().data_ptr() in writable):
                    _run_initialisers(name, module, chain, mine)
    missing = [t for t in tensors if id(t) not in done]
    if missing:
        raise ConfigError(
            f"{len(missing)} empty tensor(s) (shapes {[tuple(t.shape) for t in missing[:4]]}) belong to no module "
            "the compiled call reaches; build them outside dynapipe.empty_init() or load them from a checkpoint"
        )


def _modules_with_parents(
    module: torch.nn.Module, name: str, parents: list[tuple[str, torch.nn.Module]], chain: list
) -> Iterator[tuple[str, torch.nn.Module]]:
    """``named_modules()`` order; while a module is yielded, ``chain`` holds its ancestors, innermost last."""
    chain[:] = parents
    yield name, module
    for child_name, child in module.named_children():
        yield from _modules_with_parents(
            child, f"{name}.{child_name}" if name else child_name, [*parents, (name, module)], chain
        )


def _run_initialisers(name: str, module: torch.nn.Module, chain: list, params: list) -> None:
    hf = [m for _, m in chain if hasattr(m, "_init_weights") and hasattr(m, "config")]
    if hasattr(module, "_init_weights") and hasattr(module, "config"):
        hf.append(module)
    if hf:
        owner = hf[-1]  # the innermost HuggingFace model: its _init_weights knows this module's classes
        owner._init_weights(module)
        for _, parent in reversed(chain):
            owner._init_weights(parent)
    elif callable(reset := getattr(module, "reset_parameters", None)):
        reset()
    else:
        names = [n for n, p in module._parameters.items() if any(p is q for q in params)]
        raise ConfigError(
            f"parameter(s) {[f'{name}.{n}' if name else n for n in names]} of {type(module).__name__} have no "
            "initialiser (the module has no reset_parameters()); pass options['checkpoint'], call "
            "dynapipe.load_checkpoint() before the first step, or create them outside dynapipe.empty_init()"
        )


def _cuda_devices(params: Sequence[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
