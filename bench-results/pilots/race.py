"""Would a race of three rates from one restored state, judged on the metric, move the right way?

Run from the repository root: ``python bench-results/pilots/race.py``; it reads the committed
``paired_trial.json`` (no training) and prints the tables the pilots README quotes.

``paired_trial.py`` counted two-arm comparisons (2x against 1x, 1/2x against 1x).  A controller
that tried to mend the range test's settle with it would race all three arms from one state
(one evaluation interval each, the state restored between them) and keep the best: a move of
the rate by 2x up or down, or none.  This script plays that race on the same arms: at each
probe each arm ran on two batch streams, and a race sees each arm on its own stretch of the
loop's data, so every assignment of the three arms to the two streams but the two that put all
three on one stream is counted (six per probe; the two arms that share a stream are then less
noisy against each other than a race's would be).  The right move is up from a run at 1/4 the
grid's best constant rate, none from the best rate, and down from 4 times it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from paired_trial import ARMS, PROBES, STREAMS
from same_batch import RUNS, by_pair_and_rate

JSON = Path(__file__).with_name("paired_trial.json")
#: each arm's stream: every assignment but the ones that put all three arms on one stream
ASSIGNMENTS = [a for a in itertools.product(range(STREAMS), repeat=len(ARMS)) if len(set(a)) > 1]
#: the move a race should make from a run at each rate (a factor of the grid's best)
RIGHT = {0.25: "2", 1.0: "1", 4.0: "0.5"}


def winner(metric: dict[str, list[float]], streams: tuple[int, ...], higher: bool) -> str:
    """The arm with the best metric on its stream (a non-finite metric never wins)."""

    def score(arm: str, stream: int) -> float:
        value = metric[arm][stream]
        if not math.isfinite(value):
            return -math.inf
        return value if higher else -value

    keys = [f"{arm:g}" for arm in ARMS]
    return max(zip(keys, streams, strict=True), key=lambda ks: score(*ks))[0]


def races(run: dict[str, Any], step: int, key: str) -> Counter[str]:
    """How often each arm won, over the assignments, at the probe after ``step``."""
    probe = next(p for p in run["probes"] if p["step"] == step)
    return Counter(winner(probe[key], a, run["higher_is_better"]) for a in ASSIGNMENTS)


def table(out: list[dict[str, Any]], key: str, step: int) -> str:
    """Per pair and run rate: the races won by 1/2x, 1x and 2x (over three seeds), the right
    move's count in bold; the last row sums the pairs."""
    head = " | ".join(f"run at {r:g}x best: 1/2x, 1x, 2x" for r in RUNS)
    lines = [f"| pair | {head} |", "|---" * (len(RUNS) + 1) + "|"]
    total = {rate: Counter[str]() for rate in RUNS}
    for (workload, base), by_rate in by_pair_and_rate(out).items():
        cells = []
        for rate in RUNS:
            won = sum((races(run, step, key) for run in by_rate[rate]), Counter[str]())
            total[rate] += won
            cells.append(_cell(won, rate))
        lines.append(f"| {workload} {base} | {' | '.join(cells)} |")
    lines.append(f"| all pairs | {' | '.join(_cell(total[r], r) for r in RUNS)} |")
    return "\n".join(lines)


def _cell(won: Counter[str], rate: float) -> str:
    n = sum(won.values())
    parts = [f"**{won[a]}**" if a == RIGHT[rate] else str(won[a]) for a in ("0.5", "1", "2")]
    return f"{', '.join(parts)} of {n}"


def main() -> None:
    out = json.loads(JSON.read_text(encoding="utf-8"))
    for key, what in (("metric", "the last iterate"), ("metric_avg", "the tail average")):
        for step in PROBES:
            print(f"Races after step {step}, judged at {what} ({key}):\n")
            print(table(out, key, step), end="\n\n")


if __name__ == "__main__":
    main()
