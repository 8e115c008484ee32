"""`auto` over torch's Muon and an AdamW, stepped as one (``selftune.wrap([muon, adamw])``):
a base optimizer none of `auto`'s constants were chosen on.

Muon (``torch.optim.Muon``) orthogonalizes the updates of 2-D weights, and its authors train the
rest (biases, and the input and output layers' weights) with AdamW.  Here Muon takes every 2-D
weight but the output layer's, and AdamW the output layer and the biases, on four of the
benchmark's MLP workloads (``digits-mlp``, ``digits-autoencoder``, ``friedman-mlp`` and the held-out
``moons-deep-tanh``), seeds 0-2, with the benchmark's loop, targets and budgets
(:func:`selftune.bench.runner.train`). Rows:

- ``muon-default``: torch's Muon at its default rate (1e-3) beside AdamW at its own (1e-3);
- ``muon-grid-<lr>``: Muon at a constant rate from 1e-3 to 3e-1 (3x apart; its authors' 0.02 lies
  between two), AdamW at 1e-3: the least median steps of these is the oracle;
- ``selftune-auto-muon``: both defaults wrapped as one (``selftune.wrap([muon, adamw])``), given
  the loss at every step and the metric after every evaluation, as the benchmark's `auto` rows.

Measured: steps to target, whether the guard gave up or the run diverged, and Muon's
effective rate at the end.  Run from the repository root (a few minutes on two cores):
``SELFTUNE_CACHE=.cache PYTHONPATH=src python bench-results/muon/muon.py``; writes
``results.json`` (rows appended as runs end) and ``table.md`` next to this file;
``muon.py --table`` remakes the table from ``results.json``, and ``--adamw`` and ``--starts``
run the two follow-ups of the README (:func:`main`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selftune.bench.methods import Handle, Method, Setting

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import oracle_table, run_rows, steps_row, tuned_handle  # noqa: E402

WORKLOADS = ("digits-mlp", "digits-autoencoder", "friedman-mlp", "moons-deep-tanh")
SEEDS = range(3)
GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
DEFAULT = 1e-3  #: torch's Muon's default rate, and AdamW's
ROWS = ("muon-default", *(f"muon-grid-{lr:g}" for lr in GRID), "selftune-auto-muon")
ADAMW_ROWS = ("muon-grid-0.1", "muon-grid-0.1-adamw-0.01", "muon-grid-0.1-adamw-0.1")
AUTHORS = 0.02  #: the rate Muon's authors train hidden weights at
START_ROWS = (
    "selftune-auto-muon",
    "selftune-auto-muon-from-authors",
    "selftune-auto-muon-from-authors-joint",
)


def split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Muon's parameters (the 2-D weights but the last, the output layer's) and AdamW's."""
    matrices = [p for p in model.parameters() if p.ndim == 2]
    hidden = {id(p) for p in matrices[:-1]}
    return [p for p in matrices if id(p) in hidden], [
        p for p in model.parameters() if id(p) not in hidden
    ]


def build(row: str) -> Method:
    """A row's method: ``muon-grid-<lr>`` (``-adamw-<lr>``: AdamW at that rate, not 1e-3);
    ``selftune-auto-muon`` (``-from-authors``: from Muon at 0.02; ``-joint``: the groups tuned
    as one, keeping their rates' ratio)."""
    lr, rest_lr = DEFAULT, DEFAULT
    if row.startswith("muon-grid-"):
        muon_lr, _, adamw_lr = row.removeprefix("muon-grid-").partition("-adamw-")
        lr, rest_lr = float(muon_lr), float(adamw_lr or DEFAULT)
    if "-from-authors" in row:
        lr = AUTHORS

    def make(model: nn.Module, s: Setting) -> Handle:
        import selftune

        muon, rest = split(model)
        parts = [torch.optim.Muon(muon, lr=lr), torch.optim.AdamW(rest, lr=rest_lr)]
        if not row.startswith("selftune-auto-muon"):
            return Handle(selftune.Combined(parts))
        groups = "joint" if row.endswith("-joint") else "each"
        opt = selftune.wrap(parts, seed=s.seed, groups=groups)
        return tuned_handle(opt, s)

    return Method(row, "probe", "muon", make, len(SEEDS), lr)


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    return steps_row(build(job[1]), job)


def table(rows: list[dict[str, Any]], columns: tuple[str, ...] = ROWS) -> str:
    """Median steps to target per row and workload (hits of seeds), and `auto`'s against the
    grid's best median (the oracle)."""
    grid = [f"muon-grid-{lr:g}" for lr in GRID]
    return oracle_table(rows, WORKLOADS, columns, grid, "selftune-auto-muon")


def main() -> None:
    """The probe's rows (``--table``: the table alone, from ``results.json``); with
    ``--adamw``, Muon at 0.1 beside AdamW at 1e-2 and 1e-1, the rates `auto` raised AdamW's
    to, into ``adamw-rate.json`` and ``adamw-rate.md``; with ``--starts``, `auto` from Muon's
    authors' rate, each group on its own and jointly, into ``starts.json`` and ``starts.md``."""
    rows, name = ROWS, "results"
    if sys.argv[1:] == ["--adamw"]:
        rows, name = ADAMW_ROWS, "adamw-rate"
    if sys.argv[1:] == ["--starts"]:
        rows, name = START_ROWS, "starts"
    out = HERE / f"{name}.json"
    if sys.argv[1:] != ["--table"]:
        jobs = [(w, row, seed) for w in WORKLOADS for seed in SEEDS for row in rows]
        run_rows(run, jobs, out)
    text = table(json.loads(out.read_text(encoding="utf-8")), rows)
    (HERE / ("table.md" if name == "results" else f"{name}.md")).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
