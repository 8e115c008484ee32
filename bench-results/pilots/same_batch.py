"""Does the step's own effect on its batch (a closure's test) find the best constant rate?

Run from the repository root: ``python bench-results/pilots/same_batch.py`` (a few minutes on
two cores); it writes ``same_batch.json`` next to itself and prints the table the pilots README
quotes (``--table`` prints it from the committed ``same_batch.json`` without running).

The range test reads the cosine of each new gradient with the last update: on a flat start
(the GRU) that is the correlation of two minibatch gradients, whose sign is the batch order's
(``first_look.py``).  A loop that hands the optimizer a closure lets a controller evaluate the
*same* batch again after a trial step, as a stochastic line search does (Vaswani et al. 2019,
"Painless stochastic gradient"): the Armijo ratio ``a(f) = (L_B(θ + f·u) − L_B(θ)) / (f·⟨g, u⟩)``
of the update ``u`` the optimizer takes is 1 for short steps, 1/2 at the batch's one-step
optimum along ``u`` and 0 where the step undoes its own gain.  SGD's and AdamW's updates are
linear in the rate, so one trial step at the best rate gives ``u``, and ``θ + f·u`` is the step
at ``f`` times that rate.  This script measures ``a(f)`` for ``f = 2^-6 ... 2^6`` along plain
runs (seeds 0-2, the runner's model, data and batch order) at a few steps, together with the
loss after the step on four fresh batches (the one-step effect a held-out batch would show);
nothing in selftune is changed.  Two rates are read off each probe: the largest ``f`` before
``a`` first falls below 1/2 (the Armijo edge), and the ``f`` that lowers the fresh batches' loss
most in one step.  Read along the best constant rate's run alone, the edge could be the run's
own doing (at the edge of stability the sharpness settles at about 2/lr, wherever lr is), so
the runs are at the committed grid's best constant rate and at 1/4 and 4 times it, and the
table gives, per pair and run rate, the median [min-max] over seeds and steps of both, as
factors of the run's own rate: a test worth building on would read above 1 at 1/4x and about 1
at the best.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selftune.bench import runner
from selftune.bench.methods import _base
from selftune.bench.workloads import WORKLOADS, Task

RESULTS = Path(__file__).parents[1] / "results.jsonl"
JSON = Path(__file__).with_name("same_batch.json")
#: the seven tuning workloads (the held-out autoencoder stays out of the design's evidence)
TUNING = (
    "mnist1d-cnn",
    "digits-mlp",
    "shakespeare-char",
    "digits-autoencoder",
    "mnist1d-gru",
    "friedman-mlp",
    "digits-resnet",
)
FACTORS = tuple(2.0**k for k in range(-6, 7))
PROBES = (1, 5, 20, 50, 100, 200)  # the steps before which the trial step is taken
FRESH = 4  # fresh batches whose mean loss is the held-out one-step effect
#: the runs' rates, as factors of the best constant rate: the edge read along a run at the best
#: rate could be the run's own doing (at the edge of stability the sharpness settles at about
#: 2/lr, wherever lr is), so it is read along runs 4x below and above it too
RUNS = (0.25, 1.0, 4.0)
FROM = 5  # the table's medians skip the very first step (Adam's first update is its sign)


def best_constant_rates(workloads: tuple[str, ...] = TUNING) -> dict[tuple[str, str], float]:
    """Per (workload, base): the committed grid's constant rate with the fewest median steps to
    the target (3 seeds; a miss counts as never); pairs where no constant rate hits are left out."""
    steps: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        if "-grid-const-" in r["method"] and r["workload"] in workloads:
            hit = r["steps_to_target"]
            steps[(r["workload"], r["base"], r["lr0"])].append(math.inf if hit is None else hit)
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for (workload, base, lr), runs in steps.items():
        median = statistics.median(runs)
        if math.isfinite(median) and median < best.get((workload, base), (0.0, math.inf))[1]:
            best[(workload, base)] = (lr, median)
    return {pair: lr for pair, (lr, _) in sorted(best.items())}


def _loss(task: Task, model: torch.nn.Module, batch: Any, seed: int) -> float:
    """The batch's training loss in training mode, with the same random draws (dropout) for
    every evaluation of one probe, as a closure that re-runs the forward pass would have."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        return float(task.loss(model, batch))


