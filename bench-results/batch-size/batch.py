"""Does `auto`'s rate follow the best rate when the batch grows?  The best constant rate of SGD
grows with the batch, about in proportion until the batch passes the gradient's noise scale
(Goyal et al. 2017, McCandlish et al. 2018), and Adam's more slowly; a tuner that reads its rate
off the run's own signals should move with it, where one constant factor on the start would not.
No constant of selftune's was chosen on batches other than the benchmark's.

Three of the benchmark's workloads (``digits-mlp``, ``friedman-mlp``, ``mnist1d-cnn``), each at
its own batch size and at 4x and 16x it (the CNN at 1x and 4x: 16x is hours on two cores), seeds
0-4, with the benchmark's loop, targets and budgets (:func:`selftune.bench.runner.train`) and
its own rows: the AdamW and SGD grids of constant rates (``adamw-grid-const-*``,
``sgd-grid-const-*``), whose least median steps is the oracle, and ``selftune-auto-adamw`` and
``selftune-auto-sgd`` from the default rates.  A workload's label is ``<name> x<factor>``.

Run from the repository root (about a quarter of an hour on two cores):
``SELFTUNE_CACHE=.cache PYTHONPATH=src python bench-results/batch-size/batch.py``; writes
``results.json`` (rows as runs end; the runs already there are kept) and ``table.md`` next to
this file; ``batch.py --table`` remakes the table, ``batch.py --trace LABEL ROW SEED`` prints
one `auto` run's decisions and writes them to ``trace-LABEL-ROW-SEED.txt``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import command, fastest, oracle_table, steps_row, trace  # noqa: E402

FACTORS = {"digits-mlp": (1, 4, 16), "friedman-mlp": (1, 4, 16), "mnist1d-cnn": (1, 4)}
LABELS = [f"{w} x{f}" for w, factors in FACTORS.items() for f in factors]
SEEDS = range(5)
BASES = ("adamw", "sgd")


def grid(base: str) -> list[str]:
    from selftune.bench.methods import ADAMW_GRID, SGD_GRID, lr_label

    rates = {"adamw": ADAMW_GRID, "sgd": SGD_GRID}[base]
    return [f"{base}-grid-const-{lr_label(lr)}" for lr in rates]


def rows() -> list[str]:
    return [row for base in BASES for row in (*grid(base), f"selftune-auto-{base}")]


def workload_of(label: str) -> Any:
    """The workload of a label, ``<name> x<factor>``: the benchmark's, its batch ``factor`` times
    as large."""
    from selftune.bench import workloads

    name, factor = label.split(" x")
    (workload,) = workloads.select([name])
    return dataclasses.replace(workload, batch_size=workload.batch_size * int(factor))


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    """One run of the benchmark's row ``job[1]`` on the workload of label ``job[0]``."""
    from selftune.bench import methods

    return steps_row(methods.methods()[job[1]], job, workload_of(job[0]))


def best_rate(runs: list[dict[str, Any]], label: str, base: str) -> float | None:
    """The rate of the ``base`` grid's member with the least median steps on the workload of
    ``label`` (None where none reached the target in more than half its seeds)."""
    from selftune.bench.methods import methods

    return fastest(runs, label, grid(base), lambda row: methods()[row].lr0)


def best_rates(runs: list[dict[str, Any]], base: str) -> str:
    """Per workload label: the grid's best rate (the least median steps) and `auto`'s median
    rate at the end, the two side by side as the batch grows."""
    lines = [
        f"| workload | {base} grid's best rate | `auto`'s rate at the end (median) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label in LABELS:
        rate = best_rate(runs, label, base)
        tuned = [
            r["final_lr"]
            for r in runs
            if r["workload"] == label and r["row"] == f"selftune-auto-{base}"
        ]
        if rate is None or not tuned:
            continue
        end = statistics.median(tuned)
        lines.append(f"| {label} | {rate:g} | {end:.3g} | {end / rate:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """The probe's runs (``--table``: the table alone; ``--trace LABEL ROW SEED``: one run's
    decisions, ``LABEL`` as ``digits-mlp x16``)."""
    if sys.argv[1:2] == ["--trace"]:
        from selftune.bench import methods

        label, row, seed = sys.argv[2:]
        out = HERE / f"trace-{label.replace(' ', '-')}-{row}-{seed}.txt"
        trace(workload_of(label), methods.methods()[row], int(seed), out)
        return
    runs = command(run, [(w, row, s) for w in LABELS for s in SEEDS for row in rows()], HERE)
    assert runs is not None  # no --trace here
    tables = []
    for base in BASES:
        tuned = f"selftune-auto-{base}"
        tables.append(oracle_table(runs, LABELS, [*grid(base), tuned], grid(base), tuned))
        tables.append(best_rates(runs, base))
    text = "\n".join(tables)
    (HERE / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
