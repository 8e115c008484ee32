"""selftune with one or four examples a step: the noisiest minibatch losses there are.

With a batch of one, a network that has fitted most examples sees losses of 1e-4 on them (a
cross-entropy that rounds to exactly 0.0 on some) and of 0.1-5 on the few it has not, step
after step: heavy tails for the guard, and little signal per step for a controller.  This
trains the benchmark's digits MLP shape (64-64-10, ReLU) on scikit-learn's digits
(``selftune.bench.data.digits``) with batches of 1 and 4 for 3,000 steps, with SGD (momentum
0.9, 0.01) and AdamW (1e-3) at fixed rates, seeds 0-4:

- ``plain``: no selftune;
- ``guard-only``: ``controller="off"`` with the default guard;
- ``auto``: ``selftune.wrap(optimizer)`` at its defaults;
- ``auto-10x``: the same with the rate's rise bounded at 10x its start
  (``bounds={"lr": (1e-3, 10.0)}``), the setting that kept a fine-tune's and a policy
  gradient's gains (``bench-results/finetune/``, ``policy-gradient/``).

Measured: test accuracy at the end, whether the run stopped with ``GuardError``, the rate at
the end and the guard's events.  Run from the repository root:
``PYTHONPATH=src python bench-results/small-batch/digits.py`` (about a minute and a half on
two cores); writes ``results.json`` and ``table.md`` next to this file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selftune
from selftune.bench.data import digits
from selftune.tuner import StepEvent

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import accuracy_columns, count_guard_events, run_grid  # noqa: E402

BASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
}
VARIANTS = tuple(
    f"{base}-b{batch}-{kind}"
    for base in BASES
    for batch in (1, 4)
    for kind in ("plain", "guard-only", "auto", "auto-10x")
)
SEEDS, STEPS = range(5), 3000


def run(
    variant: str, seed: int, listen: Callable[[StepEvent], None] | None = None
) -> dict[str, Any]:
    """One run of the probe; ``listen`` (for ``trace.py``) is told every step of a wrapped run."""
    torch.set_num_threads(1)
    base, batch, kind = variant.split("-", 2)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt: Any = BASES[base](net.parameters())
    events: dict[str, int] = {}
    if kind != "plain":
        options: dict[str, Any] = {"bounds": {"lr": (1e-3, 10.0)}} if kind == "auto-10x" else {}
        opt = selftune.wrap(opt, controller="off" if kind == "guard-only" else "auto", **options)
        events = count_guard_events(opt)
        if listen is not None:
            opt.add_listener(listen)
    data, order = digits(), torch.Generator().manual_seed(seed)
    stopped = None
    for t in range(1, STEPS + 1):
        i = torch.randint(0, len(data.y_train), (int(batch[1:]),), generator=order)
        loss = nn.functional.cross_entropy(net(data.x_train[i]), data.y_train[i])
        opt.zero_grad()
        loss.backward()
        try:
            opt.step() if kind == "plain" else opt.step(loss=loss.detach())
        except selftune.GuardError:
            stopped = t
            break
    with torch.no_grad():
        accuracy = float((net(data.x_test).argmax(1) == data.y_test).float().mean())
    return {
        "variant": variant,
        "seed": seed,
        "accuracy": accuracy,
        "stopped": stopped,
        "rate": None if kind == "plain" else opt.hyperparams()[0]["lr"],
        "events": dict(events),
    }


COLUMNS = accuracy_columns()


def main() -> None:
    run_grid(run, VARIANTS, SEEDS, COLUMNS, HERE)


if __name__ == "__main__":
    main()
