"""Segments of a run resumed on another number of ranks than the one that saved it.

:func:`segment` loads a checkpoint (if given), trains a range of steps and saves one: in the
calling process where ``torch.distributed`` is not initialized (a single process, its model
plain), or as a script under ``torchrun --nproc_per_node=N`` (gloo, CPU, the model in DDP), where
each rank writes what it saw into ``--out/rank<r>.json``.  ``--zero`` wraps torch's
``ZeroRedundancyOptimizer`` (consolidated to rank 0 before the save), which only runs in a
process group.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dist_worker import _says, finish, make_model, make_optimizer, train_step
from torch.distributed.optim import ZeroRedundancyOptimizer

import selftune
from selftune.checkpoint import load_checkpoint, save_checkpoint


def _build(zero: bool, log_dir: Path) -> tuple[torch.nn.Module, selftune.SelfTuned]:
    """The run's model and wrapped optimizer; its folder on rank 0 alone."""
    distributed = dist.is_initialized()
    folder = log_dir if not distributed or dist.get_rank() == 0 else None
    if not zero:
        model = make_model()
        if distributed:
            model = torch.nn.parallel.DistributedDataParallel(model)
        return model, make_optimizer("sgd", model, folder)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    inner = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
    return model, selftune.wrap(inner, log_dir=folder, guard=False)


def _moments(opt: selftune.SelfTuned) -> dict[int, dict[str, torch.Tensor]]:
    """The optimizer's whole state, gathered to rank 0 (a collective under ZeRO)."""
    inner = opt.optimizer
    if isinstance(inner, ZeroRedundancyOptimizer):
        inner.consolidate_state_dict(to=0)
    return inner.state_dict()["state"] if dist.get_rank() == 0 else {}


def segment(
    log_dir: Path, *, load: Path | None, save: Path, steps: range, zero: bool = False
) -> dict[str, Any]:
    """Load ``load`` (if given), train ``steps``, save ``save`` on rank 0; return what was
    said: the load's refusal (None where it loaded), the knobs after, and under ZeRO whether
    the state loaded is the one saved, moment for moment."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, opt = _build(zero, log_dir)
    said: dict[str, Any] = {"load": None}
    if load is not None:
        said["load"] = _says(lambda: load_checkpoint(load, model=model, optimizer=opt))
        if said["load"] is not None:
            return said
        if zero:
            saved = torch.load(load, weights_only=True)["optimizer"]["state"]
            ours = _moments(opt)
            said["same_moments"] = rank != 0 or (
                ours.keys() == saved.keys()
                and all(torch.equal(ours[i][k], saved[i][k]) for i in saved for k in saved[i])
            )
    for step in steps:
        train_step(model, opt, step, rank)
    if zero:
        opt.optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        save_checkpoint(save, model=model, optimizer=opt, step=steps[-1])
    said["hp"] = opt.hyperparams()
    opt.close()  # the run folder's lock goes with it: the next segment may be another process
    return said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--plan",
        required=True,
        help='JSON: {"<run>": {"load": path or null, "save": path, "first": int, "last": int, '
        '"zero": bool}}, the segments to run in order, each in the run folder --out/<run>',
    )
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    said = {}
    for run, seg in json.loads(args.plan).items():
        said[run] = segment(
            args.out / run,
            load=None if seg["load"] is None else Path(seg["load"]),
            save=Path(seg["save"]),
            steps=range(seg["first"], seg["last"] + 1),
            zero=seg["zero"],
        )
    finish(args.out, said)  # (its models and optimizers gone before the group)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
