"""The benchmark page's tallies with the nine older workloads' ``selftune-*`` rows run again.

The page's ``selftune-*`` rows of the nine workloads before the held-out ones were last run at
``a52e094``, before the guard's later rules and on another machine (pilot 64): at the default rates
114 of their 150 runs took the page's steps when run here with the code of the stop that found it
(``../floor-room/``).  ``results.jsonl`` here holds those rows run again, by the benchmark's own
command (in the README), with every other run of the page left as it is.  This script puts them in
the page's place in a scratch folder, writes the page from it there with the benchmark's own
report (``selftune.bench.report``), and writes ``table.md`` next to itself: each bar of "Where
selftune falls short" as the committed page counts it and as the merged one does, then, per
workload and base, ``auto``'s median steps to the target [hits] on the page and here.

Run from the repository root: ``PYTHONPATH=src python bench-results/page-rerun/compare.py``
(a minute: the report draws its figures, in the scratch folder).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from selftune.bench.report import INF, Row, summarise, write_report
from selftune.bench.runner import read_results

HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "results.jsonl"
BARS = "## Where selftune falls short"
TALLY = re.compile(r"^- (.*) — (\d+ of \d+)$")


def merged(page: list[dict], rerun: list[dict]) -> list[dict]:
    """The page's records, each run that ``rerun`` holds again replaced by its new record."""
    again = {(r["workload"], r["method"], r["seed"]): r for r in rerun}
    return [again.get((r["workload"], r["method"], r["seed"]), r) for r in page]


def tallies(page_md: str) -> dict[str, str]:
    """Each bar of the page's "Where selftune falls short" and its count ("N of M")."""
    section = page_md.split(BARS, 1)[1].split("\nMisses", 1)[0]
    return {m[1]: m[2] for line in section.splitlines() if (m := TALLY.match(line))}


def autos(records: list[dict]) -> dict[tuple[str, str], Row]:
    """``auto``'s row at the default rate per workload and base."""
    return {
        (name, base): row
        for name, w in summarise(records).items()
        for base in ("sgd", "adamw")
        if (row := w.rows.get(f"selftune-auto-{base}")) is not None
    }


def _cell(row: Row) -> str:
    """Median steps to the target [hits/runs]."""
    steps = "miss" if row.steps == INF else f"{row.steps:g}"
    return f"{steps} [{row.hits}/{row.seeds}]"


def main() -> None:
    page, rerun = read_results(PAGE), read_results(HERE / "results.jsonl")
    both = merged(page, rerun)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        with (folder / "results.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in both)
        shutil.copy(HERE.parent / "overhead.json", folder / "overhead.json")
        new = tallies(write_report(folder, folder / "docs").read_text(encoding="utf-8"))
    old = tallies((HERE.parents[1] / "docs" / "benchmarks.md").read_text(encoding="utf-8"))
    lines = ["| bar | the page | the nine workloads' rows run again |", "|---|---:|---:|"]
    lines += [f"| {bar} | {count} | {new.get(bar, '–')} |" for bar, count in old.items()]
    redone = {r["workload"] for r in rerun}
    before, after = autos(page), autos(both)
    lines += [
        "",
        f"{len(rerun)} runs again; `auto` at the default rates, median steps [hits]:",
        "",
        "| workload | base | the page | run again |",
        "|---|---|---:|---:|",
    ]
    pairs = [(w, b) for (w, b) in before if w in redone]
    lines += [f"| {w} | {b} | {_cell(before[(w, b)])} | {_cell(after[(w, b)])} |" for w, b in pairs]
    steps = [(before[p].steps, after[p].steps) for p in pairs]
    lines += [
        "",
        f"- medians moved on {sum(a != b for a, b in steps)} of {len(pairs)}: "
        f"{sum(b < a for a, b in steps)} fewer steps, {sum(b > a for a, b in steps)} more",
    ]
    text = "\n".join(lines) + "\n"
    (HERE / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
