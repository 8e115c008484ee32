"""Read runs off a results file as the held-out READMEs quote them.

Run from the repository root: ``python bench-results/read_runs.py RESULTS.jsonl [--methods
GLOBS] [--levels 1.0,0.95] [--at 250,1000]``.  One line per run (method, then seed): its steps to
target and best metric, the first evaluation step at which the metric reached each of
``--levels`` (the held-out choice's candidate targets; ``-``: never), and the rate and metric
recorded at each step of ``--at`` (``-``: the run had stopped, at its target, before it).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path
from typing import Any


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _first(record: dict[str, Any], level: float) -> str:
    better = (lambda v: v >= level) if record["higher_is_better"] else (lambda v: v <= level)
    curves = record["curves"]
    pairs = zip(curves["step"], curves["metric"], strict=True)
    hit = next((s for s, v in pairs if v is not None and better(v)), None)
    return "-" if hit is None else str(hit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--methods", default="*", help="comma-separated globs")
    parser.add_argument("--levels", type=_numbers, default=[])
    parser.add_argument("--at", type=_numbers, default=[])
    args = parser.parse_args()
    globs = args.methods.split(",")
    lines = args.results.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    chosen = [r for r in records if any(fnmatch.fnmatch(r["method"], g) for g in globs)]
    for r in sorted(chosen, key=lambda r: (r["method"], r["seed"])):
        curves = r["curves"]
        reads_at = zip(curves["lr"], curves["metric"], strict=True)
        at = dict(zip(curves["step"], reads_at, strict=True))
        reads = [f"{r['method']} {r['seed']}: {r['steps_to_target']}, best {r['best_metric']:.4g}"]
        reads += [f"{level:g} at {_first(r, level)}" for level in args.levels]
        for step in args.at:
            lr, metric = at.get(int(step), (None, None))
            reads.append(f"@{int(step)} " + ("-" if lr is None else f"lr {lr:.3g} {metric:.4g}"))
        print(" | ".join(reads))


if __name__ == "__main__":
    main()
