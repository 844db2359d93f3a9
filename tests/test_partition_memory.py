"""Memory balance counts the embedding and the LM head: with a large vocabulary they are the heaviest
pieces of state, and the smallest stage memory any split reaches is set by them.

    pytest tests/test_partition_memory.py
"""

from __future__ import annotations

import re

import pytest
import torch
from fixtures import assign_balanced, stage_records

from dynapipe.cost import graph_costs
from dynapipe.errors import PartitionError
from dynapipe.explain import capture

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

VOCAB, HIDDEN, LAYERS, N_MICRO = 16000, 32, 4, 2


def test_embedding_and_head_count_in_stage_memory():
    t = transformers
    torch.manual_seed(0)
    config = t.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = t.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (4, 8))
    captured = capture(model, dict(input_ids=ids, labels=ids, use_cache=False), n_microbatches=N_MICRO)
    table = VOCAB * HIDDEN * 4  # bytes of the embedding, and of the head
    adamw = 4 * table  # parameters, gradients, two moments

    with pytest.raises(PartitionError, match=r"smallest feasible value is (\d+) bytes") as info:
        assign_balanced(captured, 4, max_stage_memory=1)
    smallest = int(re.search(r"smallest feasible value is (\d+) bytes", str(info.value)).group(1))
    assert adamw <= smallest < 2 * adamw  # one table's state at least; never both on one stage

    records = stage_records(captured, assign_balanced(captured, 4, max_stage_memory=smallest))
    assert max(r.memory_bytes(N_MICRO) for r in records) <= smallest
    first = records[0]
    (head,) = (r for r in records if "lm_head" in r.modules)
    assert "model.embed_tokens" in first.modules and head.index > 0
    assert first.param_bytes >= table and head.param_bytes >= table
    assert min(first.memory_bytes(N_MICRO), head.memory_bytes(N_MICRO)) >= adamw
    others = [r for r in records if r.index not in (0, head.index)]
    assert all(r.memory_bytes(N_MICRO) < adamw for r in others)  # layers are light beside them


def test_autocast_regions_are_costed_in_their_dtype():
    """A matmul inside ``torch.autocast(bfloat16)`` saves a bf16 copy of its input: half the bytes of
    the float32 input it would save if the cost model replayed it outside the region."""

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.a(x)
            return self.b(h.float()).sum()

    captured = capture(Mixed(), (torch.randn(8, 64),), n_microbatches=2)
    costs = graph_costs(captured)
    first, second = (c for n, c in costs.nodes.items() if n.target is torch._C._nn.linear)
    rows = 8 // 2
    assert [costs.buffer_bytes[b] for b in first.saves] == [rows * 64 * 2]  # bf16 input
    assert [costs.buffer_bytes[b] for b in second.saves] == [rows * 32 * 4]  # float32 again after .float()
    assert first.out_bytes == rows * 32 * 2 and first.forward_flops == 2 * rows * 64 * 32  # FLOPs: any dtype
