"""Runs with torch's ``ZeroRedundancyOptimizer`` wrapped, under ``torchrun --nproc_per_node=2``.

Its state is sharded: each rank holds the moments of its own parameters, and its
``state_dict()`` is the whole state only after ``consolidate_state_dict()`` on every rank.  Each
rank writes ``rank<r>.json`` into ``--out``: what ``wrap`` said with the guard, and of one built
with ``overlap_with_ddp=True``, whether a run checkpointed at ``CKPT_STEP`` (consolidated to
rank 0, saved there, loaded on every rank) ends as the run never stopped, and what a save steps
after that consolidation said.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dist_worker import _says, batch, finish, make_model
from torch.distributed.optim import ZeroRedundancyOptimizer

import selftune
from selftune.checkpoint import load_checkpoint, save_checkpoint

STEPS, CKPT_STEP = 12, 6


def _build() -> tuple[torch.nn.Module, ZeroRedundancyOptimizer]:
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
    return model, zero


def _train(model: torch.nn.Module, opt: selftune.SelfTuned, steps: range) -> None:
    for step in steps:
        x, y = batch(step, dist.get_rank())
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())


def _runs(out: Path, rank: int) -> dict[str, Any]:
    """What this rank saw of the runs the module's docstring lists."""
    said: dict[str, Any] = {"guard": _says(lambda: selftune.wrap(_build()[1]))}
    overlapping = ZeroRedundancyOptimizer(
        make_model().parameters(), optimizer_class=torch.optim.AdamW, overlap_with_ddp=True
    )
    said["overlap"] = _says(lambda: selftune.wrap(overlapping, guard=False))

    def wrapped(run: str) -> tuple[torch.nn.Module, ZeroRedundancyOptimizer, selftune.SelfTuned]:
        model, zero = _build()
        folder = out / run if rank == 0 else None
        return model, zero, selftune.wrap(zero, log_dir=folder, guard=False)

    model, _, opt = wrapped("ref")
    _train(model, opt, range(1, STEPS + 1))
    ref = [p.detach().clone() for p in model.parameters()]
    said["ref"] = opt.hyperparams()
    model, zero, opt = wrapped("res")
    _train(model, opt, range(1, CKPT_STEP + 1))
    zero.consolidate_state_dict(to=0)
    ckpt = out / "zero.pt"
    if rank == 0:
        save_checkpoint(ckpt, model=model, optimizer=opt, step=CKPT_STEP)
    dist.barrier()
    _train(model, opt, range(CKPT_STEP + 1, CKPT_STEP + 3))  # the steps a crash loses
    if rank == 0:  # a state consolidated before those steps
        said["stale"] = _says(opt.state_dict)
    model, _, opt = wrapped("res")
    said["load"] = _says(lambda: load_checkpoint(ckpt, model=model, optimizer=opt))
    if said["load"] is None:
        _train(model, opt, range(CKPT_STEP + 1, STEPS + 1))
        said["res"] = opt.hyperparams()
        said["same"] = all(torch.equal(a, b) for a, b in zip(ref, model.parameters(), strict=True))
    return said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    finish(out, _runs(out, rank))  # (its models and optimizers gone before the group)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
