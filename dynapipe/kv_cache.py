"""A HuggingFace static KV cache whose keys and values live on the rank of the stage that owns each layer.

``model.generate(..., cache=PipelineCache(model, batch_size=B, max_cache_len=N))`` runs HuggingFace's own
``generate()`` through a dynapipe-compiled model: the prefill and every decode step are pipelined calls,
and each stage writes and reads the keys and values of its own layers in place, on its own rank.

Why a cache class of its own, rather than ``cache_implementation="static"``:

* **Allocated before Dynamo, at the full batch, without memory.** HF's ``StaticCache`` allocates its
  tensors lazily inside the first forward, so Dynamo would trace the allocation into the graph (and at the
  traced microbatch size). Here every layer's keys and values exist from the start with their full-batch
  shape but no storage (as parameters under :func:`dynapipe.empty_init`); the pipeline gives memory only
  to the inputs its own stages read (:func:`dynapipe.runtime.state.allocate_read_inputs`), so a rank never
  holds another stage's cache.
* **A pytree.** The cache is registered as a pytree node whose leaves are its tensors: dynapipe's capture
  cuts them to one microbatch like any batched input, and every call reads them from the cache object
  HF passes (a new one per ``generate()``). Each microbatch writes its rows of the full-batch tensors in
  place, through a view.
* **One position counter per row.** HF's layer advances one 0-dim counter per ``update``, which in a
  pipeline would advance once per microbatch. Here the counter has a batch dimension: each microbatch
  advances its own rows, so every row moves once per step, and a layer's counter, like its keys, is read
  and written only by the stage that owns the layer.

What is checked when, identically on every rank (each check reads only Python values every rank has):

* **At construction**, a model family whose cache is not one full-attention tensor pair per layer
  (sliding-window, chunked or linear-attention layers, per-layer head shapes) is refused.
* **When ``generate()`` prepares its cache**, before the prefill: beam search, ``num_return_sequences > 1``,
  a number of prompts other than ``batch_size``, a cache an earlier ``generate()`` already filled, and a
  ``max_length`` (prompt plus ``max_new_tokens``) whose cache entries exceed ``max_cache_len``.
* **At every call**, backstops for calls that do not come through ``generate()``: a step that would write
  past ``max_cache_len`` is refused before it runs (the number of tokens written so far is kept in Python,
  from the mask sizes HF asks for once per step before the forward), and a batch other than ``batch_size``
  stops Dynamo's trace.
"""

from __future__ import annotations

import copy
import types
from typing import Any, cast

import torch
import torch.utils._pytree as pytree
from transformers import GenerationConfig, PreTrainedModel
from transformers.cache_utils import StaticCache, StaticLayer, get_layer_types_and_kwargs

from .errors import ConfigError

__all__ = ["PipelineCache"]

_OTHER_BATCH = (
    "the model was called on another number of sequences than the PipelineCache's batch_size, the number "
    "of prompts (beam search and num_return_sequences > 1 are not supported)"
)


