"""Turns ``results.jsonl`` (and ``overhead.json``) into ``docs/benchmarks.md`` and its plots.

Everything is computed from the one results file: medians and spread over seeds, the oracle (per
workload and base optimizer, the grid member with the fewest median steps to target), ratios to
the default and to the oracle, and the section on where selftune falls short, which checks the
numbers against the bars in :data:`BARS` and prints every miss.

A run that never reached the target counts as infinitely slow, so a median over seeds is finite
only when at least half the seeds (for an even count, more than half) reached the target.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftune.average import DEFAULT_DECAY
from selftune.bench.fields import Damaged
from selftune.bench.overhead import OVERHEAD, read_overhead
from selftune.bench.provenance import describe
from selftune.bench.runner import DIVERGE_FACTOR, RESULTS, read_results
from selftune.bench.workloads import WORKLOADS
from selftune.files import write_whole

INF = math.inf
#: The families whose rows are the published self-tuning methods selftune is measured against
#: (ReduceLROnPlateau is a schedule, not a self-tuner: it only ever lowers the rate).
PUBLISHED = ("published", "hypergradient")
#: The bars selftune's default controller is held to; the report lists every one it misses.
BARS: dict[str, str] = {
    "reliable": "reaches the target in every seed",
    "oracle": "needs no more median steps to target than the best grid member (the oracle)",
    "default": "needs at most 1.1x the median steps of the base optimizer at its default rate "
    "(do no harm)",
    "floor": "needs at most 0.7x the default's steps, as a median over the workloads",
    "published": "needs fewer median steps to target than every published self-tuning method",
    "sweep": "reaches the target in every seed from every starting rate of the sweep, in at "
    "most 1.5x the oracle's median steps",
    "stable": "no run of selftune (any controller, any start) diverges",
    "overhead": "costs at most 5% more time per step than the unwrapped optimizer, or pays "
    "for it: its median steps to target times that per-step ratio are fewer than the oracle's",
    "averaged": "evaluated at its weight average (`selftune-auto-<base>-avg`), needs no more "
    "median steps to target than the best grid member evaluated at the same average",
    "sweep-avg": "evaluated at its weight average, reaches the target in every seed from every "
    "starting rate of the sweep, in at most 1.5x the averaged oracle's median steps",
}
OVERHEAD_BAR = 1.05
DO_NO_HARM, FLOOR, SWEEP_SLACK = 1.1, 0.7, 1.5
#: Order of families in the tables: the rows a reader looks for first come first.
FAMILY_ORDER = (
    "default",
    "selftune",
    "averaged",
    "sweep",
    "sweep-avg",
    "published",
    "hypergradient",
    "plateau",
    "grid",
    "grid-avg",
)
#: The families whose rows are selftune's own (drawn bold, checked for divergence).
SELFTUNE_FAMILIES = ("selftune", "averaged", "sweep", "sweep-avg")
#: Families drawn in the curve plots (grid rows would bury the rest; the oracle is added).
PLOTTED = ("default", "selftune", "averaged", "published", "hypergradient", "plateau")
#: The rows evaluated at a weight average, and the grid they are compared with.
AVERAGED = {"averaged": "grid-avg", "sweep-avg": "grid-avg", "grid-avg": "grid-avg"}


@dataclass
class Row:
    """One method on one workload, summarised over its seeds."""

    workload: str
    method: str
    family: str
    base: str
    lr0: float | None
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        return len(self.records)

    @property
    def hits(self) -> int:
        return sum(r["steps_to_target"] is not None for r in self.records)

    def to_target(self, key: str) -> list[float]:
        """Per seed, ``steps_to_target`` or ``seconds_to_target``; a miss is infinity."""
        return [INF if r[key] is None else float(r[key]) for r in self.records]

    @property
    def steps(self) -> float:
        """Median steps to target, a miss counting as infinitely many."""
        return statistics.median(self.to_target("steps_to_target"))

    @property
    def seconds(self) -> float:
        return statistics.median(self.to_target("seconds_to_target"))

    @property
    def hit_steps(self) -> list[float]:
        return [s for s in self.to_target("steps_to_target") if s < INF]

    @property
    def diverged(self) -> int:
        return sum(bool(r["diverged"]) for r in self.records)

    @property
    def errors(self) -> list[str]:
        return [r["error"] for r in self.records if r.get("error")]

    def metric(self, key: str) -> list[float]:
        return [r[key] for r in self.records if r[key] is not None]

    @property
    def ms_per_step(self) -> float | None:
        values = [r["ms_per_step"] for r in self.records if r["ms_per_step"] is not None]
        return statistics.median(values) if values else None


@dataclass
class Workload:
    """What the records say about one workload, and its rows."""

    name: str
    metric: str
    target: float
    higher_is_better: bool
    steps: int
    eval_every: int
    held_out: bool
    rows: dict[str, Row] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The name as the tables give it, marked when the workload is held out."""
        return self.name + (" (held out)" if self.held_out else "")

    def default(self, base: str) -> Row | None:
        return self.rows.get(f"{base}-default")

    def grid(self, base: str, grid_family: str = "grid") -> list[Row]:
        """The learning-rate grid of ``base`` (``grid_family`` "grid-avg": the one evaluated at
        a weight average)."""
        return [r for r in self.rows.values() if r.family == grid_family and r.base == base]

    def oracle(self, base: str, grid_family: str = "grid") -> Row | None:
        """The grid member of ``base`` with the fewest median steps (ties as :func:`_fastest`
        breaks them)."""
        reached = [r for r in self.grid(base, grid_family) if r.steps < INF]
        return _fastest(reached) if reached else None


