"""The model set every pipelined run is checked on, each with its inputs and split points.

``CASES[name](n_stages)`` returns a :class:`Case`: a fresh model (seeded, so every rank builds the same
weights), the step function to compile (the model itself, or a callable returning the loss), example
inputs, and split points for ``n_stages`` stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from hf_models import NO_DROPOUT, hf_config  # benchmarks/hf_models.py (tests/conftest.py)

import dynapipe

__all__ = ["CASES", "Case", "HF_CASES"]

BATCH = 8


@dataclass
class Case:
    model: nn.Module
    step: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)
    split_points: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # case-specific backend options


def _points(prefix: str, n_layers: int, n_stages: int) -> list[str]:
    return [f"{prefix}.{round(i * n_layers / n_stages)}" for i in range(1, n_stages)]


class MLPStack(nn.Module):
    def __init__(self, width: int = 16, n_layers: int = 8, n_classes: int = 5):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


def mlp(n_stages: int) -> Case:
    torch.manual_seed(0)
    model = MLPStack()
    x, y = torch.randn(BATCH, 16), torch.randint(0, 5, (BATCH,))
    step = lambda x, y: F.cross_entropy(model(x), y)  # noqa: E731 - a loss callable, as users write it
    return Case(model, step, (x, y), split_points=_points("layers", 8, n_stages))


class SkipNet(nn.Module):
    """The embedding output is read again by the head: a skip connection over every middle stage. A
    stop-gradient branch (``gate``) gives parameters no gradient, which DDP must still count as ready."""

    def __init__(self, width: int = 16, n_blocks: int = 4):
        super().__init__()
        self.embed = nn.Linear(12, width)
        self.gate = nn.Linear(width, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_blocks)
        )
        self.head = nn.Linear(2 * width, 3)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)
        h = e + 0.1 * self.gate(e).detach()
        for block in self.blocks:
            h = block(h) + h
        logits = self.head(torch.cat([h, e], dim=-1))
        return F.mse_loss(logits, target)


def skip(n_stages: int) -> Case:
    torch.manual_seed(1)
    model = SkipNet()
    return Case(
        model,
        model,
        (torch.randn(BATCH, 12), torch.randn(BATCH, 3)),
        split_points=_points("blocks", 4, n_stages),
    )


class MultiIO(nn.Module):
    """Two streams that cross every stage boundary together, a kwarg mask, a buffer, a sum-reduced loss."""

    def __init__(self, width: int = 8, n_blocks: int = 4):
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(width, width) for _ in range(n_blocks))
        self.b = nn.ModuleList(nn.Linear(width, width) for _ in range(n_blocks))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor, z: torch.Tensor, *, mask: torch.Tensor | None = None) -> dict:
        for la, lb in zip(self.a, self.b, strict=True):
            x, z = torch.tanh(la(x) + z * self.scale), torch.sigmoid(lb(z) - x)
        if mask is not None:
            x = x * mask
        return {"loss": ((x - z) ** 2).sum(), "x": x, "z": z}


def multi_io(n_stages: int) -> Case:
    torch.manual_seed(2)
    model = MultiIO()
    x, z = torch.randn(BATCH, 8), torch.randn(BATCH, 8)
    mask = (torch.rand(BATCH, 8) > 0.3).float()
    step = lambda x, z, mask: model(x, z, mask=mask)["loss"]  # noqa: E731
    return Case(
        model,
        step,
        (x, z),
        {"mask": mask},
        split_points=_points("a", 4, n_stages),
        options={"loss_reduction": "sum"},
    )


class TiedLM(nn.Module):
    """The token embedding is also the output projection: one parameter in the first and last stage."""

    def __init__(self, vocab: int = 20, width: int = 16, n_layers: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = h + torch.relu(layer(h))
        logits = self.norm(h) @ self.embed.weight.t()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def tied(n_stages: int) -> Case:
    torch.manual_seed(3)
    model = TiedLM()
    ids = torch.randint(0, 20, (BATCH, 6))
    return Case(model, model, (ids, torch.roll(ids, 1, dims=1)), split_points=_points("layers", 4, n_stages))


class LoopIfNet(nn.Module):
    """A Python loop over a config-chosen depth and a config-dependent branch: Dynamo specialises both."""

    def __init__(self, depth: int = 6, residual: bool = True, use_norm: bool = False):
        super().__init__()
        self.depth, self.residual, self.use_norm = depth, residual, use_norm
        self.cells = nn.ModuleList(nn.Linear(10, 10) for _ in range(depth))
        self.norm = nn.LayerNorm(10)
        self.out = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            h = torch.relu(self.cells[i](x))
            x = x + h if self.residual and i % 2 == 0 else h
        if self.use_norm:
            x = self.norm(x)
        return F.mse_loss(self.out(x).squeeze(-1), y)


def loop_if(n_stages: int) -> Case:
    torch.manual_seed(4)
    model = LoopIfNet()
    return Case(
        model, model, (torch.randn(BATCH, 10), torch.randn(BATCH)), split_points=_points("cells", 6, n_stages)
    )


def _hf_lm(make, config, n_stages: int, seed: int, layers: str | None = None, **call) -> Case:
    """A HuggingFace LM trained on token ids that are their own labels; split before every
    ``n_layers / n_stages``-th block of ``layers`` (4 blocks), or by the automatic partition."""
    torch.manual_seed(seed)
    model = make(config)
    ids = torch.randint(0, 96, (BATCH, 12))
    step = lambda ids, labels: model(input_ids=ids, labels=labels, **call).loss  # noqa: E731
    points = _points(layers, 4, n_stages) if layers else []
    return Case(model, step, (ids, ids.clone()), split_points=points)


def llama(n_stages: int) -> Case:
    from transformers import LlamaForCausalLM

    config = hf_config("llama", vocab=96, hidden=32, layers=4, kv_heads=2, ffn=64, positions=64)
    return _hf_lm(LlamaForCausalLM, config, n_stages, 5, "model.layers")


def gpt2(n_stages: int) -> Case:
    from transformers import GPT2LMHeadModel

    config = hf_config("gpt2", vocab=96, hidden=32, layers=4, positions=32, **NO_DROPOUT["gpt2"])
    return _hf_lm(GPT2LMHeadModel, config, n_stages, 6, "transformer.h")


class MarkedNet(nn.Module):
    """Split by ``pipe_split()`` calls in forward, as torch.distributed.pipelining users write."""

    def __init__(self, use_torch_marker: bool = False):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.use_torch_marker = use_torch_marker

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.use_torch_marker:
            from torch.distributed.pipelining import pipe_split
        else:
            pipe_split = dynapipe.pipe_split
        x = torch.relu(self.l1(x))
        pipe_split()
        x = torch.relu(self.l2(x))
        return F.cross_entropy(self.l3(x), y)


class _ScaledTanh(torch.autograd.Function):
    """A custom autograd Function with a hand-written backward (a clipped straight-through gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        return torch.tanh(x) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, scale = ctx.saved_tensors
        t = torch.tanh(x)
        return grad * scale * (1 - t * t), (grad * t).sum(0)


class CustomFnNet(nn.Module):
    def __init__(self, width: int = 8, n_layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))
        self.scales = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = _ScaledTanh.apply(layer(x), self.scales)
        return F.cross_entropy(self.head(x), y)


