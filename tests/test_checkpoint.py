"""Models larger than one process: empty init, each rank fills only its own stages from a sharded
HuggingFace folder, checkpoints in the model's own names, exact resume, a rank killed mid-save."""

from __future__ import annotations

import os

import pytest
import torch
from harness import run_distributed
from models import HF_CASES

import dynapipe

LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers"}


def write_hf_folder(root: str, name: str) -> str:
    """The case's seeded model, as ``save_pretrained`` writes it, in several shards."""
    folder = os.path.join(root, f"{name}-hf")
    if not os.path.exists(folder):
        HF_CASES[name](2).model.save_pretrained(folder, max_shard_size="8KB")
        assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    return folder


def _empty_twin(name: str, n_stages: int):
    """The case (its seeded model is the one-process reference) and the same architecture built empty."""
    case = HF_CASES[name](n_stages)
    with dynapipe.empty_init():
        model = type(case.model)(case.model.config)
    return case, model


def _held(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.untyped_storage().nbytes() > 0}


def compare_worker(
    rank: int, world: int, names: list[str], folders: dict, options: dict, save_to: str
) -> dict:
    """Pipelined training of an empty-init model filled from ``folders`` equals one process: loss, every
    gradient this rank holds, and the parameters after SGD steps. Then saves it to ``save_to``."""
    from dynapipe.microbatch import split_value

    dp = options.get("dp_degree", 1)
    out = {}
    for name in names:
        n_stages = world // dp
        case, model = _empty_twin(name, n_stages)
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
        step_fn = lambda ids, labels, model=model: model(input_ids=ids, labels=labels).loss  # noqa: E731
        opts = {
            "split_points": [f"{LAYERS[name]}.{round(i * 4 / n_stages)}" for i in range(1, n_stages)],
            "n_microbatches": 4,
            "checkpoint": folders[name],
            **options,
        }
        step = torch.compile(step_fn, backend="dynapipe", options=opts)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.9)
        args = [split_value(a, dp, len(case.args[0]), rank % dp) for a in case.args]
        ref_params = dict(case.model.named_parameters())
        for i in range(2):
            loss = step(*args)
            loss.backward()
            ref_loss = case.step(*case.args)
            ref_loss.backward()
            torch.testing.assert_close(loss, ref_loss, msg=lambda m: f"{name} step {i} loss: {m}")
            held = _held(model)
            assert 0 < len(held) < len(ref_params), f"{name}: rank {rank} holds {len(held)} parameters"
            for pname, p in held.items():
                expect = ref_params[pname].grad
                torch.testing.assert_close(p.grad, expect, msg=lambda m: f"{name} step {i} grad {pname}: {m}")
            opt.step(), ref_opt.step()
            opt.zero_grad(), ref_opt.zero_grad()
        for pname, p in _held(model).items():
            torch.testing.assert_close(p, ref_params[pname], msg=lambda m: f"{name} param {pname}: {m}")
        dynapipe.save_checkpoint(os.path.join(save_to, name), model, optimizer=opt, timeout_s=60)
        out[name] = {
            n: p.detach().tolist() for n, p in _held(model).items()
        }  # tensors do not cross the queue
    return out


def _check_saved(results: dict, names: list[str], save_to: str) -> None:
    """The saved folder loads with from_pretrained in one process and equals the pipelined parameters."""
    for name in names:
        folder = os.path.join(save_to, name)
        model = type(HF_CASES[name](2).model).from_pretrained(folder)
        params = dict(model.named_parameters())
        seen = set()
        for out in results.values():
            for pname, value in out[name].items():
                torch.testing.assert_close(params[pname], torch.tensor(value), rtol=0, atol=0)
                seen.add(pname)
        assert seen == set(params), f"{name}: no rank held {sorted(set(params) - seen)}"


@pytest.mark.parametrize(
    ("world", "names", "options"),
    [
        (2, ["llama", "gpt2", "opt"], {"schedule": "1f1b"}),
        (4, ["llama", "gpt2"], {"schedule": "1f1b"}),
        (4, ["gpt2"], {"schedule": "1f1b", "dp_degree": 2}),
    ],
)
def test_empty_init_from_sharded_hf_folder_matches_one_process(world, names, options, tmp_path) -> None:
    folders = {n: write_hf_folder(str(tmp_path), n) for n in names}
    save_to = str(tmp_path / "saved")
    results = run_distributed(compare_worker, world, names, folders, options, save_to, timeout=300)
    _check_saved(results, names, save_to)
    if options.get("dp_degree") == 2:  # one replica wrote: two shards, from the ranks of replica 0
        files = sorted(f for f in os.listdir(os.path.join(save_to, "gpt2")) if f.startswith("model-rank"))
        assert files == ["model-rank00000.safetensors", "model-rank00002.safetensors"], files