def _fastest(rows: list[Row]) -> Row:
    """The row with the fewest median steps; ties go to more seeds that hit, then to the slowest
    seed's steps, then to the fastest seed's, then to the method's name.  Never to seconds:
    those measured beside other runs do not compare (the same computation took up to 2.4x
    longer in one run than in another), and among rows that all miss they are all infinite;
    nor to the order of the records, which a parallel or resumed run writes in the order runs
    finish (shuffled, the committed results made other headline rows)."""

    def rank(r: Row) -> tuple[float, int, float, float, str]:
        steps = r.to_target("steps_to_target")
        return r.steps, -r.hits, max(steps), min(steps), r.method

    return min(rows, key=rank)


#: What every run of one workload must agree on, each field with its name in a message: the
#: race's rules (steps to target would not compare across two) and what the page says of it (runs
#: of two versions of a workload, one held out and one not, were mixed, and the page said what the
#: first run did).
WORKLOAD_FIELDS = {
    "steps_budget": "budgets",
    "target": "targets",
    "eval_every": "evaluation intervals",
    "metric_name": "metrics",
    "higher_is_better": "directions (higher is better)",
    "held_out": "held-out marks",
}
#: What every run of one method on a workload must agree on: its row's family, base optimizer and
#: starting rate, which the row took from its first run.
METHOD_FIELDS = {"family": "families", "base": "base optimizers", "lr0": "starting rates"}


def _field(record: dict[str, Any], key: str) -> Any:
    """``record[key]``, an optional field absent read as the report reads it (not held out, no
    starting rate)."""
    value = record.get(key)
    return bool(value) if key == "held_out" else value


def _agree(
    first: dict[str, Any], r: dict[str, Any], fields: dict[str, str], who: str, source: str
) -> None:
    """Refuse ``r`` where it differs from ``first`` on one of ``fields``, naming both runs."""
    for key, what in fields.items():
        if _field(r, key) != _field(first, key):
            a, b = (json.dumps(_field(x, key)) for x in (first, r))
            runs = " and of ".join(f"{x['method']} seed {x['seed']}" for x in (first, r))
            raise Damaged(
                f"{who} has runs with {what} {a} and {b} in {source} ({key} of {runs}: smoke "
                "and full mixed, or runs from before and after a change?); give each suite its "
                "own --out, and run what changed again into a fresh --out, or remove the stale "
                "runs' lines"
            )


