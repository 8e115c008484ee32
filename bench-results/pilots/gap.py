"""Where does ``auto`` lose its steps to the oracle: in the training loss, or in the metric?

Run from the repository root: ``python bench-results/pilots/gap.py`` (reads
``bench-results/results.jsonl``, trains nothing).  For each pair (workload, base) with an
oracle (the grid member with the lowest median steps to the target), and each seed the oracle's
run and ``auto``'s at the default rate share, it reads both runs' curves at the step where the
oracle's run reached the target: the training loss (the runner's smoothed minibatch loss) and
the evaluation metric (when ``auto``'s run reached the target first, only its step: the runs
stop there).  A ratio of training losses near 1 with the metric short of the target says that
``auto`` optimises as fast and the steps are lost in what the evaluation sees (the noise of a
rate not yet annealed); a ratio well above 1 says the optimisation itself is slower.  The last
figure is the ratio of the two runs' effective learning rates at that step (``auto``'s over the
oracle's, the scheduled rate for a cosine member): whether a slower optimisation comes with a
rate too low or too high.

``--start`` prints instead where the range test left the rate: ``auto``'s effective rate at its
first evaluation from step 50 on (the range test is over by then at the default rate), over the
committed grid's best constant rate, per seed, on every workload with one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from same_batch import best_constant_rates

from selftune.bench.report import Workload, summarise
from selftune.bench.workloads import WORKLOADS

RESULTS = Path(__file__).parents[1] / "results.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", action="store_true", help="where the range test left the rate")
    records = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    if parser.parse_args().start:
        _start(records)
        return
    print(
        "| pair | oracle | seed: step, training loss auto / oracle, metric auto vs oracle, "
        "rate auto / oracle |"
    )
    print("|---|---|---|")
    for workload in summarise(records).values():
        for base in ("sgd", "adamw"):
            _pair(workload, base)


def _pair(workload: Workload, base: str) -> None:
    """One row: the oracle the report names, and per seed both runs hold, their curves."""
    oracle, auto = workload.oracle(base), workload.rows.get(f"selftune-auto-{base}")
    if oracle is None or auto is None:
        return
    by_seed = {r["seed"]: r for r in auto.records}
    cells = []
    for o in sorted(oracle.records, key=lambda r: r["seed"]):
        seed, a = o["seed"], by_seed.get(o["seed"])
        if a is None or o["steps_to_target"] is None:
            continue
        step = o["steps_to_target"]
        if step not in a["curves"]["step"]:  # the runs stop at the target
            cells.append(f"{seed}: auto hit first, at {a['steps_to_target']}")
            continue
        i, j = a["curves"]["step"].index(step), o["curves"]["step"].index(step)
        ratio = a["curves"]["loss_ema"][i] / o["curves"]["loss_ema"][j]
        metric = f"{a['curves']['metric'][i]:.3g} vs {o['curves']['metric'][j]:.3g}"
        rate = a["curves"]["lr"][i] / o["curves"]["lr"][j]
        cells.append(f"{seed}: {step}, {ratio:.2f}, {metric}, {rate:.2g}")
    if cells:
        print(f"| {workload.name} {base} | {oracle.method} | {'; '.join(cells)} |")


def _start(records: list[dict]) -> None:
    """Per pair: ``auto``'s rate at its first evaluation from step 50 on over the best constant
    rate, per seed (sorted), and their median."""
    print("| pair | best constant rate | auto's rate at step 50 / best, per seed | median |")
    print("|---|---:|---|---:|")
    for (workload, base), best in best_constant_rates(tuple(WORKLOADS)).items():
        ratios = []
        for r in records:
            if r["workload"] == workload and r["method"] == f"selftune-auto-{base}":
                curves = r["curves"]
                late = [lr for s, lr in zip(curves["step"], curves["lr"], strict=True) if s >= 50]
                if late and late[0]:
                    ratios.append(late[0] / best)
        cells = ", ".join(f"{x:.2g}" for x in sorted(ratios))
        print(f"| {workload} {base} | {best:g} | {cells} | {statistics.median(ratios):.2g} |")


if __name__ == "__main__":
    main()
