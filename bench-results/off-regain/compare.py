"""Whether ``off``'s trial of the guard's cut helps or costs: every run of the guard alone in the
probes of ``bench-results/`` (each variant there that wraps with ``controller="off"``), on the
probe's own seeds, once with every cut kept (``regain_after=0``: ``off`` before the trial) and
once at the default (the rate doubles back after 25 healthy steps, and trouble within 25 steps
of a doubling keeps the cuts).

Each probe's own ``run`` makes the runs, so a row is what the probe's table reads; the measure
compared is the probe's own (below, ``PROBES``).  Run from the repository root:
``PYTHONPATH=src python bench-results/off-regain/compare.py`` (about half an hour on two
cores); writes ``results.json`` and ``table.md`` next to this file.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import statistics
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
Row = dict[str, Any]


def _final_loss(r: Row) -> float:
    return float(r["loss"]["3000"])


def _hit_steps(r: Row) -> float:
    return float("inf") if r["steps_to_target"] is None else float(r["steps_to_target"])


def _solved(r: Row) -> float:
    return float("inf") if r["solved_at"] is None else float(r["solved_at"])


#: per probe: its script, the variants that wrap with ``off``, the measure compared (what the
#: probe's table reads), and whether higher is better
PROBES: dict[str, tuple[str, Callable[[str], bool], str, Callable[[Row], float], bool]] = {
    "full-batch": ("fit.py", lambda v: v.startswith("guard-only"), "final loss",
                   _final_loss, False),
    "gan": ("gan.py", lambda v: v in ("guard-only", "off-nonfinite"), "modes of 8",
            lambda r: float(r["modes"]), True),
    "multi-task": ("alternate.py", lambda v: v.endswith("guard-only"), "task B MSE",
                   lambda r: float(r["mse_b"]), False),
    "label-noise": ("digits.py", lambda v: v.endswith("guard-only"), "test accuracy",
                    lambda r: float(r["accuracy"]), True),
    "policy-gradient": ("cartpole.py", lambda v: v in ("guard-only", "off-nonfinite"),
                        "update solved at", _solved, False),
    "small-batch": ("digits.py", lambda v: "guard-only" in v, "test accuracy",
                    lambda r: float(r["accuracy"]), True),
    "negative-loss": ("nll.py", lambda v: v == "guard-only", "test NLL",
                      lambda r: float(r["test_nll"]), False),
    "too-high": ("run.py", lambda v: v.endswith(":guard-only"), "steps to target",
                 _hit_steps, False),
}  # fmt: skip


@functools.cache
def _probe(name: str) -> ModuleType:
    script = HERE.parent / name / PROBES[name][0]
    spec = importlib.util.spec_from_file_location(f"probe_{name.replace('-', '_')}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(name: str, variant: str, seed: int, keep: bool) -> Row:
    """One run of a probe's variant, with ``off``'s cuts kept or on trial."""
    from selftune.controllers import CONTROLLERS
    from selftune.controllers.off import OffController

    CONTROLLERS["off"] = functools.partial(OffController, regain_after=0) if keep else OffController
    probe = _probe(name)
    # the negative-loss probe's run takes the seed first
    row = probe.run(seed, variant) if name == "negative-loss" else probe.run(variant, seed)
    return {"probe": name, "variant": variant, "seed": seed, "cuts": "kept" if keep else "trial",
            "value": PROBES[name][3](row), "row": row}  # fmt: skip


def _jobs() -> list[tuple[str, str, int, bool]]:
    jobs = []
    for name, (_, wraps_off, *_rest) in PROBES.items():
        probe = _probe(name)
        for variant in filter(wraps_off, probe.VARIANTS):
            seeds = getattr(probe, "SEEDS", range(5))  # (the negative-loss probe's: 0-4, in main)
            jobs += [(name, variant, seed, keep) for seed in seeds for keep in (True, False)]
    return jobs


def _table(rows: list[Row]) -> str:
    lines = [
        "| probe | variant | measure | cuts kept (median) | on trial (median) | seeds better"
        " / worse / same | reached (kept / on trial) |",
        "|---|---|---|---:|---:|---|---|",
    ]
    keys = list(dict.fromkeys((r["probe"], r["variant"]) for r in rows))
    for name, variant in keys:
        _, _, measure, _, higher = PROBES[name]
        pair = {
            (r["seed"], r["cuts"]): r["value"]
            for r in rows
            if (r["probe"], r["variant"]) == (name, variant)
        }
        seeds = sorted({s for s, _ in pair})
        kept = [pair[s, "kept"] for s in seeds]
        trial = [pair[s, "trial"] for s in seeds]
        better = sum((t > k) if higher else (t < k) for k, t in zip(kept, trial, strict=True))
        worse = sum((t < k) if higher else (t > k) for k, t in zip(kept, trial, strict=True))
        same = len(seeds) - better - worse
        # where the measure is a step that may never come (a miss: inf), how many came
        reached = "-"
        if any(math.isinf(v) for v in kept + trial):
            reached = f"{sum(map(math.isfinite, kept))} / {sum(map(math.isfinite, trial))}"
        lines.append(
            f"| {name} | {variant} | {measure} | {statistics.median(kept):.4g} | "
            f"{statistics.median(trial):.4g} | {better} / {worse} / {same} | {reached} |"
        )
    totals = _reached_totals(rows)
    if totals:
        lines += [
            "",
            "| probe | runs | reached, cuts kept | reached, on trial |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {n} | {runs} | {k} | {t} |" for n, (runs, k, t) in totals.items()]
    return "\n".join(lines) + "\n"


def _reached_totals(rows: list[Row]) -> dict[str, tuple[int, int, int]]:
    """Per probe whose measure is a step that may never come: its runs of each kind, and how
    many reached it with the cuts kept and on trial."""
    totals = {}
    for name in dict.fromkeys(r["probe"] for r in rows):
        mine = [r for r in rows if r["probe"] == name]
        if not any(math.isinf(r["value"]) for r in mine):
            continue
        kept = [r for r in mine if r["cuts"] == "kept"]
        trial = [r for r in mine if r["cuts"] == "trial"]
        hits = [sum(math.isfinite(r["value"]) for r in side) for side in (kept, trial)]
        totals[name] = (len(kept), hits[0], hits[1])
    return totals


def main() -> None:
    jobs = _jobs()
    with ProcessPoolExecutor(2) as pool:
        rows = list(pool.map(_job, *zip(*jobs, strict=True)))
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = _table(rows)
    (HERE / "table.md").write_text(table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
