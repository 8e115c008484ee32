"""What the probes of kinds of run selftune was not built for share (``gan/gan.py``,
``policy-gradient/cartpole.py``, ``full-batch/fit.py``, ``small-batch/digits.py``,
``multi-task/alternate.py``, ``label-noise/digits.py``; ``groups/groups.py`` and
``schedules/schedules.py`` run their jobs with :func:`run_rows` and :func:`train_row`): every
variant on every seed, on two processes, the results written next to the probe's script as
``results.json`` and ``table.md``, and the pieces of a run's row and of the table that more
than one of them has."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

Row = dict[str, Any]
#: a column of a probe's table: its header, its alignment rule (``---`` or ``---:``), and its
#: cell from one variant's rows
Column = tuple[str, str, Callable[[list[Row]], str]]


def run_grid(
    run: Callable[[str, int], Row],
    variants: Sequence[str],
    seeds: Iterable[int],
    columns: list[Column],
    here: Path,
    workers: int = 2,
) -> list[Row]:
    """``run(variant, seed)`` for each seed and, within it, each variant; write the rows and
    their table (:func:`table`), and print the table."""
    jobs = [(v, s) for s in seeds for v in variants]
    with ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(run, *zip(*jobs, strict=True)))
    (here / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    text = table(rows, variants, columns)
    (here / "table.md").write_text(text, encoding="utf-8")
    print(text)
    return rows


def run_rows(run: Callable[[Any], Row], jobs: list[Any], out: Path, workers: int = 2) -> list[Row]:
    """``run(job)`` for each job on ``workers`` processes; each row is printed and ``out``
    rewritten as it comes, so a probe of many minutes keeps the runs it finished."""
    rows: list[Row] = []
    with ProcessPoolExecutor(workers) as pool:
        for row in pool.map(run, jobs):
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return rows


def train_row(name: str, method: Any, seed: int, key: Row, fields: Sequence[str]) -> Row:
    """Train ``method`` on the workload ``name`` from ``seed`` on one thread, as the benchmark
    does; the row is ``key`` and the run record's ``fields``."""
    from selftune.bench import workloads
    from selftune.bench.runner import one_thread, train

    (workload,) = workloads.select([name])
    with one_thread():
        record = train(workload, method, seed)
    return {**key, **{field: record[field] for field in fields}}


def table(rows: list[Row], variants: Sequence[str], columns: list[Column]) -> str:
    """A markdown table, one line per variant: its name, then each column's cell of its rows."""
    lines = [
        "| variant | " + " | ".join(head for head, _, _ in columns) + " |",
        "|---|" + "|".join(rule for _, rule, _ in columns) + "|",
    ]
    for v in variants:
        mine = of_variant(rows, v)
        lines.append(f"| {v} | " + " | ".join(cell(mine) for _, _, cell in columns) + " |")
    return "\n".join(lines) + "\n"


def count_guard_events(opt: Any, key: Callable[[dict[str, Any]], str] | None = None) -> Counter:
    """A counter, kept as ``opt`` trains, of its guard's events by ``key`` (default: the
    event's name)."""
    events: Counter[str] = Counter()
    name = key or (lambda guard: guard["event"])
    opt.add_listener(lambda e: events.update([name(e.guard)]) if e.guard else None)
    return events


def accuracy_columns() -> list[Column]:
    """The columns of a probe whose runs end on a test accuracy (``accuracy``) and may stop
    with ``GuardError`` (``stopped``): the accuracy per seed and its median, the runs stopped,
    the rate at the end and the guard's events."""
    return [
        ("test accuracy per seed", "---", lambda m: per_seed(m, lambda r: f"{r['accuracy']:.3f}")),
        ("median", "---:", lambda m: f"{statistics.median(r['accuracy'] for r in m):.3f}"),
        ("stopped by GuardError", "---:", lambda m: str(sum(r["stopped"] is not None for r in m))),
        ("rate at the end", "---", rates),
        ("guard events (all seeds)", "---", events_total),
    ]


def of_variant(rows: list[Row], variant: str) -> list[Row]:
    """The rows of one variant, in seed order."""
    return [r for r in rows if r["variant"] == variant]


def per_seed(rows: list[Row], cell: Callable[[Row], str]) -> str:
    """One table cell: ``cell`` of each row, comma-separated."""
    return ", ".join(cell(r) for r in rows)


def rates(rows: list[Row]) -> str:
    """The rates at the end, ``-`` for a plain run (rate None)."""
    return per_seed(rows, lambda r: "-" if r["rate"] is None else f"{r['rate']:.2g}")


def events_total(rows: list[Row]) -> str:
    """The guard's events of all the rows, summed by kind (``-`` for none)."""
    total: Counter[str] = Counter()
    for r in rows:
        total.update(r["events"])
    return ", ".join(f"{k} {n}" for k, n in sorted(total.items())) or "-"
