"""How many of ``auto``'s misses end with the rate at its floor.

Read off the committed full suite only (``bench-results/results.jsonl``): per workload, the
``selftune-auto-*`` runs, those that missed the target, and the misses whose last recorded rate
stands within 2x of the policy's lower bound (a thousandth of the starting rate).  Only misses
can end there: a run stops at its target.  Asked after the two held-out workloads added after
pilot 73, on which the cuts took the rate to that floor while the loss descended slowly (a
saddle, a slow stretch), and the runs missed.  Run from the repository root:
``python bench-results/pilots/floor_runs.py``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from selftune.policy import DEFAULT_BOUNDS

RESULTS = Path(__file__).resolve().parents[1] / "results.jsonl"
FLOOR = DEFAULT_BOUNDS["lr"][0]  #: the policy's default lower bound, a fraction of the start


def ends_at_floor(last_rate: float, start: float, floor: float = FLOOR) -> bool:
    """A run's last rate within 2x of its floor, ``floor`` times its starting rate."""
    return last_rate <= 2 * floor * start


def main() -> None:
    runs: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    at_floor: Counter[str] = Counter()
    for line in RESULTS.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if not r["method"].startswith("selftune-auto-") or r.get("error"):
            continue
        rates = [x for x in r["curves"]["lr"] if x is not None]
        name = r["workload"]
        runs[name] += 1
        if r["steps_to_target"] is None:
            missed[name] += 1
            at_floor[name] += bool(rates) and ends_at_floor(rates[-1], r["lr0"])
    print("workload: auto runs, misses, misses ending at the rate's floor")
    for name in runs:
        print(f"{name}: {runs[name]}, {missed[name]}, {at_floor[name]}")
    print(f"all: {sum(runs.values())}, {sum(missed.values())}, {sum(at_floor.values())}")


if __name__ == "__main__":
    main()
