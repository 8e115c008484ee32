"""Pilot 49's count: the `auto` runs whose rate reached 1000x its start, the old default bound.

Run from the repository root with the full suite before pilot 49:
``git show b958cd4~1:bench-results/results.jsonl > /tmp/before.jsonl`` and
``python bench-results/pilots/49-upper-bound-five-decades/bound_hits.py /tmp/before.jsonl``.
Prints each (workload, method) cell with a run whose recorded rate (at every evaluation) reached
the bound, its steps to target per seed, and the counts of cells and runs.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

OLD_BOUND = 1e3  #: the factor on the starting rate that pilot 49 raised to 1e5


def main() -> None:
    cells: dict[tuple[str, str], list[tuple[int, int | None]]] = defaultdict(list)
    for line in Path(sys.argv[1]).read_text().splitlines():
        r = json.loads(line)
        if not r["method"].startswith("selftune-auto-") or r["lr0"] is None:
            continue
        rates = [x for x in r["curves"]["lr"] if x is not None]
        if rates and max(rates) >= r["lr0"] * OLD_BOUND * (1 - 1e-6):
            cells[r["workload"], r["method"]].append((r["seed"], r["steps_to_target"]))
    for (workload, method), hits in sorted(cells.items()):
        print(f"{workload} {method}: " + ", ".join(f"seed {s} {t}" for s, t in sorted(hits)))
    print(f"{len(cells)} cells, {sum(map(len, cells.values()))} runs")


if __name__ == "__main__":
    main()
