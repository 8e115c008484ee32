"""Does SGD's range test, retreating to half the failed rate instead of a quarter, follow the
best rate at larger batches?

``../batch-size/`` found that with SGD the range test stops at the same rate at every batch
(a gradient-norm spike at 0.55-0.66 on the digits MLP and the CNN) and retreats to ``retreat``
(0.25) of it, while the grid's best rate moved from about a fifth of that edge at the
benchmark's batch to about half at 4x and 16x it. Half the edge is where a rate stops being
limited by the gradient's noise: on a quadratic under plain gradient descent, steps along the
sharpest direction converge without overshoot up to ``1/λ``, half the stability limit ``2/λ``,
so the best rate of a batch large against the noise scale sits near half the edge, and a
smaller batch's best lower (McCandlish et al. 2018); heavy-ball momentum moves both bounds, so
the half is the argument's form, not an exact value. ``retreat=0.5`` is that bound, not a value
fitted to the probe.

Rows: ``selftune-auto-sgd-retreat-half`` (``AutoController(retreat=0.5)``, SGD with momentum
0.9 from the default rate) on ``../batch-size/``'s eight workload labels, against that probe's
committed grid and ``selftune-auto-sgd`` rows; and on two workloads that probe did not run
(the held-out ``moons-deep-tanh`` and ``hypercube-logreg``, at 1x, 4x and 16x their batch) the
SGD grid, ``selftune-auto-sgd`` and the variant, all run here. Seeds 0-4, the benchmark's loop,
targets and budgets. AdamW's test ends where its cosines cross zero, not at a rollback, so
``retreat`` does not reach it.

Run from the repository root: ``SELFTUNE_CACHE=.cache PYTHONPATH=src python
bench-results/batch-retreat/retreat.py``; writes ``results.json`` (rows as runs end; those
already there are kept) and ``table.md`` next to this file; ``--table`` remakes the table,
``--trace LABEL ROW SEED`` prints one run's decisions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "batch-size")]
from batch import LABELS, SEEDS, grid, workload_of  # noqa: E402
from probe_grid import command, oracle_table, steps_row  # noqa: E402

VARIANT = "selftune-auto-sgd-retreat-half"
TUNED = "selftune-auto-sgd"
NEW = [f"{w} x{f}" for w in ("moons-deep-tanh", "hypercube-logreg") for f in (1, 4, 16)]


def method(row: str) -> Any:
    """The benchmark's row, or the variant: ``auto`` with ``retreat=0.5``."""
    from selftune.bench import methods as m
    from selftune.controllers import AutoController

    if row != VARIANT:
        return m.methods()[row]
    build = m._selftune("sgd", m.DEFAULT_LR["sgd"], AutoController(retreat=0.5))
    return m.Method(VARIANT, "selftune", "sgd", build, len(SEEDS), m.DEFAULT_LR["sgd"])


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    """One run of row ``job[1]`` on the workload of label ``job[0]`` (``<name> x<factor>``)."""
    return steps_row(method(job[1]), job, workload_of(job[0]))


def same_runs(runs: list[dict[str, Any]], labels: list[str]) -> str:
    """How many of the variant's runs on ``labels`` are ``auto``'s own (the same steps to the
    target and the same final rate: a range test that never retreated from a rollback)."""
    key = ("steps_to_target", "final_lr")
    mine = {(r["workload"], r["seed"]): [r[k] for k in key] for r in runs if r["row"] == VARIANT}
    theirs = {(r["workload"], r["seed"]): [r[k] for k in key] for r in runs if r["row"] == TUNED}
    pairs = [k for k in mine if k[0] in labels and k in theirs]
    same = sum(mine[k] == theirs[k] for k in pairs)
    return f"On {', '.join(labels)}: the variant ran as `{TUNED}` in {same} of {len(pairs)} runs.\n"


def main() -> None:
    jobs = [(w, VARIANT, s) for w in LABELS for s in SEEDS]
    jobs += [(w, row, s) for w in NEW for s in SEEDS for row in (*grid("sgd"), TUNED, VARIANT)]
    if sys.argv[1:2] == ["--trace"]:
        from probe_grid import trace

        label, row, seed = sys.argv[2:]
        out = HERE / f"trace-{label.replace(' ', '-')}-{row}-{seed}.txt"
        trace(workload_of(label), method(row), int(seed), out)
        return
    runs = command(run, jobs, HERE)
    assert runs is not None
    before = json.loads((HERE.parent / "batch-size" / "results.json").read_text(encoding="utf-8"))
    runs += [r for r in before if r["row"] in (*grid("sgd"), TUNED)]
    columns = [*grid("sgd"), TUNED, VARIANT]
    text = "\n".join(
        oracle_table(runs, labels, columns, grid("sgd"), (TUNED, VARIANT))
        for labels in (LABELS, NEW)
    )
    text += "\n" + same_runs(runs, NEW)
    (HERE / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
