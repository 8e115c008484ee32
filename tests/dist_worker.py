"""The toy training run the distributed, resume and crash tests share, and the script torchrun runs.

Each step's batch is drawn from a generator seeded by ``(step, rank)`` alone, so the data order
needs no RNG state to resume and every rank sees different data (so per-rank losses differ).

As a script, under ``torchrun --nproc_per_node=2`` (gloo, CPU), it runs in one process group:

- ``ref-<opt>``: an uninterrupted run of ``--steps`` steps, for SGD and AdamW;
- ``res-<opt>``: the same run, checkpointed by rank 0 at ``--ckpt-step``, carried on to
  ``--crash-step`` (the steps a crash loses), then rebuilt from fresh objects, resumed from the
  checkpoint and finished;
- ``nan``: an SGD run in which rank 1 alone reports a NaN loss at ``--nan-step``;
- ``metric``: an AdamW run in which each rank gives ``observe`` its own metric every
  ``EVALUATE`` steps (:func:`metric`).

Each rank writes ``rank<r>.json`` (its hyperparameters after every step and the steps at which its
guard acted, per run) and ``rank<r>-<run>.pt`` (final weights and optimizer state) into ``--out``;
rank 0's run folders are ``--out/<run>``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join

import selftune
from selftune.audit import read_log, verify
from selftune.checkpoint import load_checkpoint, save_checkpoint
from selftune.integrations import another_run_told
from selftune.tuner import SelfTuned, StepEvent

SEED = 1234
DIM, HIDDEN, BATCH = 8, 16, 32
OPTIMIZERS = ("sgd", "adamw", "rmsprop")  # RMSprop: its warm-up corrected under `auto`
EVALUATE = 5  #: the ``metric`` run evaluates every this many steps


def metric(step: int, rank: int) -> float:
    """What rank ``rank`` evaluates after ``step``: flat on rank 0, falling and then flat on
    rank 1, so that a rank reading its own would see a stall three evaluations before the
    other, and the mean over the ranks (1.4, 1.3, 1.2, then 1.2) stalls in between."""
    n = step // EVALUATE
    return 1.0 if rank == 0 else max(2.0 - 0.2 * n, 1.4)


def make_model() -> torch.nn.Module:
    """The same initial weights in every process: the run folder checks their hash on resume."""
    gen = torch.Generator().manual_seed(SEED)
    model = torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def make_inner(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The plain optimizer that :func:`make_optimizer` wraps (a replay wraps it too)."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=2e-3)
    if name == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=1e-3)
    raise ValueError(f"optimizer {name!r}: expected one of {OPTIMIZERS}")


def make_optimizer(name: str, model: torch.nn.Module, log_dir: Path | None) -> SelfTuned:
    # with a weight average: the states compared across ranks and across resumes include it
    return selftune.wrap(make_inner(name, model), log_dir=log_dir, seed=SEED, average=True)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step`` on ``rank``: a function of both, never of the global RNG.

    The ranks' targets pull apart (amplitude 3 on even ranks, -0.5 on odd ones): as the shared
    model fits their average, rank 0's loss falls while rank 1's rises, so a controller that read
    its own rank's loss would decide differently on each rank.
    """
    target = torch.Generator().manual_seed(SEED)
    w = torch.randn(DIM, 1, generator=target)
    gen = torch.Generator().manual_seed(SEED + 7919 * step + 104729 * rank)
    x = torch.randn(BATCH, DIM, generator=gen)
    amplitude = 3.0 if rank % 2 == 0 else -0.5
    y = amplitude * torch.sin(x @ w) + 0.1 * torch.randn(BATCH, 1, generator=gen)
    return x, y


def train_step(
    model: torch.nn.Module,
    opt: SelfTuned,
    step: int,
    rank: int,
    nan: bool = False,
    as_float: bool = False,
) -> None:
    """One optimizer step; ``nan`` reports a NaN loss (the gradients stay finite);
    ``as_float`` reports it as a Python number (``loss.item()``), not a tensor."""
    x, y = batch(step, rank)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    reported = loss.detach()
    if nan:
        reported = torch.full_like(reported, math.nan)
    opt.step(loss=reported.item() if as_float else reported)


