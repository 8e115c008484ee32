"""Which runs of a probe changed between two of its ``results.json``: the counts its READMEs quote.

Run from the repository root: ``python bench-results/probe_diff.py OLD.json NEW.json`` (e.g. a
committed ``results.json`` against a re-run, ``git show REV:PATH > OLD.json`` for an old one).
Rows are matched by variant (or workload and row) and seed; each one whose fields differ is
printed with the fields that changed, then how many changed per variant, and, where rows give
``steps_to_target``, how many reached the target in each.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any


def rows(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """A probe's rows by variant and seed (a probe over several workloads, whose rows name the
    workload and the row instead, by ``workload/row``)."""
    return {(_variant(r), r["seed"]): r for r in json.loads(path.read_text(encoding="utf-8"))}


def _variant(row: dict[str, Any]) -> str:
    return row["variant"] if "variant" in row else f"{row['workload']}/{row['row']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args()
    old, new = rows(args.old), rows(args.new)
    shared = sorted(set(old) & set(new))
    changed: Counter[str] = Counter()
    for key in shared:
        a, b = old[key], new[key]
        fields = {f: (a.get(f), b.get(f)) for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)}
        if fields:
            changed[key[0]] += 1
            print(*key, *(f"{f}: {x} -> {y}" for f, (x, y) in fields.items()), sep="  ")
    print(f"{sum(changed.values())} of {len(shared)} runs changed")
    for variant, n in sorted(changed.items()):
        print(f"  {variant}: {n}")
    if shared and "steps_to_target" in new[shared[0]]:
        hits = [sum(side[k]["steps_to_target"] is not None for k in shared) for side in (old, new)]
        print(f"reached the target: {hits[0]} -> {hits[1]}")


if __name__ == "__main__":
    main()
