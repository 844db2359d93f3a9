"""Start-up of a Llama larger than one rank should hold: empty init + checkpoint against the whole model.

    python benchmarks/bench_big_model.py                 # 4 processes, a 845 MiB (fp32) Llama
    python benchmarks/bench_big_model.py --hidden 1024   # a 4x smaller one

Writes a random ``LlamaForCausalLM`` as a sharded HuggingFace folder, then for each row starts ``--nproc``
fresh processes that run one pipelined training step (forward and backward, 1F1B, 4 microbatches) and
report their peak RSS and the time from the start of building the model to the end of that step:

* ``empty init + checkpoint``: built under ``dynapipe.empty_init()``, each rank fills its own stage from
  the folder (``options["checkpoint"]``);
* ``whole model per rank``: every rank builds the model and loads the whole folder (``from_pretrained``),
  then dynapipe frees the other stages' parameters after the partition (the path without empty init);
* ``torch.distributed.pipelining, meta``: what a user of torch.distributed.pipelining writes by hand: the
  model built on the meta device, each rank keeps its own layers (an equal split; the first also the
  embedding, the last the norm and head), ``to_empty()``, reads its tensors from the folder with
  ``safe_open``, rebuilds the rotary buffer, and runs ``Schedule1F1B``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from hf_models import hf_config

VOCAB, SEQ, BATCH = 8000, 16, 8


def _config(hidden: int, layers: int):
    return hf_config(
        "llama",
        vocab=VOCAB,
        hidden=hidden,
        layers=layers,
        heads=8,
        kv_heads=4,
        ffn=hidden * 11 // 4,
        positions=SEQ,
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _TorchPipelineStage(torch.nn.Module):
    """Layers ``first:last`` of a Llama, with the embedding before them on the first stage and the final
    norm and head after them on the last: the stage module a torch.distributed.pipelining user writes."""

    def __init__(self, model, first: int, last: int) -> None:
        super().__init__()
        self.n_layers = len(model.model.layers)
        self.embed = model.model.embed_tokens if first == 0 else None
        self.layers = torch.nn.ModuleList(model.model.layers[first:last])
        self.rotary = model.model.rotary_emb
        self.norm = model.model.norm if last == self.n_layers else None
        self.head = model.lm_head if last == self.n_layers else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            h = self.embed(h)
        positions = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
        rotary = self.rotary(h, positions)
        for layer in self.layers:
            h = layer(h, position_embeddings=rotary, position_ids=positions)
        return h if self.head is None else self.head(self.norm(h))


def _torch_pipelining_step(hf: str, hidden: int, layers: int) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from safetensors import safe_open
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = _config(hidden, layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    first, last = rank * layers // world, (rank + 1) * layers // world
    stage = _TorchPipelineStage(model, first, last).to_empty(device="cpu")
    stage.rotary = LlamaRotaryEmbedding(config)  # a non-persistent buffer: meta holds no value
    own = {}  # the checkpoint's name of each tensor this stage holds
    for name, t in stage.state_dict().items():
        if name.startswith("layers."):
            index, rest = name[len("layers.") :].split(".", 1)
            own[f"model.layers.{first + int(index)}.{rest}"] = t
        elif name.startswith(("embed.", "norm.")):
            own[f"model.{name.replace('embed.', 'embed_tokens.')}"] = t
        elif name.startswith("head."):
            own[name.replace("head.", "lm_head.")] = t
    files = json.load(open(os.path.join(hf, "model.safetensors.index.json")))["weight_map"]
    for file in sorted({files[k] for k in own}):
        with safe_open(os.path.join(hf, file), "pt") as f:
            for key in [k for k in own if files[k] == file]:
                own[key].copy_(f.get_tensor(key))
    pipe = PipelineStage(stage, rank, world, torch.device("cpu"))

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    schedule = Schedule1F1B(pipe, n_microbatches=4, loss_fn=loss_fn)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    args = (ids,) if rank == 0 else ()
    schedule.step(*args, target=ids if rank == world - 1 else None)


def _worker(mode: str, hf: str, hidden: int, layers: int) -> dict:
    from transformers import LlamaForCausalLM

    import dynapipe

    base, start = _rss_mb(), time.perf_counter()
    options = {"n_microbatches": 4}
    if mode == "torch":
        _torch_pipelining_step(hf, hidden, layers)
    elif mode == "empty":
        with dynapipe.empty_init():
            model = LlamaForCausalLM(_config(hidden, layers))
        options["checkpoint"] = hf
    else:
        model = LlamaForCausalLM.from_pretrained(hf)
    if mode != "torch":
        step = torch.compile(
            lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss,
            backend="dynapipe",
            options=options,
        )
        step(torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))).backward()
    elapsed = time.perf_counter() - start
    with open("/proc/self/status") as f:  # VmHWM: ru_maxrss would carry the launching parent's peak over exec
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    return {"base": base, "peak": peak, "first_step": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    a = parser.parse_args()
    from transformers import LlamaForCausalLM

    from dynapipe.launch import launch

    root = tempfile.mkdtemp(prefix="bench-big-")
    hf = os.path.join(root, "llama-hf")
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(a.hidden, a.layers))
    size = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    model.save_pretrained(hf, max_shard_size="64MB")
    del model
    print(f"Llama hidden={a.hidden} layers={a.layers}: {size:.0f} MiB fp32, {a.nproc} ranks\n")
    print(
        "| path | peak RSS per rank (MiB, max) | growth over bare process (MiB, max) | time to first step (s, max) |"
    )
    print("| --- | --- | --- | --- |")
    for mode, label in (
        ("empty", "dynapipe: empty init + checkpoint"),
        ("whole", "dynapipe: whole model per rank"),
        ("torch", "torch.distributed.pipelining, meta"),
    ):
        rows = list(launch(_worker, mode, hf, a.hidden, a.layers, nproc=a.nproc).values())
        print(
            f"| {label} | {max(r['peak'] for r in rows):.0f} | {max(r['peak'] - r['base'] for r in rows):.0f} "
            f"| {max(r['first_step'] for r in rows):.1f} |"
        )


if __name__ == "__main__":
    main()
