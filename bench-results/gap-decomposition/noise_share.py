"""Does the gradient's noise share say where the best rate lies against the range test's crossing?

The range test's crossing (``auto``'s rate after 50 steps from the default rate, ``later.md``'s
"auto after 0") lands from 0.15x to 11x the grid's best constant rate ``lr*``, and the bar needs
it within half a grid step. McCandlish et al. (2018) put the best rate at a batch ``b`` at
``ε_max / (1 + B_noise / b)``: if the crossing read ``ε_max`` (or a fixed multiple of it), the
pairs whose batch is small against their noise scale would be those whose crossing stands far
above ``lr*``, and ``crossing / (1 + B_noise / b)`` would be a fixed multiple of ``lr*``. This
script measures ``B_noise`` on the eighteen pairs of ``run.py`` to say whether that holds: a
settle that read the noise scale in the run (it would need two batch sizes at one point:
per-rank gradients before DDP's all-reduce, or the micro-batches of gradient accumulation) is
worth building only if it does.  The seven pairs with an oracle of the held-out workloads are
read too, with the factors chosen on the eighteen.

For each pair and seed 0-2, the plain base optimizer at ``lr*`` trains from the benchmark's
initialisation on its batches, and at steps 25 (where the range test ends) and 200 (the run's
middle stretch) ``B_noise`` is measured as ``../batch-size/noise.py`` measures it (``DRAWS``
pairs of gradients of the benchmark's batch and of one 16x larger, at the held weights). The
crossing is read off ``later.json``, and for the held-out pairs (which ``later.py`` did not
run) measured here as ``later.py`` measures it.  No rule of ``auto`` is made from it.

Run from the repository root (about 21 minutes on two cores):
``SELFTUNE_CACHE=.cache python bench-results/gap-decomposition/noise_share.py``; writes
``noise_share.json`` (rows as runs end; those already there are kept) and ``noise_share.md``
next to this file; ``--table`` remakes the table only.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "src"), str(HERE), str(HERE.parent), str(HERE.parent / "batch-size")]

from finder import HALF_STEP  # noqa: E402
from later import auto_rate  # noqa: E402
from noise import measure  # noqa: E402
from probe_grid import run_rows  # noqa: E402
from run import SEEDS, page, pairs  # noqa: E402

from selftune.bench.runner import one_thread  # noqa: E402
from selftune.bench.workloads import WORKLOADS  # noqa: E402

POINTS = (25, 200)
DRAWS = 128  #: half ``noise.py``'s: the transformer's 16x batch takes most of the time
OUT = HERE / "noise_share.json"
Job = tuple[str, str, float, int]  #: workload, base, lr*, seed


def one(job: Job) -> dict[str, Any]:
    """``B_noise`` along the pair's run at ``lr*``; for a held-out pair (not in ``later.json``)
    also the crossing: ``auto``'s rate after 50 steps from the default rate, as ``later.py``
    reads it."""
    name, base, rate, seed = job
    row = {"base": base, **measure(name, seed, rate, base, POINTS, DRAWS)}
    if WORKLOADS[name].held_out:
        with one_thread():
            row["crossing"] = auto_rate(name, base, seed, 0)
    return row


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties given their mean rank)."""

    def ranks(v: list[float]) -> list[float]:
        ordered = sorted(v)
        return [(ordered.index(x) + len(v) - 1 - ordered[::-1].index(x)) / 2 for x in v]

    return statistics.correlation(ranks(xs), ranks(ys))


def run_pairs(
    run: Callable[[Any], dict[str, Any]], out: Path, jobs: list[Any], extra: str | None = None
) -> None:
    """Add to ``out`` the rows of ``run`` for the jobs (workload, base, ``lr*``, seed) whose
    (workload, base, seed) it lacks, two processes at a time, each row written as it comes
    (:func:`probe_grid.run_rows`); ``extra``: a field of the rows that a fifth entry of each
    job sets, telling apart rows of one pair and seed."""
    kept = json.loads(out.read_text(encoding="utf-8")) if out.exists() else []
    done = {(r["workload"], r["base"], r["seed"], r.get(extra)) for r in kept}
    todo = [j for j in jobs if (j[0], j[1], j[3], j[4] if extra else None) not in done]
    run_rows(run, todo, out, kept=kept)


Cell = tuple[str, str, float, int, dict[int, float], float]


def cells_of(rows: list[dict[str, Any]], found: list[tuple[str, str, float]]) -> list[Cell]:
    """Per pair measured: name, base, ``lr*``, batch, ``B_noise`` at each point and the crossing
    over ``lr*`` (medians over seeds); the crossing read off ``later.json`` where it has the
    pair, else off the rows' own ``crossing`` (the held-out pairs, measured here)."""
    later = json.loads((HERE / "later.json").read_text(encoding="utf-8"))
    crossing = {
        (r["workload"], r["base"]): statistics.median(r["rates"])
        for r in later
        if r["warm"] == 0 and r["kind"] == "auto"
    }
    cells = []
    for name, base, best in found:
        mine = [r for r in rows if (r["workload"], r["base"]) == (name, base)]
        if not mine:
            continue
        scale = {p: statistics.median(r["noise_scale"][str(p)] for r in mine) for p in POINTS}
        rate = crossing.get((name, base)) or statistics.median(r["crossing"] for r in mine)
        cells.append((name, base, best, mine[0]["batch"], scale, rate / best))
    return cells


