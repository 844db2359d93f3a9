"""Train a Llama no rank holds whole: empty init, each rank loads only its own stage, save, resume.

    python examples/big_model.py                       # 4 processes, a 1 GB (fp32) Llama
    python examples/big_model.py --nproc 2 --hidden 256 --layers 4 --steps 1   # a quick run

Writes a random ``LlamaForCausalLM`` as a sharded HuggingFace checkpoint (``save_pretrained`` with
``max_shard_size``), then three times starts ``--nproc`` fresh processes that build the model under
``dynapipe.empty_init()`` (shapes, no memory) and train it pipelined, each rank reading only its own
stage's tensors from the checkpoint:

1. ``--steps`` steps from the HuggingFace folder, then ``dynapipe.save_checkpoint``;
2. ``dynapipe.load_checkpoint`` of that save (before the first call), ``--steps`` more, save again;
3. ``2 * --steps`` steps straight from the HuggingFace folder, save.

It prints each rank's peak memory (RSS) next to the model's size and checks

* that runs 2 and 3 end with bitwise equal weights and AdamW state (against one uninterrupted run);
* that no rank built more than its own stage: by the end of its first step a rank must hold its stage's
  parameters and their gradients (2 x held); had it built the whole model, as a plain
  ``LlamaForCausalLM(config)`` does, it would hold every parameter and its gradients, at least
  ``size + held``, so every rank must grow by less than that. Everything else a rank adds (Python, torch,
  Dynamo, compiling, activations: about 200 MiB here, and it moves with the versions installed) does not
  grow with the model, so the bound tells the two apart only for a model well above it: the check runs
  from ``MEMORY_CHECKED_FROM_MIB`` (the default model is 845 MiB) and says so when skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

VOCAB, SEQ, BATCH = 8000, 16, 8
MEMORY_CHECKED_FROM_MIB = 512  # below this, a rank's fixed cost (~200 MiB) hides the model


def config(hidden: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
    )


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the launching parent's peak over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))


def train(hf: str, hidden: int, layers: int, first: int, steps: int, load: str, save: str) -> dict:
    """One rank: build empty, fill its stage (from ``load`` or the HF folder), train, save, report memory."""
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    import dynapipe

    base = rss_mb()
    start = time.perf_counter()
    with dynapipe.empty_init():
        model = LlamaForCausalLM(config(hidden, layers))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if load:
        assert dynapipe.load_checkpoint(load, model, optimizer=opt) == {"step": first}
    step = torch.compile(
        lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss,
        backend="dynapipe",
        options={"n_microbatches": 4, "checkpoint": hf},
    )
    first_step = None
    for i in range(first, first + steps):
        loss = step(batch(i))
        loss.backward()
        if first_step is None:  # start-up: the stage filled, one forward and backward, no AdamW state yet
            first_step, startup_peak = time.perf_counter() - start, peak_rss_mb()
        opt.step()
        opt.zero_grad()
    dynapipe.save_checkpoint(save, model, optimizer=opt, extra={"step": first + steps})
    held = sum(p.untyped_storage().nbytes() for p in model.parameters()) / 2**20
    return {
        "rank": dist.get_rank(),
        "base": base,
        "startup_peak": startup_peak,
        "peak": peak_rss_mb(),
        "held": held,
        "first": first_step,
    }


def read_checkpoint(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        for file in set(json.load(f)["weight_map"].values()):
            out.update(load_file(os.path.join(folder, file)))
    with open(os.path.join(folder, "optimizer.index.json")) as f:
        for file in set(json.load(f).values()):
            for name, state in torch.load(os.path.join(folder, file), weights_only=True).items():
                out.update({f"{name}:{k}": v for k, v in state.items()})
    return out


def write_hf_checkpoint(folder: str, hidden: int, layers: int) -> float:
    """A random Llama as save_pretrained writes it, in shards; returns its fp32 size in MiB."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config(hidden, layers))
    model.save_pretrained(folder, max_shard_size="64MB")
    return sum(p.numel() * 4 for p in model.parameters()) / 2**20


def run(nproc: int, *args) -> list[dict]:
    from dynapipe.launch import launch

    return list(launch(train, *args, nproc=nproc).values())  # each rank's memory report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None, help="folder for the checkpoints (default: a temporary one)")
    a = parser.parse_args()
    root = a.out or tempfile.mkdtemp(prefix="big-model-")
    hf = os.path.join(root, "llama-hf")
    size = write_hf_checkpoint(hf, a.hidden, a.layers)
    print(f"model: {size:.0f} MiB fp32, sharded in {hf}")
    shape = (a.hidden, a.layers)
    first = run(a.nproc, hf, *shape, 0, a.steps, "", os.path.join(root, "run", "step-a"))
    run(
        a.nproc,
        hf,
        *shape,
        a.steps,
        a.steps,
        os.path.join(root, "run", "latest"),
        os.path.join(root, "run", "step-b"),
    )
    run(a.nproc, hf, *shape, 0, 2 * a.steps, "", os.path.join(root, "straight"))
    for line in first:
        print(
            f"rank {line['rank']}: peak RSS to the first step {line['startup_peak']:.0f} MiB "
            f"(+{line['startup_peak'] - line['base']:.0f} over the bare process), with AdamW state "
            f"{line['peak']:.0f} MiB; parameters held {line['held']:.0f} MiB of {size:.0f}; first step "
            f"{line['first']:.1f} s"
        )
    resumed, straight = (
        read_checkpoint(os.path.join(root, "run", "step-b")),
        read_checkpoint(os.path.join(root, "straight")),
    )
    same = resumed.keys() == straight.keys() and all(torch.equal(v, straight[k]) for k, v in resumed.items())
    print(
        f"saved, resumed in new processes, trained on vs trained straight -> {'match' if same else 'MISMATCH'}"
    )
    # must hold: its stage's parameters and gradients (2 x held); the whole model would be size + held
    for line in first:
        print(
            f"rank {line['rank']}: grew {line['startup_peak'] - line['base']:.0f} MiB = 2 x {line['held']:.0f} "
            f"(its stage's parameters and gradients) + {line['startup_peak'] - line['base'] - 2 * line['held']:.0f} "
            f"(fixed cost); the whole model would take at least {size + line['held']:.0f}"
        )
    fits = True
    if size < MEMORY_CHECKED_FROM_MIB:
        print(f"memory not checked: the model ({size:.0f} MiB) is below {MEMORY_CHECKED_FROM_MIB} MiB")
    else:
        fits = all(line["startup_peak"] - line["base"] < size + line["held"] for line in first)
        print(
            f"every rank grew less than the whole model's parameters + its stage's gradients by its first "
            f"step -> {'match' if fits else 'MISMATCH'}"
        )
    if not (same and fits):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
