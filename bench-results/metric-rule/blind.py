"""`auto` with and without the metric's plateau rule, on every workload of the page.

The benchmark's loop gives each `selftune-auto-<base>` run the held-out metric after every
evaluation (`opt.observe`), and `auto` halves the rate once it has gone more than three
evaluations without a new best (`ReduceLROnPlateau(patience=3)`'s rule, pilot 45). The page's
`selftune-auto-blind-<base>` rows are the same controller from the same rate and seeds, never
told the metric. The rule was judged on the eight workloads the benchmark had then; the seven
added since (`LATER`) are its test out of sample.

Prints, from `bench-results/results.jsonl` alone (no run), one line per workload and base: the
seeds that hit and the median steps to target of each (a miss counts as infinitely many), and
each against the oracle; then, for the four bars of the page that read the default-rate row
alone, how many checks each meets with the rows as they are and with the blind rows in their
place, over the eight and over the seven. Run from the repository root:
``PYTHONPATH=src python bench-results/metric-rule/blind.py``; its output is `table.md`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from selftune.bench import report
from selftune.bench.runner import read_results

RESULTS = Path(__file__).resolve().parents[1] / "results.jsonl"
#: the workloads added after the metric's rule was adopted (pilot 45), in the order they came
LATER = (
    "moons-deep-tanh",
    "hypercube-logreg",
    "image-fourier-mlp",
    "ratings-factorization",
    "digits-vae",
    "poisson-pinn",
    "swissroll-diffusion",
)
#: the page's bars that read only the default-rate `auto` row
BARS = ("reliable", "oracle", "default", "published")


def _steps(row: report.Row) -> str:
    median = "miss" if row.steps == report.INF else f"{row.steps:g}"
    return f"{median} [{row.hits}/{row.seeds}]"


def _against(row: report.Row, oracle: report.Row | None) -> str:
    ratio = report.ratio(row, oracle)
    return "–" if ratio is None or ratio == report.INF else f"{ratio:.2f}x"


def _count(tally: tuple[int, int]) -> str:
    return f"{tally[0]} of {tally[1]}"


def _blind(workloads: dict[str, report.Workload]) -> dict[str, report.Workload]:
    """The workloads with each `selftune-auto-<base>` row's runs replaced by the blind row's."""
    out = {}
    for name, w in workloads.items():
        rows = dict(w.rows)
        for base in ("sgd", "adamw"):
            auto, blind = f"selftune-auto-{base}", f"selftune-auto-blind-{base}"
            if auto in rows and blind in rows:
                rows[auto] = replace(rows[auto], records=rows[blind].records)
        out[name] = replace(w, rows=rows)
    return out


def _tallies(workloads: dict[str, report.Workload]) -> dict[str, tuple[int, int]]:
    short, met = report.shortfalls(workloads, [])
    return report.tally(short, met)


def main() -> None:
    workloads = report.summarise(read_results(RESULTS), RESULTS)
    print("| workload | base | auto: median [hits] | × oracle | blind: median [hits] | × oracle |")
    print("|---|---|---:|---:|---:|---:|")
    for w in workloads.values():
        for base in ("sgd", "adamw"):
            auto, blind = w.rows[f"selftune-auto-{base}"], w.rows[f"selftune-auto-blind-{base}"]
            oracle = w.oracle(base)
            name = w.name + (" (later)" if w.name in LATER else "")
            print(
                f"| {name} | {base} | {_steps(auto)} | {_against(auto, oracle)} | "
                f"{_steps(blind)} | {_against(blind, oracle)} |"
            )
    print()
    print("| bar | workloads | as on the page | blind in auto's place |")
    print("|---|---|---:|---:|")
    for label, keep in (("the eight", False), ("the seven later", True)):
        part = {k: w for k, w in workloads.items() if (k in LATER) == keep}
        page, blind = _tallies(part), _tallies(_blind(part))
        for bar in BARS:
            words = report.BARS[bar]
            print(f"| {words} | {label} | {_count(page[words])} | {_count(blind[words])} |")


if __name__ == "__main__":
    main()
