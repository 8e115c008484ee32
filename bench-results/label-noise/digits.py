"""selftune on noisy labels: a training loss that rewards memorising the noise.

With a share of the training labels replaced by random classes, the training loss keeps
falling as the network memorises the wrong labels, while the test accuracy falls with it: the
training loss is no longer a measure of the progress that matters, and a controller that
speeds its fall speeds the memorising.  This trains a 64-128-10 MLP on the digits
(``selftune.bench.data.digits``: the last fifth of its training split held out for validation)
with 20% and 50% of the remaining training labels replaced at random, batches of 32 for 3,000
steps, SGD (momentum 0.9, 0.05) and AdamW (1e-3), seeds 0-4:

- ``plain``: no selftune;
- ``guard-only``: ``controller="off"`` with the default guard;
- ``auto``: ``selftune.wrap(optimizer)`` at its defaults, told the training loss;
- ``auto-observe``: the same, also told the validation accuracy every 100 steps
  (``observe(accuracy, mode="max")``), the held-out evidence its plateau rule reads.

Measured: test accuracy at the end, the rate at the end and the guard's events.  Run from the
repository root: ``PYTHONPATH=src python bench-results/label-noise/digits.py`` (about three
minutes on two cores); writes ``results.json`` and ``table.md`` next to this file.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selftune
from selftune.bench.data import digits

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import (  # noqa: E402
    Column,
    count_guard_events,
    events_total,
    per_seed,
    rates,
    run_grid,
)

BASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
}
KINDS = ("plain", "guard-only", "auto", "auto-observe")
VARIANTS = tuple(f"{b}-noise{n}-{k}" for b in BASES for n in (20, 50) for k in KINDS)
SEEDS, STEPS, EVALUATE = range(5), 3000, 100


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def run(variant: str, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    base, noise, kind = variant.split("-", 2)
    kind, _, floor = kind.partition("-floor-")  # (``../floor-room/``: the rate's floor raised)
    bounds = {"lr": (float(floor), 1e5)} if floor else None
    data, gen = digits(), torch.Generator().manual_seed(seed)
    held = len(data.y_train) // 5
    x_val, y_val = data.x_train[-held:], data.y_train[-held:]
    x, y = data.x_train[:-held], data.y_train[:-held].clone()
    flip = torch.rand(len(y), generator=gen) < int(noise[5:]) / 100
    y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=gen)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt: Any = BASES[base](net.parameters())
    events: dict[str, int] = {}
    if kind != "plain":
        controller = "off" if kind == "guard-only" else "auto"
        opt = selftune.wrap(opt, controller=controller, bounds=bounds)
        events = count_guard_events(opt)
    for t in range(1, STEPS + 1):
        i = torch.randint(0, len(y), (32,), generator=gen)
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step() if kind == "plain" else opt.step(loss=loss.detach())
        if kind == "auto-observe" and t % EVALUATE == 0:
            opt.observe(accuracy(net, x_val, y_val), mode="max")
    return {
        "variant": variant,
        "seed": seed,
        "accuracy": accuracy(net, data.x_test, data.y_test),
        "rate": None if kind == "plain" else opt.hyperparams()[0]["lr"],
        "events": dict(events),
    }


COLUMNS: list[Column] = [
    ("test accuracy per seed", "---", lambda m: per_seed(m, lambda r: f"{r['accuracy']:.3f}")),
    ("median", "---:", lambda m: f"{statistics.median(r['accuracy'] for r in m):.3f}"),
    ("rate at the end", "---", rates),
    ("guard events (all seeds)", "---", events_total),
]


def main() -> None:
    run_grid(run, VARIANTS, SEEDS, COLUMNS, HERE)


if __name__ == "__main__":
    main()
