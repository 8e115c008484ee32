"""Compare two sets of ``selftune-auto-*`` runs, run by run: the counts the README quotes.

Run from the repository root: ``python bench-results/pilots/compare.py OLD.jsonl NEW.jsonl``.
Every run of NEW (workload, method, seed) that OLD also holds is compared on steps to target (a
miss counts as infinitely slow); the changed ones are listed, then how many got faster and slower,
how many reached the target in each, and the geometric mean of NEW's steps over OLD's on the runs
that reached it in both (below 1: faster).
The full suite before pilot 24 is ``git show a5035cf~1:bench-results/results.jsonl``; pilot 26's
is ``bench-results/pilots/26-trial-against-the-trend/full-suite.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def runs(path: Path) -> dict[tuple[str, str, int], dict]:
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {
        (r["workload"], r["method"], r["seed"]): r
        for r in records
        if r["method"].startswith("selftune-auto-")
    }


def steps(r: dict) -> float:
    return math.inf if r["steps_to_target"] is None else r["steps_to_target"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args()
    old, new = runs(args.old), runs(args.new)
    shared = sorted(set(old) & set(new))
    faster = slower = 0
    for key in shared:
        a, b = old[key], new[key]
        if steps(a) != steps(b) or a["diverged"] != b["diverged"]:
            print(*key, a["steps_to_target"], "->", b["steps_to_target"], sep="  ")
        faster += steps(b) < steps(a)
        slower += steps(b) > steps(a)
    print(f"{faster} faster, {slower} slower, of {len(shared)} runs in both")
    both = [k for k in shared if math.isfinite(steps(old[k])) and math.isfinite(steps(new[k]))]
    hits = [sum(math.isfinite(steps(side[k])) for k in shared) for side in (old, new)]
    logs = [math.log(steps(new[k]) / steps(old[k])) for k in both]
    mean = math.exp(sum(logs) / len(logs)) if logs else math.nan
    print(f"reached the target: {hits[0]} -> {hits[1]}; geometric mean ratio {mean:.3f} on the")
    print(f"{len(both)} runs that reached it in both")


if __name__ == "__main__":
    main()
