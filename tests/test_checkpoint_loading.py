"""Loading a checkpoint runs no code from the folder, and a bad folder changes nothing: ``extra`` without
pickle unless ``allow_pickle=True``; a truncated file, a missing shard, a wrong shape or dtype, another
model: an error naming the file and tensor on every rank, with every value as it was."""

from __future__ import annotations

import os
import random
import re
import shutil

import pytest
import torch
from harness import run_distributed
from safetensors.torch import load_file, save_file

import dynapipe
from dynapipe.runtime.checkpoint import pending_load


def _net(depth: int = 3) -> torch.nn.Sequential:
    """Linear layers 0, 2, 4, ... with a Tanh between; cut at "2", stage 0 is layer 0."""
    layers: list[torch.nn.Module] = [torch.nn.Linear(8, 16)]
    for _ in range(depth - 2):
        layers += [torch.nn.Tanh(), torch.nn.Linear(16, 16)]
    return torch.nn.Sequential(*layers, torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every value a load may change: the parameters this rank holds, its optimizer state, its RNG."""
    held = [p.detach().clone() for p in model.parameters() if p.untyped_storage().nbytes() > 0]
    state = [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    lrs = [torch.tensor(g["lr"]) for g in opt.param_groups]
    return held + state + lrs + [torch.get_rng_state()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_scheduler_and_data_loader_state_round_trip_without_pickle(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), T_max=10)
    order = torch.Generator().manual_seed(7)  # a shuffling DataLoader's generator
    for _ in range(3):
        model(torch.randn(2, 8)).sum().backward()
        opt.step(), step_lr.step(), cosine.optimizer.step(), cosine.step()
        torch.randperm(10, generator=order)  # an epoch's order drawn
    loader = {"epoch": 3, "batch": 5, "generator": order.get_state()}
    extra = {"step_lr": step_lr.state_dict(), "cosine": cosine.state_dict(), "loader": loader}
    extra["python_rng"] = random.getstate()
    dynapipe.save_checkpoint(tmp_path / "ck", model, optimizer=opt, extra=extra)

    loads = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k)
    )
    model2 = _net()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    got = dynapipe.load_checkpoint(tmp_path / "ck", model2, optimizer=opt2)
    assert loads and all(w is True for w in loads), loads  # nothing was unpickled
    assert got["cosine"] == cosine.state_dict() and got["python_rng"] == random.getstate()
    assert (got["loader"]["epoch"], got["loader"]["batch"]) == (3, 5)
    resumed = torch.Generator()
    resumed.set_state(got["loader"]["generator"])
    assert torch.equal(torch.randperm(10, generator=resumed), torch.randperm(10, generator=order))
    step_lr2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    step_lr2.load_state_dict(got["step_lr"])
    lrs, lrs2 = [], []
    for _ in range(3):
        opt.step(), step_lr.step(), opt2.step(), step_lr2.step()
        lrs.append(step_lr.get_last_lr()), lrs2.append(step_lr2.get_last_lr())
    assert lrs == lrs2 and lrs[0] != lrs[-1], (lrs, lrs2)


class _Plan:
    """A user's object: a pickle of it names this class, which weights_only refuses."""


def _touch(file: str) -> str:
    """What unpickling a :class:`_Payload` calls: leaves a file behind, as any code could."""
    with open(file, "w") as f:
        f.write("ran")
    return "ran"


class _Payload:
    def __init__(self, file: str) -> None:
        self.file = file

    def __reduce__(self):
        return (_touch, (self.file,))


def test_extra_that_needs_pickle_is_refused_before_anything_is_written(tmp_path) -> None:
    model = _net()
    with pytest.raises(
        dynapipe.ConfigError, match=r"extra holds an object .*_Plan.*allow_pickle=True"
    ) as err:
        dynapipe.save_checkpoint(tmp_path / "ck", model, extra={"plan": _Plan()})
    assert "state_dict()" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary folder, no `latest`
    dynapipe.save_checkpoint(tmp_path / "ck", model, extra={"plan": _Plan()}, allow_pickle=True)
    assert os.path.exists(tmp_path / "ck" / "extra.pt")


@pytest.mark.parametrize("how", ["allow_pickle", "written_before"])
def test_pickled_extra_loads_only_with_allow_pickle(tmp_path, how) -> None:
    """A folder whose extra is a pickle (saved with allow_pickle=True, or by dynapipe before extra was
    saved without pickle: ``torch.save(extra)``) refuses, runs nothing and changes nothing, unless
    ``allow_pickle=True``."""
    marker = str(tmp_path / "ran")
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    folder = tmp_path / "ck"
    if how == "allow_pickle":
        dynapipe.save_checkpoint(
            folder, model, optimizer=opt, extra={"x": _Payload(marker)}, allow_pickle=True
        )
    else:
        dynapipe.save_checkpoint(folder, model, optimizer=opt, extra={"x": 1})
        torch.save({"x": _Payload(marker)}, folder / "extra.pt")
    model2 = _net()
    opt2 = torch.optim.AdamW(model2.parameters())
    before = _snapshot(model2, opt2)
    with pytest.raises(dynapipe.ConfigError) as err:
        dynapipe.load_checkpoint(folder, model2, optimizer=opt2)
    message = str(err.value)
    assert str(folder / "extra.pt") in message and "_touch" in message, message
    assert "load_checkpoint(..., allow_pickle=True) only if you trust the folder" in message, message
    assert not os.path.exists(marker)
    assert _same(_snapshot(model2, opt2), before) and not opt2.state
    assert dynapipe.load_checkpoint(folder, model2, optimizer=opt2, allow_pickle=True) == {"x": "ran"}
    assert os.path.exists(marker)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def _break(root: str) -> dict[str, tuple[str, str]]:
    """Copies of ``root/good`` with one defect each: case -> (file, pattern naming a tensor) its error
    must name."""
    good = os.path.join(root, "good")
    shard0, shard1 = "model-rank00000.safetensors", "model-rank00001.safetensors"

    def copy(case: str) -> str:
        shutil.copytree(good, os.path.join(root, case))
        return os.path.join(root, case)

    def truncate(file: str, size: int) -> None:
        with open(file, "r+b") as f:
            f.truncate(size)

    truncate(os.path.join(copy("truncated"), shard1), os.path.getsize(os.path.join(good, shard1)) - 4)
    truncate(os.path.join(copy("header"), shard1), 40)
    os.remove(os.path.join(copy("missing"), shard0))
    for case, name, value in [
        ("shape", "2.weight", torch.zeros(16, 8)),
        ("dtype", "4.bias", torch.zeros(4).double()),
    ]:
        tensors = load_file(os.path.join(good, shard1))
        save_file({**tensors, name: value}, os.path.join(copy(case), shard1), metadata={"format": "pt"})
    optimizer_file = os.path.join(copy("optimizer"), "optimizer-rank00001.pt")
    truncate(optimizer_file, os.path.getsize(optimizer_file) // 2)
    return {
        "truncated": (shard1, r"is truncated \(\d+ bytes\): tensor '[24]\.(weight|bias)' is cut"),
        "header": (shard1, r"no complete header; it holds '2\.bias' and 3 more"),
        "missing": (shard0, r"is missing; the index puts '0\.bias' and 1 more"),
        "shape": (shard1, r"tensor '2\.weight' in \S+ is F32 of shape \(16, 8\).*shape \(16, 16\)"),
        "dtype": (
            shard1,
            r"tensor '4\.bias' in \S+ is F64 of shape \(4,\), but the model's is torch\.float32",
        ),
        "optimizer": (
            "optimizer-rank00001.pt",
            r"optimizer state \(e\.g\. of '2\.bias'\), is missing, truncated",
        ),
        "other": (shard0, r"does not have, e\.g\. '6\.bias' in /\S+/model-rank00000"),  # written by the test
    }


def bad_folders_worker(rank: int, world: int, root: str) -> dict:
    """Train a step, save, break copies of the save; then each bad folder is an error on this rank that
    leaves the model, optimizer and RNG as they were, also for a model whose tensors load later."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    options = {"split_points": ["2"], "n_microbatches": 2, "timeout_s": 60}
    step = torch.compile(lambda x: model(x).square().mean(), backend="dynapipe", options=options)
    step(torch.randn(4, 8)).backward()
    opt.step()
    dynapipe.save_checkpoint(
        os.path.join(root, "good"), model, optimizer=opt, extra={"step": 1}, timeout_s=60
    )
    try:  # rank 0's extra is saved: it stops rank 1 too, before either writes
        unsafe = {"plan": _Plan()} if rank == 0 else None
        dynapipe.save_checkpoint(os.path.join(root, "unsafe"), model, extra=unsafe, timeout_s=60)
        refused = "saved"
    except dynapipe.ConfigError as err:
        refused = str(err)
    cases = [_break(root) if rank == 0 else None]
    dist.broadcast_object_list(cases, src=0)  # the copies exist once this returns
    step(torch.randn(4, 8)).backward()
    opt.step()  # values the good checkpoint does not have
    before = _snapshot(model, opt)
    out = {}
    for case in [*cases[0], "good"]:
        with dynapipe.empty_init():
            later = _net()  # nothing held: every tensor would be filled by the first pipeline
        errors = []
        for target, optimizer in [(model, opt), (later, torch.optim.AdamW(later.parameters()))]:
            try:
                dynapipe.load_checkpoint(os.path.join(root, case), target, optimizer=optimizer)
                errors.append(None)
            except dynapipe.ConfigError as err:
                errors.append(str(err))
        out[case] = (*errors, _same(_snapshot(model, opt), before), pending_load(later) is not None)
    return {"cases": cases[0], "results": out, "refused": refused}


def test_bad_folder_is_an_error_on_every_rank_before_any_value_changes(tmp_path) -> None:
    dynapipe.save_checkpoint(tmp_path / "other", _net(depth=4))  # another model, in one process
    results = run_distributed(bad_folders_worker, 2, str(tmp_path), timeout=120)
    assert not any(p.name.startswith("unsafe") for p in tmp_path.iterdir())
    for rank, r in results.items():
        assert "extra holds an object" in r["refused"] and "_Plan" in r["refused"], (rank, r["refused"])
        for case, (file, pattern) in r["cases"].items():
            held, later, unchanged, pending = r["results"][case]
            assert held is not None and os.path.join(str(tmp_path), case, file) in held, (rank, case, held)
            assert re.search(pattern, held), (rank, case, held)
            assert later == held, (rank, case, later)  # checked when the folder is opened, not when filled
            assert unchanged and not pending, (rank, case)
        held, later, unchanged, pending = r["results"]["good"]
        assert held is None and later is None and not unchanged and pending, (rank, r["results"]["good"])
