"""`auto` over SGD at momentum 0.5 and none, its alignment read against past updates filtered to
the memory of momentum 0.9.

`auto`'s range test reads the sign of the cosine between the new gradient and the last applied
update. At momentum 0.9 that update is a 10-step average of gradients, in which the bounce
across a valley cancels and the descent along it adds up, so the cosines stay positive up to
the edge of stability; with less momentum the bounce is more of the update, and on the Friedman
regression at momentum 0.5 the cosines read -0.5 to -0.7 at a rate the grid found best
(``README.md``). If that is the cause, reading the gradient against the updates averaged with
decay ``d = 1 - 0.1 / (1 - μ)`` (0.8 at momentum 0.5, 0.9 at none, 0 at 0.9), so that update and
average together remember gradients as momentum 0.9 does, should give back the missed runs.

The variant turns, for this probe only, the tracker's record of the last update
(:meth:`selftune.signals.SignalTracker.before_update`, wrapped) into that average, for param
groups with a ``momentum`` and no ``betas``; nothing else changes. Rows: ``grid.py``'s
``selftune-auto-sgd-m0.5`` and ``../bases/``'s ``selftune-auto-sgd0``, seeds 0-4, on the same
four workloads. Run from the repository root (about five minutes on two cores):
``SELFTUNE_CACHE=.cache PYTHONPATH=src python bench-results/momentum-factor/filtered.py``;
writes ``filtered.json`` and ``filtered.md`` (median steps and hits beside the unfiltered
rows'); ``--table`` remakes the table.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "bases"), str(HERE.parent)]

import bases  # noqa: E402
import grid  # noqa: E402
from probe_grid import median_steps  # noqa: E402

from selftune import signals  # noqa: E402

ROWS = {
    "selftune-auto-sgd-m0.5": (grid, HERE),
    "selftune-auto-sgd0": (bases, HERE.parent / "bases"),
}
OUT = HERE / "filtered.json"


def memory(group: dict[str, Any]) -> float:
    """The decay that, after the group's momentum, remembers gradients as momentum 0.9 does."""
    mu = group.get("momentum")
    if mu is None or "betas" in group:
        return 0.0
    return max(0.0, 1 - 0.1 / (1 - mu))


ORIGINAL = signals.SignalTracker.before_update


def before_update(self: signals.SignalTracker) -> None:
    """The tracker's own, then the decay added back: ``prev`` becomes ``θ_t + d·prev``, so that
    after the update (``prev -= θ_{t+1}``) it holds the average of the negated updates."""
    if self._prev is None:
        return ORIGINAL(self)
    kept = [[t.clone() for t in prev] for prev in self._prev]
    ORIGINAL(self)
    for old, group, has_grad, (prev, _) in zip(
        kept, self._groups, self._moved, self._moving, strict=True
    ):
        if has_grad is not None:
            old = [t for t, h in zip(old, has_grad, strict=True) if h]
        if prev:
            torch._foreach_mul_(old, memory(group))
            torch._foreach_add_(prev, old)


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    signals.SignalTracker.before_update = before_update  # type: ignore[method-assign]
    return ROWS[job[1]][0].run(job)


def main() -> None:
    """Run the rows (``--table``: read the last run's) and write the comparison."""
    if sys.argv[1:] not in ([], ["--table"]):
        raise SystemExit(f"usage: {sys.argv[0]} [--table]")
    if not sys.argv[1:]:
        jobs = [(w, row, seed) for w in grid.WORKLOADS for row in ROWS for seed in grid.SEEDS]
        with ProcessPoolExecutor(2) as pool:
            done = list(pool.map(run, jobs))
        OUT.write_text(json.dumps(done, indent=1) + "\n", encoding="utf-8")
    rows = json.loads(OUT.read_text(encoding="utf-8"))
    lines = [
        "| row | workload | unfiltered | filtered |",
        "|---|---|---:|---:|",
    ]
    for row, (_, where) in ROWS.items():
        plain = json.loads((where / "results.json").read_text(encoding="utf-8"))
        for w in grid.WORKLOADS:
            cells = []
            for runs in (plain, rows):
                steps, hits, n = median_steps(runs, w, row)
                cells.append(f"{'miss' if steps is None else f'{steps:g}'} [{hits}/{n}]")
            lines.append(f"| {row} | {w} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    (HERE / "filtered.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
