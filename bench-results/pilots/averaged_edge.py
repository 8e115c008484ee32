"""Does the weight average move the best fixed rate to the edge of what still reaches the target?

Run from the repository root: ``python bench-results/pilots/averaged_edge.py`` (reads
``bench-results/results.jsonl``, trains nothing).  For each workload and base, and for the plain
grid and the grid evaluated at the weight average (``-avg``), it finds the oracle (the member
with the lowest median steps to the target) and asks whether its rate is the *largest* rate of
its schedule whose median reaches the target, i.e. whether the next rate up the grid (3x) misses.
Printed per pair, and counted; writes ``averaged_edge.json`` next to this file.  A lead for a
controller paired with an average: if the averaged oracle sits at the edge where the plain one
does not, the average wants the largest stable rate rather than the greedy one ``auto``'s range
test finds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selftune.bench.report import INF, summarise
from selftune.bench.runner import read_results
from selftune.bench.workloads import WORKLOADS

RESULTS = Path(__file__).parents[1] / "results.jsonl"
#: the workloads this was read on, those before the one named (in the benchmark's order): those
#: added since are left out, so the committed counts stay the ones this script makes
READ_ON = tuple(WORKLOADS)[: list(WORKLOADS).index("moons-deep-tanh")]


def at_edge(rows: list, oracle: Any) -> bool:
    """Whether no member of the oracle's schedule above its rate reaches the target."""
    schedule = oracle.method.split("-")[2]  # <base>-grid-<schedule>-<lr>[-avg]
    above = [
        r
        for r in rows
        if r.method.split("-")[2] == schedule and r.lr0 is not None and r.lr0 > oracle.lr0
    ]
    return all(r.steps == INF for r in above)


def main() -> None:
    workloads = summarise([r for r in read_results(RESULTS) if r["workload"] in READ_ON])
    out, counts = [], {"grid": [0, 0], "grid-avg": [0, 0]}
    for w in workloads.values():
        for base in ("sgd", "adamw"):
            row = {"workload": w.name, "base": base}
            for family in ("grid", "grid-avg"):
                oracle = w.oracle(base, family)
                if oracle is None:
                    continue
                members = [r for r in w.rows.values() if r.family == family and r.base == base]
                edge = at_edge(members, oracle)
                row[family] = {"oracle": oracle.method, "steps": oracle.steps, "at_edge": edge}
                counts[family][0] += edge
                counts[family][1] += 1
            out.append(row)
            print(row)
    for family, (edge, total) in counts.items():
        print(f"{family}: the oracle is the largest rate that reaches the target on {edge}/{total}")
    path = Path(__file__).with_name("averaged_edge.json")
    path.write_text(json.dumps({"pairs": out, "counts": counts}, indent=2) + "\n")


if __name__ == "__main__":
    main()
