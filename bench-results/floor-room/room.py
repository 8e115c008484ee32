"""Does a higher floor for the rate mend the runs whose cuts ended at it?

``selftune.RateFloorWarning`` told a run whose rate was cut to its floor (the lower end of
``bounds["lr"]``, by default a thousandth of the starting rate) that, where the loss or the
metric still has far to go, the floor wants room (after this measurement it no longer does).
About half of ``auto``'s misses on the benchmark ended at the floor (``../pilots/floor_runs.py``).
This measures the advice as a user would take it, before the run, on every run:

- on every workload of the benchmark, both bases, seeds 0-4, from the default rates, the
  benchmark's ``selftune-auto-<base>`` row (run here, the baseline) and the same with the
  floor at a hundredth (``-floor-1e-2``) and a tenth (``-floor-1e-1``) of the starting rate
  (``bounds={"lr": (f, 1e5)}``, the default's upper end): one and two decades of room, the
  advice's own steps, not values fitted to these runs;
- and where the cuts are meant, on ``../label-noise/``'s runs told the validation accuracy
  (``auto-observe``: there the metric's cuts stop the memorising of the noisy labels), the
  same two floors.

Run from the repository root: ``SELFTUNE_CACHE=.cache PYTHONPATH=src python
bench-results/floor-room/room.py`` (some thirty minutes on two cores); writes ``results.json``
(the benchmark's rows, kept as they end) and ``label-noise.json`` next to this file, and the
tables of both to ``table.md``; ``--table`` remakes the table from them.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "label-noise"), str(HERE.parent / "pilots")]
import digits as noisy  # noqa: E402
from floor_runs import ends_at_floor  # noqa: E402
from probe_grid import command, median_steps, run_rows, steps_row, table  # noqa: E402

from selftune.bench import methods as m  # noqa: E402
from selftune.bench.report import summarise  # noqa: E402
from selftune.bench.runner import read_results  # noqa: E402
from selftune.bench.workloads import WORKLOADS  # noqa: E402
from selftune.errors import RateFloorWarning  # noqa: E402
from selftune.policy import DEFAULT_BOUNDS  # noqa: E402

BASES = ("sgd", "adamw")
FLOORS = (1e-2, 1e-1)  #: the variants' floors, as factors of the starting rate
SEEDS = range(5)


def floor_of(row: str) -> float:
    """The floor of a row, as a factor of its starting rate (the default's for the baseline)."""
    return float(row.split("-floor-")[1]) if "-floor-" in row else DEFAULT_BOUNDS["lr"][0]


def rows_of(base: str) -> list[str]:
    """The baseline and its variants, by name."""
    tuned = f"selftune-auto-{base}"
    return [tuned, *(f"{tuned}-floor-{m.lr_label(f)}" for f in FLOORS)]


def method(row: str) -> m.Method:
    """The benchmark's ``auto`` row, or it with the floor that the row's name gives."""
    if "-floor-" not in row:
        return m.methods()[row]
    base = row.split("-")[2]
    bounds = {"lr": (floor_of(row), DEFAULT_BOUNDS["lr"][1])}
    build = m._selftune(base, m.DEFAULT_LR[base], "auto", bounds=bounds)
    return m.Method(row, "selftune", base, build, len(SEEDS), m.DEFAULT_LR[base])


def quiet(train: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """One run without the floor's warning (counted from the rows instead: ``at_floor``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RateFloorWarning)
        return train(*args)


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    return quiet(steps_row, method(job[1]), job)


def run_noisy(job: tuple[str, int]) -> dict[str, Any]:
    return quiet(noisy.run, *job)


def at_floor(r: dict[str, Any]) -> bool:
    """A miss whose last rate stands within 2x of its floor (``floor_runs.py``'s reading)."""
    start = m.DEFAULT_LR[r["row"].split("-")[2]]
    return r["steps_to_target"] is None and ends_at_floor(r["final_lr"], start, floor_of(r["row"]))


def steps_table(runs: list[dict[str, Any]]) -> str:
    """Median steps to target [hits] per workload, base and row, against the page's oracle;
    then, per variant against the baseline, the runs faster, slower and alike, the hits, and
    the misses at the floor; and how many baseline runs here took the page's own steps."""
    records = read_results(HERE.parent / "results.jsonl")
    page = summarise(records)
    lines = [
        "| workload | base | oracle (page) | "
        + " | ".join(r.removeprefix("selftune-auto-sgd") or "auto" for r in rows_of("sgd"))
        + " |",
        "|---|---|---:|" + "---:|" * (len(FLOORS) + 1),
    ]
    for name in WORKLOADS:
        for base in BASES:
            oracle = page[name].oracle(base)
            cells = [f"{oracle.steps:g}" if oracle else "miss"]
            for row in rows_of(base):
                value, hits, n = median_steps(runs, name, row)
                cell = "miss" if value is None else f"{value:g}"
                if value is not None and oracle is not None:
                    cell += f" ({value / oracle.steps:.2f}x)"
                cells.append(f"{cell} [{hits}/{n}]")
            lines.append(f"| {name} | {base} | " + " | ".join(cells) + " |")
    lines.append("")
    key = {(r["workload"], r["row"], r["seed"]): r for r in runs}
    for base in BASES:
        tuned, *variants = rows_of(base)
        mine = [r for r in runs if r["row"] == tuned]
        lines.append(
            f"- `{tuned}`: {sum(r['steps_to_target'] is not None for r in mine)} of {len(mine)} "
            f"runs hit, {sum(map(at_floor, mine))} misses at the floor"
        )
        for variant in variants:
            inf = float("inf")
            pairs = [
                (a, key[(a["workload"], variant, a["seed"])])
                for a in mine
                if (a["workload"], variant, a["seed"]) in key
            ]
            steps = [(a["steps_to_target"] or inf, b["steps_to_target"] or inf) for a, b in pairs]
            theirs = [b for _, b in pairs]
            lines.append(
                f"- `{variant}`: runs faster {sum(b < a for a, b in steps)}, "
                f"slower {sum(b > a for a, b in steps)}, alike {sum(a == b for a, b in steps)}; "
                f"{sum(r['steps_to_target'] is not None for r in theirs)} of {len(theirs)} hit, "
                f"{sum(map(at_floor, theirs))} misses at the floor"
            )
    committed = {(r["workload"], r["method"], r["seed"]): r["steps_to_target"] for r in records}
    base_runs = [r for r in runs if "-floor-" not in r["row"]]
    apart = Counter(
        r["workload"]
        for r in base_runs
        if committed.get((r["workload"], r["row"], r["seed"]), -1) != r["steps_to_target"]
    )
    lines.append(
        f"- the baseline's runs here that took the page's own steps: "
        f"{len(base_runs) - sum(apart.values())} of {len(base_runs)}; those that did not, by "
        "workload: " + (", ".join(f"{w} {n}" for w, n in apart.items()) or "none")
    )
    return "\n".join(lines) + "\n"


def noisy_variants() -> list[str]:
    """``../label-noise/``'s runs told the metric, and the same with each floor."""
    told = [v for v in noisy.VARIANTS if v.endswith("-auto-observe")]
    return [f"{v}{suffix}" for v in told for suffix in ("", *(f"-floor-{f:g}" for f in FLOORS))]


def noisy_alike(told: list[dict[str, Any]]) -> str:
    """How many of the label-noise baseline's runs here ended as that probe's committed ones."""
    committed = {
        (r["variant"], r["seed"]): r["accuracy"]
        for r in json.loads((HERE.parent / "label-noise" / "results.json").read_text())
    }
    mine = [r for r in told if "-floor-" not in r["variant"]]
    alike = sum(committed.get((r["variant"], r["seed"])) == r["accuracy"] for r in mine)
    return (
        f"- the label-noise baseline's runs here that ended at that probe's committed accuracy: "
        f"{alike} of {len(mine)}\n"
    )


def main() -> None:
    jobs = [(w, row, s) for w in WORKLOADS for b in BASES for row in rows_of(b) for s in SEEDS]
    runs = command(run, jobs, HERE)
    assert runs is not None
    out = HERE / "label-noise.json"
    if sys.argv[1:] != ["--table"]:
        run_rows(run_noisy, [(v, s) for s in SEEDS for v in noisy_variants()], out)
    told = json.loads(out.read_text(encoding="utf-8"))
    text = steps_table(runs) + "\n" + table(told, noisy_variants(), noisy.COLUMNS)
    text += "\n" + noisy_alike(told)
    (HERE / "table.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