def final_state(model: torch.nn.Module, opt: SelfTuned) -> dict[str, Any]:
    """Weights and optimizer state, less the run folder's file positions (rank 0's alone), the
    count of rewinds that numbers the log's notes of them (a run resumed in place made some,
    one never stopped none) and a metric observed after the last step (each rank's own, until a
    step shares it)."""
    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    sd = opt.state_dict()
    history = ("log", "trace", "rewinds")
    sd["selftune"] = {k: v for k, v in sd["selftune"].items() if k not in history}
    sd["selftune"]["metric"].pop("observed")
    return {
        "model": {k: v.clone() for k, v in module.state_dict().items()},
        "optimizer": sd,
    }


def log_body(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records without the chain fields and without the notes resuming leaves."""
    chain = ("seq", "prev", "hash")
    return [
        {k: v for k, v in r.items() if k not in chain}
        for r in read_log(run_dir).records
        if r["kind"] != "note"
    ]


def dropped_on_resume(run_dir: Path) -> list[int]:
    """How many records each resume dropped, from its note; the only other note expected is
    the one a crash mid-write leaves, that the log's torn final line was dropped."""
    dropped = []
    for r in read_log(run_dir).records:
        if r["kind"] == "note" and not re.fullmatch(
            r"dropped a torn final line of \d+ bytes", r["reason"]
        ):
            match = re.fullmatch(  # with what the notes of earlier resumes it dropped said
                r"resumed: dropped (\d+) records written after the checkpoint( \(among .*\))?",
                r["reason"],
            )
            assert match is not None, f"unexpected note in {run_dir}: {r['reason']}"
            dropped.append(int(match.group(1)))
    return dropped


def assert_same_state(a: Any, b: Any, where: str = "state") -> None:
    """Bit-identical nested state: tensors by bytes (NaN included), everything else by ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} != {b.keys()}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


# --------------------------------------------------------------------------- torchrun script


class _Recorder:
    """Keeps this rank's hyperparameters after every step and the steps its guard acted at."""

    def __init__(self) -> None:
        self.hp: list[list[dict[str, float]]] = []
        self.guard_steps: list[int] = []

    def __call__(self, event: StepEvent) -> None:
        self.hp.append(event.hyperparams)
        if event.guard is not None:
            self.guard_steps.append(event.step)

    def json(self) -> dict[str, Any]:
        return {"hp": self.hp, "guard_steps": self.guard_steps}


def _build(name: str, log_dir: Path, rank: int) -> tuple[torch.nn.Module, SelfTuned, _Recorder]:
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer(name, model, log_dir)
    recorder = _Recorder()
    opt.add_listener(recorder)
    return model, opt, recorder


def _run(
    out: Path,
    run: str,
    name: str,
    steps: int,
    rank: int,
    nan_step: int | None = None,
    evaluate: str | None = None,
    as_float: bool = False,
    tensorboard: bool = False,
    listeners: tuple[Any, ...] = (),
) -> dict[str, Any]:
    """``evaluate``: every rank observes its :func:`metric` ("every"), or rank 0 alone ("rank0").
    ``tensorboard``: every rank also adds a TensorBoard writer on ``out/<run>-tb``, as a DDP
    script does; only rank 0's writes.  ``listeners``: added too, and closed at the end."""
    model, opt, rec = _build(name, out / run, rank)
    writers = list(listeners)
    if tensorboard:
        from selftune.integrations.tensorboard import TensorBoardWriter

        writers.append(TensorBoardWriter(out / f"{run}-tb"))
    for writer in writers:
        opt.add_listener(writer)
    for t in range(1, steps + 1):
        train_step(model, opt, t, rank, nan=t == nan_step and rank == 1, as_float=as_float)
        if t % EVALUATE == 0 and (evaluate == "every" or (evaluate == "rank0" and rank == 0)):
            opt.observe(metric(t, rank))
    torch.save(final_state(model, opt), out / f"rank{rank}-{run}.pt")
    opt.close()
    for writer in writers:
        writer.close()
    return rec.json()


def _early_writers(out: Path) -> tuple[Any, ...]:
    """Writers built before the process group exists, as a Lightning callback's are (built
    before the Trainer starts its processes): each took its process for rank 0 and every rank
    wrote the run.  The MLflow store is new, as MLflow's default one is on a first run: every
    rank's client set it up at once, and the setup failed."""
    from selftune.integrations.tensorboard import TensorBoardWriter

    writers: list[Any] = [TensorBoardWriter(out / "early-tb")]
    if importlib.util.find_spec("mlflow") is not None:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
        os.chdir(out)  # a database store keeps its artifacts in ./mlruns
        from selftune.integrations.mlflow import MLflowWriter

        writers.append(MLflowWriter())
    return tuple(writers)


def _resumed_run(
    out: Path, run: str, name: str, steps: int, rank: int, half: int, crash: int
) -> dict[str, Any]:
    ckpt = out / f"{run}.ckpt"
    model, opt, first = _build(name, out / run, rank)
    for t in range(1, crash + 1):
        train_step(model, opt, t, rank)
        if t == half:
            if rank == 0:
                save_checkpoint(ckpt, model=model, optimizer=opt, step=t)
            dist.barrier()  # the file exists before any rank could need it
    opt.close()
    # fresh objects, as after a crash: the records of steps half+1..crash are dropped on load
    model, opt, second = _build(name, out / run, rank)
    start = load_checkpoint(ckpt, model=model, optimizer=opt)["step"] + 1
    for t in range(start, steps + 1):
        train_step(model, opt, t, rank)
    torch.save(final_state(model, opt), out / f"rank{rank}-{run}.pt")
    opt.close()
    guard_steps = [s for s in first.guard_steps if s <= half] + second.guard_steps
    return {"hp": first.hp[:half] + second.hp, "guard_steps": guard_steps}


def _sharded_mlp() -> torch.nn.Module:
    """The model both FSDP scenarios shard, the same on every rank."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def _sharded_steps(
    model: torch.nn.Module,
    opt: selftune.SelfTuned,
    rank: int,
    steps: int,
    nan_step: int,
    read: Callable[[selftune.SelfTuned], Any] = lambda opt: opt.hyperparams()[0]["lr"],
) -> list[Any]:
    """Train on per-rank batches, a NaN loss on rank 1 at ``nan_step``; what ``read`` reads of
    the optimizer after every step (the first group's rate)."""
    gen, hp = torch.Generator().manual_seed(rank), []
    for t in range(1, steps + 1):
        x = torch.randn(32, 16, generator=gen)
        loss = (model(x) - x[:, :1] * x[:, 1:2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        bad = math.nan if t == nan_step and rank == 1 else 1.0
        opt.step(loss=loss.detach() * bad)
        hp.append(read(opt))
    return hp


def _checkpoint_says(path: Path, model: torch.nn.Module, opt: selftune.SelfTuned) -> str:
    """What ``save_checkpoint`` and then ``load_checkpoint`` (of a whole model's checkpoint)
    say of a sharded model: their refusals, or "saved" and "loaded"."""
    said = []
    try:
        selftune.save_checkpoint(path, model=model, optimizer=opt, step=0)
        said.append("saved")
    except selftune.CheckpointError as err:
        said.append(str(err))
    whole = make_model()
    plain = path.with_name(f"whole-{path.name}")
    selftune.save_checkpoint(plain, model=whole, optimizer=make_inner("sgd", whole), step=0)
    try:
        selftune.load_checkpoint(plain, model=model, optimizer=opt)
        said.append("loaded")
    except selftune.CheckpointError as err:
        said.append(str(err))
    return " / ".join(said)


def _fully_sharded(out: Path, rank: int, steps: int, nan_step: int) -> dict[str, Any]:
    """``auto`` on an FSDP2 model (``fully_shard``: every parameter a DTensor, which failed inside
    the first step) with a weight average and a log, a NaN loss on rank 1 at ``nan_step``; then
    the run replayed from its log on both ranks.  The hyperparameters of every step, whether the
    weights are finite, whether the replay ended on the same shards, what ``save_checkpoint``
    says, and what a replay onto weights that differ on rank 1's shard alone says."""
    from torch.distributed.fsdp import fully_shard

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = _sharded_mlp()
        fully_shard(model)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    folder = out / "fully-sharded"
    model, inner = build()
    opt = selftune.wrap(inner, average=True, log_dir=folder)
    hp = _sharded_steps(model, opt, rank, steps, nan_step)
    opt.close()
    shards = [p.to_local().clone() for p in model.parameters()]
    finite = all(bool(torch.isfinite(s).all()) for s in shards)
    with opt.averaged():
        averaged = [p.to_local().clone() for p in model.parameters()]
    saved = _checkpoint_says(out / f"fs-rank{rank}.pt", model, opt)
    dist.barrier()  # the log is complete before any rank replays it
    again, inner_again = build()
    replay_hp = _sharded_steps(again, selftune.replay(inner_again, folder), rank, steps, nan_step)
    same = all(
        torch.equal(a.to_local(), b) for a, b in zip(again.parameters(), shards, strict=True)
    )
    moved = any(not torch.equal(a, b) for a, b in zip(averaged, shards, strict=True))
    other, other_inner = build()  # started from other weights on rank 1 alone
    if rank == 1:
        with torch.no_grad():
            next(iter(other.parameters())).to_local().add_(1.0)
    try:
        selftune.replay(other_inner, folder)
        refused = None
    except selftune.SelfTuneError as err:
        refused = str(err)
    return {
        "hp": hp,
        "finite": finite,
        "replayed": same and replay_hp == hp,
        "average_differs": moved,
        "save": saved,
        "other_start": refused,
    }


def _dcp_resumed(out: Path, rank: int, steps: int) -> dict[str, Any]:
    """An FSDP2 run checkpointed as the guide says (the model and the wrapped optimizer's own
    state by ``torch.distributed.checkpoint``, each rank's ``state_dict()["selftune"]`` in a file
    of that rank), stopped five steps past it, and resumed over its folder: the rates of every
    step, whether the shards end where an uninterrupted run's do, and whether the log verifies."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dcp_sd
    from torch.distributed.fsdp import fully_shard

    half = steps // 2

    def build(folder: Path) -> tuple[torch.nn.Module, selftune.SelfTuned]:
        model = _sharded_mlp()
        fully_shard(model)
        return model, selftune.wrap(torch.optim.AdamW(model.parameters()), log_dir=folder)

    def run(model: torch.nn.Module, opt: selftune.SelfTuned, span: range) -> list[float]:
        gen, hp = torch.Generator().manual_seed(rank), []
        for t in range(1, span.stop):
            x = torch.randn(32, 16, generator=gen)  # (drawn for every step: the same batches)
            if t in span:
                loss = (model(x) - x[:, :1] * x[:, 1:2]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step(loss=loss.detach())
                hp.append(opt.hyperparams()[0]["lr"])
        return hp

    def states(model: torch.nn.Module, opt: selftune.SelfTuned) -> dict[str, Any]:
        # the wrapped optimizer's own: DCP's helpers drop the wrapper's "selftune" key
        return {
            "model": dcp_sd.get_model_state_dict(model),
            "optim": dcp_sd.get_optimizer_state_dict(model, opt.optimizer),
        }

    model, opt = build(out / "dcp-ref")
    ref_hp = run(model, opt, range(1, steps + 1))
    opt.close()
    ref = [p.to_local().clone() for p in model.parameters()]
    folder, ckpt = out / "dcp", out / "dcp-ckpt"
    model, opt = build(folder)
    hp = run(model, opt, range(1, half + 1))
    dcp.save(states(model, opt), checkpoint_id=ckpt)
    torch.save(opt.state_dict()["selftune"], ckpt / f"selftune-rank{rank}.pt")
    run(model, opt, range(half + 1, half + 6))  # the steps a crash loses
    opt.close()
    model, opt = build(folder)  # a new process's: wrapped at the initial weights, then loaded
    loaded = states(model, opt)
    dcp.load(loaded, checkpoint_id=ckpt)
    dcp_sd.set_model_state_dict(model, loaded["model"])
    dcp_sd.set_optimizer_state_dict(model, opt.optimizer, loaded["optim"])
    own = torch.load(ckpt / f"selftune-rank{rank}.pt", weights_only=True)
    opt.load_state_dict({**opt.optimizer.state_dict(), "selftune": own})
    hp += run(model, opt, range(half + 1, steps + 1))
    opt.close()
    same = all(torch.equal(p.to_local(), r) for p, r in zip(model.parameters(), ref, strict=True))
    dist.barrier()
    return {"hp": hp, "ref_hp": ref_hp, "same": same, "verified": _says(lambda: verify(folder))}


def _fsdp(out: Path, rank: int, steps: int, nan_step: int) -> dict[str, Any]:
    """``auto`` on a FullyShardedDataParallel model whose flat shard leaves rank 0 three empty
    parameters (no gradient there): the ranks stacked unequal numbers of scalars, and the
    all-reduce of the first step aborted the process.  A NaN loss on rank 1 at ``nan_step``
    rolls every rank's shard back.  The hyperparameters of every step, the last alignment read,
    whether the weights are finite, and what ``save_checkpoint`` says."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    cpu = torch.device("cpu")
    model = FullyShardedDataParallel(_sharded_mlp(), use_orig_params=True, device_id=cpu)
    opt = selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9))
    empty = [p.numel() == 0 for p in model.parameters()]
    hp = _sharded_steps(model, opt, rank, steps, nan_step)
    assert opt.last_signals is not None
    return {
        "hp": hp,
        "empty": empty,
        "cos": opt.last_signals.groups[0].cos_update,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "save": _checkpoint_says(out / f"fsdp-rank{rank}.pt", model, opt),
    }


def _combined(rank: int, steps: int, nan_step: int) -> dict[str, Any]:
    """``wrap([muon, adamw])`` on a DDP model: Muon on the hidden weights, AdamW on the rest,
    per-rank batches, a NaN loss on rank 1 at ``nan_step``.  Both groups' rates at every step,
    and the weights at the end."""
    model = torch.nn.parallel.DistributedDataParallel(_sharded_mlp())
    hidden = model.module[0].weight
    rest = [p for p in model.parameters() if p is not hidden]
    opt = selftune.wrap([torch.optim.Muon([hidden], lr=0.02), torch.optim.AdamW(rest)])
    hp = _sharded_steps(
        model, opt, rank, steps, nan_step, read=lambda o: [k["lr"] for k in o.hyperparams()]
    )
    return {"hp": hp, "weights": [p.detach().flatten().tolist() for p in model.parameters()]}


def _raise(err: BaseException) -> None:
    raise err


def _step_says(model: torch.nn.Module, opt: SelfTuned, step: int, rank: int) -> str | None:
    """What a training step of ``opt`` raised on this rank (None: it stepped)."""
    x, y = batch(step, rank)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    try:
        opt.step(loss=loss.detach())
        return None
    except (selftune.ConfigError, RuntimeError) as err:
        return str(err)


def _refusals(rank: int) -> dict[str, str | None]:
    """What each rank is told when the ranks wrap with different settings, and when one rank
    steps with a loss and the other without: every rank must raise, none hang."""
    said: dict[str, str | None] = {}
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    try:  # a guard on rank 0 alone
        selftune.wrap(make_inner("sgd", model), guard=rank == 0)
        said["settings"] = None
    except selftune.ConfigError as err:
        said["settings"] = str(err)
    opt = selftune.wrap(make_inner("sgd", model))
    x, y = batch(1, rank)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    try:
        opt.step(loss=loss.detach() if rank == 0 else None)
        said["loss"] = None
    except selftune.ConfigError as err:
        said["loss"] = str(err)

    def once(step: int) -> str | None:
        return _step_says(model, opt, step, rank)

    said["retried"] = once(2)  # that refusal changed nothing: the run goes on
    # the loss in float64 on rank 0 alone, the model's scalars float32: a stack of another dtype
    # on each rank, which gloo aborted the processes on
    loss = torch.nn.functional.mse_loss(model(x), y)
    try:
        opt.step(loss=loss.detach().double() if rank == 0 else None)
        said["loss64"] = None
    except selftune.ConfigError as err:
        said["loss64"] = str(err)
    x, y = batch(2, rank)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step(loss=loss.detach().double() if rank == 0 else loss.detach())
    said["mixed"] = f"{opt.step_count} {opt.last_signals.loss!r}"
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step(loss=1.0000000123456789)  # a number with more digits than a float32's
    said["digits"] = repr(opt.last_signals.loss)
    if rank == 1:  # a step that raises part-way on one rank (an error in its update)
        hook = opt.optimizer.register_step_post_hook(lambda *a: _raise(RuntimeError("lost")))
    said["part_way"] = once(3)
    if rank == 1:
        hook.remove()
    said["after"] = once(4)  # refused on every rank alike, the collectives still paired
    # each rank would judge the mean metric its own way: the step that shares it is refused on
    # every rank, and the metric dropped, so that the next one (observed alike) steps
    opt = selftune.wrap(make_inner("sgd", model))
    opt.observe(0.5, mode="max" if rank else "min")
    said["modes"] = once(5)
    opt.observe(0.5, mode="min")
    said["modes-then"] = once(6)
    try:  # torch's uneven inputs: a rank that ran out left the others waiting in the step
        Join([model, opt])
        said["join"] = None
    except Exception as err:  # (an AttributeError, the wrapper having no join hook)
        said["join"] = f"{type(err).__name__}: {err}"
    return said


def _saved_before_shared(rank: int) -> dict[str, list[str]]:
    """What a state saved on rank 0 between ``observe`` and the next step warns of there: a
    resume from it reads rank 0's metric alone, which differs from the ranks' mean the run
    read where the ranks observed different values, and is that mean where rank 0 alone
    observed (as where every rank observed the same value, a NaN among them)."""
    said: dict[str, list[str]] = {}
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer("adamw", model, None)
    _step_says(model, opt, 1, rank)
    alone = 1.0 if rank == 0 else None
    cases = [("alone", alone), ("own", 1.0 + rank), ("undefined", math.nan)]
    for step, (key, value) in enumerate(cases, 2):
        if value is not None:
            opt.observe(value)
        if rank == 0:
            opt.state_dict()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _step_says(model, opt, step, rank)
        said[key] = [str(w.message) for w in caught if "holds the metric" in str(w.message)]
    return said


def finish(out: Path, said: dict[str, Any]) -> None:
    """Write what this rank ``said`` into ``out/rank<r>.json``, and leave the process group
    once every rank has written: the workers' common end.  The models and optimizers of the
    runs go first (a collection): one alive at ``destroy_process_group`` aborted the process
    at its exit now and then ("terminate called without an active exception")."""
    gc.collect()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(said))
    dist.barrier()
    dist.destroy_process_group()


def _says(call: Callable[[], object]) -> str | None:
    """What ``call`` raised, a selftune error named by its type, or None."""
    try:
        call()
    except selftune.SelfTuneError as err:
        return f"{type(err).__name__}: {err}"
    return None


def _told(call: Callable[[], object]) -> object:
    """``call`` inside an integration's wrap, whose refusal of a folder as another run's
    says the framework's way (here a stand-in) instead of the plain loop's."""
    with another_run_told(FRAMEWORKS_WAY):
        return call()


#: the advice :func:`_told` gives, which every rank's refusal must end with
FRAMEWORKS_WAY = "the framework's way"


def _folder_refusals(out: Path, rank: int) -> dict[str, str | None]:
    """Where rank 0 alone gives a ``log_dir`` (the others None), what only rank 0 sees of its
    folder (taken over by a wrapper since, holding steps of a run not resumed, closed) refuses
    the step on every rank alike: rank 0 refused alone, before the step's collective, which
    the other ranks' step then paired with its next one (gloo aborted the processes); a
    wrap on a folder that holds another run's log, which raised on rank 0 alone; and a state
    of another run folder, which rank 0 alone refused to load."""
    said: dict[str, str | None] = {}
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    folder = out / "handed" if rank == 0 else None
    initial = copy.deepcopy(model.module.state_dict())
    first = make_optimizer("sgd", model, folder)
    second = make_optimizer("sgd", model, folder)  # takes the folder over, on rank 0
    said["taken"] = _step_says(model, first, 1, rank)
    said["second"] = _step_says(model, second, 1, rank)
    model.module.load_state_dict(initial)  # the same run, started again over its folder
    said["unresumed"] = _step_says(model, make_optimizer("sgd", model, folder), 1, rank)
    closing = make_optimizer("sgd", model, out / "closed" if rank == 0 else None)
    said["third"] = _step_says(model, closing, 1, rank)
    if rank == 0:
        closing.close()
    said["closed"] = _step_says(model, closing, 2, rank)
    kept = closing.state_dict()
    # a load, which rank 0 alone refused (closed) before the ranks' check of the state
    said["closed-load"] = _says(lambda: closing.load_state_dict(kept))
    # the weights moved at step 1 of `closing`: another run's folder, which rank 0 alone opens
    said["other-run"] = _says(lambda: make_optimizer("sgd", model, folder))
    # the same inside an integration's wrap, which follows the refusal with its framework's
    # advice: rank 1 heard the plain loop's, which rank 0's refusal had dropped
    said["other-run-told"] = _says(lambda: _told(lambda: make_optimizer("sgd", model, folder)))
    said["after"] = _step_says(model, make_optimizer("sgd", model, None), 3, rank)
    # a state of another run folder, which rank 0 alone tells from its log, loaded on every
    # rank: rank 0 refused it alone, and the other ranks loaded it
    source = make_optimizer("sgd", model, out / "source" if rank == 0 else None)
    other = make_optimizer("sgd", model, out / "another" if rank == 0 else None)
    for step in range(1, 9):  # the range test's first decisions: records in both logs
        _step_says(model, source, step, rank)
        _step_says(model, other, step, rank)
    foreign = source.state_dict()
    said["foreign-state"] = _says(lambda: other.load_state_dict(foreign))
    said["after-foreign"] = _step_says(model, other, 9, rank)
    # a checkpoint that rank 0 saved where rank 1 cannot read it (not a shared folder): rank 1
    # refused it alone, and rank 0 waited in the optimizer's check of the state
    if rank == 0:
        save_checkpoint(out / "ckpt-rank0.pt", model=model, optimizer=other, step=9)
    said["unshared-checkpoint"] = _says(
        lambda: load_checkpoint(out / f"ckpt-rank{rank}.pt", model=model, optimizer=other)
    )
    said["after-unshared"] = _step_says(model, other, 10, rank)
    # and a file of each node's own, rank 1's newer: each rank loaded its own, and the ranks
    # went on from different steps and weights, with no word
    if rank == 0:
        save_checkpoint(out / "ckpt-rank1.pt", model=model, optimizer=other, step=10)
    dist.barrier()  # (rank 1 loads it)
    said["older-checkpoint"] = _says(
        lambda: load_checkpoint(out / f"ckpt-rank{rank}.pt", model=model, optimizer=other)
    )
    said["after-older"] = _step_says(model, other, 11, rank)
    # a file saved by each rank, with its own generators' states (dropout streams per rank):
    # the same step and weights, loaded on every rank
    torch.manual_seed(100 + rank)
    save_checkpoint(out / f"own-rank{rank}.pt", model=model, optimizer=other, step=11)
    said["own-checkpoint"] = _says(
        lambda: load_checkpoint(out / f"own-rank{rank}.pt", model=model, optimizer=other)
    )
    said["after-own"] = _step_says(model, other, 12, rank)
    # a folder given on rank 1 alone: rank 0, which alone writes the run folder, had none, and
    # the run went on with no log, with no word
    said["rank1-folder"] = _says(
        lambda: make_optimizer("sgd", model, out / "rank1-only" if rank == 1 else None)
    )
    return said


def _plain_loads(out: Path, rank: int) -> dict[str, str | None]:
    """A DDP model with a plain optimizer (tuning off): a checkpoint rank 0 saved where rank 1
    cannot read it was refused on rank 1 alone, and rank 0 loaded it and went on to DDP's next
    all-reduce, where it waited; and rank 0 alone loads a checkpoint into the module DDP
    wraps, to evaluate it, with no collective.  A plain module's load on every rank, given
    ``every_rank=True``, is refused on every rank alike."""
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    plain = make_inner("sgd", model)
    if rank == 0:
        save_checkpoint(out / "plain-rank0.pt", model=model, optimizer=plain, step=1)
    dist.barrier()  # (saved before rank 1 looks)
    said = {
        "unshared": _says(
            lambda: load_checkpoint(out / f"plain-rank{rank}.pt", model=model, optimizer=plain)
        )
    }
    if rank == 0:
        evaluated = make_inner("sgd", model.module)
        said["alone"] = _says(
            lambda: load_checkpoint(out / "plain-rank0.pt", model=model.module, optimizer=evaluated)
        )
    x, y = batch(2, rank)  # both ranks go on to DDP's next all-reduce together
    torch.nn.functional.mse_loss(model(x), y).backward()
    # a plain module with a plain optimizer, which every rank trains (gradients synced by
    # hand): its load is the calling rank's alone, and rank 1 refused the file it lacked
    # while rank 0 resumed from it; a loop that starts afresh where no checkpoint loads then
    # trained from two steps.  every_rank=True refuses it on every rank alike
    module = make_model()
    own = make_inner("sgd", module)
    path = out / f"plain-rank{rank}.pt"
    said["module-alone"] = _says(lambda: load_checkpoint(path, model=module, optimizer=own))
    said["module-every"] = _says(
        lambda: load_checkpoint(path, model=module, optimizer=own, every_rank=True)
    )
    return said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nan-step", type=int, default=40)
    # early, so that the controller still changes knobs between the checkpoint and the "crash"
    parser.add_argument("--ckpt-step", type=int, default=5)
    parser.add_argument("--crash-step", type=int, default=30)
    args = parser.parse_args()
    early = _early_writers(args.out)
    # short timeouts: a rank that misses a collective fails the test instead of hanging it
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"world_size": dist.get_world_size()}
    for name in OPTIMIZERS:
        results[f"ref-{name}"] = _run(args.out, f"ref-{name}", name, args.steps, rank)
        results[f"res-{name}"] = _resumed_run(
            args.out, f"res-{name}", name, args.steps, rank, args.ckpt_step, args.crash_step
        )
    results["nan"] = _run(args.out, "nan", "sgd", args.steps, rank, nan_step=args.nan_step)
    results["metric"] = _run(args.out, "metric", "adamw", args.steps, rank, evaluate="every")
    results["metric-rank0"] = _run(
        args.out, "metric-rank0", "adamw", args.steps, rank, evaluate="rank0"
    )
    results["float-loss"] = _run(
        args.out, "float-loss", "sgd", args.steps, rank, as_float=True, tensorboard=True
    )
    results["early"] = _run(args.out, "early", "sgd", args.steps, rank, listeners=early)
    results["fully-sharded"] = _fully_sharded(args.out, rank, args.steps, args.nan_step)
    results["fsdp"] = _fsdp(args.out, rank, args.steps, args.nan_step)
    results["dcp"] = _dcp_resumed(args.out, rank, args.steps)
    results["combined"] = _combined(rank, args.steps, args.nan_step)
    results["refusals"] = _refusals(rank)
    results["folder-refusals"] = _folder_refusals(args.out, rank)
    results["plain-loads"] = _plain_loads(args.out, rank)
    results["saved-before-shared"] = _saved_before_shared(rank)
    finish(args.out, results)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
