"""The guard alone at rates too high for the plain optimizer: is the run still not lost?

selftune's guard promises that a run which turns unstable rolls back and backs off instead of
being lost.  The benchmark's learning-rate grid (``../results.jsonl``) holds the test: on each
workload, the constant rates above the largest one at which the plain optimizer reaches the
target in at least two seeds of three are rates at which it does not.  For each of those
(workload, base optimizer, rate) this trains, with the benchmark's own runner, data, budget
and seeds 0-2:

- ``plain``: the optimizer at that constant rate (the grid's row, re-run on this machine);
- ``guard-only``: the same optimizer wrapped with ``controller="off"``: the default guard and
  nothing else, so any change comes from its rollbacks and back-offs.

Measured per run: steps to the target, the final metric, whether it diverged (the benchmark's
rule), the rate at the end and the guard's events.  Run from the repository root:
``PYTHONPATH=src python bench-results/too-high/run.py`` (about a quarter of an hour on two
cores); writes ``results.json`` and ``table.md`` next to this file.  ``run.py --summary``
prints, from the committed ``results.json``, the runs of each kind that reach the target and
those that miss it with no guard event.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from selftune.bench import methods as registry
from selftune.bench import runner
from selftune.bench.methods import Handle, Method, Setting, lr_label
from selftune.bench.workloads import WORKLOADS

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import Column, count_guard_events, events_total, per_seed, run_grid  # noqa: E402

SEEDS = range(3)
KINDS = ("plain", "guard-only")


def too_high(results: Path) -> list[tuple[str, str, float]]:
    """(workload, base, rate) for every constant grid rate above the largest at which the
    plain optimizer reached the target in at least two of its seeds."""
    hits: dict[tuple[str, str], dict[float, int]] = defaultdict(lambda: defaultdict(int))
    for line in results.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["family"] == "grid" and "-const-" in r["method"]:
            hits[(r["workload"], r["base"])][r["lr0"]] += r["steps_to_target"] is not None
    cells = []
    for (workload, base), by_rate in sorted(hits.items()):
        reached = [lr for lr, n in by_rate.items() if n >= 2]
        if reached:
            cells += [(workload, base, lr) for lr in sorted(by_rate) if lr > max(reached)]
    return cells


CELLS = too_high(HERE.parent / "results.jsonl")
VARIANTS = tuple(f"{w}:{b}:{lr_label(lr)}:{k}" for w, b, lr in CELLS for k in KINDS)


def run(variant: str, seed: int) -> dict[str, Any]:
    workload, base, label, kind = variant.split(":")
    lr = next(x for w, b, x in CELLS if (w, b, lr_label(x)) == (workload, base, label))
    counters: list[Counter[str]] = []  # the guard's events, counted as the run trains
    if kind == "plain":
        build = registry._plain(base, lr, "const")
    else:
        wrapped = registry._selftune(base, lr, "off", metric=False)

        def build(model: torch.nn.Module, s: Setting) -> Handle:
            handle = wrapped(model, s)
            counters.append(count_guard_events(handle.optimizer))
            return handle

    with runner.one_thread():
        record = runner.train(WORKLOADS[workload], Method(variant, kind, base, build, 3, lr), seed)
    return {
        "variant": variant,
        "seed": seed,
        "steps_to_target": record["steps_to_target"],
        "final_metric": record["final_metric"],
        "diverged": record["diverged"],
        "error": record["error"],
        "rate": record["curves"]["lr"][-1],
        "events": dict(counters[0]) if counters else {},
    }


def _steps(r: dict[str, Any]) -> str:
    return "miss" if r["steps_to_target"] is None else str(r["steps_to_target"])


def _metric(r: dict[str, Any]) -> str:
    return "-" if r["final_metric"] is None else f"{r['final_metric']:.3g}"


COLUMNS: list[Column] = [
    ("steps to target per seed", "---", lambda m: per_seed(m, _steps)),
    ("hits", "---:", lambda m: str(sum(r["steps_to_target"] is not None for r in m))),
    ("final metric per seed", "---", lambda m: per_seed(m, _metric)),
    ("diverged", "---:", lambda m: str(sum(r["diverged"] for r in m))),
    ("rate at the end", "---", lambda m: per_seed(m, lambda r: f"{r['rate']:.2g}")),
    ("guard events (all seeds)", "---", events_total),
]


def summary(rows: list[dict[str, Any]]) -> str:
    """Per kind, its runs, how many reached the target, and how many missed it with no guard
    event: the counts the README quotes."""
    lines = []
    for kind in KINDS:
        mine = [r for r in rows if r["variant"].endswith(f":{kind}")]
        reached = sum(r["steps_to_target"] is not None for r in mine)
        silent = sum(r["steps_to_target"] is None and not r["events"] for r in mine)
        lines.append(f"{kind}: {len(mine)} runs, {reached} reach the target, {silent} miss it "
                     "with no guard event")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:] == ["--summary"]:  # of the committed results.json, training nothing
        sys.stdout.write(summary(json.loads((HERE / "results.json").read_text())))
        return
    run_grid(run, VARIANTS, SEEDS, COLUMNS, HERE)


if __name__ == "__main__":
    main()
