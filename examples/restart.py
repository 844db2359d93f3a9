"""Survive a dead rank: save every few steps, resume from ``latest``, let the launcher restart the job.

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 examples/restart.py --kill-at 5 --out DIR
    python examples/restart.py --kill-at 5           # local processes: dynapipe.launch(max_restarts=1)
    python examples/restart.py --kill-at 3 --nproc 4 --dp 2   # pp=2 x dp=2

What a training script needs is in ``train``: ``step = dynapipe.resume(folder, model, opt)`` before the
first call (0 on a fresh start), and ``dynapipe.save_checkpoint`` every ``--every`` steps with the step in
``extra``. When a rank dies the launcher stops every rank and starts them all again; they load the last
complete checkpoint and repeat at most ``--every`` steps. ``--kill-at N`` shows it: rank 1 kills itself
(SIGKILL) as step N begins, in the first attempt only. Without torchrun the script then trains again
without a kill and checks that both runs end with bitwise equal parameters and optimizer state.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time

import torch
import torch.nn.functional as F

import dynapipe

WIDTH, BATCH = 32, 16


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every rank builds the same weights
    layers = [torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU()) for _ in range(4)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s data, from the step number alone: a resumed run sees the same data."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 4, (BATCH,), generator=g)


def train(folder: str, steps: int, every: int, dp: int, kill_at: int | None) -> None:
    rank = int(os.environ["RANK"])
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    options = {"split_points": ["2"], "n_microbatches": 4, "dp_degree": dp}
    step_fn = torch.compile(lambda x, y: F.cross_entropy(model(x), y), backend="dynapipe", options=options)

    start = dynapipe.resume(folder, model, opt)  # the step to start from: 0 when no checkpoint yet
    for step in range(start, steps):
        if step == kill_at:
            crash(folder, rank, step)
        x, y = (t.chunk(dp)[rank % dp] for t in batch(step))  # each replica its share of the batch
        step_fn(x, y).backward()
        opt.step()
        opt.zero_grad()
        report(folder, rank, step, start)
        if (step + 1) % every == 0 or step + 1 == steps:
            path = os.path.join(folder, f"step-{step + 1}")
            dynapipe.save_checkpoint(path, model, optimizer=opt, extra={"step": step + 1})


def crash(folder: str, rank: int, step: int) -> None:
    """The demo's failure: rank 1 dies without a word in the first attempt, noting when."""
    if rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "killed-at"), "w") as f:
            f.write(str(time.time()))
        print(f"rank 1: killed as step {step} begins", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def report(folder: str, rank: int, step: int, start: int) -> None:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if rank != 0:
        return
    print(f"attempt {attempt}: step {step} done", flush=True)
    killed = os.path.join(folder, "killed-at")
    if step == start and attempt != "0" and os.path.exists(killed):
        with open(killed) as f:
            seconds = time.time() - float(f.read())
        print(f"restart: {seconds:.1f} s from the kill to the next finished step (resumed at {start})")


def final_state(folder: str) -> dict[str, torch.Tensor]:
    """Parameters and optimizer state of a checkpoint, loaded into one process."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dynapipe.load_checkpoint(folder, model, optimizer=opt)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {f"{names[id(p)]}:{k}": v for p, s in opt.state.items() for k, v in s.items()}
    return {**model.state_dict(), **state}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=2, help="save a checkpoint every this many steps")
    parser.add_argument("--kill-at", type=int, default=None, help="rank 1 dies as this step begins")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--out", default=None, help="checkpoints go to OUT/killed (and OUT/straight)")
    args = parser.parse_args()
    if "RANK" in os.environ and args.out is None:
        raise SystemExit("under torchrun, give every rank the same new folder: --out DIR")
    out = args.out or tempfile.mkdtemp(prefix="dynapipe-restart-")
    run = (args.steps, args.every, args.dp)
    dynapipe.launch(train, os.path.join(out, "killed"), *run, args.kill_at, nproc=args.nproc, max_restarts=1)
    if "RANK" in os.environ:  # under torchrun: this process was one rank
        return
    dynapipe.launch(train, os.path.join(out, "straight"), *run, None, nproc=args.nproc)
    resumed, straight = (final_state(os.path.join(out, k, "latest")) for k in ("killed", "straight"))
    same = resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    print(
        f"{len(straight)} tensors after a kill and restart vs uninterrupted -> {'match' if same else 'MISMATCH'}"
    )
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