class _StageLayer(StaticLayer):
    """One layer's keys and values, ``(batch, kv_heads, max_cache_len, head_dim)``, with a per-row counter."""

    def __init__(self, *, max_cache_len: int, shape: tuple[int, int, int], dtype: torch.dtype, device: Any):
        super().__init__(max_cache_len=max_cache_len)
        batch, heads, head_dim = shape
        self.keys = _without_memory((batch, heads, max_cache_len, head_dim), dtype, device)
        self.values = _without_memory((batch, heads, max_cache_len, head_dim), dtype, device)
        self.cumulative_length = torch.zeros(batch, dtype=torch.long, device=device)
        self.batch_size, self.num_heads, self.k_head_dim, self.v_head_dim = batch, heads, head_dim, head_dim
        self.device = torch.device(device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = cast(torch.Tensor, self.keys), cast(torch.Tensor, self.values)
        # raised while Dynamo traces (static shapes), before any stage runs
        torch._check_with(ConfigError, key_states.shape[0] == keys.shape[0], lambda: _OTHER_BATCH)
        new = key_states.shape[-2]
        # A value of this layer's own computation, in every op on the counter: a pipeline that places nodes
        # as early as their inputs allow (every one after the first, following the parameters' owners)
        # then reads and advances each layer's counter on that layer's stage, not on the first one.
        this_layer = key_states.new_zeros((), dtype=torch.long)
        # every row of a step writes at the same place (prompts are left-padded to one length)
        start = (self.cumulative_length + this_layer).amax()
        self.cumulative_length.add_(this_layer + new)
        position = torch.arange(new, device=key_states.device) + start
        # what index_copy_ returns (the same tensors) is what attention reads: in the graph, every read then
        # follows the write, and a later pipeline that places nodes as early as their inputs allow keeps
        # them on the writer's stage
        return keys.index_copy_(2, position, key_states), values.index_copy_(2, position, value_states)

    def get_seq_length(self) -> Any:
        return self.cumulative_length.amax()

    def reset(self) -> None:
        for t in (self.keys, self.values, self.cumulative_length):
            if (
                t is not None and t.untyped_storage().nbytes()
            ):  # other stages' layers hold no memory on this rank
                t.zero_()


class PipelineCache(StaticCache):
    """HF static cache for ``generate()`` through a dynapipe pipeline (see the module docstring).

    ``batch_size`` is the number of prompts (``input_ids.shape[0]``); ``max_cache_len`` the longest
    sequence, prompt plus new tokens. Use a new cache for every ``generate()`` call (or ``reset()`` it).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        batch_size: int,
        max_cache_len: int,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        config = model.config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(config)
        other = sorted({t for t in layer_types if t != "full_attention"})
        shape = cast(Any, model)._get_static_cache_init_shape() if other == [] else None
        if shape is None or not isinstance(shape[0], int) or not isinstance(shape[1], int):
            raise ConfigError(
                f"{type(model).__name__} does not fit PipelineCache: it holds one (batch, heads, length, "
                f"head_dim) tensor pair per full-attention layer, but this model has "
                f"{', '.join(other) or 'per-layer head shapes'} layers; generate without a cache through the "
                "pipeline (use_cache=False) or on one process"
            )
        heads, head_dim = shape
        dtype = dtype or model.dtype
        device = device or model.device
        layers: list[Any] = [
            _StageLayer(
                max_cache_len=max_cache_len, shape=(batch_size, heads, head_dim), dtype=dtype, device=device
            )
            for _ in layer_types
        ]
        super(StaticCache, self).__init__(layers=layers)
        self.max_cache_len = max_cache_len
        self.written: dict[int, int] = {}  # mask layer -> tokens written so far (Python, on every rank)
        if "_prepare_cache_for_generation" not in vars(model):  # once per model: see _prepare_checked
            cast(Any, model)._prepare_cache_for_generation = types.MethodType(_prepare_checked, model)

    def check_generate(self, config: GenerationConfig, n_prompts: int, entries: int) -> None:
        """Refuses a ``generate()`` this cache cannot serve, before its prefill, with the same error on every
        rank. ``entries`` is HF's own count of what the cache must hold: ``max_length - 1`` (the last token
        is returned, never written)."""
        if config.num_beams > 1 or config.num_return_sequences > 1:
            raise ConfigError(
                f"beam search and num_return_sequences > 1 are not supported through a PipelineCache (got "
                f"num_beams={config.num_beams}, num_return_sequences={config.num_return_sequences}): it holds "
                "one row per prompt; use num_beams=1 and num_return_sequences=1"
            )
        if n_prompts != self.batch_size:
            raise ConfigError(
                f"generate() got {n_prompts} prompts, but the PipelineCache was built with "
                f"batch_size={self.batch_size}; build it with batch_size=input_ids.shape[0]"
            )
        if self.written:
            raise ConfigError(
                "this PipelineCache was filled by an earlier generate(), and continuing from it is not "
                "supported; build a new one for every generate() call (or call its reset() first)"
            )
        if entries > self.max_cache_len:
            new = config.max_new_tokens
            asked = (
                f"a prompt of {config.max_length - new} tokens and max_new_tokens={new}"
                if new is not None
                else f"max_length={config.max_length}"
            )
            fewer = (
                f"max_new_tokens <= {self.max_cache_len - (config.max_length - new) + 1}"
                if new is not None
                else f"max_length <= {self.max_cache_len + 1}"
            )
            raise ConfigError(
                f"the PipelineCache holds max_cache_len={self.max_cache_len} tokens, but {asked} need "
                f"{entries} (the prompt and every new token but the last); build it with max_cache_len >= "
                f"{entries}, or pass {fewer}"
            )

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """HF asks once per step, before the forward (and again inside it, while Dynamo traces)."""
        if not torch.compiler.is_compiling():
            end = self.written.get(layer_idx, 0) + query_length
            if end > self.max_cache_len:
                raise ConfigError(
                    f"the PipelineCache holds {self.max_cache_len} tokens, but this step would write token "
                    f"{end}; build it with max_cache_len >= prompt length + max_new_tokens"
                )
            self.written[layer_idx] = end
        return super().get_mask_sizes(query_length, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> Any:
        if torch.compiler.is_compiling():
            return super().get_seq_length(layer_idx)
        return min(self.written.values(), default=0)  # every rank knows it, whichever layers it holds

    def reset(self) -> None:
        super().reset()
        self.written.clear()


def _prepare_checked(
    model: Any,
    generation_config: GenerationConfig,
    model_kwargs: dict[str, Any],
    generation_mode: Any,
    batch_size: int,
    max_cache_length: int,
) -> Any:
    """``generate()``'s cache preparation, after :meth:`PipelineCache.check_generate` on a PipelineCache.

    HF gives a user's cache no look at the generation's settings (no documented hook, in 5.23 or 5.24,
    sees both the cache and ``max_length`` before the prefill), and the forward never sees
    ``max_new_tokens``. ``_prepare_cache_for_generation`` is the narrowest place that does: HF calls it
    once per ``generate()``, with the lengths settled and the beams known, on the user's cache (only to
    check conflicting arguments), before any forward. Overridden on the model instance the cache was
    built for, so other models are untouched, and it calls HF's own method unchanged.
    """
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))  # its name since 5.24, before
    if isinstance(cache, PipelineCache):
        cache.check_generate(generation_config, batch_size, max_cache_length)
        # HF compiles the decode step itself (on CUDA) when the cache is compileable; that compile would
        # wrap dynapipe's own. Set on this call's config, so a user's own generation_config is covered too.
        generation_config.disable_compile = True
    return type(model)._prepare_cache_for_generation(
        model, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    )


def _without_memory(shape: tuple[int, ...], dtype: torch.dtype, device: Any) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    t.untyped_storage().resize_(0)
    return t


_FIELDS = ("keys", "values", "cumulative_length")


def _flatten(cache: PipelineCache) -> tuple[list[torch.Tensor], PipelineCache]:
    return [getattr(layer, f) for layer in cache.layers for f in _FIELDS], cache


def _flatten_with_keys(cache: PipelineCache) -> tuple[list[tuple[Any, torch.Tensor]], PipelineCache]:
    leaves, context = _flatten(cache)
    return [(pytree.SequenceKey(i), leaf) for i, leaf in enumerate(leaves)], context


def _unflatten(leaves: Any, template: PipelineCache) -> PipelineCache:
    """A cache like ``template`` (sizes, Python counters shared) over other tensors: no copy of data."""
    cache = copy.copy(template)
    cache.layers = [copy.copy(layer) for layer in template.layers]
    values = iter(leaves)
    for layer in cache.layers:
        for f in _FIELDS:
            setattr(layer, f, next(values))
    return cache


pytree.register_pytree_node(
    PipelineCache,
    _flatten,
    _unflatten,
    flatten_with_keys_fn=_flatten_with_keys,
    serialized_type_name="dynapipe.PipelineCache",
)
