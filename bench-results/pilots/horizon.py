"""Does the hypergradient over a longer horizon tell a rate too low from the best one?

Run from the repository root: ``python bench-results/pilots/horizon.py`` (about a minute on two
cores); it writes ``horizon.json`` next to itself and prints the table of medians the pilots
README quotes (``--table`` prints it from the committed ``horizon.json`` without running).

The one-step hypergradient ``⟨−g_t, Δθ_{t-1}⟩`` is the derivative of the loss with respect to
the *last* step's rate.  Summed over the last H updates, ``⟨−g_t, θ_t − θ_{t−H}⟩`` is the
derivative with respect to a rate held over those H steps (the Jacobian of later updates on
earlier ones left out).  On a noisy quadratic at its noise floor both are negative, but the
one-step noise term is ``−a·σ²/(2−a)`` per direction (``a = lr·curvature``) while the H-step
one saturates at ``−σ²/(2−a)`` once ``H > 1/a``: stiff directions at their floor weigh less
against the drift ``~H·|∇L|²`` of the flat ones still moving, which is Wu et al.'s short-horizon
bias read the other way.  This script measures both cosines along plain runs at constant rates
(the committed grid's best constant rate for each pair, 10x and 3x below and 3x above), with the
H-step displacement kept as an EMA of the updates (decay ``γ``, about ``1/(1−γ)`` steps), in
global optimizer-step hooks; nothing in selftune is changed.  Recorded at every evaluation: the
metric, and the mean of each cosine over the steps since the previous evaluation.  The table
gives, per pair and rate, the median of those means from step ``FROM`` on, for the 33-step
cosine and (in brackets) the one-step one, and the steps to the target.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from selftune.bench import runner
from selftune.bench.methods import Method, _plain
from selftune.bench.workloads import WORKLOADS

BEST = {  # the committed grid's best constant rate (bench-results/results.jsonl, median of 3)
    ("digits-mlp", "sgd"): 0.1,
    ("digits-mlp", "adamw"): 0.01,
    ("mnist1d-cnn", "adamw"): 0.01,
    ("friedman-mlp", "sgd"): 3e-3,
    ("friedman-mlp", "adamw"): 3e-2,
    ("mnist1d-gru", "adamw"): 3e-2,
}
FACTORS = (0.1, 1 / 3, 1.0, 3.0)
DECAYS = (0.0, 0.9, 0.97)  # γ = 0: the one-step cosine
FROM = 30  # the table's medians skip the first evaluations, before the runs have settled
JSON = Path(__file__).with_name("horizon.json")


def _measure(workload: str, base: str, lr: float) -> dict[str, Any]:
    params: list[torch.Tensor] = []
    before: list[torch.Tensor] = []
    disp: dict[float, list[torch.Tensor]] = {}
    sums: dict[float, list[float]] = {d: [] for d in DECAYS}

    def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not params:
            params.extend(p for g in opt.param_groups for p in g["params"])
            disp.update({d: [torch.zeros_like(p) for p in params] for d in DECAYS})
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        gn = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        for d in DECAYS:
            dn = math.sqrt(sum(float(x.pow(2).sum()) for x in disp[d]))
            if gn > 0 and dn > 0:
                dot = sum(float((x * g).sum()) for x, g in zip(disp[d], grads, strict=True))
                sums[d].append(-dot / (gn * dn))
        before[:] = [p.detach().clone() for p in params]

    def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for d in DECAYS:
            for x, p, b in zip(disp[d], params, before, strict=True):
                x.mul_(d).add_(p.detach() - b)

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    method = Method(f"{base}-const-{lr:g}", "grid", base, _plain(base, lr, "const"), 1, lr)
    try:
        with runner.one_thread():
            record = runner.train(WORKLOADS[workload], method, 0)
    finally:
        for h in handles:
            h.remove()
    curves = record["curves"]
    rows = []
    last = 0
    for s, m in zip(curves["step"], curves["metric"], strict=True):
        window = {d: sums[d][last:s] for d in DECAYS}
        rows.append({"step": s, "metric": m, **{f"cos_{d:g}": _mean(window[d]) for d in DECAYS}})
        last = s
    return {"workload": workload, "base": base, "lr": lr, "seed": 0,
            "steps_to_target": record["steps_to_target"], "evaluations": rows}  # fmt: skip


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def table(out: list[dict[str, Any]]) -> str:
    """The pilots README's table: per pair, per rate factor, ``33-step (one-step), steps``."""
    head = " | ".join(f"{f:.3g}x" for f in FACTORS)
    lines = [f"| pair | {head} |", "|---" * (len(FACTORS) + 1) + "|"]
    for (workload, base), _ in BEST.items():
        cells = []
        for run in (r for r in out if (r["workload"], r["base"]) == (workload, base)):
            late = [e for e in run["evaluations"] if e["step"] >= FROM]
            long, one = (statistics.median(e[k] for e in late) for k in ("cos_0.97", "cos_0"))
            steps = run["steps_to_target"] or "miss"
            cells.append(f"{long:+.3f} ({one:+.3f}), {steps}")
        lines.append(f"| {workload} {base} | {' | '.join(cells)} |")
    return "\n".join(lines)


def run_or_read(
    doc: str, path: Path, work: Callable[..., dict[str, Any]], runs: list[tuple[Any, ...]]
) -> list[dict[str, Any]]:
    """A measurement script's command line: run ``work`` on each of ``runs`` in ``--jobs``
    processes and write the records to ``path``, or with ``--table`` only read what it wrote."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only print the committed table")
    args = parser.parse_args()
    if not args.table:
        with ProcessPoolExecutor(args.jobs) as pool:
            out = list(pool.map(work, *zip(*runs, strict=True)))
        path.write_text(json.dumps(out, indent=1) + "\n")
    records: list[dict[str, Any]] = json.loads(path.read_text())
    return records


def main() -> None:
    runs = [(w, b, best * f) for (w, b), best in BEST.items() for f in FACTORS]
    print(table(run_or_read(__doc__, JSON, _measure, runs)))


if __name__ == "__main__":
    main()
