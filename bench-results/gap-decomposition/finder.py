"""Where the offline learning-rate finder's suggestions land against the grid's best constant rate.

Smith's range test as it is used offline (Smith 2017; the ``lr_find`` of fastai): train from the
initial weights while the rate grows geometrically from ``LOW`` to ``HIGH`` over ``STEPS`` steps,
smooth the minibatch loss (an EMA of decay 0.98 with its bias corrected), stop once it stands 4x
above its lowest, then read a rate off the curve of loss against rate, and train from the
restored weights at that rate. Three readings, each from the published practice:

- ``min/10``: a tenth of the rate at the lowest smoothed loss;
- ``steep``: the rate where the smoothed loss falls fastest against the log of the rate;
- ``valley``: along the longest run of rates over which the smoothed loss keeps falling (the
  longest decreasing subsequence), the rate about halfway down it.

``auto``'s own test reads the hypergradient cosine instead, and keeps the rate where its average
turns negative; its column is the rate it held at the first evaluation from step 50 on, as
``../pilots/gap.py --start`` reads it, over the same seeds. Each figure is a multiple of the
grid's best constant rate ``lr*`` (``run.py``), median over seeds 0-2; the workloads not held out
only. A reading within a factor of ``sqrt(3)`` either way lands within half a grid step of
``lr*``, what the bar asks (``README.md``).

Run from the repository root: ``python bench-results/gap-decomposition/finder.py``; writes
``finder.json`` (every probe's curve and readings) and ``finder.md`` next to this file.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from run import SEEDS, page, pairs, rate_after  # noqa: E402

from selftune.bench.methods import _base as optimizer  # noqa: E402
from selftune.bench.runner import fresh_run, one_thread, read_results  # noqa: E402
from selftune.bench.workloads import WORKLOADS, Task, Workload  # noqa: E402

LOW = {"sgd": 1e-5, "adamw": 1e-6}
HIGH = {"sgd": 10.0, "adamw": 1.0}
STEPS = 100  #: fastai's default number of iterations
SMOOTH = 0.98
STOP = 4.0  #: the smoothed loss's rise over its lowest that ends the probe
READINGS = ("min/10", "steep", "valley")
HALF_STEP = math.sqrt(3.0)


def sweep(
    task: Task, model: torch.nn.Module, gen: torch.Generator, workload: Workload, base: str
) -> tuple[list[float], list[float]]:
    """The offline range test from the model's present weights: the rates and smoothed losses
    until it stopped (``later.py`` runs it from trained weights)."""
    low, high = LOW[base], HIGH[base]
    opt = optimizer(base, low)(model.parameters())
    rates, smoothed, avg, lowest = [], [], 0.0, math.inf
    for i in range(STEPS):
        lr = low * (high / low) ** (i / (STEPS - 1))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = task.loss(model, task.batch(workload.batch_size, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        avg = SMOOTH * avg + (1 - SMOOTH) * value
        level = avg / (1 - SMOOTH ** (i + 1))
        rates.append(lr)
        smoothed.append(level)
        lowest = min(lowest, level)
        if level > STOP * lowest:
            break
    return rates, smoothed


def probe(workload: str, base: str, seed: int) -> dict[str, Any]:
    """One offline range test from the initial weights."""
    w = WORKLOADS[workload]
    rates, smoothed = sweep(*fresh_run(w, seed), w, base)
    return {"workload": workload, "base": base, "seed": seed, "lr": rates, "loss": smoothed}


def readings(rates: list[float], losses: list[float]) -> dict[str, float]:
    """The three readings of one probe's curve (see the module docstring)."""
    at_min = min(range(len(losses)), key=losses.__getitem__)
    logs = [math.log(r) for r in rates]
    slopes = [
        (losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1])
        for i in range(1, len(losses) - 1)
    ]
    steep = 1 + min(range(len(slopes)), key=slopes.__getitem__)
    # the longest decreasing subsequence ending at each point, and where it starts
    run, start = [1] * len(losses), list(range(len(losses)))
    for i in range(len(losses)):
        for j in range(i):
            if losses[j] > losses[i] and run[j] + 1 > run[i]:
                run[i], start[i] = run[j] + 1, start[j]
    end = max(range(len(losses)), key=run.__getitem__)
    valley = start[end] + (end - start[end]) // 2
    return {"min/10": rates[at_min] / 10, "steep": rates[steep], "valley": rates[valley]}


def auto_settle(records: list[dict[str, Any]], workload: str, base: str) -> list[float]:
    """``auto``'s rate at its first evaluation from step 50 on, at the default rate, per seed."""
    method = f"selftune-auto-{base}"
    return [
        rate
        for r in records
        if r["workload"] == workload and r["method"] == method and r["seed"] in SEEDS
        if (rate := rate_after(r)) is not None
    ]


def main() -> None:
    records = read_results(ROOT / "bench-results" / "results.jsonl")
    workloads = page()
    probes, lines = (
        [],
        [
            "| workload | base | lr* | " + " | ".join(READINGS) + " | auto's settle |",
            "|---|---|---|" + "---|" * (len(READINGS) + 1),
        ],
    )
    within = dict.fromkeys([*READINGS, "auto"], 0)
    with one_thread():
        for name, base, best in pairs(workloads):
            found: dict[str, list[float]] = {k: [] for k in READINGS}
            for seed in SEEDS:
                p = probe(name, base, seed)
                p["readings"] = readings(p["lr"], p["loss"])
                probes.append(p)
                for k in READINGS:
                    found[k].append(p["readings"][k] / best)
            found["auto"] = [lr / best for lr in auto_settle(records, name, base)]
            medians = {k: statistics.median(v) for k, v in found.items()}
            for k, m in medians.items():
                within[k] += 1 / HALF_STEP <= m <= HALF_STEP
            cells = " | ".join(f"{medians[k]:.2g}x" for k in [*READINGS, "auto"])
            lines.append(f"| {name} | {base} | {best:g} | {cells} |")
            print(lines[-1], flush=True)
    n = len(lines) - 2
    counts = ", ".join(f"{k} {v}" for k, v in within.items())
    lines += ["", f"Pairs whose median lands within half a grid step of lr* (of {n}): {counts}."]
    (HERE / "finder.json").write_text(json.dumps(probes) + "\n")
    (HERE / "finder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
