"""Which of the page's selftune runs diverged, which of those still reached the target, and
which ended no better than they started (the runs a user would call lost).

Run from the repository root:
``python bench-results/pilots/69-trouble-after-a-restart/lost_runs.py`` (reads
``bench-results/results.jsonl``; writes ``lost_runs.json`` next to this file).  A run
*diverged* as the benchmark counts it: a minibatch loss not finite or above 10x the first at
any step, a spike the guard then rolled back included, or the guard gave up.  A run *ended no
better than it started* when its last evaluation of the metric is no better than its first (at
the initial weights), or it has none.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path("bench-results/results.jsonl")


def _no_better(run: dict[str, Any]) -> bool:
    first, last = run["curves"]["metric"][0], run["final_metric"]
    if first is None or last is None:
        return True
    return last <= first if run["higher_is_better"] else last >= first


def main() -> None:
    runs = [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines()]
    own = [r for r in runs if r["method"].startswith("selftune")]
    diverged = [r for r in own if r["diverged"]]
    lost = [r for r in own if _no_better(r)]
    out = {
        "selftune_runs": len(own),
        "diverged": len(diverged),
        "diverged_and_reached_the_target": sum(r["steps_to_target"] is not None for r in diverged),
        "ended_no_better_than_they_started": len(lost),
        "of_those_by_workload_and_base": dict(
            Counter(f"{r['workload']} {r['base']}" for r in lost).most_common()
        ),
        "of_those_outside_the_gru": sorted(
            f"{r['workload']} {r['method']} seed {r['seed']}"
            for r in lost
            if r["workload"] != "mnist1d-gru"
        ),
    }
    path = Path(__file__).with_name("lost_runs.json")
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
