"""A controller of your own, under selftune's guard, audit log and replay.

    python examples/custom_controller.py

A controller implements the protocol the built-in ones do (`selftune.Controller`, listed with
what it reads in `docs/api.md`): ``propose(signals, knobs)`` returns the knobs it wants changed,
each with the reason the audit log keeps; ``on_backoff`` hears of the guard's rollbacks;
``state_dict`` / ``load_state_dict`` carry its state through checkpoints and rollbacks (plain
values only).  An ``options`` dict goes into the run's manifest.  Everything else, the policy's
bounds, the guard, the log, ``verify``, ``report`` and ``replay``, works as for ``auto``.

The controller here is a rule a practitioner might write by hand: halve the rate when the
smoothed loss has not fallen by ``min_gain`` (relative) for ``patience`` steps.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch

import selftune
from selftune import Proposal
from selftune.signals import Signals


class PlateauHalver:
    """Halve every group's rate after ``patience`` steps without a relative gain of ``min_gain``
    in the smoothed loss."""

    name = "plateau-halver"
    reads_buffer = False  # it reads no momentum-buffer alignment: spare the step that pass

    def __init__(self, patience: int = 50, min_gain: float = 0.01) -> None:
        if patience < 1 or not 0 < min_gain < 1:
            raise selftune.ConfigError(
                f"PlateauHalver(patience={patience!r}, min_gain={min_gain!r}): give a patience "
                "of 1 or more steps and a gain in (0, 1), e.g. 50 and 0.01"
            )
        self.patience, self.min_gain = patience, min_gain
        self.options = {"patience": patience, "min_gain": min_gain}  # for the run's manifest
        self._best: float | None = None  # the smoothed loss at the last gain
        self._since = 0  # steps since then

    def propose(self, signals: Signals, knobs: list[dict[str, float]]) -> list[Proposal]:
        level = signals.loss_ema
        if level is None:  # the loop passes no loss: nothing to judge
            return []
        if self._best is None or level < self._best * (1 - self.min_gain):
            self._best, self._since = level, 0
            return []
        self._since += 1
        if self._since < self.patience:
            return []
        self._best, self._since = level, 0
        why = f"smoothed loss {level:.4g}: no {self.min_gain:.0%} gain in {self.patience} steps"
        return [Proposal(i, "lr", k["lr"] / 2, why) for i, k in enumerate(knobs)]

    def on_backoff(self, step: int) -> None:
        self._since = 0  # the guard just cut the rate: give the new one its full patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self._best, "since": self._since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._best, self._since = state["best"], state["since"]


def _problem(seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator]:
    torch.manual_seed(seed)
    x = torch.randn(2048, 8)
    y = torch.sin(x @ torch.randn(8, 1) / 8**0.5) + 0.1 * torch.randn(2048, 1)  # a noise floor
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return model, x, y, torch.Generator().manual_seed(seed)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer a run and its replay both wrap: other settings would not reproduce it."""
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _loop(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    steps: int,
) -> float:
    """Minibatches of 64 drawn with ``gen``: the same sequence for a run and its replay."""
    last = float("nan")
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        last = loss.item()
    return last


def train(log_dir: Path, steps: int = 600, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """Train under the controller, logging to ``log_dir``; return the model and the last loss."""
    model, x, y, gen = _problem(seed)
    opt = selftune.wrap(
        _sgd(model), controller=PlateauHalver(patience=40), log_dir=log_dir, seed=seed
    )
    last = _loop(model, opt, x, y, gen, steps)
    opt.close()
    return model, last


def replayed(log_dir: Path, steps: int = 600, seed: int = 0) -> torch.nn.Module:
    """The same run again from its log alone: the logged decisions re-applied, no controller."""
    model, x, y, gen = _problem(seed)
    opt = selftune.replay(_sgd(model), log_dir)
    _loop(model, opt, x, y, gen, steps)
    opt.close()
    return model


def fresh(folder: Path) -> Path:
    """``folder``, emptied if it holds this example's own earlier run (run it again and again);
    a folder of anything else is left alone, and refused by ``wrap`` if it holds a run."""
    manifest = folder / selftune.audit.MANIFEST
    if manifest.exists() and selftune.audit.read_log(folder).manifest.get("controller") == (
        PlateauHalver.name
    ):
        shutil.rmtree(folder)
    return folder


if __name__ == "__main__":
    folder = fresh(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/custom-controller"))
    model, last = train(folder)
    run = selftune.audit.read_log(folder)
    print(f"final loss {last:.4f}; manifest: {run.manifest['config']['controller_options']}")
    for record in run.records:
        if record.get("kind") == "decision":
            print(f"  step {record['step']}: lr {record['old']:.4g} -> {record['new']:.4g}")
    again = replayed(folder)
    pairs = zip(model.parameters(), again.parameters(), strict=True)
    same = all(torch.equal(a, b) for a, b in pairs)
    print(f"replayed from the log: {'the same weights, bit for bit' if same else 'DIFFERENT'}")
