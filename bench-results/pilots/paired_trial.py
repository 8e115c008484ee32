"""Would a trial of another rate, judged on the evaluation metric from a restored state, pick right?

Run from the repository root: ``python bench-results/pilots/paired_trial.py`` (several minutes
on two cores); it writes ``paired_trial.json`` next to itself and prints the table the pilots
README quotes (``--table`` prints it from the committed ``paired_trial.json`` without running).

Pilots 33-35 and 47 compared the loss under a doubled rate with the loss before it, and time
confounds that comparison (a loss falls ever more slowly) while 50 steps of minibatch losses
are too few to outweigh its noise.  A loop that evaluates (``SelfTuned.observe``) gives a
measurement on a fixed held-out set, and the guard can restore a state: so a controller could
run one evaluation interval at its rate, restore the state it started from, run the same
interval at another rate, and keep the better.  The two arms see different minibatches (the
loop's data moves on), so what separates them is the rate plus the noise of two different batch
sequences.  This script measures how often that comparison points the right way, before any
controller is built on it: along plain runs at the committed grid's best constant rate and at
1/4 and 4 times it (seeds 0-2, the runner's model, data and batch order; the 12 pairs where a
constant rate reaches the target), at steps ``PROBES`` it copies the run and trains each copy
for one evaluation interval at 1/2, 1 and 2 times the run's rate, on two batch streams (the
same two for every arm), and evaluates the metric.  The table gives, per pair and run rate,
over seeds and probes, how often 2x beat 1x and 1/2x beat 1x when the arms came from different
streams (what a controller would see), and the median of the arm effect (2x against 1x, same
stream) over the stream noise (same arm, two streams).

Each arm is also judged at the average of its iterates over the interval's second half
(``metric_avg``; Polyak's tail average, batch-norm statistics recomputed for the averaged
weights): the last iterate's metric carries a noise floor that grows with the rate, which any
short comparison credits to the lower rate (a decay's instant drop), while the average of the
iterates removes much of that floor and keeps most of the drift. If the averaged comparison
stops leaning low at the best rate and still points up from 1/4 of it, a trial judged that way
would be a long-horizon test that the last iterate cannot give (``--table`` prints both).
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from same_batch import RUNS, by_pair_and_rate, grid_runs, probed_run
from torch.optim.swa_utils import AveragedModel, update_bn

from selftune.bench.workloads import WORKLOADS

JSON = Path(__file__).with_name("paired_trial.json")
ARMS = (0.5, 1.0, 2.0)  #: each arm's rate, as a factor of the run's
STREAMS = 2  #: batch streams per arm
PROBES = (50, 100, 200)  #: the steps after which the run is copied


def _measure(workload_name: str, base: str, best: float, run: float, seed: int) -> dict[str, Any]:
    """The arms' metrics along one run, after each of ``PROBES``."""
    workload = WORKLOADS[workload_name]

    def probe(step: int, task: Any, model: torch.nn.Module, opt: Any, batch: Any) -> dict:
        return _arms(workload, task, model, opt, best * run, seed, step)

    record = probed_run(workload_name, base, best, run, seed, PROBES, probe, after_step=True)
    return {**record, "higher_is_better": workload.higher_is_better}


def _arms(
    workload: Any, task: Any, model: torch.nn.Module, opt: Any, lr: float, seed: int, step: int
) -> dict[str, Any]:
    """The metric after one evaluation interval from this state, per arm and stream, at the
    last iterate and at the average of the interval's second half."""
    out: dict[str, list[float]] = {}
    averaged: dict[str, list[float]] = {}
    tail = workload.eval_every - workload.eval_every // 2  # the iterates averaged
    for factor in ARMS:
        metrics, at_mean = [], []
        for stream in range(STREAMS):
            arm_model, arm_opt = copy.deepcopy((model, opt))  # one copy: the params stay shared
            for group in arm_opt.param_groups:
                group["lr"] = lr * factor
            gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + 1009 * step + stream)
            average: AveragedModel | None = None  # Polyak's equal weights over the tail
            with torch.random.fork_rng():
                torch.manual_seed(stream)
                for i in range(workload.eval_every):
                    loss = task.loss(arm_model, task.batch(workload.batch_size, gen))
                    arm_opt.zero_grad()
                    loss.backward()
                    arm_opt.step()
                    if i >= workload.eval_every - tail:
                        if average is None:
                            average = AveragedModel(arm_model)
                        average.update_parameters(arm_model)
            assert average is not None
            # batch-norm statistics for the averaged weights, from a few fixed training batches
            fixed = torch.Generator().manual_seed(77 + seed)
            update_bn([task.batch(workload.batch_size, fixed) for _ in range(4)], average.module)
            metrics.append(_evaluate(task, arm_model))
            at_mean.append(_evaluate(task, average.module))
        out[f"{factor:g}"], averaged[f"{factor:g}"] = metrics, at_mean
    model.train()
    return {"metric": out, "metric_avg": averaged}


