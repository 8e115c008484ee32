"""Is there anything to gain from tuning momentum (SGD) or β1 (AdamW) beside the rate?

Run from the repository root: ``python bench-results/pilots/momentum.py`` (about five minutes on
two cores); it writes ``momentum.json`` next to itself and prints the table the pilots README
quotes (``--table`` prints it from the committed ``momentum.json`` without running).

``auto`` leaves momentum and β1 where the user set them (0.9 in the benchmark).  Before building
a controller for them, this measures what a grid over both would give: for six pairs, constant
rates of 1/3, 1 and 3 times the committed grid's best constant rate (``horizon.BEST``), each with
momentum or β1 of 0.8, 0.9, 0.95 and 0.98, three seeds, through the benchmark's own runner.  The
table gives, per pair, the median steps to the target of the best rate at 0.9 (what tuning the
rate alone reaches) and of the best (rate, momentum) cell, with its settings.  For heavy-ball SGD
the effective step is about ``lr / (1 - momentum)``, so the rate factors let a longer memory be
paired with a smaller rate.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from horizon import BEST, run_or_read

from selftune.bench import runner
from selftune.bench.methods import Handle, Method, Setting
from selftune.bench.workloads import WORKLOADS

FACTORS = (1 / 3, 1.0, 3.0)
MOMENTA = (0.8, 0.9, 0.95, 0.98)
SEEDS = (0, 1, 2)
JSON = Path(__file__).with_name("momentum.json")


def _method(base: str, lr: float, momentum: float) -> Method:
    def build(params: Iterable[torch.nn.Parameter], s: Setting) -> Handle:
        if base == "sgd":
            return Handle(torch.optim.SGD(params, lr=lr, momentum=momentum))
        return Handle(torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999)))

    return Method(f"{base}-lr{lr:.3g}-m{momentum:g}", "grid", base, build, len(SEEDS), lr)


def _run(workload: str, base: str, lr: float, momentum: float, seed: int) -> dict[str, Any]:
    with runner.one_thread():
        record = runner.train(WORKLOADS[workload], _method(base, lr, momentum), seed)
    return {"workload": workload, "base": base, "lr": lr, "momentum": momentum, "seed": seed,
            "steps_to_target": record["steps_to_target"]}  # fmt: skip


def table(records: list[dict[str, Any]]) -> str:
    """Per pair: the best rate at 0.9 and the best (rate, momentum) cell, median of the seeds."""
    cells: dict[tuple[str, str], dict[tuple[float, float], list[float]]] = {}
    for r in records:
        steps = math.inf if r["steps_to_target"] is None else r["steps_to_target"]
        pair = cells.setdefault((r["workload"], r["base"]), {})
        pair.setdefault((r["lr"], r["momentum"]), []).append(steps)
    lines = ["| pair | best rate at 0.9 | best cell | ratio |", "|---|---|---|---|"]
    for (workload, base), pair in cells.items():
        medians = {k: statistics.median(v) for k, v in pair.items()}
        at_09 = min((m, k) for k, m in medians.items() if k[1] == 0.9)
        best = min((m, k) for k, m in medians.items())
        ratio = best[0] / at_09[0] if math.isfinite(at_09[0]) else math.nan

        def cell(m: float, k: tuple[float, float]) -> str:
            return f"{m:g} (lr {k[0]:.3g}, {k[1]:g})"

        lines.append(f"| {workload} {base} | {cell(*at_09)} | {cell(*best)} | {ratio:.2f} |")
    return "\n".join(lines)


def main() -> None:
    runs = [
        (w, b, best * f, m, s)
        for (w, b), best in BEST.items()
        for f in FACTORS
        for m in MOMENTA
        for s in SEEDS
    ]
    print(table(run_or_read(__doc__, JSON, _run, runs)))


if __name__ == "__main__":
    main()
