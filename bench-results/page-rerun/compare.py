"""The benchmark page's ``selftune-*`` rows, every one run again with one code on one machine.

Until this folder's stop the page's ``selftune-*`` rows came from several stops: those of the
nine workloads before the held-out ones were last run at ``a52e094``, before the guard's later
rules and on another machine (pilot 64); at the default rates 114 of the page's 150 ``auto``
runs took the page's steps when run here with the code of the stop that found it
(``../floor-room/``).  ``results.jsonl`` here holds every ``selftune-*`` run of the page's
fifteen workloads made again here, by the benchmark's own command (in the README); the grids,
the plain optimizers and the published methods were not run again.

``--write`` puts those runs in the page's place (``bench-results/results.jsonl``, every other
line kept as it is). Without it, this script reads the page as it stood before (``git show
BEFORE:bench-results/results.jsonl``), checks that the page now is that page with these runs in
it, counts the runs that are, field by field, the runs of the first re-run (``FIRST``, made in
two parts before records named their source), writes the page of each from the benchmark's own
report (``selftune.bench.report``) in a scratch folder, and writes ``table.md`` next to itself:
each bar of "Where selftune falls short" before and now, ``auto``'s median steps to the target
[hits] at the default rates per workload and base, and how many runs took the steps they had.

Run from the repository root: ``PYTHONPATH=src python bench-results/page-rerun/compare.py``
(a minute or two: the report draws its figures, twice, in the scratch folder).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from selftune.bench.report import INF, Row, summarise, write_report
from selftune.bench.runner import read_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PAGE = HERE.parent / "results.jsonl"
BEFORE = "aedcad7"  # the last commit whose page held the older rows
FIRST = "9895527"  # the commit whose results.jsonl here held the first re-run, made in two parts
#: the fields a second run of the same code on the same machine may change, and the first lacked
TIMING = {"train_seconds", "ms_per_step", "seconds_to_target", "source"}
BARS = "## Where selftune falls short"
TALLY = re.compile(r"^- (.*) — (\d+ of \d+)$")


def key(record: dict) -> tuple[str, str, int]:
    """A run's identity: its workload, method and seed."""
    return record["workload"], record["method"], record["seed"]


def merged(page: list[dict], rerun: list[dict]) -> list[dict]:
    """The page's records, each run that ``rerun`` holds again replaced by its new record."""
    again = {key(r): r for r in rerun}
    return [again.get(key(r), r) for r in page]


def write(records: list[dict], path: Path) -> None:
    """Records one per line, as the benchmark's runner writes them."""
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)


def committed(commit: str, path: str) -> list[dict]:
    """A results file as it stood at ``commit``, from the repository's history."""
    text = subprocess.run(
        ["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def alike(a: dict, b: dict) -> bool:
    """Two records of one run the same, field by field, the timings and ``source`` aside."""
    return {k: v for k, v in a.items() if k not in TIMING} == {
        k: v for k, v in b.items() if k not in TIMING
    }


def tallies(records: list[dict]) -> dict[str, str]:
    """Each bar of the page's "Where selftune falls short" and its count ("N of M")."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write(records, folder / "results.jsonl")
        shutil.copy(HERE.parent / "overhead.json", folder / "overhead.json")
        page_md = write_report(folder, folder / "docs").read_text(encoding="utf-8")
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


def table(old: list[dict], new: list[dict], rerun: list[dict], first: list[dict]) -> str:
    """The bars, ``auto``'s default-rate medians and the runs' steps, before and now; and the
    runs that came out as the first re-run's."""
    was, now = tallies(old), tallies(new)
    lines = ["| bar | before | now |", "|---|---:|---:|"]
    lines += [f"| {bar} | {count} | {now.get(bar, '–')} |" for bar, count in was.items()]
    steps = {key(r): r["steps_to_target"] for r in old}
    same = sum(steps[key(r)] == r["steps_to_target"] for r in rerun)
    earlier = {key(r): r for r in first}
    twice = sum(key(r) in earlier and alike(earlier[key(r)], r) for r in rerun)
    a, b = autos(old), autos(new)
    medians = [(a[p].steps, b[p].steps) for p in a]
    lines += [
        "",
        f"{len(rerun)} runs again, {same} of them to the target in the steps they took before "
        "(or missing it as before); `auto` at the default rates, median steps [hits]:",
        "",
        "| workload | base | before | now |",
        "|---|---|---:|---:|",
        *(f"| {w} | {base} | {_cell(a[(w, base)])} | {_cell(b[(w, base)])} |" for w, base in a),
        "",
        f"- medians moved on {sum(x != y for x, y in medians)} of {len(medians)}: "
        f"{sum(y < x for x, y in medians)} fewer steps, {sum(y > x for x, y in medians)} more",
        f"- records the same as the first re-run's ({FIRST}), field by field, timings aside: "
        f"{twice} of {len(rerun)}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    rerun = read_results(HERE / "results.jsonl")
    if sys.argv[1:] == ["--write"]:
        write(merged(read_results(PAGE), rerun), PAGE)
        return
    old, page = committed(BEFORE, "bench-results/results.jsonl"), read_results(PAGE)
    if merged(old, rerun) != page:
        sys.exit(f"{PAGE} is not the page of {BEFORE} with these runs in it; run --write first")
    text = table(old, page, rerun, committed(FIRST, "bench-results/page-rerun/results.jsonl"))
    (HERE / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