def summarise(records: list[dict[str, Any]], source: Path | None = None) -> dict[str, Workload]:
    """Group records by workload and method (``source``: their file, for the messages).

    The first record of a workload sets its rules and marks, and the first of a method its row's;
    a later one that disagrees on any of :data:`WORKLOAD_FIELDS` or :data:`METHOD_FIELDS` is
    refused, never mixed in: the page would say what the first said, of runs some of which were
    not that."""
    out: dict[str, Workload] = {}
    first: dict[tuple[str, ...], dict[str, Any]] = {}
    where = str(source) if source is not None else "one results folder"
    for r in records:
        w = out.setdefault(
            r["workload"],
            Workload(
                r["workload"],
                r["metric_name"],
                r["target"],
                r["higher_is_better"],
                r["steps_budget"],
                r["eval_every"],
                _field(r, "held_out"),
            ),
        )
        method = f"{r['workload']}: {r['method']}"
        _agree(first.setdefault((r["workload"],), r), r, WORKLOAD_FIELDS, r["workload"], where)
        _agree(first.setdefault((r["workload"], r["method"]), r), r, METHOD_FIELDS, method, where)
        row = w.rows.setdefault(
            r["method"], Row(r["workload"], r["method"], r["family"], r["base"], r.get("lr0"))
        )
        if any(other["seed"] == r["seed"] for other in row.records):
            raise Damaged(
                f"{r['workload']}: {r['method']} seed {r['seed']} is in the results twice (two "
                "runs into one --out at once?); remove one of the two lines"
            )
        row.records.append(r)
    # the workloads in the suite's order, whatever order the runs finished in
    order = {name: i for i, name in enumerate(WORKLOADS)}
    return dict(sorted(out.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def ratio(row: Row | None, ref: Row | None) -> float | None:
    """Median steps of ``row`` over those of ``ref`` (inf: row missed; None: nothing to compare)."""
    if row is None or ref is None or ref.steps == INF:
        return None
    return row.steps / ref.steps


def _fmt_ratio(x: float | None) -> str:
    if x is None:
        return "–"
    return "miss" if x == INF else f"{x:.2f}x"


def _fmt_steps(row: Row) -> str:
    hits = row.hit_steps
    if row.steps == INF:
        return f"miss ({row.hits}/{row.seeds} hit)"
    # the spread is over every seed: a seed that missed is its top end
    top = "miss" if row.hits < row.seeds else f"{max(hits):.0f}"
    spread = f" [{min(hits):.0f}–{top}]" if row.seeds > 1 else ""
    return f"{row.steps:.0f}{spread}"


def _fmt_metric(values: list[float]) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.4g}"
    return f"{med:.4g} [{min(values):.4g}–{max(values):.4g}]"


def _sorted_rows(w: Workload) -> list[Row]:
    def key(r: Row) -> tuple[int, str, float, str]:
        fam = FAMILY_ORDER.index(r.family) if r.family in FAMILY_ORDER else len(FAMILY_ORDER)
        return (fam, r.base, r.lr0 or 0.0, r.method)

    return sorted(w.rows.values(), key=key)


def _own_oracle(w: Workload, row: Row) -> Row | None:
    """The oracle ``row`` is compared with: the averaged grid's for an averaged row."""
    return w.oracle(row.base, AVERAGED.get(row.family, "grid"))


def _table(w: Workload) -> list[str]:
    head = (
        "| method | base | hits | steps to target, median [min–max] | seconds to target | "
        "× default | × oracle | final metric, median [min–max] | diverged | ms/step |"
    )
    lines = [head, "|" + "---|" * 10]
    for row in _sorted_rows(w):
        name = row.method
        oracle = _own_oracle(w, row)
        if oracle is row:
            name += " **(oracle)**"
        seconds = "–" if row.seconds == INF else f"{row.seconds:.1f}"
        ms = "–" if row.ms_per_step is None else f"{row.ms_per_step:.2f}"
        lines.append(
            f"| {name} | {row.base} | {row.hits}/{row.seeds} | {_fmt_steps(row)} | {seconds} | "
            f"{_fmt_ratio(ratio(row, w.default(row.base)))} | "
            f"{_fmt_ratio(ratio(row, oracle))} | "
            f"{_fmt_metric(row.metric('final_metric'))} | {row.diverged} | {ms} |"
        )
    return lines


def _headline(workloads: dict[str, Workload]) -> list[str]:
    lines = [
        "| workload | base | default | oracle | selftune-auto | × default | × oracle | "
        "best published | × oracle |",
        "|" + "---|" * 9,
    ]
    for w, base in _pairs(workloads):
        oracle, auto = w.oracle(base), w.rows.get(f"selftune-auto-{base}")
        default = w.default(base)
        published = _best_published(w, base)
        if oracle is None and auto is None and default is None:
            continue
        lines.append(
            f"| {w.label} | {base} | {_fmt_steps(default) if default else '–'} | "
            f"{_label(oracle)} | {_fmt_steps(auto) if auto else '–'} | "
            f"{_fmt_ratio(ratio(auto, default))} | "
            f"{_fmt_ratio(ratio(auto, oracle))} | {_label(published)} | "
            f"{_fmt_ratio(ratio(published, oracle))} |"
        )
    return lines


def _pairs(workloads: dict[str, Workload]) -> Iterator[tuple[Workload, str]]:
    """Each workload with each base optimizer, in the tables' order."""
    for w in workloads.values():
        for base in ("sgd", "adamw"):
            yield w, base


def _at_grid_edge(workloads: dict[str, Workload]) -> list[str]:
    """The oracles that are their grid's highest or lowest rate, in words (empty if none).

    A faster rate may lie beyond such an edge, so the ratio to that oracle may flatter the
    method measured against it: a reader should know which ones."""
    found = []
    for w, base in _pairs(workloads):
        for family in ("grid", "grid-avg"):
            oracle = w.oracle(base, family)
            rates = [
                r.lr0
                for r in w.rows.values()
                if r.family == family and r.base == base and r.lr0 is not None
            ]
            if oracle is None or len(rates) < 2 or oracle.lr0 not in (min(rates), max(rates)):
                continue
            side = "highest" if oracle.lr0 == max(rates) else "lowest"
            found.append(f"{w.name} {base}: {oracle.method} ({side} rate of its grid)")
    if not found:
        return []
    return [
        "Oracles at an edge of their grid, where a rate beyond it may be faster still (the "
        "ratios to them may flatter what is measured against them): " + "; ".join(found) + ".",
        "",
    ]


def _averaged_headline(workloads: dict[str, Workload]) -> list[str]:
    """``auto`` evaluated at its weight average against the grid evaluated at the same average,
    and against the plain oracle (empty when no averaged rows were run)."""
    lines = [
        "| workload | base | oracle, averaged | selftune-auto, averaged | × averaged oracle | "
        "oracle | × oracle |",
        "|" + "---|" * 7,
    ]
    for w, base in _pairs(workloads):
        auto = w.rows.get(f"selftune-auto-{base}-avg")
        averaged = w.oracle(base, "grid-avg")
        if auto is None and averaged is None:
            continue
        oracle = w.oracle(base)
        lines.append(
            f"| {w.label} | {base} | {_label(averaged)} | {_fmt_steps(auto) if auto else '–'} | "
            f"{_fmt_ratio(ratio(auto, averaged))} | {_label(oracle)} | "
            f"{_fmt_ratio(ratio(auto, oracle))} |"
        )
    return lines if len(lines) > 2 else []


def _label(row: Row | None) -> str:
    return "–" if row is None else f"{row.method}: {_fmt_steps(row)}"


def _best_published(w: Workload, base: str | None = None) -> Row | None:
    rows = [r for r in w.rows.values() if r.family in PUBLISHED]
    if base is not None:
        rows = [r for r in rows if r.base == base]
    return _fastest(rows) if rows else None


def _floor_ratio(workloads: dict[str, Workload], base: str) -> tuple[float, str] | None:
    """Median over workloads of auto's steps over the default's, and the ratios in words.

    Where the default never reaches the target and auto does, the ratio counts as 0 (any finite
    number of steps is less than 0.7 of infinitely many); where both miss, as 1.
    """
    ratios, words = [], []
    for w in workloads.values():
        auto, default = w.rows.get(f"selftune-auto-{base}"), w.default(base)
        if auto is None or default is None:
            continue
        if default.steps == INF:
            ratios.append(0.0 if auto.steps < INF else 1.0)
            words.append(f"{w.name} default missed" + ("" if auto.steps < INF else ", auto too"))
        else:
            ratios.append(auto.steps / default.steps)
            words.append(f"{w.name} {_fmt_ratio(ratios[-1])}")
    return (statistics.median(ratios), "; ".join(words)) if ratios else None


def _against_oracle(
    row: Row, oracle: Row | None, grid: list[Row], grid_name: str
) -> tuple[bool, str] | None:
    """Whether ``row`` needs no more median steps than ``oracle``, the best of ``grid``, and the
    figures in words; with no oracle (no member reached the target) a row that reaches it
    does, and a row that misses too (or no grid that ran) says nothing either way."""
    if oracle is not None:
        r, what = ratio(row, oracle), "the " + grid_name.replace("grid", "oracle")
        return r is not None and r <= 1.0, _versus(row, oracle, what)
    if row.steps < INF and grid:
        return True, f"{_fmt_steps(row)} steps; no {grid_name} member reaches it"
    return None


def _versus(row: Row, ref: Row, what: str) -> str:
    """``412 [380–450] steps vs 350 [...] for the oracle adamw-grid-cos-1e-2 (1.18x)``."""
    r = ratio(row, ref)
    tail = f" ({_fmt_ratio(r)})" if r is not None and r < INF else ""
    unit = " steps" if row.steps < INF else ""
    return f"{_fmt_steps(row)}{unit} vs {_fmt_steps(ref)} for {what} {ref.method}{tail}"


def tally(short: list[str], met: list[str]) -> dict[str, tuple[int, int]]:
    """Per bar of :data:`BARS` (its words), how many of :func:`shortfalls`' checks met it, of how
    many: each check's line names its bar's words between ": " and " — "."""
    out = {}
    for words in BARS.values():
        mark = f": {words} — "
        passed, missed = sum(mark in m for m in met), sum(mark in s for s in short)
        out[words] = (passed, passed + missed)
    return out


def shortfalls(
    workloads: dict[str, Workload], overhead: list[dict[str, Any]]
) -> tuple[list[str], list[str]]:
    """Each bar of :data:`BARS` checked per workload and base: (misses, passes), in words."""
    short: list[str] = []
    met: list[str] = []
    for w in workloads.values():
        tag = w.label
        for base in ("sgd", "adamw"):
            auto = w.rows.get(f"selftune-auto-{base}")
            if auto is None:
                continue

            def check(ok: bool, bar: str, detail: str, who: str = f"{tag}, {auto.method}") -> None:
                (met if ok else short).append(f"{who}: {BARS[bar]} — {detail}")

            check(auto.hits == auto.seeds, "reliable", f"{auto.hits}/{auto.seeds} seeds hit")
            oracle = w.oracle(base)
            verdict = _against_oracle(auto, oracle, w.grid(base), "grid")
            if verdict is not None:
                check(verdict[0], "oracle", verdict[1])
            default = w.default(base)
            # both missing says nothing either way: skipped, as a miss of the oracle is
            if default is not None and not default.steps == auto.steps == INF:
                ok = default.steps == INF or auto.steps <= DO_NO_HARM * default.steps
                check(ok, "default", _versus(auto, default, "the default"))
            published = _best_published(w)
            # as for the default: auto and every published method missing says nothing
            if published is not None and not published.steps == auto.steps == INF:
                detail = _versus(auto, published, "the best published")
                check(auto.steps < published.steps, "published", detail)
            sweep = [r for r in w.rows.values() if r.family == "sweep" and r.base == base]
            verdict_sweep = _sweep_check(sweep, oracle, w.grid(base), "sweep")
            if verdict_sweep is not None:
                check(*verdict_sweep)
            tuned = [r for r in w.rows.values() if r.family in SELFTUNE_FAMILIES and r.base == base]
            averaged = w.rows.get(f"selftune-auto-{base}-avg")
            oracle_avg = w.oracle(base, "grid-avg")
            if averaged is not None:
                grid_avg = w.grid(base, "grid-avg")
                verdict = _against_oracle(averaged, oracle_avg, grid_avg, "averaged grid")
                if verdict is not None:
                    check(verdict[0], "averaged", verdict[1], f"{tag}, {averaged.method}")
            sweep = [r for r in w.rows.values() if r.family == "sweep-avg" and r.base == base]
            verdict_sweep = _sweep_check(sweep, oracle_avg, w.grid(base, "grid-avg"), "sweep-avg")
            if verdict_sweep is not None:
                check(*verdict_sweep, f"{tag}, {auto.method}-lr*-avg")
            diverged = [_diverged(r) for r in tuned if r.diverged]
            detail = ("diverged: " + ", ".join(diverged)) if diverged else "no divergence"
            check(not diverged, "stable", detail, f"{tag}, selftune rows on {base}")
    for base in ("sgd", "adamw"):
        floor = _floor_ratio(workloads, base)
        if floor is not None:
            median, words = floor
            line = f"selftune-auto-{base}: {BARS['floor']} — median {median:.2f} ({words})"
            (met if median <= FLOOR else short).append(line)
    for o in overhead:
        paid, detail = _paid_for(workloads.get(o["workload"]), o["base"], o["ratio"])
        line = (
            f"{o['workload']}, {o['base']}: {BARS['overhead']} — {o['ratio']:.2f}x "
            f"({o['plain_ms']:.2f} → {o['selftune_ms']:.2f} ms/step; the optimizer step alone "
            f"{_step_alone(o)} ms){detail}"
        )
        (met if o["ratio"] <= OVERHEAD_BAR or paid else short).append(line)
    return short, met


def _diverged(row: Row) -> str:
    """How many of a row's seeds diverged, and how many of those still reached the target: a
    divergence counts a loss above the bar at any step, a spike the guard rolled back too, so
    one that the run came back from reads apart from a run it lost."""
    came_back = sum(bool(r["diverged"]) and r["steps_to_target"] is not None for r in row.records)
    return f"{row.method} {row.diverged}/{row.seeds} ({came_back} of them reached the target)"


def _sweep_check(
    sweep: list[Row], oracle: Row | None, grid: list[Row], bar: str
) -> tuple[bool, str, str] | None:
    """Whether every start of ``sweep`` hit in every seed within 1.5x ``oracle``, the best of
    ``grid``; in words.  None where there is no sweep, or where every start hit and no grid ran
    to hold them to (as :func:`_against_oracle`): that was counted as met, "in at most 1.5x the
    oracle's median steps" with no oracle, whatever the starts' steps (the smoke suite runs no
    averaged AdamW grid beside its averaged AdamW sweep)."""
    if not sweep:
        return None
    missed = [f"{r.method} {r.hits}/{r.seeds}" for r in sweep if r.hits < r.seeds]
    if not missed and not grid:
        return None
    limit = SWEEP_SLACK * oracle.steps if oracle is not None else INF
    slow = [
        f"{r.method} {_fmt_ratio(ratio(r, oracle))}"
        for r in sweep
        if r.hits == r.seeds and r.steps > limit
    ]
    problems = [f"missed: {', '.join(missed)}"] if missed else []
    if slow:
        problems.append(f"over {SWEEP_SLACK:g}x the oracle: {', '.join(slow)}")
    worst = max(sweep, key=lambda r: r.steps)
    slowest = f"slowest start {worst.method}: {_fmt_steps(worst)} steps"
    return not problems, bar, "; ".join(problems) or slowest


def _paid_for(w: Workload | None, base: str, per_step: float) -> tuple[bool, str]:
    """Whether ``auto``'s median steps to target, each costing ``per_step`` times a plain one,
    come to fewer than the oracle's steps, and the figures in words.

    The issue's other way to meet the per-step bar: the time to target counts the per-step cost
    and the steps saved alike.  It is judged on steps times the paired per-step ratio, not on
    the runs' own seconds, which were timed with runs in parallel and vary by more than the
    cost in question; those are given beside it."""
    if w is None or (auto := w.rows.get(f"selftune-auto-{base}")) is None:
        return False, ""
    oracle, default = w.oracle(base), w.default(base)
    cost = auto.steps * per_step
    words = [f"{_fmt_steps(auto)} steps x {per_step:.2f} = {cost:.0f}" if cost < INF else "a miss"]
    words += [f"the oracle {oracle.method} {oracle.steps:.0f}"] if oracle else []
    seconds = [f"selftune-auto-{base} {_fmt_seconds(auto)}"]
    seconds += [f"the oracle {_fmt_seconds(oracle)}"] if oracle else []
    seconds += [f"the default {_fmt_seconds(default)}"] if default else []
    paid = oracle is not None and cost < oracle.steps
    return paid, f"; {', against '.join(words)} (seconds to target: {', '.join(seconds)})"


def _fmt_seconds(row: Row) -> str:
    return "miss" if row.seconds == INF else f"{row.seconds:.2f} s"


def _median_curve(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """The per-step median over seeds of a recorded curve (missing and None values skipped).

    A run ends where it reaches the target (a race), so past its last evaluation it holds its
    last value: a median over the runs still going would be one of the slower seeds alone,
    and the line would turn away from the target just where the faster seeds reached it.
    """
    steps = sorted({s for r in rows for s in r["curves"]["step"]})
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        curve = dict(zip(r["curves"]["step"], r["curves"][key], strict=True))
        end = max(curve, default=-1)
        held: float | None = None
        for step in steps:
            value = curve.get(step) if step <= end else held
            if value is not None and math.isfinite(value):
                by_step[step].append(value)
                held = value
    kept = sorted(by_step)
    return [float(s) for s in kept], [statistics.median(by_step[s]) for s in kept]


def _curves_png(w: Workload, rows: list[Row], title: str, path: Path) -> None:
    """Metric, training-loss EMA and effective rate over steps, one median line per row."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (
        ("metric", w.metric, False),
        ("loss_ema", "training loss (EMA)", False),
        ("lr", "effective learning rate", True),
    )
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for i, row in enumerate(rows):
            xs, ys = _median_curve(row.records, key)
            if xs:
                ax.plot(
                    xs,
                    ys,
                    "--" if row.family == "grid" else "-",
                    color=colors[i % len(colors)],
                    label=row.method,
                    linewidth=2.0 if row.family in SELFTUNE_FAMILIES else 1.0,
                )
        if key == "metric":
            ax.axhline(w.target, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{w.name}: {title} (median over seeds; dotted line: target)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _step_alone(o: dict[str, Any]) -> str:
    """The optimizer step's milliseconds alone, plain → selftune; "–" for a row measured before
    the step was timed apart, or an edited one that holds one of the two (a KeyError before)."""
    if not o.keys() >= {"plain_step_ms", "selftune_step_ms"}:
        return "–"
    return f"{o['plain_step_ms']:.2f} → {o['selftune_step_ms']:.2f}"


def _plots(w: Workload, fig_dir: Path) -> list[str]:
    """Write the workload's PNGs; return their names (relative to ``fig_dir``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{w.name}-curves.png"]
    oracles = [o for o in (w.oracle("sgd"), w.oracle("adamw")) if o is not None]
    shown = [r for r in _sorted_rows(w) if r.family in PLOTTED] + oracles
    _curves_png(w, shown, "methods and oracles", fig_dir / names[-1])
    sweep = [r for r in _sorted_rows(w) if r.family == "sweep"]
    if sweep:
        names.append(f"{w.name}-sweep.png")
        _curves_png(
            w, sweep + oracles, "selftune-auto from each starting rate", fig_dir / names[-1]
        )

    ranked = [r for r in _sorted_rows(w) if r.family != "grid"] + oracles
    ranked = list({r.method: r for r in ranked if r.hit_steps}.values())
    if ranked:
        ranked.sort(key=lambda r: r.steps)
        fig, axes = plt.subplots(1, 2, figsize=(13, 0.3 * len(ranked) + 1.4), sharey=True)
        for ax, key, unit in zip(
            axes, ("steps_to_target", "seconds_to_target"), ("steps", "seconds"), strict=True
        ):
            for i, row in enumerate(ranked):
                hits = [float(r[key]) for r in row.records if r[key] is not None]
                med = statistics.median(row.to_target(key))
                ax.barh(
                    i,
                    med if med < INF else max(hits),
                    color="tab:green" if row.family in SELFTUNE_FAMILIES else "tab:gray",
                    alpha=0.8 if med < INF else 0.3,  # pale: half the seeds or fewer hit
                )
                ax.plot([min(hits), max(hits)], [i, i], color="black", linewidth=1)
            ax.set_xlabel(f"{unit} to target: median (bar), min–max of seeds that hit (line)")
        axes[0].set_yticks(
            range(len(ranked)), [f"{r.method} ({r.hits}/{r.seeds})" for r in ranked], fontsize=7
        )
        axes[0].invert_yaxis()
        fig.suptitle(
            f"{w.name}: time to {w.metric} {'≥' if w.higher_is_better else '≤'} {w.target:g}"
        )
        fig.tight_layout()
        names.append(f"{w.name}-time-to-target.png")
        fig.savefig(fig_dir / names[-1], dpi=90)
        plt.close(fig)
    return names


def _methods_section() -> list[str]:
    """What each row label means, from the registry's own constants."""
    from selftune.bench import methods as m

    def rates(values: tuple[float, ...]) -> str:
        return ", ".join(f"{v:g}" for v in values)

    return [
        "## Methods",
        "",
        f"- `sgd-default`: SGD, momentum {m.SGD_DEFAULT['momentum']}, lr {m.SGD_DEFAULT['lr']}; "
        f"`adamw-default`: AdamW, lr {m.ADAMW_DEFAULT['lr']} (torch's other defaults).",
        "- `<base>-grid-const-<lr>` / `<base>-grid-cos-<lr>`: a constant rate, or cosine decay "
        f"to zero over the budget; AdamW at {rates(m.ADAMW_GRID)}, SGD at {rates(m.SGD_GRID)}.",
        "- `adamw-plateau`: AdamW from the default rate, halved by ReduceLROnPlateau "
        "(patience 3) at the fourth evaluation in a row without improvement of the held-out "
        "metric.",
        "- `prodigy` (prodigyopt), `dadapt-adam` (dadaptation) at lr 1.0, `schedulefree-adamw` "
        "(schedulefree) at its defaults, with `train()`/`eval()` around evaluation; their "
        "plotted rate is `lr × d` (Prodigy, D-Adaptation) or the scheduled rate.",
        "- `dog-sgd`: DoG (dog-optimizer, Ivgi et al. 2023) at its defaults (`reps_rel` 1e-6, "
        "1e-4 for a model with batch norm, as its README advises), evaluated at the polynomial-"
        "decay average of its package (weights and buffers), which its authors publish it with; "
        "its plotted rate is its step size `eta`.",
        "- `hd-sgd`, `hd-adam`: hypergradient descent as published (Baydin et al. 2018), from "
        "the defaults, hypergradient rate 1e-3 (SGD-HD) and 1e-7 (Adam-HD), no bounds.",
        "- `selftune-<controller>-<base>`: `selftune.wrap` around the default optimizer, given "
        "the loss at every step and the held-out metric after every evaluation (`observe`, "
        "which only `auto` reads); `selftune-auto-<base>-lr<x>`: the default controller "
        f"started at rate x (AdamW {rates(m.ADAMW_SWEEP)}; SGD {rates(m.SGD_SWEEP)}); "
        "`selftune-auto-blind-<base>`: the default controller given the loss alone, as a loop "
        "that never evaluates drives it.",
        "- `-avg` rows (`<base>-grid-<schedule>-<lr>-avg`, `selftune-auto-<base>-avg`, "
        "`selftune-auto-<base>-lr<x>-avg`): the same "
        "runs evaluated at an exponential moving average of the weights (decay "
        f"{DEFAULT_DECAY:g}, `selftune.wrap(..., average=True)`; the grid keeps the same "
        "`WeightAverage` beside its optimizer), swapped in for each evaluation; `auto` reads "
        "the average's metric. Their *× oracle* is against the best averaged grid member.",
        "",
    ]


#: The block of README.md that :func:`update_readme` rewrites with the headline table.
README_START, README_END = "<!-- bench-headline:start -->", "<!-- bench-headline:end -->"


def _averaged_section(workloads: dict[str, Workload]) -> list[str]:
    table = _averaged_headline(workloads)
    if not table:
        return []
    return [
        "### Evaluated at a weight average",
        "",
        "The same race with every evaluation read at an exponential moving average of the "
        f"weights (decay {DEFAULT_DECAY:g}, about {1 / (1 - DEFAULT_DECAY):.0f} steps): "
        "`selftune-auto` with `average=True` against the grid evaluated at the same average "
        "(a fair oracle: the average helps a fixed rate too), and against the plain oracle "
        "above.",
        "",
        *table,
        "",
    ]


def headline_block(results_dir: Path) -> list[str]:
    """The headline tables of the results in ``results_dir``, as README.md embeds them."""
    workloads = summarise(read_results(results_dir / RESULTS), results_dir / RESULTS)
    lines = [*_headline(workloads), "", *_averaged_section(workloads)]
    while not lines[-1]:
        lines.pop()
    return lines


def readme_problem(readme: Path) -> str | None:
    """Why ``readme`` cannot take the headline block, or None: asked before a suite runs, where
    a misspelt ``--readme`` was refused only once the suite and its page were done (hours
    into ``make bench``)."""
    if not readme.is_file():
        what = "a folder" if readme.is_dir() else "no such file"
        return f"--readme {readme}: {what}; give the README to update"
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return (
            f"--readme {readme} has no headline block to rewrite (the lines {README_START} and "
            f"{README_END}); add them where it goes"
        )
    if text.index(README_START) > text.index(README_END):
        return f"--readme {readme}: its bench-headline markers are in the wrong order"
    return None


def update_readme(readme: Path, results_dir: Path) -> None:
    """Rewrite the headline block of ``readme`` from the results; ValueError saying why
    (:func:`readme_problem`) where it cannot.

    So that the figures the README quotes are generated from the committed results, never typed.
    """
    problem = readme_problem(readme)
    if problem is not None:
        raise ValueError(problem)
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    block = "\n".join(["", *headline_block(results_dir), ""])
    # whole or not at all: the README is the user's, and a write cut by Ctrl-C or a full disk
    # would lose all of it past the cut
    write_whole(readme, f"{head}{README_START}{block}\n{README_END}{tail}".encode())


def write_report(results_dir: Path, report_dir: Path) -> Path:
    """Write ``report_dir/benchmarks.md`` and ``report_dir/bench/*.png`` from ``results_dir``."""
    records = read_results(results_dir / RESULTS)
    overhead = read_overhead(results_dir / OVERHEAD)
    if not records and not overhead:
        raise ValueError(
            f"{results_dir} holds no runs ({RESULTS}) and no {OVERHEAD}; run `selftune bench` "
            "(without --report-only) first, or point --out at a folder that holds results"
        )
    workloads = summarise(records, results_dir / RESULTS)
    fig_dir = report_dir / "bench"
    fig_dir.mkdir(parents=True, exist_ok=True)
    short, met = shortfalls(workloads, overhead)
    versions = sorted(
        {f"selftune {r['versions']['selftune']}, torch {r['versions']['torch']}" for r in records}
    )
    suites = sorted({r.get("suite", "?") for r in records})
    made = [
        "Where the runs were made (the code's commit, torch's CPU kernels): "
        f"{describe(records)}. Runs agree to the bit on one code and one machine, not across "
        "them: compare rows made alike.",
        "",
    ]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `selftune bench` from `{results_dir}` ({len(records)} runs"
        + (f", suite {', '.join(suites)}; {'; '.join(versions)}" if records else "")
        + f"). Regenerate with `selftune bench --report-only --out {results_dir}`.",
        "",
        *(made if records else []),
        "Each run trains one method on one workload from one seed, on one CPU thread, and "
        "evaluates the held-out metric every few steps on a fixed set. *Steps to target* is the "
        "first evaluation step at which the metric meets the workload's target; a run that never "
        "does counts as infinitely slow, so a median over seeds is a *miss* unless more than half "
        "of the seeds hit. *Seconds* are training time without evaluation. A run *diverged* if "
        f"any step's minibatch loss was not finite or above {DIVERGE_FACTOR:g}x its first (for a "
        "selftune run, a step its guard then rolled back counts too) or the guard gave up. "
        "The *oracle* is, per "
        "workload and base optimizer, the member of the learning-rate grid (constant and cosine) "
        "with the fewest median steps: the best a user who ran the whole grid could have picked. "
        "Ratios divide median steps by those of the default or the oracle of the same base "
        "optimizer, all from this one results file; for a row evaluated at a weight average "
        "(`-avg`) the oracle is the averaged grid's, and the default is the plain one (no "
        "default was run with an average). Times were measured with runs in parallel "
        "on a shared machine: compare them within a table, not across machines.",
        "",
        "## Headline",
        "",
        *_headline(workloads),
        "",
        *_at_grid_edge(workloads),
        *_averaged_section(workloads),
        "## Where selftune falls short",
        "",
        "The default controller (`selftune-auto-<base>`) against each bar, per workload and "
        "base optimizer (how many of the checks below meet it):",
        "",
        *(f"- {b} — {n} of {m}" for b, (n, m) in tally(short, met).items()),
        "",
    ]
    if short:
        lines += ["Misses, from the numbers below:", "", *(f"- {s}" for s in short), ""]
    else:
        lines += ["No bar was missed in these results.", ""]
    if met:
        lines += [
            "<details><summary>Bars met</summary>",
            "",
            *(f"- {m}" for m in met),
            "",
            "</details>",
            "",
        ]
    for w in workloads.values():
        lines += [
            f"## {w.label}",
            "",
            f"Target: {w.metric} {'≥' if w.higher_is_better else '≤'} {w.target:g}; budget "
            f"{w.steps} steps, evaluated every {w.eval_every}."
            + (
                " Held out: no default or controller was tuned on this workload."
                if w.held_out
                else ""
            ),
            "",
            *_table(w),
            "",
        ]
        lines += [f"![{name}](bench/{name})" for name in _plots(w, fig_dir)]
        errors = [f"{row.method}: {e}" for row in _sorted_rows(w) for e in row.errors]
        if errors:
            lines += ["", "Runs that stopped with an error:", "", *(f"- {e}" for e in errors)]
        lines.append("")
    lines += _methods_section()
    if overhead:
        lines += [
            "## Per-step overhead",
            "",
            'Plain and wrapped (`controller="auto"`) steps interleaved in one process, in blocks '
            "that alternate, each as long as the guard's snapshot interval (25 steps), so that "
            "every wrapped block pays for one snapshot; mean per-step times (batch, forward, "
            "backward, step). The ratio is the median over rounds of each round's two block "
            "means, so that load which drifts between rounds cancels. The forward and backward "
            "passes, which selftune does not touch, still differ between the two sides by a few "
            "percent on the transformer, in either direction (`bench-results/overhead-split/`); "
            "the optimizer step alone, timed apart, is selftune's own cost.",
            "",
            "| workload | base | steps | plain ms/step | selftune ms/step | ratio "
            "| optimizer step alone, ms: plain → selftune |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {o['workload']} | {o['base']} | {o['steps']} | {o['plain_ms']:.2f} | "
                f"{o['selftune_ms']:.2f} | {o['ratio']:.2f}x | {_step_alone(o)} |"
                for o in overhead
            ),
            "",
        ]
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "benchmarks.md"
    write_whole(path, "\n".join(lines).encode("utf-8"))
    return path
