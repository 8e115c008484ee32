"""Does the best constant rate depend on the target? Read off the committed grid (no runs).

Run from the repository root: ``python bench-results/gap-decomposition/targets.py``; it reads
``bench-results/results.jsonl`` and prints the tables ``targets.md`` holds.

Issue 7's bar is the oracle's steps to each workload's target, and the settle has to land within
about half a grid step of the best constant rate for it (``README.md`` here).  That rate is the
one that reaches *that* level soonest: a rate that gets to an easy level first may leave a
noise floor above a hard one.  A controller is not told the target.  So for each pair this
script moves the target along the way from where the runs start to the benchmark's target
(half, three quarters, nine tenths and all of the way, on the metric's own scale) and reads,
from the same committed runs, the constant rates of the grid tied for the fewest steps to each
level, and the steps of ``auto`` (at the default rate) against the oracle (the best grid
member, constant or cosine) for each level.  Every step count is a median over the seeds, a
miss counting as infinitely many, as the benchmark counts them; a level is reached at the
first evaluation that meets it, so a level the oracle reaches at its first evaluation cannot
tell rates apart (the output says how many evaluations the oracle took to each).
"""

from __future__ import annotations

import math
import statistics
import sys
from typing import Any

from run import page

from selftune.bench.report import INF, Row, Workload

#: how far along the way from the starting metric to the benchmark's target each level lies (a
#: quarter of the way is reached at the first evaluation or two, too coarse to tell rates apart)
FRACTIONS = (0.5, 0.75, 0.9, 1.0)


def start(w: Workload) -> float:
    """The metric where the runs start: the median over the grid's runs of the first evaluation."""
    firsts = [r["curves"]["metric"][0] for row in w.rows.values() for r in row.records]
    return statistics.median(v for v in firsts if v is not None and math.isfinite(v))


def level(w: Workload, fraction: float) -> float:
    m0 = start(w)
    return m0 + fraction * (w.target - m0)


def steps_to(row: Row, w: Workload, value: float) -> float:
    """Median over seeds of the first evaluation step whose metric meets ``value``."""

    def first(record: dict[str, Any]) -> float:
        curves = record["curves"]
        for step, metric in zip(curves["step"], curves["metric"], strict=True):
            if metric is not None and (metric >= value if w.higher_is_better else metric <= value):
                return float(step)
        return INF

    return statistics.median(first(r) for r in row.records)


def fastest(rows: list[Row], w: Workload, value: float) -> tuple[list[Row], float]:
    """The rows tied for the fewest median steps to ``value``, and those steps."""
    steps = {r.method: steps_to(r, w, value) for r in rows}
    least = min(steps.values(), default=INF)
    return ([r for r in rows if steps[r.method] == least] if least < INF else []), least


def _rates(rows: list[Row]) -> str:
    """A tied set of grid members as the span of their rates."""
    if not rows:
        return "-"
    rates = sorted(r.lr0 or 0.0 for r in rows)
    return f"{rates[0]:g}" if len(rates) == 1 else f"{rates[0]:g}-{rates[-1]:g}"


def table(workloads: dict[str, Workload]) -> tuple[str, str, str, dict[str, Any]]:
    """Per pair: the best constant rates per level; the rate best for the easiest level and for
    the target, each at the other's level; and ``auto``'s steps over the oracle's per level."""
    head = " | ".join(f"{f:g}" for f in FRACTIONS)
    rule = "|---" * (len(FRACTIONS) + 1) + "|"
    rates, ratios = [f"| pair | {head} |", rule], [f"| pair | {head} |", rule]
    swaps = [
        "| pair | best for half the way, to the target | best for the target, to half the way |",
        "|---|---|---|",
    ]
    counts: dict[str, Any] = {
        "pairs": 0,
        "no one rate best at every level": 0,
        "no one rate best at 0.9 and at 1": 0,
    }
    evaluations: list[list[float]] = [[] for _ in FRACTIONS]
    counts.update({f"auto within 1.0x the oracle at {f:g}": 0 for f in FRACTIONS})
    costs: list[list[float]] = [[], []]
    for name, w in sorted(workloads.items()):
        for base in ("adamw", "sgd"):
            grid = w.grid(base)
            const = [r for r in grid if "-const-" in r.method]
            auto = w.rows.get(f"selftune-auto-{base}")
            if not const or auto is None or w.oracle(base) is None:
                continue
            counts["pairs"] += 1
            label = f"{name}{' (held out)' if w.held_out else ''} {base}"
            tied, cells = [], []
            for f in FRACTIONS:
                value = level(w, f)
                tied.append(fastest(const, w, value)[0])
                oracle = fastest(grid, w, value)[1]
                evaluations[FRACTIONS.index(f)].append(oracle / w.eval_every)
                mine = steps_to(auto, w, value)
                counts[f"auto within 1.0x the oracle at {f:g}"] += mine <= oracle
                cells.append("miss" if mine == INF else f"{mine / oracle:.2f}x")
            common = set.intersection(*({r.method for r in t} for t in tied))
            counts["no one rate best at every level"] += not common
            late = {r.method for r in tied[-2]} & {r.method for r in tied[-1]}
            counts["no one rate best at 0.9 and at 1"] += not late
            rates.append(f"| {label} | " + " | ".join(_rates(t) for t in tied) + " |")
            ratios.append(f"| {label} | " + " | ".join(cells) + " |")
            pair = []
            for mine_at, other in ((0, -1), (-1, 0)):  # the first level's best at the target's
                value = level(w, FRACTIONS[other])
                held = min(steps_to(r, w, value) for r in tied[mine_at]) if tied[mine_at] else INF
                cost = held / fastest(const, w, value)[1]
                costs[mine_at != 0].append(cost)
                pair.append("miss" if cost == INF else f"{cost:.2f}x")
            swaps.append(f"| {label} | {pair[0]} | {pair[1]} |")
    counts["the oracle's evaluations to each level, median over pairs (range)"] = ", ".join(
        f"{f:g}: {statistics.median(e):g} ({min(e):g}-{max(e):g})"
        for f, e in zip(FRACTIONS, evaluations, strict=True)
    )
    for i, what in enumerate(("the half-way rate to the target", "the target's rate half way")):
        counts[f"{what}: median, slower on"] = (
            f"{statistics.median(costs[i]):.2f}x, {sum(c > 1 for c in costs[i])} pairs"
        )
    return "\n".join(rates), "\n".join(swaps), "\n".join(ratios), counts


def main() -> int:
    workloads = page()
    rates, swaps, ratios, counts = table(workloads)
    print("The grid's best constant rates for each level (a fraction of the way to the target):")
    print(f"\n{rates}\n")
    print("Each of those rates held to the other level, its steps over that level's best rate's:")
    print(f"\n{swaps}\n")
    print("`auto` at the default rate, its median steps over the oracle's, for each level:")
    print(f"\n{ratios}\n")
    print("\n".join(f"- {k}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
