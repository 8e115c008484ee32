"""Fault injection for the trust-layer tests: a tiny real training task, faults, log damage.

A fault is something that goes wrong *from outside* selftune at a chosen optimizer step: a NaN
loss, an infinite gradient, a loss 100x too large, or a learning rate overwritten with 1e3. The
training loop here injects it exactly where a real bug in data, model or scheduler would show up,
so the guard meets it the way it would in a user's run. The log-damage helpers at the bottom do to
a run folder what a crash, a careless edit or a wrong path does.

Everything is deterministic for a seed: the same seed gives the same weights, the same minibatch
order and, run twice, bit-identical results (replay depends on that).
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import selftune
from selftune.audit import DECISIONS, MANIFEST, read_log

#: the faults a training loop can inject, each at one optimizer step
FAULTS = ("nan_loss", "inf_grad", "loss_x100", "lr_1e3")

#: starting rates at which the plain optimizers train :func:`make_task` well
LR = {"sgd": 0.05, "adamw": 0.01, "rmsprop": 0.01}


def make_optimizer(name: str, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, or AdamW or RMSprop at their defaults; ``lr`` defaults to
    :data:`LR`."""
    rate = LR[name] if lr is None else lr
    if name == "sgd":
        return torch.optim.SGD(params, lr=rate, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=rate)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=rate)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(LR)}")


@dataclass
class Task:
    """A small teacher-student regression: a model, a minibatch per step, the full-data loss."""

    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    order: torch.Generator  #: draws the minibatch indices, step after step
    batch: int = 32

    def batch_loss(self) -> torch.Tensor:
        """The loss of the next minibatch (advances the data order by one step)."""
        idx = torch.randint(
            0, self.x.shape[0], (self.batch,), generator=self.order, device=self.order.device
        )
        return torch.nn.functional.mse_loss(self.model(self.x[idx]), self.y[idx])

    @torch.no_grad()
    def full_loss(self) -> float:
        """The loss on all the data; ``inf`` once the model holds non-finite values."""
        value = float(torch.nn.functional.mse_loss(self.model(self.x), self.y))
        return value if math.isfinite(value) else math.inf


def make_task(
    seed: int = 0, hidden: int = 16, n: int = 256, inputs: int = 8, device: str = "cpu"
) -> Task:
    """Fit a random tanh network (the teacher) from noisy samples with a smaller tanh MLP.

    Small enough that a step costs well under a millisecond of arithmetic, so a test can afford
    thousands of them; nonlinear and noisy enough that the loss falls over a few hundred steps
    and minibatch losses scatter the way real ones do.  ``device``: where the data, the model
    and the minibatch order live (the same data and initial weights on every device).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=gen)
    w1 = torch.randn(inputs, 32, generator=gen) / inputs**0.5
    w2 = torch.randn(32, 1, generator=gen) / 32**0.5
    y = torch.tanh(x @ w1) @ w2 * 2 + 0.05 * torch.randn(n, 1, generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(inputs, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    order = torch.Generator(device=device).manual_seed(seed + 1)
    return Task(model.to(device), x.to(device), y.to(device), order)


@dataclass
class Run:
    """What one training run did: the full-data loss after every step and when it hit a target."""

    losses: list[float] = field(default_factory=list)
    hit: int | None = None  #: first step whose full-data loss was at or below the target
    steps: int = 0  #: optimizer steps taken (``step`` calls, skipped or not)

    @property
    def final(self) -> float:
        return self.losses[-1] if self.losses else math.inf


def train(
    task: Task,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    faults: Mapping[int, str] | None = None,
    fault_from: tuple[int, str] | None = None,
    target: float | None = None,
    stop_at_target: bool = False,
    evaluate: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> Run:
    """Train ``steps`` optimizer steps, injecting ``faults[t]`` at step ``t`` (1-based).

    ``fault_from=(t, kind)`` injects ``kind`` at step ``t`` and at every step after it (trouble
    that does not go away).  The loss is passed to ``step`` as a user would (``loss.detach()`` of
    the loss that was backpropagated), so a faulty loss reaches selftune as the gradients do.
    ``evaluate=False`` skips the full-data loss (long runs that only watch the guard).
    """
    plan = dict(faults or {})
    for kind in [*plan.values(), *([fault_from[1]] if fault_from else [])]:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; choose one of {FAULTS}")
    run = Run()
    for t in range(1, steps + 1):
        kind = plan.get(t)
        if fault_from is not None and t >= fault_from[0]:
            kind = fault_from[1]
        loss = task.batch_loss()
        if kind == "nan_loss":
            loss = loss * math.nan
        elif kind == "loss_x100":
            loss = loss * 100.0
        opt.zero_grad()
        loss.backward()
        if kind == "inf_grad":
            first = next(iter(task.model.parameters()))
            assert first.grad is not None
            first.grad.fill_(math.inf)
        elif kind == "lr_1e3":
            opt.param_groups[0]["lr"] = 1e3  # a scheduler or user code gone wrong
        if isinstance(opt, selftune.SelfTuned):
            opt.step(loss=loss.detach())
        else:
            opt.step()
        run.steps = t
        if on_step is not None:
            on_step(t)
        if not evaluate:
            continue
        value = task.full_loss()
        run.losses.append(value)
        if target is not None and run.hit is None and value <= target:
            run.hit = t
            if stop_at_target:
                break
    return run


def guard_records(log_dir: Path) -> list[dict[str, Any]]:
    """The guard records of a run folder's decision log, read through the chain check."""
    return [r for r in read_log(log_dir).records if r["kind"] == "guard"]


def final_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- log damage


def decision_lines(log_dir: Path) -> list[bytes]:
    return (log_dir / DECISIONS).read_bytes().splitlines(keepends=True)


def edit_record(log_dir: Path, line: int, **changes: Any) -> None:
    """Change fields of one record in place (1-based line), leaving its hash as it was."""
    lines = decision_lines(log_dir)
    record = json.loads(lines[line - 1])
    record.update(changes)
    lines[line - 1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    (log_dir / DECISIONS).write_bytes(b"".join(lines))


def tear_tail(log_dir: Path, nbytes: int) -> None:
    """Cut the last ``nbytes`` bytes off the decision log, as a crash mid-write would."""
    data = (log_dir / DECISIONS).read_bytes()
    (log_dir / DECISIONS).write_bytes(data[:-nbytes])


def write_garbage(path: Path, seed: int = 0, size: int = 300) -> None:
    """Fill ``path`` with random bytes: a file that is not what its name says."""
    gen = torch.Generator().manual_seed(seed)
    path.write_bytes(bytes(torch.randint(0, 256, (size,), generator=gen).tolist()))


def make_unsearchable(folder: Path, monkeypatch: Any) -> None:
    """Make ``folder`` one whose entries may not be reached, as ``chmod 000`` does (a run
    folder inside another user's): where that does not stop a look (root), ``Path.stat`` of a
    path inside it is refused alike."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder.chmod(0)
        return
    real_stat = Path.stat

    def refuse(path: Path, *, follow_symlinks: bool = True) -> os.stat_result:
        if folder in path.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_stat(path, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "stat", refuse)


__all__ = [
    "DECISIONS",
    "FAULTS",
    "LR",
    "MANIFEST",
    "Run",
    "Task",
    "decision_lines",
    "edit_record",
    "final_weights",
    "guard_records",
    "make_optimizer",
    "make_task",
    "make_unsearchable",
    "tear_tail",
    "train",
    "write_garbage",
]