def share(cell: Cell, p: int) -> float:
    """``1 + B_noise / b`` at step ``p`` (``B_noise`` below zero read as zero)."""
    return 1 + max(cell[4][p], 0.0) / cell[3]


def within(values: list[float]) -> int:
    """How many of ``values`` (multiples of ``lr*``) lie within half a grid step of 1."""
    return sum(1 / HALF_STEP <= v <= HALF_STEP for v in values)


def table(
    rows: list[dict[str, Any]],
    found: list[tuple[str, str, float]],
    held: list[tuple[str, str, float]],
) -> str:
    """Per pair: ``B_noise`` at each point (median over seeds), the crossing as a multiple of
    ``lr*``, and the crossing over the noise share as a multiple of ``lr*`` over its median across
    the pairs not held out, the fixed factor a settle would need (chosen on those pairs: on them
    the most this reading could give); then the counts, with a second reading that also fits the
    power of the share (a least-squares line of log(crossing / lr*) on log(1 + B_noise / b)).
    The held-out pairs are read with the factors and lines chosen on the others."""
    tuning, others = cells_of(rows, found), cells_of(rows, held)
    raw = statistics.median(c[5] for c in tuning)
    centre = {p: statistics.median(c[5] / share(c, p) for c in tuning) for p in POINTS}
    ys = [math.log(c[5]) for c in tuning]
    xs = {p: [math.log(share(c, p)) for c in tuning] for p in POINTS}
    fit = {p: statistics.linear_regression(xs[p], ys) for p in POINTS}

    def fixed(c: Cell, p: int) -> float:  # the crossing over the share, over its factor
        return c[5] / share(c, p) / centre[p]

    def line(c: Cell, p: int) -> float:  # the crossing over the fitted power of the share
        return c[5] / math.exp(fit[p].slope * math.log(share(c, p)) + fit[p].intercept)

    heads = " | ".join(f"`B_noise` at {p}" for p in POINTS)
    over = " | ".join(f"crossing / (1 + B_noise/b) at {p}, over its median" for p in POINTS)
    lines = [
        f"| workload | base | lr* | b | {heads} | crossing / lr* | {over} |",
        "|---|---|---|---|" + "---|" * (2 * len(POINTS) + 1),
    ]
    for c in tuning + others:
        name = f"{c[0]} (held out)" if c in others else c[0]
        noise = " | ".join(f"{c[4][p]:.0f}" for p in POINTS)
        placed = " | ".join(f"{fixed(c, p):.2g}x" for p in POINTS)
        lines.append(f"| {name} | {c[1]} | {c[2]:g} | {c[3]} | {noise} | {c[5]:.2g}x | {placed} |")
    ratios = [c[5] for c in tuning]
    lines += [
        "",
        f"Of {len(tuning)} pairs not held out, the crossing over its own median across them lands"
        f" within half a grid step of lr* on {within([r / raw for r in ratios])} (as shipped:"
        f" {within(ratios)}; spread {max(ratios) / min(ratios):.0f}x, the most to the least)."
        + "".join(
            f" Divided by the noise share at step {p}: {within([fixed(c, p) for c in tuning])}"
            f" (spread {max(r := [c[5] / share(c, p) for c in tuning]) / min(r):.0f}x);"
            f" Spearman's correlation of log(crossing / lr*) with log(1 + B_noise/b)"
            f" {spearman(ys, xs[p]):+.2f}; by the least-squares power of the share (fitted here:"
            f" {fit[p].slope:.2f}, where McCandlish et al.'s form gives 1):"
            f" {within([line(c, p) for c in tuning])}."
            for p in POINTS
        ),
    ]
    if others:
        lines += [
            "",
            f"Of {len(others)} held-out pairs, with the factors and lines chosen on the others: the"
            f" crossing as shipped {within([c[5] for c in others])}, over its median"
            f" {within([c[5] / raw for c in others])}"
            + "".join(
                f"; over the share at step {p} {within([fixed(c, p) for c in others])}, over its"
                f" fitted power {within([line(c, p) for c in others])}"
                for p in POINTS
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def command_line() -> tuple[list[tuple[str, str, float]], list[tuple[str, str, float]], list[Job]]:
    """The pairs not held out and the held-out ones, (workload, base, ``lr*``), and the jobs to
    run over seeds 0-2: none with ``--table``, which remakes the table alone."""
    workloads = page()
    found, held = pairs(workloads), pairs(workloads, held_out=True)
    if sys.argv[1:] not in ([], ["--table"]):
        raise SystemExit(f"usage: {sys.argv[0]} [--table]")
    jobs = [] if sys.argv[1:] else [(n, b, lr, s) for n, b, lr in found + held for s in SEEDS]
    return found, held, jobs


def main() -> None:
    found, held, jobs = command_line()
    run_pairs(one, OUT, jobs)
    text = table(json.loads(OUT.read_text(encoding="utf-8")), found, held)
    (HERE / "noise_share.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
