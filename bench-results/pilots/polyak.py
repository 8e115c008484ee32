"""Does the stochastic Polyak step size land near the best constant rate for SGD?

Run from the repository root: ``python bench-results/pilots/polyak.py`` (a few minutes on two
cores); it writes ``polyak.json`` next to itself and prints the table the pilots README quotes
(``--table`` prints it from the committed JSON without training).

``rate_estimators.py`` read the published self-tuners' own rate estimates against the grid's
best constant rate; the stochastic Polyak step (SPS, Loizou et al. 2021) is another one-run
estimate, and needs no state at all: ``γ_t = (f_i(x_t) − f_i*) / (c ‖∇f_i(x_t)‖²)``, with the
minibatch's loss ``f_i``, its lower bound ``f_i*`` (0 here, as the paper's models that
interpolate their data take it) and ``c = 1/2``.  Along plain SGD runs (momentum 0.9, the
benchmark's SGD) at the grid's best constant rate ``lr*``, seeds 0-2, the ten workloads not held
out, this script reads ``γ_t`` at every step before the update and compares its median over
steps 1-50 and 51-200 with the effective step of ``lr*``, ``lr* / (1 − 0.9)`` (a heavy ball at
rate ``lr`` moves as plain SGD at ``lr / (1 − μ)`` once its buffer is full).  It reads it along
runs at 1/4 and 4 times ``lr*`` too: an estimate that follows the run's own rate rather than
the best one would show there.  A loss whose floor is
far above zero (a regression's noise, an ELBO) inflates ``γ_t`` by the share of the loss that
no step removes; the table says which losses those are.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from same_batch import best_constant_rates

from selftune.bench import runner
from selftune.bench.methods import SGD_DEFAULT, _base
from selftune.bench.workloads import WORKLOADS

JSON = Path(__file__).with_name("polyak.json")
#: the workloads not held out (the four held out stay out of every measurement's evidence)
WORKLOADS_READ = tuple(name for name, w in WORKLOADS.items() if not w.held_out)
SEEDS, STEPS, EARLY = (0, 1, 2), 200, 50
C = 0.5  #: SPS's constant
#: the losses whose floor lies far above zero, where f* = 0 overstates the step
FLOOR_ABOVE_ZERO = (
    "digits-autoencoder",
    "friedman-mlp",
    "mnist1d-conv-autoencoder",
    "digits-vae",
    "ratings-factorization",  # its ratings' noise: a floor of 0.25 against a target of 1.0
)
#: the runs' rates as factors of ``lr*``: an estimate read along a run could be the run's own
#: doing, so it is read along runs 4x below and above the best rate too
RUNS = (0.25, 1.0, 4.0)


def _run(workload_name: str, lr: float, seed: int) -> list[float]:
    """γ_t at every step of a plain SGD run at ``lr``."""
    workload = WORKLOADS[workload_name]
    task, model, gen = runner.fresh_run(workload, seed)
    opt = _base("sgd", lr)(model.parameters())
    gammas = []
    for _ in range(STEPS):
        loss = task.loss(model, task.batch(workload.batch_size, gen))
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        squared = float(sum(g.pow(2).sum() for g in grads))
        gammas.append(loss.item() / (C * squared) if squared > 0 else float("nan"))
        opt.step()
    return gammas


def measure() -> list[dict[str, Any]]:
    best = best_constant_rates(WORKLOADS_READ)
    out = []
    for (name, base), lr in best.items():
        if base != "sgd":
            continue
        for run in RUNS:
            for seed in SEEDS:
                gammas = _run(name, lr * run, seed)
                out.append({"workload": name, "lr": lr, "run": run, "seed": seed, "gamma": gammas})
                print(f"{name} at {run:g}x, seed {seed}: done", file=sys.stderr)
    return out


def table(out: list[dict[str, Any]]) -> str:
    """Per workload and run rate: the median over seeds of SPS's median step over each window,
    over the effective step of the best constant rate ``lr*`` (not of the run's own rate)."""
    effective = 1.0 / (1.0 - SGD_DEFAULT["momentum"])
    windows = (slice(0, EARLY), slice(EARLY, STEPS))
    head = " | ".join(f"run at {r:g}x: steps 1-{EARLY}, {EARLY + 1}-{STEPS}" for r in RUNS)
    lines = [f"| workload | lr* | loss floor | {head} |", "|---|---:|---|" + "---|" * len(RUNS)]
    within = {(run, i): 0 for run in RUNS for i in range(len(windows))}
    #: per run rate, the losses near zero whose later reading lies within half a grid step (√3)
    half_step = dict.fromkeys(RUNS, 0)
    names = sorted({r["workload"] for r in out})
    for name in names:
        cells = []
        for run in RUNS:
            runs = [r for r in out if r["workload"] == name and r["run"] == run]
            lr = runs[0]["lr"]
            parts = []
            for i, window in enumerate(windows):
                ratio = statistics.median(
                    statistics.median(r["gamma"][window]) / (lr * effective) for r in runs
                )
                within[(run, i)] += 0.5 <= ratio <= 2.0
                if i == 1 and name not in FLOOR_ABOVE_ZERO:
                    half_step[run] += 3**-0.5 <= ratio <= 3**0.5
                parts.append(f"{ratio:.2g}")
            cells.append(", ".join(parts))
        floor = "above zero" if name in FLOOR_ABOVE_ZERO else "near zero"
        lines.append(f"| {name} | {lr:g} | {floor} | {' | '.join(cells)} |")
    counts = "; ".join(
        f"run at {run:g}x: {within[(run, 0)]} and {within[(run, 1)]}" for run in RUNS
    )
    lines.append(
        f"\nWithin 2x of lr*'s effective step (of {len(names)}), over steps 1-{EARLY} and "
        f"{EARLY + 1}-{STEPS}: {counts}."
    )
    near_zero = sum(n not in FLOOR_ABOVE_ZERO for n in names)
    lines.append(
        f"Within half a grid step (√3) over steps {EARLY + 1}-{STEPS}, of the {near_zero} losses "
        "whose floor is near zero: "
        + "; ".join(f"run at {run:g}x: {half_step[run]}" for run in RUNS)
        + "."
    )
    return "\n".join(lines)


def main() -> None:
    if "--table" in sys.argv[1:]:
        out = json.loads(JSON.read_text(encoding="utf-8"))
    else:
        torch.set_num_threads(1)
        out = measure()
        JSON.write_text(json.dumps(out), encoding="utf-8")
    print(table(out))


if __name__ == "__main__":
    main()
