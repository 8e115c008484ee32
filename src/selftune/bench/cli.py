"""``selftune bench``: run a suite (resumably) and regenerate the benchmark report.

Heavy imports (torch, the workloads, matplotlib) happen inside :func:`run`, so building the
command-line parser stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from selftune.bench.fields import Damaged
from selftune.terminal import printable

if TYPE_CHECKING:
    from selftune.bench.runner import RunSpec
    from selftune.bench.workloads import Workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        choices=("smoke", "full", "overhead"),
        default="full",
        help="smoke: every method family on tiny data with a tiny budget; full: every method "
        "with 3-5 seeds (long; resumable); overhead: per-step cost of wrapping",
    )
    parser.add_argument(
        "--out",
        type=_path,
        default=RESULTS_DIR,
        help="results folder (results.jsonl, overhead.json); default %(default)s",
    )
    parser.add_argument(
        "--report-dir",
        type=_path,
        default=None,
        help="where benchmarks.md and bench/*.png go; default docs for the default --out, "
        "else OUT/docs (a run into a folder of its own left the checkout's page alone)",
    )
    parser.add_argument(
        "--seeds",
        help="a count (3: seeds 0-2) or a list (0,4,7); "
        "default: the suite's (smoke 1; full 5 for headline rows, 3 for others)",
    )
    parser.add_argument("--workloads", help="comma-separated globs, e.g. 'mnist1d-*,digits-mlp'")
    parser.add_argument("--methods", help="comma-separated globs, e.g. 'adamw-*,selftune-auto-*'")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="parallel runs, one thread each (default: number of CPUs)",
    )
    parser.add_argument(
        "--overhead-steps",
        type=int,
        default=None,
        help="steps per side in the overhead measurement (default 400; smoke 40)",
    )
    parser.add_argument(
        "--readme",
        type=_path,
        default=None,
        help="also rewrite this file's headline block (between bench-headline markers), e.g. "
        "README.md (make bench does)",
    )
    parser.add_argument("--no-report", action="store_true", help="run, but leave the report")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only regenerate the report from the results folder",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the planned runs per workload and method (and how many are already done), "
        "run nothing",
    )


#: the results folder and report folder of the committed benchmark (``make bench``)
RESULTS_DIR, DOCS = Path("bench-results"), Path("docs")


def _path(text: str) -> Path:
    """A folder or file given on the command line, ``~`` expanded as the other commands do (a
    quoted ``--out '~/runs'`` made a folder named ``~`` in the working directory)."""
    return Path(text).expanduser()


def _fail(message: object) -> int:
    """Print why ``bench`` stops, as the terminal shows text and never obeys it (a message may
    quote a results file: a method named ``"\\x1b[2J"`` cleared the screen), and return its exit
    status: 1 for a damaged results folder (:class:`Damaged`), as ``verify``'s for a damaged
    log, 2 for the command line's usage."""
    print(printable(f"selftune bench: {message}"), file=sys.stderr)
    return 1 if isinstance(message, Damaged) else 2


#: the options each kind of invocation never reads, and what it does instead
UNREAD = {
    "--report-only": (
        ("--seeds", "--workloads", "--methods", "--overhead-steps", "--list"),
        "writes the page of every run in --out",
    ),
    "--suite full": (("--overhead-steps",), "measures no overhead"),
    "--suite overhead": (("--seeds", "--methods"), "measures the overhead alone"),
}


def _unread(args: argparse.Namespace) -> str | None:
    """Why options given are never read in this invocation, or None: an option silently
    dropped (``--report-only --list`` wrote the page and listed nothing) misleads."""
    for invocation, (options, does) in UNREAD.items():
        flag, _, suite = invocation.partition(" ")
        if not (args.report_only if flag == "--report-only" else args.suite == suite):
            continue
        given = [o for o in options if getattr(args, o[2:].replace("-", "_")) not in (None, False)]
        if given:
            return f"{invocation} {does}; {' and '.join(given)} do nothing there: leave them out"
    return None


