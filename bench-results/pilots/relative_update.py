"""Does the relative size of a step, ‖Δθ‖/‖θ‖, stand alike at every workload's best rate?

Run from the repository root: ``SELFTUNE_CACHE=.cache PYTHONPATH=src python
bench-results/pilots/relative_update.py``; writes ``relative_update.json`` next to itself and
prints the table the pilots README quotes.

The grid's best constant rate (``same_batch.best_constant_rates``) spans a factor of 10 over
the AdamW workloads and of 1000 over the SGD ones, and the range test's crossing lands from
0.1x to 7.4x it (``gap.py``).  A step that moves the weights by a fixed fraction of their norm is
the invariant of layer-wise trust ratios (LARS, You et al. 2017; LAMB) and of the angular
updates of scale-invariant networks: if that fraction, at each workload's best constant rate,
lay in a band narrower than the crossing's, a controller could aim the rate at it.  Per pair:
train the best constant rate from seed 0 (the benchmark's model, data, batch size and
optimizer) for 200 steps and read each step's ‖Δθ‖/‖θ‖ over all weights (``global``) and its
median over the weight matrices and kernels, tensors of two or more dimensions (``per_tensor``,
the layer-wise form); summarise by the median over steps 1-5 (where a step's size is exactly
proportional to the rate), 26-100 and 101-200.  A fixed fraction r* aims a rate at each
workload; were the step's size proportional to the rate, the spread of r over the workloads
(largest over smallest) would be the spread of those aims, the figure ``rate_estimators.py``
gives for the crossing (14.4x over the AdamW workloads, 206x over the SGD ones); "within 2x"
counts the workloads within 2x of the geometric mean of r.  Whether it is proportional: the same
median over steps 26-100 from a third and from three times the best rate (``at 0.333333x``,
``at 3x``).  Each summary is given over every workload and over those not held out.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from same_batch import best_constant_rates

from selftune.bench.methods import _base
from selftune.bench.runner import one_thread
from selftune.bench.workloads import WORKLOADS

JSON = Path(__file__).with_name("relative_update.json")
STEPS, WINDOWS = 200, {"1-5": (1, 5), "26-100": (26, 100), "101-200": (101, 200)}
LINEARITY = (1 / 3, 3.0)  #: factors on the best rate at which the step's size is read too


def trace(workload: str, base: str, lr: float) -> dict[str, list[float]]:
    """Each step's global and per-tensor relative update at ``lr``, seed 0."""
    w = WORKLOADS[workload]
    task = w.task()
    torch.manual_seed(0)
    model = w.make_model(task)
    opt = _base(base, lr)(model.parameters())
    gen = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, list[float]] = {"global": [], "per_tensor": []}
    for _ in range(STEPS):
        loss = task.loss(model, task.batch(w.batch_size, gen))
        opt.zero_grad()
        loss.backward()
        before = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            moved = [float((p - b).norm()) for p, b in zip(params, before, strict=True)]
            sizes = [float(b.norm()) for b in before]
        out["global"].append(math.hypot(*moved) / math.hypot(*sizes))
        ratios = [m / s for m, s, p in zip(moved, sizes, params, strict=True) if p.dim() > 1]
        out["per_tensor"].append(statistics.median(ratios))
    return out


def summary(values: dict[str, float]) -> dict[str, Any]:
    """Spread over workloads, and how many lie within 2x of the geometric mean."""
    centre = math.exp(statistics.fmean(math.log(v) for v in values.values()))
    return {
        "spread": max(values.values()) / min(values.values()),
        "within_2x": sum(0.5 <= v / centre <= 2 for v in values.values()),
        "workloads": len(values),
        "geometric_mean": centre,
    }


def main() -> None:
    best = best_constant_rates(tuple(WORKLOADS))
    rows: dict[str, Any] = {}
    with one_thread():
        for (workload, base), lr in best.items():
            t = trace(workload, base, lr)
            rows[f"{workload} {base}"] = {
                "lr": lr,
                "held_out": WORKLOADS[workload].held_out,
                **{
                    f"{kind} {name}": statistics.median(t[kind][a - 1 : b])
                    for kind in t
                    for name, (a, b) in WINDOWS.items()
                },
            }
            # how the step's size follows the rate: the same at a third and at three times it
            for factor in LINEARITY:
                other = trace(workload, base, lr * factor)["global"][25:100]
                rows[f"{workload} {base}"][f"global 26-100 at {factor:g}x"] = (
                    statistics.median(other) if all(map(math.isfinite, other)) else math.inf
                )
            print(workload, base, {k: f"{v:.3g}" for k, v in rows[f"{workload} {base}"].items()})
    summaries = {}
    measures = [f"{kind} {name}" for kind in ("global", "per_tensor") for name in WINDOWS]
    for base in ("adamw", "sgd"):
        for tuned in (False, True):  # every workload; the workloads not held out only
            mine = {n: r for n, r in rows.items() if n.endswith(base)}
            if tuned:
                mine = {n: r for n, r in mine.items() if not r["held_out"]}
            label = f"{base}{' (not held out)' if tuned else ''}"
            for key in measures:
                summaries[f"{label} {key}"] = summary({n: r[key] for n, r in mine.items()})
            summaries[f"{label} best rate itself"] = summary({n: r["lr"] for n, r in mine.items()})
    JSON.write_text(json.dumps({"pairs": rows, "summaries": summaries}, indent=1) + "\n")
    print("| base, measure | workloads | within 2x of the geometric mean | spread |")
    print("|---|---:|---:|---:|")
    for name, s in summaries.items():
        print(f"| {name} | {s['workloads']} | {s['within_2x']} | {s['spread']:.1f} |")


if __name__ == "__main__":
    main()
