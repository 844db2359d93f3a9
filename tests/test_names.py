"""Names dynapipe shows and accepts are the user's own (``named_modules()``, ``named_parameters()``), found by
identity, however the compiled function reaches the model: the module itself, ``model.compile()``, a bound
method, a closure, an argument, ``functools.partial``, decorated forwards, dicts and lists, globals."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

import dynapipe.backend
from dynapipe.capture import capture_microbatch


def _passthrough(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class Net(nn.Module):
    """Blocks, a buffer and a head tied to the embedding-like input layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 6, bias=False)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.inp.weight
        self.register_buffer("shift", torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return (self.head(x) + self.shift).square().mean()


class Tower(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(self.inp(x))
        return self.head(x) + self.shift


class DecoratedNet(Net):
    """HuggingFace-style: forward wrapped twice by decorators taking ``*args, **kwargs``."""

    @_passthrough
    @_passthrough
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class _Captured(Exception):
    """Stops the call once the backend's first call has captured the step."""


class _CaptureOnly:
    """Stands in for the backend's pipeline: captures the frame as the pipeline's first call does, then stops."""

    def __init__(self, config, frame, graph_args, shared) -> None:
        self.frame = frame

    def __call__(self, *flat):
        raise _Captured(capture_microbatch(self.frame, n_microbatches=2, batch_size=4))


def _names(compiled, *args) -> tuple[set[str], set[str]]:
    """(module paths, state names) of the microbatch capture of ``compiled(*args)``, as the backend sees it."""
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynapipe.backend, "_LazyPipeline", _CaptureOnly)
        with pytest.raises(_Captured) as seen:
            compiled(dynapipe.backend.dynapipe_backend)(*args)
    captured = seen.value.args[0]
    return {n.meta["module_path"] for n in captured.gm.graph.nodes}, set(captured.state_names.values())


MODEL = Net()


def _shapes():
    x = torch.randn(4, 6)
    net = Net()
    deco = DecoratedNet()

    def takes_model(model, x):
        return model(x)

    def global_model(x):
        return MODEL(x)

    return {
        "torch.compile(model)": (net, lambda b: torch.compile(net, backend=b), (x,)),
        "model.compile()": (net, lambda b: (net.compile(backend=b), net)[1], (x,)),
        "bound forward": (net, lambda b: torch.compile(net.forward, backend=b), (x,)),
        "closure": (net, lambda b: torch.compile(lambda x: net(x), backend=b), (x,)),
        "argument": (net, lambda b: torch.compile(takes_model, backend=b), (net, x)),
        "partial": (net, lambda b: torch.compile(functools.partial(takes_model, net), backend=b), (x,)),
        "decorated forward": (deco, lambda b: torch.compile(deco, backend=b), (x,)),
        "decorated, closure": (deco, lambda b: torch.compile(lambda x: deco(x) * 2, backend=b), (x,)),
        "dict": (net, lambda b: torch.compile(lambda d, x: d["net"](x), backend=b), ({"net": net}, x)),
        "list": (net, lambda b: torch.compile(lambda x: [net][0](x), backend=b), (x,)),
        "global": (MODEL, lambda b: torch.compile(global_model, backend=b), (x,)),
    }


@pytest.mark.parametrize("shape", list(_shapes()))
def test_names_are_the_models_own(shape: str) -> None:
    model, compiled, args = _shapes()[shape]
    paths, state = _names(compiled, *args)
    assert {"inp", "blocks.0.lin", "blocks.2", "blocks.2.lin", "head"} <= paths
    own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert state == own  # the tied head weight is read once, under its first name


def test_several_models_are_named_by_their_variables() -> None:
    gen, disc = Tower(), Tower()
    loss_fn = nn.MSELoss()

    def step(z, y):
        return loss_fn(disc(gen(z)), y)

    paths, state = _names(lambda b: torch.compile(step, backend=b), torch.randn(4, 6), torch.randn(4, 6))
    assert {"gen.blocks.1.lin", "disc.blocks.1.lin", "loss_fn"} <= paths
    assert {"gen.inp.weight", "disc.shift"} <= state
    assert not any(name.startswith(("L_", "G_", "args")) for name in paths | state)


def test_a_stateless_loss_module_keeps_the_models_names() -> None:
    net, loss_fn = Net(), nn.MSELoss()
    paths, state = _names(
        lambda b: torch.compile(lambda x, y: loss_fn(net(x), y), backend=b),
        torch.randn(4, 6),
        torch.tensor(0.0),
    )
    assert {"blocks.1.lin", "loss_fn"} <= paths
    assert "inp.weight" in state


def hf_module_worker(rank: int, world: int) -> list[str]:
    """HuggingFace Llama compiled as a module (its forward is wrapped by a ``*args, **kwargs`` decorator in
    newer transformers), split at its own module names, equal to one process."""
    from models import llama

    case, ref = llama(world), llama(world)
    step = torch.compile(
        case.model, backend="dynapipe", options={"split_points": case.split_points, "n_microbatches": 4}
    )
    ids = case.args[0]
    out = step(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    expect = ref.model(input_ids=ids, labels=ids, use_cache=False)
    expect.loss.backward()
    torch.testing.assert_close(out.loss, expect.loss)
    torch.testing.assert_close(out.logits, expect.logits)
    reference = dict(ref.model.named_parameters())
    held = []
    for name, p in case.model.named_parameters():
        if p.untyped_storage().nbytes() > 0:
            torch.testing.assert_close(p.grad, reference[name].grad, msg=lambda m: f"grad {name}: {m}")
            held.append(name)
    return held


@pytest.mark.hf
def test_huggingface_llama_compiled_as_a_module_with_split_points() -> None:
    from harness import run_distributed

    transformers = pytest.importorskip("transformers")
    results = run_distributed(hf_module_worker, 2, timeout=240)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4)
    )
    assert set(results[0]) | set(results[1]) == {n for n, _ in model.named_parameters()}
    assert "model.layers.0.mlp.up_proj.weight" in results[0]
    assert "model.layers.3.mlp.up_proj.weight" in results[1]