def _patterns(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def run(args: argparse.Namespace) -> int:
    from selftune.bench import overhead, report, suites
    from selftune.bench.runner import check_budgets, run_all

    if args.no_report and args.report_only:
        return _fail("--no-report and --report-only exclude each other; pick one")
    if (unread := _unread(args)) is not None:
        return _fail(unread)
    if args.jobs is not None and args.jobs < 1:  # before planning, and with --list too
        return _fail(f"--jobs {args.jobs}: give 1 or more parallel runs")
    out: Path = args.out
    report_dir: Path = args.report_dir or (DOCS if out == RESULTS_DIR else out / "docs")
    for name, folder in (("--out", out), ("--report-dir", report_dir)):
        if folder.exists() and not folder.is_dir():
            return _fail(f"{name} {folder} is a file; give a folder")
    if args.readme is not None:  # before the suite, which may take hours
        if args.no_report:
            return _fail(
                "--readme is rewritten with the report, which --no-report leaves; pick one"
            )
        if (problem := report.readme_problem(args.readme)) is not None:
            return _fail(problem)
    if not args.report_only:
        jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
        try:
            seeds = suites.parse_seeds(args.seeds)
            workloads = _patterns(args.workloads)
            steps = args.overhead_steps
            if steps is None:
                steps = 40 if args.suite == "smoke" else 400
            if steps < 2:  # before any run: not after an hour of the smoke suite's
                raise ValueError(f"--overhead-steps {steps}: pass at least 2 (one a side)")
            start = time.perf_counter()
            if args.suite in ("smoke", "full"):
                specs = suites.plan(args.suite, workloads, _patterns(args.methods), seeds)
                if args.list:  # the smoke suite's overhead measurement is listed below
                    _print_plan(specs, out)
                else:
                    check_budgets(specs, out)  # a smoke run into a full folder, before it writes
                    done = run_all(specs, out, jobs=jobs, progress=not args.quiet)
                    print(
                        f"{args.suite}: {done.ran} runs done, {done.skipped} already in "
                        f"{out / 'results.jsonl'}, {len(specs)} planned"
                    )
            if args.suite in ("smoke", "overhead"):
                names = [w.name for w in _overhead_workloads(workloads)]
                if not names and args.suite == "overhead":  # the smoke suite's runs were the point
                    measured = ", ".join(overhead.OVERHEAD_WORKLOADS)
                    raise ValueError(
                        f"no workload to measure: the overhead suite measures {measured}"
                    )
                if names and args.list:
                    print(f"overhead: {', '.join(names)}, {steps} steps a side, into {out}")
                elif names:
                    path = overhead.run_overhead(out, steps, names, small=args.suite == "smoke")
                    print(f"overhead: {path}")
            if args.list:
                return 0
            print(f"{args.suite} suite took {time.perf_counter() - start:.0f} s")
        except ValueError as exc:
            return _fail(exc)
    if args.no_report:
        return 0
    try:
        path = report.write_report(out, report_dir)
        if args.readme is not None:
            report.update_readme(args.readme, out)
            print(f"headline table: {args.readme}")
    except ValueError as exc:
        return _fail(exc)
    print(f"report: {path}")
    return 0


def _print_plan(specs: list[RunSpec], out: Path) -> None:
    from collections import Counter

    from selftune.bench.runner import RESULTS, done_keys

    done = done_keys(out / RESULTS)
    planned = Counter(s.workload for s in specs)
    finished = Counter(s.workload for s in specs if s.key in done)
    for name, n in planned.items():
        print(f"{name}: {n} runs planned, {finished[name]} already in {out / RESULTS}")
        methods = Counter(s.method for s in specs if s.workload == name)
        for method, count in methods.items():  # the names --methods matches its globs against
            print(f"  {method}: {count} seed{'s' if count > 1 else ''}")


def _overhead_workloads(patterns: list[str] | None) -> list[Workload]:
    from selftune.bench.overhead import OVERHEAD_WORKLOADS
    from selftune.bench.workloads import WORKLOADS, select

    chosen = {w.name for w in select(patterns)} if patterns else set(WORKLOADS)
    return [WORKLOADS[n] for n in OVERHEAD_WORKLOADS if n in chosen]