def _evaluate(task: Any, model: torch.nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        value = task.evaluate(model)
    return value if math.isfinite(value) else math.nan


def _better(a: float, b: float, higher: bool) -> bool:
    """Whether metric ``a`` beats ``b`` (a non-finite one never does)."""
    if not math.isfinite(a):
        return False
    if not math.isfinite(b):
        return True
    return a > b if higher else a < b


def table(out: list[dict[str, Any]], key: str = "metric") -> str:
    """Per pair and run rate: how often 2x and 1/2x beat 1x across streams, and the 2x arm's
    effect over the stream noise (median of |2x - 1x| same stream / |stream 0 - stream 1| at 1x)."""
    head = " | ".join(f"run at {r:g}x best: 2x wins; 1/2x wins; effect/noise" for r in RUNS)
    lines = [f"| pair | {head} |", "|---" * (len(RUNS) + 1) + "|"]
    for (workload, base), by_rate in by_pair_and_rate(out).items():
        cells = []
        for rate in RUNS:
            up = down = total = 0
            ratios = []
            for run in by_rate[rate]:
                for probe in run["probes"]:
                    m = probe[key]
                    up += _wins(run, probe, "2", key)
                    down += _wins(run, probe, "0.5", key)
                    total += STREAMS
                    noise = abs(m["1"][0] - m["1"][1])
                    effect = statistics.fmean(abs(m["2"][s] - m["1"][s]) for s in range(STREAMS))
                    if math.isfinite(effect) and noise > 0:
                        ratios.append(effect / noise)
            ratio = f"{statistics.median(ratios):.2g}" if ratios else "-"
            cells.append(f"{up}/{total}; {down}/{total}; {ratio}")
        lines.append(f"| {workload} {base} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _wins(run: dict[str, Any], probe: dict[str, Any], arm: str, key: str = "metric") -> int:
    """How often ``arm`` beat 1x across the two ways of pairing different streams."""
    m = probe[key]
    higher = run["higher_is_better"]
    return sum(_better(m[arm][s], m["1"][(s + 1) % STREAMS], higher) for s in range(STREAMS))


def by_step(out: list[dict[str, Any]], key: str = "metric") -> str:
    """Per pair and run rate, at each probe's step: how often 2x, and in brackets 1/2x, beat 1x
    across streams (of 6: three seeds, two pairings); the last row sums every pair."""
    head = " | ".join(f"run at {r:g}x best: steps {', '.join(map(str, PROBES))}" for r in RUNS)
    lines = [f"| pair | {head} |", "|---" * (len(RUNS) + 1) + "|"]
    total: dict[tuple[float, int], list[int]] = {(r, s): [0, 0, 0] for r in RUNS for s in PROBES}
    for (workload, base), by_rate in by_pair_and_rate(out).items():
        cells = []
        for rate in RUNS:
            parts = []
            for step in PROBES:
                cases = [(r, p) for r in by_rate[rate] for p in r["probes"] if p["step"] == step]
                up = sum(_wins(r, p, "2", key) for r, p in cases)
                down = sum(_wins(r, p, "0.5", key) for r, p in cases)
                n = STREAMS * len(cases)
                counts = total[(rate, step)]
                counts[0], counts[1], counts[2] = counts[0] + up, counts[1] + down, counts[2] + n
                parts.append(f"{up} ({down})/{n}")
            cells.append(", ".join(parts))
        lines.append(f"| {workload} {base} | {' | '.join(cells)} |")
    sums = [", ".join("{} ({})/{}".format(*total[(r, s)]) for s in PROBES) for r in RUNS]
    lines.append(f"| all pairs | {' | '.join(sums)} |")
    return "\n".join(lines)


def main() -> None:
    from horizon import run_or_read  # the measurement scripts' shared command line

    out = run_or_read(__doc__, JSON, _measure, grid_runs())
    for key, what in (("metric", "the last iterate"), ("metric_avg", "the tail average")):
        print(f"Judged at {what} ({key}):\n\n{table(out, key)}\n\n{by_step(out, key)}\n")


if __name__ == "__main__":
    main()
