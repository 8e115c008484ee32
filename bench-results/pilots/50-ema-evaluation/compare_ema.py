"""Pilot 50's table: `auto` and two grid members, each evaluated at an EMA of its weights.

Run from the repository root: ``python bench-results/pilots/50-ema-evaluation/compare_ema.py
[AUTO]``.  Per pair: the committed `auto` row and oracle (evaluated at the last iterate, from
``bench-results/results.jsonl``), then `auto` evaluated at the EMA (``results.jsonl`` here,
written by the benchmark with ``candidate.patch`` applied, or the ``results.jsonl`` of pilot 54
given as ``AUTO``, a variant of `auto` run the same way) against the faster of the two grid
members run with the EMA: the committed oracle and the next rate of its grid above it, with the
same schedule. Only two members were run, so the EMA column's best is an upper bound on the
steps of the EMA grid's true best, and the last ratio a lower bound on `auto`'s.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from selftune.bench import report
from selftune.bench.runner import read_results

HERE = Path(__file__).parent


def _steps(x: float) -> str:
    return "miss" if x == math.inf else f"{x:.0f}"


def main() -> None:
    plain = report.summarise(read_results(HERE.parents[1] / "results.jsonl"))
    ema = report.summarise(read_results(HERE / "results.jsonl"))
    variant = report.summarise(read_results(Path(sys.argv[1]))) if len(sys.argv) > 1 else ema
    print("| pair | auto | oracle | auto x oracle | auto, EMA | EMA grid | auto, EMA x its best |")
    print("|---|---|---|---|---|---|---|")
    for name, w in ema.items():
        for base in ("sgd", "adamw"):
            averaged = variant[name].rows.get(f"selftune-auto-{base}-ema")
            oracle = plain[name].oracle(base)
            if averaged is None or oracle is None:
                continue
            auto = plain[name].rows[f"selftune-auto-{base}"]
            grid = [r for r in w.rows.values() if r.base == base and "-grid-" in r.method]
            best = min(grid, key=lambda r: (r.steps, r.seconds))
            members = ", ".join(f"{r.method.removesuffix('-ema')} {_steps(r.steps)}" for r in grid)
            print(
                f"| {name} {base} | {_steps(auto.steps)} ({auto.hits}/{auto.seeds}) | "
                f"{oracle.method} {_steps(oracle.steps)} | "
                f"{report._fmt_ratio(report.ratio(auto, oracle))} | "
                f"{_steps(averaged.steps)} ({averaged.hits}/{averaged.seeds}) | {members} | "
                f"{report._fmt_ratio(report.ratio(averaged, best))} |"
            )


if __name__ == "__main__":
    main()
