"""Can the gradient-noise scale be read off the optimizer's own first-moment buffer?

Run from the repository root: ``python bench-results/pilots/noise_scale.py`` (about two minutes);
it writes ``noise_scale.json`` next to itself.

McCandlish et al. (2018) set the best rate at ``ε_max · r`` with ``r = |G|² / E|g|²``, the share
of the minibatch gradient's power that is signal.  A wrapper sees one minibatch gradient per step,
but the optimizer keeps a running average of them (SGD's momentum buffer, Adam's ``exp_avg``):
with decay β, independent noise of power ``N`` leaves ``c·N`` in the average, ``c = (1−β)/(1+β)``,
so ``M = |avg|² ≈ |G|² + c·N`` and ``S = E|g|² ≈ |G|² + N`` give ``r = (M/S − c) / (1 − c)``.
That holds only while ``G`` stays put over the average's window.  This script measures ``r``
(``M`` and ``S`` as EMAs over about 20 steps) along plain runs at constant rates, the grid's best
for each workload and one ten times smaller, with a global optimizer-step hook, and records it at
every evaluation with the metric and the rate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from selftune.bench import runner
from selftune.bench.methods import Method, _plain
from selftune.bench.workloads import WORKLOADS

RUNS = [  # workload, base, constant rate (the committed grid's best, and one 10x smaller)
    ("digits-mlp", "sgd", 0.1),
    ("digits-mlp", "sgd", 0.01),
    ("digits-mlp", "adamw", 0.01),
    ("mnist1d-cnn", "sgd", 0.1),
]
DECAY = 0.95  # of the EMAs of M and S


def _average(
    opt: torch.optim.Optimizer, group: dict[str, Any], p: torch.Tensor
) -> torch.Tensor | None:
    """The optimizer's running average of ``p``'s gradients, as an EMA of them (or None)."""
    st = opt.state.get(p, {})
    if st.get("momentum_buffer") is not None:  # SGD, dampening 0: buf = Σ μ^k g
        return (1 - group["momentum"]) * st["momentum_buffer"]
    if "exp_avg" in st:  # Adam: bias-corrected
        return st["exp_avg"] / (1 - group["betas"][0] ** float(st["step"]))
    return None


def _measure(workload: str, base: str, lr: float) -> dict[str, Any]:
    trace: dict[int, tuple[float, float]] = {}
    ema = {"S": 0.0, "M": 0.0, "t": 0}
    beta = 0.9  # SGD's momentum and Adam's β1 in the benchmark's bases
    c = (1 - beta) / (1 + beta)

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        ema["t"] += 1
        gg = mm = 0.0
        for group in opt.param_groups:
            for p in group["params"]:
                avg = None if p.grad is None else _average(opt, group, p)
                if avg is not None:
                    gg += float(p.grad.pow(2).sum())
                    mm += float(avg.pow(2).sum())
        if mm > 0:
            ema["S"] = DECAY * ema["S"] + (1 - DECAY) * gg
            ema["M"] = DECAY * ema["M"] + (1 - DECAY) * mm
            trace[ema["t"]] = ((ema["M"] / ema["S"] - c) / (1 - c), math.sqrt(gg))

    handle = register_optimizer_step_pre_hook(hook)
    method = Method(f"{base}-const-{lr:g}", "grid", base, _plain(base, lr, "const"), 1, lr)
    try:
        with runner.one_thread():
            record = runner.train(WORKLOADS[workload], method, 0)
    finally:
        handle.remove()
    curves = record["curves"]
    rows = [
        {"step": s, "metric": m, "lr": lr, "r": trace[s][0], "grad_norm": trace[s][1]}
        for s, m in zip(curves["step"], curves["metric"], strict=True)
        if s in trace
    ]
    return {"workload": workload, "base": base, "lr": lr, "seed": 0,
            "steps_to_target": record["steps_to_target"], "evaluations": rows}  # fmt: skip


def main() -> None:
    out = [_measure(*run) for run in RUNS]
    path = Path(__file__).with_name("noise_scale.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    for run in out:
        rs = [e["r"] for e in run["evaluations"]]
        print(f"{run['workload']} {run['base']} {run['lr']:g}: target at {run['steps_to_target']}")
        print("  r at evaluations:", " ".join(f"{r:+.3f}" for r in rs[:16]))


if __name__ == "__main__":
    main()
