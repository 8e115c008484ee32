"""The suites: which runs make up ``smoke`` and ``full`` (``overhead`` is measured apart).

``full`` gives every method its registry seed count (5 for headline rows, 3 for grid and ablation
rows).  ``smoke`` runs one seed of one representative per method family on tiny data with a tiny
budget: it proves that every code path works end to end, and says nothing about speed.
"""

from __future__ import annotations

import fnmatch

from selftune.bench import methods as methods_mod
from selftune.bench import workloads as workloads_mod
from selftune.bench.runner import RunSpec

SUITES = ("smoke", "full", "overhead")
SMOKE_STEPS = 60
#: One member per family, each base, each selftune controller, one start of the sweep, and the
#: averaged rows (a grid member with a scheduler, ``auto``, one start of its sweep).
SMOKE_METHODS = (
    "sgd-default",
    "adamw-default",
    "sgd-grid-cos-1e-1",
    "adamw-grid-const-1e-2",
    "adamw-plateau",
    "prodigy",
    "dadapt-adam",
    "schedulefree-adamw",
    "dog-sgd",
    "hd-sgd",
    "hd-adam",
    "selftune-*-adamw",
    "selftune-auto-sgd",
    "selftune-auto-adamw-lr1e-5",
    "sgd-grid-cos-1e-1-avg",
    "selftune-auto-adamw-avg",
    "selftune-auto-adamw-lr1e-5-avg",
)


def parse_seeds(text: str | None) -> list[int] | None:
    """``"3"`` means seeds 0, 1, 2; ``"0,4,7"`` means exactly those; None keeps the suite's."""
    if text is None:
        return None
    try:
        if "," in text:
            seeds = [int(part) for part in text.split(",") if part.strip()]
        else:
            count = int(text)  # not a list of billions
            seeds = list(range(count)) if count <= MAX_COUNT else []
    except ValueError:
        seeds = []
    if not seeds or any(not 0 <= s < MAX_SEED for s in seeds):
        raise ValueError(
            f"--seeds {text!r}: give a count up to {MAX_COUNT} (e.g. 3 for seeds 0-2) or a "
            f"comma-separated list of seeds from 0 to {MAX_SEED - 1} (e.g. 0,4,7)"
        )
    return list(dict.fromkeys(seeds))  # a seed given twice runs once


#: seeds are below this; a count of seeds is at most MAX_COUNT
MAX_SEED, MAX_COUNT = 2**32, 1000


def plan(
    suite: str,
    workload_patterns: list[str] | None = None,
    method_patterns: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[RunSpec]:
    """The runs of ``suite`` that pass the filters, workload by workload."""
    if suite not in ("smoke", "full"):
        raise ValueError(f"suite {suite!r} has no training runs; use 'smoke' or 'full'")
    chosen = methods_mod.select(method_patterns)  # every pattern names a method
    smoke_steps = None
    if suite == "smoke":  # and, in the smoke suite, one of its methods
        smoke = {
            m.name: m for m in chosen if any(fnmatch.fnmatch(m.name, p) for p in SMOKE_METHODS)
        }
        runs = f"the smoke suite runs {', '.join(SMOKE_METHODS)}"
        chosen = workloads_mod.by_glob(smoke, method_patterns, "smoke-suite method", runs)
        smoke_steps = SMOKE_STEPS
    specs = []
    for w in workloads_mod.select(workload_patterns):
        for m in chosen:
            run_seeds = (
                seeds if seeds is not None else ([0] if suite == "smoke" else list(range(m.seeds)))
            )
            specs += [RunSpec(w.name, m.name, s, smoke_steps) for s in run_seeds]
    return specs
