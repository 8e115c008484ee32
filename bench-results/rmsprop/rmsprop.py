"""`auto` over torch's RMSprop: a base optimizer none of `auto`'s constants were chosen on.

RMSprop divides each step by a running root mean square of the gradients, with no first moment
unless given ``momentum``, and, unlike Adam, no bias correction: its average starts at zero, so
its first steps are up to ``1/sqrt(1 - alpha) = 10x`` the rate in every coordinate.  Four of the
benchmark's workloads (``digits-mlp``, ``friedman-mlp``, ``mnist1d-cnn`` and the held-out
``moons-deep-tanh``), seeds 0-9, with the benchmark's loop, targets and budgets
(:func:`selftune.bench.runner.train`). Rows:

- ``rmsprop-grid-<lr>``: RMSprop at a constant rate from 1e-4 to 1e-2 (torch's default, 3x
  apart): the least median steps of these is the oracle;
- ``selftune-auto-rmsprop``: RMSprop at torch's default rate wrapped with ``selftune.wrap``,
  given the loss at every step and the metric after every evaluation, as the benchmark's `auto`
  rows are; ``-lr1e-3``: started at 1e-3;
- ``selftune-auto-rmsprop-no-range-test``: from torch's default, ``range_test=False``;
- ``selftune-off-rmsprop``: torch's default wrapped with ``controller="off"`` (the guard alone);
  ``-regain``: with ``regain_after=25`` (a cut of the guard's doubles back after 25 healthy
  steps).

Measured: steps to target, whether the guard gave up or the run diverged, and the rate at the
end.  Run from the repository root (about five minutes on two cores):
``SELFTUNE_CACHE=.cache PYTHONPATH=src python bench-results/rmsprop/rmsprop.py``; writes
``results.json`` (rows appended as runs end) and ``table.md`` next to this file;
``rmsprop.py --table`` remakes the table from ``results.json``, and ``rmsprop.py --trace
WORKLOAD ROW SEED`` prints one `auto` run's decisions and writes them to
``trace-WORKLOAD-ROW-SEED.txt``.  ``rmsprop.py --before``, with ``PYTHONPATH`` at the code
before RMSprop's warm-up was corrected (``git archive 26f55c0 src | tar -x -C /tmp/before``),
writes the `auto` rows of that code to ``results-before.json``.  ``--momentum`` (with or
without ``--before``) runs the grid and the `auto` rows with ``momentum=0.9`` instead, a form
of RMSprop the correction was not first measured on, into ``results-momentum.json``,
``results-momentum-before.json`` and ``table-momentum.md``.  ``--wide`` (with or without
``--before``) runs the grid and `auto` from torch's default on the benchmark's ten other
workloads, seeds 0-2, into ``results-wide.json``, ``results-wide-before.json`` and
``table-wide.md``.  ``--controllers`` runs the grid and the other built-in controllers that
tune the rate, ``hypergradient`` and ``stability``, from torch's default, seeds 0-9, into
``results-controllers.json`` (``-before``) and ``table-controllers.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from selftune.bench.methods import Handle, Method, Setting

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import oracle_table, run_rows, steps_row, trace, tuned_handle  # noqa: E402

WORKLOADS = ("digits-mlp", "friedman-mlp", "mnist1d-cnn", "moons-deep-tanh")
#: the benchmark's other workloads, which ``--wide`` runs: none of them was read for the correction
WIDE = (
    "digits-autoencoder",
    "digits-resnet",
    "digits-vae",
    "hypercube-logreg",
    "image-fourier-mlp",
    "mnist1d-conv-autoencoder",
    "mnist1d-gru",
    "poisson-pinn",
    "ratings-factorization",
    "shakespeare-char",
)
SEEDS = range(10)
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT = 1e-2  #: torch's RMSprop's default rate
TUNED = "selftune-auto-rmsprop"
OFF = "selftune-off-rmsprop"  #: the guard alone, the rate as given
REGAIN = f"{OFF}-regain"  #: the guard alone, its cuts on trial
MOMENTUM = 0.9  #: the momentum of the ``--momentum`` rows
M = "momentum-"  #: the prefix of a row run with it
OTHERS = ("selftune-hypergradient-rmsprop", "selftune-stability-rmsprop")  #: ``--controllers``
AUTO_ROWS = (TUNED, f"{TUNED}-lr1e-3", f"{TUNED}-no-range-test")
ROWS = (*(f"rmsprop-grid-{lr:g}" for lr in GRID), *AUTO_ROWS, OFF, REGAIN)


def build(row: str) -> Method:
    """A row's method: ``rmsprop-grid-<lr>``, `auto` over RMSprop (``-lr1e-3``: from that
    rate; ``-no-range-test``: the cruise from the start), another controller over it
    (:data:`OTHERS`), or the guard alone over it; each with ``momentum=0.9`` under the prefix
    ``momentum-``."""
    momentum = MOMENTUM if row.startswith(M) else 0.0
    name = row.removeprefix(M)
    lr = float(name.removeprefix("rmsprop-grid-")) if name.startswith("rmsprop-grid-") else DEFAULT
    if name.endswith("-lr1e-3"):
        lr = 1e-3

    def make(model: nn.Module, s: Setting) -> Handle:
        import selftune

        opt = torch.optim.RMSprop(model.parameters(), lr=lr, momentum=momentum)
        if not name.startswith("selftune-"):
            return Handle(opt)
        if name in OTHERS:  # another of the built-in controllers, by name
            return tuned_handle(selftune.wrap(opt, name.split("-")[1], seed=s.seed), s)
        if name.startswith(OFF):
            regain = 25 if name == REGAIN else 0
            return tuned_handle(selftune.wrap(opt, "off", regain_after=regain, seed=s.seed), s)
        range_test = not name.endswith("-no-range-test")
        return tuned_handle(selftune.wrap(opt, "auto", range_test=range_test, seed=s.seed), s)

    return Method(row, "probe", "rmsprop", make, len(SEEDS), lr)


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    return steps_row(build(job[1]), job)


class Mode(NamedTuple):
    """What one invocation runs: the rows' prefix, the files' tag, the workloads and seeds, the
    `auto` rows (run again by ``--before``) and the rows besides the grid and those."""

    prefix: str
    tag: str
    workloads: tuple[str, ...]
    seeds: range
    tuned: tuple[str, ...]
    others: tuple[str, ...] = ()


MODES = {
    "": Mode("", "", WORKLOADS, SEEDS, AUTO_ROWS, (OFF, REGAIN)),
    "--momentum": Mode(M, "-momentum", WORKLOADS, SEEDS, AUTO_ROWS),
    "--wide": Mode("", "-wide", WIDE, range(3), (TUNED,)),
    "--controllers": Mode("", "-controllers", WORKLOADS, SEEDS, OTHERS),
}


def main() -> None:
    """The probe's rows (``--table``: the table alone, from the results; ``--trace``: one run's
    decisions; ``--before``: the `auto` rows alone; ``--momentum``, ``--wide``: see the module's
    docstring)."""
    args = sys.argv[1:]
    mode = MODES[next((a for a in args if a in MODES), "")]
    args = [a for a in args if a not in MODES]
    if args[:1] == ["--trace"]:
        workload, row, seed = args[1:]
        trace(workload, build(row), int(seed), HERE / f"trace-{workload}-{row}-{seed}.txt")
        return
    tuned = [mode.prefix + row for row in mode.tuned]
    jobs = [(w, seed) for w in mode.workloads for seed in mode.seeds]
    if args == ["--before"]:  # the `auto` rows alone, run on the code given
        before = [(w, row, seed) for w, seed in jobs for row in tuned]
        run_rows(run, before, HERE / f"results{mode.tag}-before.json")
        return
    grid = [f"{mode.prefix}rmsprop-grid-{lr:g}" for lr in GRID]
    columns = [*grid, *tuned, *mode.others]
    out = HERE / f"results{mode.tag}.json"
    if args != ["--table"]:
        run_rows(run, [(w, row, seed) for w, seed in jobs for row in columns], out)
    rows = json.loads(out.read_text(encoding="utf-8"))
    text = oracle_table(rows, mode.workloads, columns, grid, tuned[0])
    before = HERE / f"results{mode.tag}-before.json"
    if before.exists():  # the same grid against the `auto` rows of the code before
        runs = json.loads(before.read_text(encoding="utf-8"))
        old = [{**r, "row": f"{r['row']} (before)"} for r in runs]
        columns = [f"{row} (before)" for row in tuned]
        text += (
            "\nThe tuned rows of the code before RMSprop's warm-up was corrected "
            f"(`{before.name}`), against the same grid:\n\n"
            + oracle_table(rows + old, mode.workloads, columns, grid, columns[0])
        )
    (HERE / f"table{mode.tag}.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