def custom_fn(n_stages: int) -> Case:
    torch.manual_seed(8)
    model = CustomFnNet()
    return Case(
        model,
        model,
        (torch.randn(BATCH, 8), torch.randint(0, 2, (BATCH,))),
        split_points=_points("layers", 4, n_stages),
    )


def opt(n_stages: int) -> Case:
    from transformers import OPTForCausalLM

    config = hf_config("opt", vocab=96, hidden=32, layers=4, ffn=64, positions=32, **NO_DROPOUT["opt"])
    return _hf_lm(OPTForCausalLM, config, n_stages, 9, "model.decoder.layers")


def bloom(n_stages: int) -> Case:
    from transformers import BloomForCausalLM

    config = hf_config("bloom", vocab=96, hidden=32, layers=4, **NO_DROPOUT["bloom"])
    return _hf_lm(BloomForCausalLM, config, n_stages, 10, "transformer.h")


def qwen2(n_stages: int) -> Case:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return _hf_lm(Qwen2ForCausalLM, config, n_stages, 11, use_cache=False)


def t5(n_stages: int) -> Case:
    """An encoder-decoder: the decoder reads the encoder's output, a skip connection over stages."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return _hf_lm(T5ForConditionalGeneration, config, n_stages, 12, use_cache=False)


def bert(n_stages: int) -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(13)
    config = BertConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    ids, labels = torch.randint(0, 96, (BATCH, 12)), torch.randint(0, 3, (BATCH,))
    step = lambda ids, labels: model(input_ids=ids, labels=labels).loss  # noqa: E731
    return Case(model, step, (ids, labels))


CASES: dict[str, Callable[[int], Case]] = {
    "mlp": mlp,
    "skip": skip,
    "multi_io": multi_io,
    "tied": tied,
    "loop_if": loop_if,
    "custom_fn": custom_fn,
}
HF_CASES: dict[str, Callable[[int], Case]] = {
    "llama": llama,
    "gpt2": gpt2,
    "opt": opt,
    "bloom": bloom,
    "qwen2": qwen2,
    "t5": t5,
    "bert": bert,
}