def _probe(
    task: Task, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any, fresh: list[Any]
) -> dict[str, Any]:
    """The trial step's Armijo ratios and fresh-batch losses at every factor, on copies (the
    run itself, its batch-norm statistics included, is left as it was)."""
    trial_model, trial_opt = copy.deepcopy((model, opt))  # one copy: the params stay shared
    for p, q in zip(model.parameters(), trial_model.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    start = [p.detach().clone() for p in trial_model.parameters()]
    trial_opt.step()
    update = [p.detach() - s for p, s in zip(trial_model.parameters(), start, strict=True)]
    slope = sum(
        float((p.grad * u).sum())
        for p, u in zip(model.parameters(), update, strict=True)
        if p.grad is not None
    )
    probe_seed = 1234
    before = _loss(task, trial_model_at(trial_model, start, update, 0.0), batch, probe_seed)
    fresh_before = statistics.fmean(
        _loss(task, trial_model, b, probe_seed + 1 + i) for i, b in enumerate(fresh)
    )
    armijo, fresh_change = [], []
    for f in FACTORS:
        trial_model_at(trial_model, start, update, f)
        after = _loss(task, trial_model, batch, probe_seed)
        armijo.append((after - before) / (f * slope) if slope < 0 else math.nan)
        fresh_after = statistics.fmean(
            _loss(task, trial_model, b, probe_seed + 1 + i) for i, b in enumerate(fresh)
        )
        fresh_change.append(fresh_after - fresh_before)
    return {"slope": slope, "loss": before, "armijo": armijo, "fresh_change": fresh_change}


def trial_model_at(
    model: torch.nn.Module, start: list[torch.Tensor], update: list[torch.Tensor], f: float
) -> torch.nn.Module:
    """Set ``model``'s parameters to ``start + f * update``; returns it."""
    with torch.no_grad():
        for p, s, u in zip(model.parameters(), start, update, strict=True):
            p.copy_(s + f * u)
    return model


def probed_run(
    workload_name: str,
    base: str,
    best: float,
    run: float,
    seed: int,
    probes: tuple[int, ...],
    probe: Callable[[int, Task, torch.nn.Module, torch.optim.Optimizer, Any], dict[str, Any]],
    after_step: bool = False,
) -> dict[str, Any]:
    """One plain run at ``run`` times the best constant rate ``best`` (the runner's model, data
    and batch order for ``seed``), with ``probe(step, task, model, optimizer, batch)`` recorded
    at each of ``probes``: after the backward pass and before the step, or after the step."""
    workload = WORKLOADS[workload_name]
    with runner.one_thread():
        task = workload.task()
        torch.manual_seed(seed)
        model = workload.make_model(task)
        gen = torch.Generator().manual_seed(seed)
        opt = _base(base, best * run)(model.parameters())
        out = []
        for step in range(1, max(probes) + 1):
            batch = task.batch(workload.batch_size, gen)
            loss = task.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            if step in probes and not after_step:
                out.append({"step": step, **probe(step, task, model, opt, batch)})
            opt.step()
            if step in probes and after_step:
                out.append({"step": step, **probe(step, task, model, opt, batch)})
    return {
        "workload": workload_name,
        "base": base,
        "best": best,
        "run": run,
        "seed": seed,
        "probes": out,
    }


def _measure(workload_name: str, base: str, best: float, run: float, seed: int) -> dict[str, Any]:
    """The trial step's Armijo ratios and fresh-batch losses along one run, at ``PROBES``."""
    fresh_gen = torch.Generator().manual_seed(10_000 + seed)

    def probe(step: int, task: Task, model: torch.nn.Module, opt: Any, batch: Any) -> dict:
        size = WORKLOADS[workload_name].batch_size
        fresh = [task.batch(size, fresh_gen) for _ in range(FRESH)]
        return _probe(task, model, opt, batch, fresh)

    return probed_run(workload_name, base, best, run, seed, PROBES, probe)


def armijo_edge(armijo: list[float], c: float = 0.5) -> float:
    """The largest factor before the ratio first falls below ``c`` (the smallest factor's half
    if it is already below; the largest factor if it never falls)."""
    for i, a in enumerate(armijo):
        if not a >= c:
            return FACTORS[i - 1] if i > 0 else FACTORS[0] / 2
    return FACTORS[-1]


def table(out: list[dict[str, Any]]) -> str:
    """Per pair and run rate: the median [min-max] over seeds and steps >= FROM of the Armijo
    edge and of the fresh batches' best one-step rate, both as factors of the run's *own* rate
    (what a controller reading them would compare its rate with)."""
    head = " | ".join(f"run at {r:g}x best: edge; fresh" for r in RUNS)
    lines = [f"| pair | best rate | {head} |", "|---|---:" + "|---" * len(RUNS) + "|"]
    for (workload, base), by_rate in by_pair_and_rate(out).items():
        cells = []
        for rate in RUNS:
            probes = [p for r in by_rate[rate] for p in r["probes"] if p["step"] >= FROM]
            edges = [armijo_edge(p["armijo"]) for p in probes]
            fresh = [FACTORS[_argmin(p["fresh_change"])] for p in probes]
            cells.append(f"{_spread(edges)}; {_spread(fresh)}")
        best = next(iter(by_rate.values()))[0]["best"]
        lines.append(f"| {workload} {base} | {best:g} | {' | '.join(cells)} |")
    return "\n".join(lines)


def by_step(out: list[dict[str, Any]]) -> str:
    """Per pair, along the best constant rate's runs: the Armijo edge at each probe's step, as
    a factor of that rate, median [min-max] over the seeds (the first step included)."""
    lines = [
        "| pair | " + " | ".join(f"step {s}" for s in PROBES) + " |",
        "|---" * (len(PROBES) + 1) + "|",
    ]
    for (workload, base), by_rate in by_pair_and_rate(out).items():
        cells = []
        for step in PROBES:
            probes = [p for r in by_rate[1.0] for p in r["probes"] if p["step"] == step]
            edges = [armijo_edge(p["armijo"]) for p in probes]
            cells.append(_spread(edges))
        lines.append(f"| {workload} {base} | {' | '.join(cells)} |")
    return "\n".join(lines)


def by_pair_and_rate(out: list[dict[str, Any]]) -> dict[tuple[str, str], dict[float, list]]:
    """The measured runs grouped by (workload, base), then by run rate."""
    pairs: dict[tuple[str, str], dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for run in out:
        pairs[(run["workload"], run["base"])][run["run"]].append(run)
    return pairs


def grid_runs() -> list[tuple[str, str, float, float, int]]:
    """Every run to measure: (workload, base, best constant rate, run rate, seed)."""
    best = best_constant_rates().items()
    return [(w, b, lr, run, seed) for (w, b), lr in best for run in RUNS for seed in (0, 1, 2)]


def _argmin(xs: list[float]) -> int:
    return min(range(len(xs)), key=lambda i: xs[i] if math.isfinite(xs[i]) else math.inf)


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g} [{min(xs):.3g}-{max(xs):.3g}]"


def main() -> None:
    from horizon import run_or_read  # the measurement scripts' shared command line

    out = run_or_read(__doc__, JSON, _measure, grid_runs())
    print(table(out))
    print()
    print(by_step(out))


if __name__ == "__main__":
    main()
