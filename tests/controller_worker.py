"""A controller of one's own that raises on one rank alone, as a script under
``torchrun --nproc_per_node=2`` (gloo, CPU, the model in DDP).

Each run trains :data:`STEPS` steps with :class:`RaisesOnRank`, which raises on rank 1 alone in
one of its methods at one step (``propose`` at :data:`AT`; ``on_backoff`` at the rollback a NaN
loss on rank 1 makes there; ``state_dict`` at step 1's snapshot, before that rollback), and the
``drifts`` run with :class:`DriftsOnRank`, whose error there leaves its state apart on rank 1;
the ``restart`` run with :class:`RestartsAtFirst`, replayed on every rank.  Each
rank writes into ``--out/rank<r>.json``, per run, its knobs after every step, what each step
raised (a selftune error, by its type) and its final weights; rank 0's run folders are
``--out/<run>``.  The ``builtin`` run counts the step's collectives under a controller of
selftune's own; ``two-classes`` wraps with ranks' controllers of two classes under one name;
``add_group`` adds a param group while :class:`RaisesOnAdd`'s ``state_dict`` raises on rank 1.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from dist_worker import finish, make_inner, make_model, train_step

import selftune
from selftune.controllers.off import OffController

STEPS, AT = 6, 3


class RaisesOnRank(OffController):
    """Lowers the rate by a tenth at every step; raises on rank 1 alone in ``stage`` (its
    ``propose`` or ``on_backoff``) at step :data:`AT`, or its ``state_dict`` at step 1's
    snapshot (its second call, the wrap's the first)."""

    name = "raises-on-rank"

    def __init__(self, stage: str) -> None:
        self.stage, self.calls = stage, 0

    def state_dict(self) -> dict[str, Any]:
        self.calls += 1
        self._maybe_raise("state_dict", AT if self.calls == 2 else 0)
        return {}

    def _maybe_raise(self, stage: str, step: int) -> None:
        if stage == self.stage and step == AT and dist.get_rank() == 1:
            raise ZeroDivisionError(f"{stage} on rank 1")

    def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
        self._maybe_raise("propose", signals.step)
        return [selftune.Proposal(0, "lr", knobs[0]["lr"] * 0.9, "lower")]

    def on_backoff(self, step: int) -> None:
        self._maybe_raise("on_backoff", step)


class DriftsOnRank(OffController):
    """Lowers the rate by a tenth at every step; at step :data:`AT`, on rank 1 alone, halves
    its factor and then raises in ``propose``: its state after its own error differs there,
    and so do its later proposals (the rate by a half on rank 1, by a tenth on rank 0)."""

    name = "drifts-on-rank"

    def __init__(self) -> None:
        self.factor = 0.9

    def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
        if signals.step == AT and dist.get_rank() == 1:
            self.factor = 0.5
            raise ZeroDivisionError("propose on rank 1")
        return [selftune.Proposal(0, "lr", knobs[0]["lr"] * self.factor, "lower")]


class RestartsAtFirst(OffController):
    """Lowers the rate by a tenth at every step, and asks for a restart at step 1, where the
    guard takes its first snapshot."""

    name = "restarts-at-first"

    def __init__(self) -> None:
        self.step = 0

    def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
        self.step = signals.step
        return [selftune.Proposal(0, "lr", knobs[0]["lr"] * 0.9, "lower")]

    def take_restart(self) -> str | None:
        return "probed" if self.step == 1 else None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


def says(model: torch.nn.Module, opt: selftune.SelfTuned, t: int, nan: bool) -> str | None:
    """What training step ``t`` raised on this rank, by its type (None: it stepped)."""
    try:
        train_step(model, opt, t, dist.get_rank(), nan=nan)
    except Exception as err:  # the controller's own, where it broke the step (it did)
        return f"{type(err).__name__}: {err}"
    return None


class RaisesOnAdd(OffController):
    """Lowers the rate by a tenth at every step; its ``state_dict`` raises on rank 1 alone
    while ``raising`` holds (set around an ``add_param_group``)."""

    name = "raises-on-add"

    def __init__(self) -> None:
        self.raising = False

    def state_dict(self) -> dict[str, Any]:
        if self.raising and dist.get_rank() == 1:
            raise ZeroDivisionError("state_dict on rank 1")
        return {}

    def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
        return [selftune.Proposal(0, "lr", knobs[0]["lr"] * 0.9, "lower")]


def counted_gathers(call: Any) -> tuple[int, Any]:
    """How many gathers ``call()`` made, and what it raised (a selftune error, by its type and
    cause) or None."""
    count, gather = [0], dist.all_gather

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return gather(*args, **kwargs)

    dist.all_gather = counted  # type: ignore[assignment]
    try:
        call()
    except selftune.SelfTuneError as err:
        cause = type(err.__cause__).__name__ if err.__cause__ is not None else None
        return count[0], {"error": f"{type(err).__name__}: {err}", "cause": cause}
    finally:
        dist.all_gather = gather
    return count[0], None


def group_refused(out: Path) -> dict[str, Any]:
    """Train to :data:`AT`, add a group while :class:`RaisesOnAdd`'s ``state_dict`` raises on
    rank 1, train on to :data:`STEPS`, then add the group again (it gives its state now) and
    take one step more; what this rank saw, and the gathers an add makes under ``auto``."""
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    folder = out / "add_group" if rank == 0 else None
    controller = RaisesOnAdd()
    opt = selftune.wrap(make_inner("sgd", model), controller=controller, log_dir=folder)
    said = [says(model, opt, t, False) for t in range(1, AT)]
    extra = torch.nn.Parameter(torch.zeros(3))
    groups = [len(opt.param_groups)]
    controller.raising = True
    gathers, added = counted_gathers(lambda: opt.add_param_group({"params": [extra], "lr": 0.01}))
    controller.raising = False
    groups.append(len(opt.param_groups))
    knobs = []
    for t in range(AT, STEPS + 1):
        said.append(says(model, opt, t, False))
        knobs.append(opt.hyperparams())
    weights = [p.tolist() for p in model.parameters()]
    opt.add_param_group({"params": [extra], "lr": 0.01})
    said.append(says(model, opt, STEPS + 1, False))
    groups.append(len(opt.param_groups))
    opt.close()
    if folder is not None:
        selftune.verify(folder)
    builtin_model = torch.nn.parallel.DistributedDataParallel(make_model())
    builtin = selftune.wrap(make_inner("sgd", builtin_model), controller="auto")
    train_step(builtin_model, builtin, 1, rank)
    builtin_extra = torch.nn.Parameter(torch.zeros(3))
    builtin_gathers, _ = counted_gathers(
        lambda: builtin.add_param_group({"params": [builtin_extra], "lr": 0.01})
    )
    return {
        "added": added,
        "gathers": gathers,
        "groups": groups,
        "said": said,
        "knobs": knobs,
        "weights": weights,
        "builtin_gathers": builtin_gathers,
    }


class OffOfOnesOwn(OffController):
    """Proposes nothing, under the name of selftune's ``off``."""


def wrapped_with_two_classes() -> str | None:
    """What wrap raises where rank 0 gives ``off`` and rank 1 a class of its own of that name,
    whose steps would share its failures in a gather that rank 0 never makes."""
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    controller = "off" if dist.get_rank() == 0 else OffOfOnesOwn()
    try:
        selftune.wrap(make_inner("sgd", model), controller=controller)
    except selftune.ConfigError as err:
        return str(err)
    return None


def run(out: Path, name: str, controller: Any) -> dict[str, Any]:
    """Train :data:`STEPS` steps with ``controller`` (a NaN loss on rank 1 at :data:`AT` where
    it raises in ``on_backoff`` or ``state_dict``); what this rank saw."""
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    folder = out / name if rank == 0 else None
    opt = selftune.wrap(make_inner("sgd", model), controller=controller, log_dir=folder)
    nan = getattr(controller, "stage", None) in ("on_backoff", "state_dict")
    knobs, said = [], []
    for t in range(1, STEPS + 1):
        said.append(says(model, opt, t, nan and t == AT))
        knobs.append(opt.hyperparams())
    opt.close()
    if folder is not None:
        selftune.verify(folder)
    weights = [p.tolist() for p in model.parameters()]
    return {"knobs": knobs, "said": said, "weights": weights, "step": opt.step_count}


def replayed(out: Path, name: str) -> dict[str, Any]:
    """Replay rank 0's run folder ``out/name`` on every rank, over :data:`STEPS` steps: this
    rank's knobs after every step and its final weights."""
    dist.barrier()  # the log is whole before any rank reads it
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = selftune.replay(make_inner("sgd", model), out / name)
    knobs = []
    for t in range(1, STEPS + 1):
        train_step(model, opt, t, dist.get_rank())
        knobs.append(opt.hyperparams())
    return {"knobs": knobs, "weights": [p.tolist() for p in model.parameters()]}


def collectives_per_step(controller: str) -> list[int]:
    """How many gathers each of :data:`STEPS` steps makes under ``controller``."""
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = selftune.wrap(make_inner("sgd", model), controller=controller)
    counts, gather = [], dist.all_gather

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[-1] += 1
        return gather(*args, **kwargs)

    dist.all_gather = counted  # type: ignore[assignment]
    try:
        for t in range(1, STEPS + 1):
            counts.append(0)
            train_step(model, opt, t, rank)
    finally:
        dist.all_gather = gather
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    said = {
        stage: run(args.out, stage, RaisesOnRank(stage))
        for stage in ("propose", "on_backoff", "state_dict")
    }
    said["drifts"] = run(args.out, "drifts", DriftsOnRank())
    said["restart"] = run(args.out, "restart", RestartsAtFirst())
    said["restart"]["replay"] = replayed(args.out, "restart")
    said["builtin"] = {"collectives": collectives_per_step("auto")}
    said["two-classes"] = {"wrap": wrapped_with_two_classes()}
    said["add_group"] = group_refused(args.out)
    finish(args.out, said)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
