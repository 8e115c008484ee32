"""Split `auto`'s gap to the oracle into its parts: the rate it settles on, and what its cruise
does at a rate that is right.

Run from the repository root: ``python bench-results/gap-decomposition/run.py [--jobs 2]``
(``--table`` runs nothing and makes ``table.md`` from the committed rows).  Two readings:

1. From ``../results.jsonl`` alone (no runs): per pair, the grid's best *constant* rate against
   the oracle (the best member, constant or cosine over the budget): what knowing the budget's
   decay is worth on these workloads; and the constant members a factor of 3 below and above
   it (the grid's step), in multiples of its steps: how near the best rate a settle must land.
2. Runs, seeds 0-2, on every pair with an oracle of the workloads not held out (the held-out
   ones are not touched: a rule could be read off them), at that best constant rate ``lr*``:
   ``const-best`` (the plain optimizer at ``lr*``, re-run here so that the comparison is on one
   machine), ``cruise-from-best`` (``auto`` with ``range_test=False``: its cruise, guard and
   metric rule start at ``lr*``) and ``auto-from-best`` (``auto`` as shipped, started at
   ``lr*``: does its range test leave a rate that is already right?); and the cruise started at
   ``lr*`` times 1/3, 1/sqrt(3), sqrt(3) and 3 (``cruise-at-*``): how near ``lr*`` a settle
   must land; and the cruise from ``lr*`` evaluated at its weight average
   (``cruise-avg-from-best``), against the averaged grid's best.  Rows go to
   ``results.jsonl`` here; ``table.md`` is made from them.  The last column sets the cruise
   against the committed oracle's median, whose rows are of the same seeds (0-2) but were run
   on another machine (the README of ``../pilots/``, 64: float rounding moves trajectories).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))

from selftune.bench import methods as m  # noqa: E402
from selftune.bench.report import INF, Row, Workload, _fastest, summarise  # noqa: E402
from selftune.bench.runner import one_thread, read_results, train  # noqa: E402
from selftune.bench.workloads import WORKLOADS  # noqa: E402
from selftune.controllers.auto import AutoController  # noqa: E402

MAIN = ("const-best", "cruise-from-best", "auto-from-best")
#: the cruise started off ``lr*`` by half a grid step and a whole one, each way: how near it
#: the settle must land for the cruise to meet the bar
OFF = {
    "cruise-at-0.33": 1 / 3,
    "cruise-at-0.58": 3**-0.5,
    "cruise-at-1.73": 3**0.5,
    "cruise-at-3": 3.0,
}
#: the cruise from ``lr*`` evaluated at its weight average (``average=True``), for the bar at
#: the average: the averaged grid's best member
AVERAGED = "cruise-avg-from-best"
ARMS = (*MAIN, *OFF, AVERAGED)
#: workloads added to the benchmark after this decomposition was measured: none of its runs
#: are here, so its scripts leave them out of the page they read (:func:`page`)
LATER = ("swissroll-diffusion",)
SEEDS = (0, 1, 2)


def page() -> dict[str, Workload]:
    """The benchmark page's workloads, summarised from its results, but those added since this
    decomposition was measured (``LATER``)."""
    workloads = summarise(read_results(ROOT / "bench-results" / "results.jsonl"))
    return {name: w for name, w in workloads.items() if name not in LATER}


def best_of(w: Workload, base: str, schedule: str) -> Row | None:
    """The grid member of ``schedule`` ("const" or "cos") with the fewest median steps (ties
    broken as the oracle's are)."""
    rows = [r for r in w.grid(base) if f"-{schedule}-" in r.method and r.steps < INF]
    return _fastest(rows) if rows else None


def pairs(workloads: dict[str, Workload], held_out: bool = False) -> list[tuple[str, str, float]]:
    """(workload, base, lr*) for every pair that has an oracle, of the workloads not held out
    (or, ``held_out``, of those held out)."""
    out = []
    for w in workloads.values():
        for base in ("sgd", "adamw"):
            const = best_of(w, base, "const")
            if w.held_out == held_out and const is not None and const.lr0 is not None:
                out.append((w.name, base, const.lr0))
    return out


def method(arm: str, base: str, lr: float) -> m.Method:
    """The benchmark method of ``arm`` for a pair whose best constant rate is ``lr``."""
    start = lr * OFF.get(arm, 1.0)
    if arm == "const-best":
        build = m._plain(base, start, "const")
    elif arm == "auto-from-best":
        build = m._selftune(base, start, "auto")
    elif arm == AVERAGED:
        build = m._selftune(base, start, AutoController(range_test=False), average=True)
    else:
        build = m._selftune(base, start, AutoController(range_test=False))
    return m.Method(f"{arm}-{base}", arm, base, build, len(SEEDS), start)


def one(job: tuple[str, str, str, float, int]) -> dict[str, Any]:
    workload, arm, base, lr, seed = job
    with one_thread():
        return train(WORKLOADS[workload], method(arm, base, lr), seed)


def _member(row: Row | None) -> str:
    return f"{row.method}: {row.steps:g}" if row else "miss"


def _steps(median: float, hits: int) -> str:
    return f"{median:g} ({hits}/{len(SEEDS)})" if median < INF else f"miss ({hits}/{len(SEEDS)})"


def _neighbours(w: Workload, base: str, const: Row) -> list[float | None]:
    """The constant grid's members a factor of the grid's step (3) below and above ``const``,
    as multiples of its median steps (infinite: a miss; None: no such member): how far from the
    best rate a constant one may be."""
    grid = {r.lr0: r for r in w.grid(base) if "-const-" in r.method}
    rates = sorted(grid)
    at = rates.index(const.lr0)
    return [
        grid[rates[j]].steps / const.steps if 0 <= j < len(rates) else None
        for j in (at - 1, at + 1)
    ]


def _ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}x" if value < INF else "miss"


