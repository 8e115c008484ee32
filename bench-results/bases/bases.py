"""`auto` over four more of torch's optimizers, none of which any constant of selftune's was
chosen on: Adagrad, RAdam, NAdam and Adamax, each at its defaults but for the rate; and over two
forms of SGD the benchmark does not run: SGD at torch's defaults (no momentum, 1e-3) and SGD with
Nesterov momentum 0.9 (at the benchmark's SGD rate, 1e-2).

Four of the benchmark's workloads (``digits-mlp``, ``friedman-mlp``, ``mnist1d-cnn`` and
``moons-deep-tanh``), seeds 0-4, with the benchmark's loop, targets and budgets
(:func:`selftune.bench.runner.train`). Rows, for each optimizer ``<opt>``:

- ``<opt>-grid-<lr>``: the optimizer at a constant rate from 1e-4 to 0.1, about 3x apart (the
  SGD forms: the benchmark's SGD grid, 1e-3 to 3): the least median steps of these is the
  oracle;
- ``selftune-auto-<opt>``: the optimizer at torch's default rate wrapped with
  ``selftune.wrap(opt, "auto")``, given the loss at every step and the metric after every
  evaluation, as the benchmark's `auto` rows are.

Measured: steps to target, whether the run diverged or the guard gave up, the rate at the end.
Run from the repository root (about ten minutes on two cores for the first four, as long again
for the SGD forms; the runs already in ``results.json`` are kept, not run again):
``SELFTUNE_CACHE=.cache PYTHONPATH=src python bench-results/bases/bases.py``; writes
``results.json`` (rows as runs end) and ``table.md`` next to this file; ``bases.py --table``
remakes the table, ``bases.py --trace WORKLOAD ROW SEED`` prints one `auto` run's decisions
and writes them to ``trace-WORKLOAD-ROW-SEED.txt``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from selftune.bench.methods import SGD_GRID, Method

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import command, optimizer_method, oracle_table, steps_row  # noqa: E402

WORKLOADS = ("digits-mlp", "friedman-mlp", "mnist1d-cnn", "moons-deep-tanh")
SEEDS = range(5)
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: each optimizer, the rate its `auto` row starts at (torch's default where it has one), and
#: its grid
BASES: dict[str, tuple[Callable[..., torch.optim.Optimizer], float, tuple[float, ...]]] = {
    "adagrad": (torch.optim.Adagrad, 1e-2, GRID),
    "radam": (torch.optim.RAdam, 1e-3, GRID),
    "nadam": (torch.optim.NAdam, 2e-3, GRID),
    "adamax": (torch.optim.Adamax, 2e-3, GRID),
    "sgd0": (torch.optim.SGD, 1e-3, SGD_GRID),
    "nesterov": (partial(torch.optim.SGD, momentum=0.9, nesterov=True), 1e-2, SGD_GRID),
}


def grid(base: str) -> list[str]:
    return [f"{base}-grid-{lr:g}" for lr in BASES[base][2]]


def rows() -> Iterator[str]:
    for base in BASES:
        yield from grid(base)
        yield f"selftune-auto-{base}"


def build(row: str) -> Method:
    """A row's method: ``<opt>-grid-<lr>`` or ``selftune-auto-<opt>``."""
    base = row.removeprefix("selftune-auto-").split("-grid-")[0]
    make_opt, lr, _ = BASES[base]
    if "-grid-" in row:
        lr = float(row.split("-grid-")[1])

    return optimizer_method(row, base, make_opt, lr, len(SEEDS))


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    return steps_row(build(job[1]), job)


def main() -> None:
    """The probe's rows (``--table``: the table alone; ``--trace``: one run's decisions)."""
    jobs = [(w, row, seed) for w in WORKLOADS for seed in SEEDS for row in rows()]
    runs = command(run, jobs, HERE, build)
    if runs is None:
        return
    tables = []
    for base in BASES:
        tuned = f"selftune-auto-{base}"
        tables.append(oracle_table(runs, WORKLOADS, [*grid(base), tuned], grid(base), tuned))
    text = "\n".join(tables)
    (HERE / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
