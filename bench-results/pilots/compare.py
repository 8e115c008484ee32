"""Compare two sets of ``selftune-auto-*`` runs, run by run: the counts the README quotes.

Run from the repository root: ``python bench-results/pilots/compare.py OLD.jsonl NEW.jsonl``
(``--prefix ''`` compares every row, not only ``auto``'s; ``--rename FROM=TO``, e.g.
``selftune-autocos=selftune-auto``, reads a variant's rows, named apart, as the rows they are
compared with; ``--methods`` keeps only the runs of the methods its globs name).
Every run of NEW (workload, method, seed) that OLD also holds is compared on steps to target (a
miss counts as infinitely slow); the changed ones are listed, then how many got faster and slower,
how many reached the target in each, how many ran identically (every curve the same), and the
geometric mean of NEW's steps over OLD's on the runs that reached it in both (below 1: faster).
When NEW also holds the grid's rows (a full suite), it then gives, per workload and base, the
median steps of `auto` at the default rate in each, as a multiple of the oracle (the grid member
with the lowest median in NEW, a miss counting as infinite), with the seeds that hit; and which
cells of the start sweep (1e-5 to 1e-1) met the issue's bar (every seed hit, median within 1.5x
the oracle) in OLD and in NEW.
The full suite before pilot 24 is ``git show a5035cf~1:bench-results/results.jsonl``; pilot 26's
is ``bench-results/pilots/26-trial-against-the-trend/full-suite.jsonl``; the suite before pilot 31
is ``git show 28930a4:bench-results/results.jsonl``, and pilot 31's, which 34's and 35's
``full-suite.jsonl`` were compared with, ``git show e2d4626:bench-results/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from fnmatch import fnmatch
from pathlib import Path


def runs(
    path: Path, prefix: str = "selftune-auto-", rename: tuple[str, str] = ("", "")
) -> dict[tuple[str, str, int], dict]:
    """The runs of ``path`` by (workload, method, seed), method names with ``rename[0]`` replaced
    by ``rename[1]`` (a variant's rows read as the rows they are compared with)."""
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    out = {}
    for r in records:
        method = r["method"].replace(*rename) if rename[0] else r["method"]
        if method.startswith(prefix):
            out[r["workload"], method, r["seed"]] = r
    return out


def steps(r: dict) -> float:
    return math.inf if r["steps_to_target"] is None else r["steps_to_target"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument(
        "--prefix", default="selftune-auto-", help="compare the methods named so ('': every row)"
    )
    parser.add_argument(
        "--rename",
        default="",
        help="FROM=TO: read NEW's method names with FROM replaced by TO (a variant's own rows)",
    )
    parser.add_argument(
        "--methods",
        default="",
        help="comma-separated globs: compare only the runs of these methods (after --rename)",
    )
    args = parser.parse_args()
    rename = tuple(args.rename.split("=", 1)) if args.rename else ("", "")
    old, new = runs(args.old, args.prefix), runs(args.new, args.prefix, rename)
    globs = [g for g in args.methods.split(",") if g]
    shared = sorted(
        k for k in set(old) & set(new) if not globs or any(fnmatch(k[1], g) for g in globs)
    )
    faster = slower = 0
    for key in shared:
        a, b = old[key], new[key]
        if steps(a) != steps(b) or a["diverged"] != b["diverged"]:
            print(*key, a["steps_to_target"], "->", b["steps_to_target"], sep="  ")
        faster += steps(b) < steps(a)
        slower += steps(b) > steps(a)
    print(f"{faster} faster, {slower} slower, of {len(shared)} runs in both")
    same = sum(old[k]["curves"] == new[k]["curves"] for k in shared)
    print(f"{same} of them with every curve (loss, rate, metric) identical")
    both = [k for k in shared if math.isfinite(steps(old[k])) and math.isfinite(steps(new[k]))]
    hits = [sum(math.isfinite(steps(side[k])) for k in shared) for side in (old, new)]
    logs = [math.log(steps(new[k]) / steps(old[k])) for k in both]
    mean = math.exp(sum(logs) / len(logs)) if logs else math.nan
    print(f"reached the target: {hits[0]} -> {hits[1]}; geometric mean ratio {mean:.3f} on the")
    print(f"{len(both)} runs that reached it in both")
    # the oracle of NEW's grid; of OLD's when NEW holds a variant's rows only
    oracle = _oracles(runs(args.new, prefix="")) or _oracles(runs(args.old, prefix=""))
    if oracle:
        _against_the_oracle(old, new, oracle)


def _medians(rs: dict[tuple[str, str, int], dict]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (workload, method, _), r in rs.items():
        out[workload, method].append(steps(r))
    return out


def _oracles(every: dict[tuple[str, str, int], dict]) -> dict[tuple[str, str], float]:
    """Per (workload, base): the lowest median steps of a grid member (finite ones only)."""
    best: dict[tuple[str, str], float] = {}
    for (workload, method), v in _medians(every).items():
        base, _, rest = method.partition("-")
        median = statistics.median(v)
        # the plain grid only: the grid evaluated at a weight average is the -avg rows' oracle
        if rest.startswith("grid-") and not rest.endswith("-avg") and math.isfinite(median):
            best[workload, base] = min(best.get((workload, base), math.inf), median)
    return best


def _against_the_oracle(old: dict, new: dict, oracle: dict[tuple[str, str], float]) -> None:
    a, b = _medians(old), _medians(new)
    print("auto at the default rate, median steps (x the oracle) [seeds hit]: OLD -> NEW")
    gained: list[str] = []
    lost: list[str] = []
    total = 0
    for (workload, base), o in sorted(oracle.items()):
        auto = f"selftune-auto-{base}"
        for method in (m for w, m in sorted(b) if w == workload and m.startswith(auto)):
            start = method.removeprefix(auto)
            if start == "":
                row = [_median_text(d[workload, method], o) for d in (a, b)]
                print(f"  {workload} {base}: {row[0]} -> {row[1]}")
            if start != "-lr1e0":  # the default rate and the sweep's 1e-5 to 1e-1
                met = [_at_the_bar(d[workload, method], o) for d in (a, b)]
                cell = f"{workload} {method}"
                gained += [cell] if met == [0, 1] else []
                lost += [cell] if met == [1, 0] else []
                total += 1
    counts = f"{len(gained)} gained, {len(lost)} lost of {total}"
    print(f"cells (default and sweep starts) at the issue's bar: {counts}")
    print(f"  gained: {', '.join(gained) or '-'}\n  lost: {', '.join(lost) or '-'}")


def _median_text(v: list[float], oracle: float) -> str:
    m = statistics.median(v)
    return f"{m:g} ({m / oracle:.2f}x) [{sum(map(math.isfinite, v))}]"


def _at_the_bar(v: list[float], oracle: float) -> int:
    return int(all(map(math.isfinite, v)) and statistics.median(v) <= 1.5 * oracle)


if __name__ == "__main__":
    main()
