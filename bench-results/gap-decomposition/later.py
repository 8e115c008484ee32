"""Whether a range test read later in the run lands nearer the best constant rate.

``finder.py`` found that every reading of a short probe from the initial weights errs, and
that the readings err together: what the probe sees at the start is not what decides the best
rate over the run. Here the probe starts from weights already trained for ``WARM`` steps at
the plain optimizer's default rate (SGD 0.01 with momentum 0.9, AdamW 1e-3), the benchmark's
own batches: ``auto``'s range test (a fresh optimizer at the default rate, wrapped; its rate
after 50 steps, as ``finder.py`` and ``../pilots/gap.py --start`` read it) and the offline
finder's ``min/10``. Each as a multiple of the grid's best constant rate ``lr*``, median over
seeds 0-2, on the workloads not held out; a reading within a factor of ``sqrt(3)`` lands within
half a grid step.

Run from the repository root: ``python bench-results/gap-decomposition/later.py``; writes
``later.json`` and ``later.md`` next to this file.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from finder import HALF_STEP, readings, sweep  # noqa: E402
from probe_grid import train_steps  # noqa: E402
from run import SEEDS, page, pairs  # noqa: E402

import selftune  # noqa: E402
from selftune.bench.methods import DEFAULT_LR  # noqa: E402
from selftune.bench.methods import _base as optimizer  # noqa: E402
from selftune.bench.runner import fresh_run, one_thread  # noqa: E402
from selftune.bench.workloads import WORKLOADS  # noqa: E402

WARM = (0, 25, 50, 100, 200)  #: steps at the default rate before the probe
AUTO_STEPS = 50  #: steps of ``auto`` whose rate is read


def _warmed(workload: str, base: str, seed: int, warm: int) -> tuple[Any, Any, Any, Any]:
    w = WORKLOADS[workload]
    task, model, gen = fresh_run(w, seed)
    train_steps(
        task, model, optimizer(base, DEFAULT_LR[base])(model.parameters()), gen, w.batch_size, warm
    )
    return w, task, model, gen


def auto_rate(workload: str, base: str, seed: int, warm: int) -> float:
    """``auto``'s rate after its first ``AUTO_STEPS`` steps, started on the warmed weights."""
    w, task, model, gen = _warmed(workload, base, seed, warm)
    opt = selftune.wrap(optimizer(base, DEFAULT_LR[base])(model.parameters()), seed=seed)
    train_steps(task, model, opt, gen, w.batch_size, AUTO_STEPS)
    return float(opt.hyperparams()[0]["lr"])


def finder_rate(workload: str, base: str, seed: int, warm: int) -> float:
    """The offline finder's ``min/10``, its probe started on the warmed weights."""
    w, task, model, gen = _warmed(workload, base, seed, warm)
    return readings(*sweep(task, model, gen, w, base))["min/10"]


def main() -> None:
    workloads = page()
    heads = [f"{kind} after {warm}" for warm in WARM for kind in ("auto", "min/10")]
    lines = [
        "| workload | base | lr* | " + " | ".join(heads) + " |",
        "|---|---|---|" + "---|" * len(heads),
    ]
    within = dict.fromkeys(heads, 0)
    raw: list[dict[str, Any]] = []
    with one_thread():
        for name, base, best in pairs(workloads):
            cells = []
            for warm in WARM:
                for kind, read in (("auto", auto_rate), ("min/10", finder_rate)):
                    rates = [read(name, base, seed, warm) for seed in SEEDS]
                    raw.append({"workload": name, "base": base, "warm": warm, "kind": kind,
                                "rates": rates})  # fmt: skip
                    ratio = statistics.median(rates) / best
                    within[f"{kind} after {warm}"] += 1 / HALF_STEP <= ratio <= HALF_STEP
                    cells.append(f"{ratio:.2g}x")
            lines.append(f"| {name} | {base} | {best:g} | {' | '.join(cells)} |")
            print(lines[-1], flush=True)
    counts = ", ".join(f"{k} {v}" for k, v in within.items())
    lines += ["", f"Pairs within half a grid step of lr* (of {len(lines) - 2}): {counts}."]
    (HERE / "later.json").write_text(json.dumps(raw) + "\n")
    (HERE / "later.md").write_text("\n".join(lines) + "\n")
    print(lines[-1])


if __name__ == "__main__":
    main()
