"""selftune on two tasks trained by turns: one loss stream, two levels.

Multi-task training often takes its batches from one task, then another, in turn (every step,
or in blocks of steps); when the tasks' losses differ in scale the loss the optimizer is told
jumps between two levels, which the guard, judging one stream, may call spikes.  This trains a
shared tanh trunk (8-64-64) with one linear head per task on two regressions of the same
inputs, ``sin(x . w_a)`` (its MSE about 0.5 at the start) and ``10 tanh(x . w_b)`` (about 50),
batches of 32 from task A for ``block`` steps and then from task B, for blocks of 1, 20 and 100
steps, AdamW at 1e-3 for 2,000 steps, seeds 0-4:

- ``plain``: no selftune;
- ``guard-only``: ``controller="off"`` with the default guard;
- ``auto``: ``selftune.wrap(adamw)`` at its defaults;
- ``auto-nonfinite``: ``auto`` with ``GuardConfig(nonfinite_only=True)``.

Measured: each task's MSE on all 2,000 inputs at the end, the step a ``GuardError`` stopped
the run (its weights then measured as they were), the rate at the end and the guard's events.
Run from the repository root: ``PYTHONPATH=src python bench-results/multi-task/alternate.py``
(about two minutes on two cores); writes ``results.json`` and ``table.md`` next to this file.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selftune

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

KINDS = ("plain", "guard-only", "auto", "auto-nonfinite")
BLOCKS = (1, 20, 100)
VARIANTS = tuple(f"block{b}-{k}" for b in BLOCKS for k in KINDS)
SEEDS, STEPS = range(5), 2000


def run(variant: str, seed: int, log_dir: Path | None = None) -> dict[str, Any]:
    """One run; ``log_dir``: where a wrapped run writes its decision log (for a trace)."""
    torch.set_num_threads(1)
    block, kind = int(variant.split("-", 1)[0][5:]), variant.split("-", 1)[1]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, 8, generator=gen)
    w_a, w_b = torch.randn(8, 1, generator=gen), torch.randn(8, 1, generator=gen)
    targets = (torch.sin(x @ w_a), 10 * torch.tanh(x @ w_b))
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(64, 1), nn.Linear(64, 1)])
    opt: Any = torch.optim.AdamW([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    events: dict[str, int] = {}
    if kind != "plain":
        guard = selftune.GuardConfig(nonfinite_only=True) if kind == "auto-nonfinite" else True
        opt = selftune.wrap(
            opt, "off" if kind == "guard-only" else "auto", guard=guard, log_dir=log_dir
        )
        events = count_guard_events(opt)
    stopped = None
    for t in range(STEPS):
        task = (t // block) % 2
        i = torch.randint(0, len(x), (32,), generator=gen)
        loss = nn.functional.mse_loss(heads[task](trunk(x[i])), targets[task][i])
        opt.zero_grad()
        loss.backward()
        try:
            opt.step() if kind == "plain" else opt.step(loss=loss.detach())
        except selftune.GuardError:
            stopped = t + 1
            break
    with torch.no_grad():
        features = trunk(x)
        mse = [
            float(nn.functional.mse_loss(h(features), y))
            for h, y in zip(heads, targets, strict=True)
        ]
    return {
        "variant": variant,
        "seed": seed,
        "mse_a": mse[0],
        "mse_b": mse[1],
        "stopped": stopped,
        "rate": None if kind == "plain" else opt.hyperparams()[0]["lr"],
        "events": dict(events),
    }


COLUMNS: list[Column] = [
    ("task A MSE per seed", "---", lambda m: per_seed(m, lambda r: f"{r['mse_a']:.3g}")),
    ("task B MSE per seed", "---", lambda m: per_seed(m, lambda r: f"{r['mse_b']:.3g}")),
    ("median B", "---:", lambda m: f"{statistics.median(r['mse_b'] for r in m):.3g}"),
    (
        "stopped by GuardError (step)",
        "---",
        lambda m: ", ".join(str(r["stopped"]) for r in m if r["stopped"]) or "-",
    ),
    ("rate at the end", "---", rates),
    ("guard events (all seeds)", "---", events_total),
]


def main() -> None:
    run_grid(run, VARIANTS, SEEDS, COLUMNS, HERE)


if __name__ == "__main__":
    main()
