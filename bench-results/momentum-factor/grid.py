"""Does the best constant rate follow the weight of the newest gradient in the step, or the
step's steady size?

``../gap-decomposition/horizon.py`` found the greedy step of a quadratic model, taken as the
first step from rest, within half a grid step of the best constant rate ``lr*`` on 10 of 18
pairs, where the same step taken as the steady step (``optimal_step.py``) stood about 12x short;
and without momentum, on ``../bases/``'s grid, the greedy step read 0.42x-0.71x ``lr*``. With
heavy-ball momentum ``μ`` the newest gradient enters the step with weight ``lr`` and the steady
step is ``lr / (1 - μ)``; with Adam's average the newest gradient's weight is ``lr (1 - β1)`` and
the steady step ``lr``. The two readings make opposite predictions when the momentum changes:

- if ``lr*`` sets the newest gradient's weight, SGD's ``lr*`` barely moves with ``μ`` and Adam's
  falls as ``β1`` falls (``1 - β1`` from 0.1 to 0.5: 5x);
- if it sets the steady step, SGD's ``lr*`` rises as ``μ`` falls (``1 - μ`` from 0.1 to 0.5: 5x)
  and Adam's barely moves.

The benchmark's two optimizers, both at 0.9, cannot tell them apart. This probe runs the grid of
constant rates (the benchmark's, ``SGD_GRID`` and ``ADAMW_GRID``) of SGD with momentum 0.9, 0.5
and none, and of AdamW with ``β1`` 0.9 and 0.5, on ``../bases/``'s four workloads, seeds 0-4, with
the benchmark's loop, targets and budgets; the least median steps of each grid is its ``lr*``.
And since no constant of ``auto`` was chosen on these momenta, ``selftune-auto-<variant>`` rows
wrap the two at 0.5 from the benchmark's default rates (SGD 1e-2, AdamW 1e-3) as the benchmark's
`auto` rows are wrapped: the figures as they came.

Run from the repository root (about fifteen minutes on two cores; the runs already in
``results.json`` are kept): ``SELFTUNE_CACHE=.cache PYTHONPATH=src python
bench-results/momentum-factor/grid.py``; writes ``results.json`` (rows as runs end) and
``table.md`` next to this file; ``--table`` remakes the table.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from selftune.bench.methods import ADAMW_GRID, DEFAULT_LR, SGD_GRID, Method

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import command, fastest, optimizer_method, oracle_table, steps_row  # noqa: E402

WORKLOADS = ("digits-mlp", "friedman-mlp", "mnist1d-cnn", "moons-deep-tanh")
SEEDS = range(5)
#: each variant: its kind (``sgd`` or ``adamw``) and its momentum (``μ`` or ``β1``)
VARIANTS: dict[str, tuple[str, float]] = {
    "sgd-m0.9": ("sgd", 0.9),
    "sgd-m0.5": ("sgd", 0.5),
    "sgd-m0": ("sgd", 0.0),
    "adamw-b0.9": ("adamw", 0.9),
    "adamw-b0.5": ("adamw", 0.5),
}
GRIDS = {"sgd": SGD_GRID, "adamw": ADAMW_GRID}


def optimizer(variant: str) -> Callable[..., torch.optim.Optimizer]:
    """The variant's optimizer: torch's SGD with its momentum, or AdamW with its ``β1`` (and
    torch's ``β2``)."""
    kind, mu = VARIANTS[variant]
    if kind == "sgd":
        return partial(torch.optim.SGD, momentum=mu)
    return partial(torch.optim.AdamW, betas=(mu, 0.999))


#: the momentum the benchmark runs both optimizers at, against which the others are read
REFERENCE = 0.9


def grid(variant: str) -> list[str]:
    return [f"{variant}-grid-{lr:g}" for lr in GRIDS[VARIANTS[variant][0]]]


#: the variants whose ``auto`` rows run, none of whose momenta ``auto`` was tuned at
TUNED = ("sgd-m0.5", "adamw-b0.5")


def build(row: str) -> Method:
    """A row's method: ``<variant>-grid-<lr>``, the plain optimizer at that constant rate, or
    ``selftune-auto-<variant>``, it wrapped by ``auto`` from the benchmark's default rate."""
    if row.startswith("selftune-auto-"):
        variant = row.removeprefix("selftune-auto-")
        lr = DEFAULT_LR[VARIANTS[variant][0]]
    else:
        variant, rate = row.split("-grid-")
        lr = float(rate)
    return optimizer_method(row, variant, optimizer(variant), lr, len(SEEDS))


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    return steps_row(build(job[1]), job)


def summary(runs: list[dict[str, Any]]) -> str:
    """Per workload: each variant's ``lr*``, its steady step (SGD's ``lr* / (1 - μ)``, Adam's
    ``lr*``), and its ``lr*`` over that of its kind at 0.9 beside the move each reading predicts
    (the newest gradient's weight held: SGD 1, Adam ``(1 - 0.9) / (1 - β1)``; the steady step
    held: SGD ``(1 - μ) / (1 - 0.9)``, Adam 1)."""
    lines = [
        "| workload | variant | lr* | its steady step | lr* over the 0.9 variant's |"
        " newest weight held predicts | steady step held predicts |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    references = {v: kind for v, (kind, mu) in VARIANTS.items() if mu == REFERENCE}
    for w in WORKLOADS:
        refs = {kind: fastest(runs, w, grid(v)) for v, kind in references.items()}
        for variant, (kind, mu) in VARIANTS.items():
            ref = refs[kind]
            mine = fastest(runs, w, grid(variant))
            if mine is None or ref is None:
                lines.append(f"| {w} | {variant} | miss | – | – | – | – |")
                continue
            newest = 1.0 if kind == "sgd" else (1 - REFERENCE) / (1 - mu)
            steady = (1 - mu) / (1 - REFERENCE) if kind == "sgd" else 1.0
            step = mine / (1 - mu) if kind == "sgd" else mine
            cells = f"{mine:g} | {step:.3g} | {mine / ref:.3g}x | {newest:.3g}x | {steady:.3g}x"
            lines.append(f"| {w} | {variant} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = [row for v in VARIANTS for row in grid(v)] + [f"selftune-auto-{v}" for v in TUNED]
    jobs = [(w, row, seed) for w in WORKLOADS for seed in SEEDS for row in rows]
    runs = command(run, jobs, HERE, build)
    if runs is None:
        return
    tables = []
    for v in VARIANTS:
        tuned = [f"selftune-auto-{v}"] if v in TUNED else []
        tables.append(oracle_table(runs, WORKLOADS, grid(v) + tuned, grid(v), tuned))
    text = "\n".join(tables) + "\n" + summary(runs)
    (HERE / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