def decay_table(workloads: dict[str, Workload]) -> list[str]:
    """Per pair with an oracle: the oracle, the best constant and cosine members, the constant
    one against the oracle and its neighbours in the grid; then the counts the README quotes."""
    lines = [
        "| workload | base | oracle | best constant | best cosine | constant × oracle | "
        "constant / 3 | constant × 3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    to_oracle, below, above = [], [], []
    for w in workloads.values():
        for base in ("sgd", "adamw"):
            oracle, const, cos = w.oracle(base), best_of(w, base, "const"), best_of(w, base, "cos")
            if oracle is None or const is None:
                continue
            to_oracle.append(const.steps / oracle.steps)
            near = _neighbours(w, base, const)
            below += [r for r in near[:1] if r is not None]
            above += [r for r in near[1:] if r is not None]
            members = " | ".join(_member(r) for r in (oracle, const, cos))
            cells = " | ".join(_ratio(r) for r in [to_oracle[-1], *near])
            lines.append(f"| {w.label} | {base} | {members} | {cells} |")
    others = [r for r in to_oracle if r > 1.0]
    lines += [
        "",
        f"The best constant member needs the oracle's steps on {len(to_oracle) - len(others)} "
        f"pairs of {len(to_oracle)}, {min(others):.2f}-{max(others):.2f}x on the others. One "
        f"grid step below it: {statistics.median(below):.2f}x its steps in median over "
        f"{len(below)} pairs; one above: a miss on {sum(r == INF for r in above)} of "
        f"{len(above)}.",
    ]
    return lines


def _median(records: list[dict[str, Any]]) -> tuple[float, int]:
    steps = [r["steps_to_target"] or INF for r in records]
    return statistics.median(steps), sum(s < INF for s in steps)


def _arms(rows: list[dict[str, Any]], name: str, base: str) -> dict[str, tuple[float, int]]:
    """Each arm's median steps and hits on one pair."""
    got = {}
    for arm in ARMS:
        recs = [r for r in rows if r["workload"] == name and r["method"] == f"{arm}-{base}"]
        got[arm] = _median(recs) if recs else (INF, 0)
    return got


def rate_after(record: dict[str, Any], step: int = 50) -> float | None:
    """A run's rate at its first evaluation from ``step`` on (None: it had stopped before):
    where a range test left it, as ``../pilots/gap.py --start`` reads it."""
    curves = record["curves"]
    return next((lr for s, lr in zip(curves["step"], curves["lr"], strict=True) if s >= step), None)


def _times(steps: float, base: float) -> str:
    return f"{steps / base:.2f}x" if steps < INF and base < INF else "–"


def runs_table(workloads: dict[str, Workload], rows: list[dict[str, Any]]) -> list[str]:
    """The three arms at ``lr*``, against the constant rate and the oracle; ``auto``'s rate at
    step 50 from ``lr*`` (median over seeds, as a multiple of ``lr*``); then the counts."""
    lines = [
        "| workload | base | lr* | const-best | cruise-from-best | auto-from-best | "
        "cruise × const | auto × const | cruise × oracle | auto-from-best's rate at 50 / lr* |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    to_const, to_oracle, shipped = [], [], 0
    for name, base, lr in pairs(workloads):
        got, w = _arms(rows, name, base), workloads[name]
        const, cruise = got["const-best"][0], got["cruise-from-best"][0]
        oracle = w.oracle(base)
        steps = oracle.steps if oracle else INF
        to_const.append(cruise / const)
        to_oracle.append(cruise / steps)
        auto = w.rows.get(f"selftune-auto-{base}")
        shipped += auto is not None and auto.steps <= steps
        ratios = [_times(got[a][0], const) for a in MAIN[1:]] + [_times(cruise, steps)]
        after = [
            rate / lr
            for r in rows
            if r["workload"] == name and r["method"] == f"auto-from-best-{base}"
            if (rate := rate_after(r)) is not None
        ]
        moved = f"{statistics.median(after):.2g}x" if after else "–"
        cells = " | ".join(_steps(*got[a]) for a in MAIN)
        lines.append(f"| {name} | {base} | {lr:g} | {cells} | {' | '.join(ratios)} | {moved} |")
    n = len(to_const)
    lines += [
        "",
        f"The cruise from lr*: within 1.0x the constant rate on {sum(r <= 1.0 for r in to_const)} "
        f"pairs of {n}, within 1.15x on {sum(r <= 1.15 for r in to_const)}; within 1.0x the "
        f"oracle on {sum(r <= 1.0 for r in to_oracle)}, within 1.25x on "
        f"{sum(r <= 1.25 for r in to_oracle)}. auto as shipped (the committed rows, from the "
        f"default rate): within 1.0x the oracle on {shipped}.",
    ]
    return lines


def tolerance_table(workloads: dict[str, Workload], rows: list[dict[str, Any]]) -> list[str]:
    """The cruise's steps from each start around ``lr*``, as multiples of the oracle's, and how
    many pairs each start brings within 1.0x and 1.25x of it."""
    starts = [
        "cruise-at-0.33",
        "cruise-at-0.58",
        "cruise-from-best",
        "cruise-at-1.73",
        "cruise-at-3",
    ]
    factors = [OFF.get(a, 1.0) for a in starts]
    lines = [
        "| workload | base | " + " | ".join(f"lr* × {f:.2g}" for f in factors) + " |",
        "|---|---|" + "---|" * len(starts),
    ]
    within = {a: [0, 0] for a in starts}
    for name, base, _ in pairs(workloads):
        got, oracle = _arms(rows, name, base), workloads[name].oracle(base)
        cells = []
        for a in starts:
            ratio = got[a][0] / oracle.steps if oracle else INF
            within[a][0] += ratio <= 1.0
            within[a][1] += ratio <= 1.25
            cells.append(f"{_times(got[a][0], oracle.steps if oracle else INF)} ({got[a][1]}/3)")
        lines.append(f"| {name} | {base} | {' | '.join(cells)} |")
    n = len(lines) - 2
    lines.append(
        f"| within 1.0x / 1.25x (of {n}) | | "
        + " | ".join(f"{a} / {b}" for a, b in within.values())
        + " |"
    )
    return lines


def averaged_table(workloads: dict[str, Workload], rows: list[dict[str, Any]]) -> list[str]:
    """The averaged cruise from ``lr*`` against the averaged oracle, beside ``auto -avg`` as
    shipped (the committed rows, from the default rate)."""
    lines = [
        "| workload | base | averaged oracle | cruise-avg-from-best | × averaged oracle | "
        "auto -avg as shipped × averaged oracle |",
        "|---|---|---|---|---|---|",
    ]
    within, shipped_within = 0, 0
    for name, base, _ in pairs(workloads):
        got, w = _arms(rows, name, base), workloads[name]
        oracle = w.oracle(base, "grid-avg")
        steps = oracle.steps if oracle else INF
        shipped = w.rows.get(f"selftune-auto-{base}-avg")
        shipped_steps = shipped.steps if shipped else INF
        within += got[AVERAGED][0] <= steps
        shipped_within += shipped_steps <= steps
        lines.append(
            f"| {name} | {base} | {_member(oracle)} | {_steps(*got[AVERAGED])} | "
            f"{_times(got[AVERAGED][0], steps)} | {_times(shipped_steps, steps)} |"
        )
    n = len(lines) - 2
    lines += [
        "",
        f"Within 1.0x the averaged oracle: the cruise {within} of {n}, auto -avg as shipped "
        f"{shipped_within}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only make the tables")
    args = parser.parse_args()
    workloads = page()
    out = HERE / "results.jsonl"
    if not args.table:
        done = (
            {(r["workload"], r["method"], r["seed"]) for r in read_results(out)}
            if out.exists()
            else set()
        )
        jobs = [
            (name, arm, base, lr, seed)
            for name, base, lr in pairs(workloads)
            for arm in ARMS
            for seed in SEEDS
            if (name, f"{arm}-{base}", seed) not in done
        ]
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for record in pool.map(one, jobs):
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(
                    record["workload"],
                    record["method"],
                    record["seed"],
                    record["steps_to_target"],
                    flush=True,
                )
    rows = read_results(out) if out.exists() else []
    table = [
        "## What the budget's decay is worth (the committed grid)",
        "",
        *decay_table(workloads),
    ]
    table += ["", "## `auto` at the best constant rate (seeds 0-2, this machine)", ""]
    table += runs_table(workloads, rows)
    table += ["", "## The cruise from starts around the best constant rate (× the oracle)", ""]
    table += tolerance_table(workloads, rows)
    table += ["", "## The cruise from the best constant rate, evaluated at its average", ""]
    table += averaged_table(workloads, rows)
    (HERE / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
