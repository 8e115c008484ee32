"""selftune on full-batch training: no minibatch noise, and Adam's own oscillations.

Fitting a function from all its points at every step (a physics-informed network, a small
scientific regression, a coordinate network) gives a loss with no sampling noise, and Adam in
that regime bounces: its gradient norm jumps 10-30x within a few steps while the loss barely
moves or rises a few percent, and it settles by itself.  This fits a tanh MLP (1-64-64-64-1) to
``sin(6 pi x) exp(-2 x^2) + 0.3 sign(x)`` on 512 points of [-1, 1], mean squared error, full
batch, Adam at 1e-3 for 3,000 steps, seeds 0-4:

- ``plain``: no selftune;
- ``guard-only``: ``controller="off"`` with the default guard;
- ``auto``: ``selftune.wrap(adam)`` at its defaults;
- ``guard-only-no-grad`` and ``auto-no-grad``: the same with the gradient-norm spike check
  off after the guard's warm-up (``GuardConfig(grad_ratio=1e9)``; non-finite gradients still
  roll back).

Measured: the loss after 500, 1,000 and 3,000 steps, the first step the loss is below 3e-3
(a level plain Adam reaches in every seed), the rate at the end and the guard's events by
signal; and, from the gradient norm of every step, its largest rise over 8 steps with the
loss's change over the same steps, and at each gradient-norm spike the guard called, the norm
and the loss over their medians of the 20 steps before.  Run from the repository root:
``PYTHONPATH=src python bench-results/full-batch/fit.py`` (about two minutes on two cores);
writes ``results.json`` and ``table.md`` next to this file.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selftune

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import Column, count_guard_events, per_seed, rates, run_grid  # noqa: E402

VARIANTS = ("plain", "guard-only", "auto", "guard-only-no-grad", "auto-no-grad")
SEEDS, STEPS, TARGET = range(5), 3000, 3e-3


def run(variant: str, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x = torch.linspace(-1, 1, 512).unsqueeze(1)
    y = torch.sin(6 * math.pi * x) * torch.exp(-2 * x**2) + 0.3 * torch.sign(x)
    net = nn.Sequential(
        nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
        nn.Linear(64, 1),
    )  # fmt: skip
    opt: Any = torch.optim.Adam(net.parameters(), lr=1e-3)
    events: dict[str, int] = {}
    spikes: list[int] = []  # the steps of the guard's gradient-norm spikes
    if variant != "plain":
        guard = selftune.GuardConfig(grad_ratio=1e9) if variant.endswith("no-grad") else True
        controller = "auto" if variant.startswith("auto") else "off"
        opt = selftune.wrap(opt, controller=controller, guard=guard)
        events = count_guard_events(opt, lambda g: f"{g['event']}:{g['signal']}")
        opt.add_listener(
            lambda e: (
                spikes.append(e.step) if e.guard and e.guard["signal"] == "grad_norm" else None
            )
        )
    losses, norms = [], []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.norm() for p in net.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        opt.step() if variant == "plain" else opt.step(loss=loss.detach())
        losses.append(float(loss.detach()))
    reached = next((t + 1 for t, v in enumerate(losses) if v < TARGET), None)
    rise = max(range(8, STEPS), key=lambda t: norms[t] / norms[t - 8])
    return {
        "variant": variant,
        "seed": seed,
        "loss": {str(t): losses[t - 1] for t in (500, 1000, STEPS)},
        "reached": reached,
        "rate": opt.hyperparams()[0]["lr"] if variant != "plain" else 1e-3,
        "events": dict(events),
        "largest_rise_8": {
            "step": rise + 1,
            "norm": norms[rise] / norms[rise - 8],
            "loss": losses[rise] / losses[rise - 8],
        },
        "grad_spikes": [
            {
                "step": s,
                "norm": norms[s - 1] / statistics.median(norms[s - 21 : s - 1]),
                "loss": losses[s - 1] / statistics.median(losses[s - 21 : s - 1]),
            }
            for s in spikes
        ],
    }


def _losses_at(rows: list[dict[str, Any]]) -> str:
    """The median loss at 500, 1,000 and the last step."""
    return " / ".join(
        f"{statistics.median(r['loss'][t] for r in rows):.2e}" for t in ("500", "1000", str(STEPS))
    )


def _events_median(rows: list[dict[str, Any]]) -> str:
    """Each kind of guard event, its median count per run."""
    kinds = sorted({k for r in rows for k in r["events"]})
    counts = (f"{k} {statistics.median(r['events'].get(k, 0) for r in rows):g}" for k in kinds)
    return ", ".join(counts) or "-"


COLUMNS: list[Column] = [
    (f"loss at 500 / 1,000 / {STEPS:,} steps (median of {len(SEEDS)} seeds)", "---", _losses_at),
    ("final loss per seed", "---", lambda m: per_seed(m, lambda r: f"{r['loss'][str(STEPS)]:.2e}")),
    (
        f"first step below {TARGET:g} per seed",
        "---",
        lambda m: per_seed(m, lambda r: str(r["reached"] or "-")),
    ),
    ("rate at the end", "---", rates),
    ("guard events per run (median)", "---", _events_median),
]


def main() -> None:
    run_grid(run, VARIANTS, SEEDS, COLUMNS, HERE)


if __name__ == "__main__":
    main()
