"""Where do the good rates stand against the curvature's stability limit?

Run from the repository root: ``python bench-results/pilots/curvature.py`` (a few minutes); it
writes ``curvature.json`` next to itself.

Issue 7 lists a curvature direction: estimate the largest Hessian eigenvalue λ by power iteration
on Hessian-vector products every K steps and keep the rate below the stability limit with a
margin.  For heavy-ball SGD (momentum β) on a quadratic the limit is ``lr < 2(1+β)/λ``; for Adam
it is ``lr < (2+2β1)/(1−β1) / λ_P`` with ``λ_P`` the largest eigenvalue of the preconditioned
Hessian ``P⁻¹H``, ``P = diag(√v̂ + ε)`` (Cohen et al. 2022, "Adaptive gradient methods at the
edge of stability").  This script measures ``edge = lr·λ / limit`` (1: at the limit) along plain
runs at constant rates (the committed grid's best for each workload, 3x below and 3x above) and
along ``auto``'s runs at the default rates, on two tuning workloads, seed 0: whether a cap at the
limit would bind, and where.  λ is the Rayleigh quotient after 20 power iterations on a fixed
probe batch of 512 training samples, measured in an optimizer-step pre-hook every ``EVERY``
steps, before the update, and timed (``probe_ms``); the controller is not changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from selftune.bench import runner
from selftune.bench.methods import Method, _plain, methods
from selftune.bench.workloads import WORKLOADS
from selftune.tuner import SelfTuned

EVERY = {"digits-mlp": 25, "mnist1d-cnn": 100}
BEST = {("digits-mlp", "sgd"): 0.1, ("digits-mlp", "adamw"): 0.01,
        ("mnist1d-cnn", "sgd"): 0.1, ("mnist1d-cnn", "adamw"): 0.03}  # fmt: skip
ITERATIONS = 20
PROBE = 512
BETA = 0.9  # SGD's momentum and Adam's β1 in the benchmark's bases


def _top_eigenvalue(
    model: torch.nn.Module, task: Any, probe: tuple[torch.Tensor, torch.Tensor], scale: Any
) -> float:
    """The Rayleigh quotient of ``D H D`` after power iteration (D: ``scale`` per param, or 1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        grads = torch.autograd.grad(task.loss(model, probe), params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    quotient = 0.0
    for _ in range(ITERATIONS):
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / norm for x in v]
        u = [x * d for x, d in zip(v, scale, strict=True)] if scale else v
        hu = torch.autograd.grad(grads, params, u, retain_graph=True)
        hv = [x * d for x, d in zip(hu, scale, strict=True)] if scale else list(hu)
        quotient = float(sum((a * b).sum() for a, b in zip(v, hv, strict=True)))
        v = [x.detach() for x in hv]
    return quotient


def _adam_scale(opt: torch.optim.Optimizer) -> list[torch.Tensor] | None:
    """``(√v̂ + ε)^-1/2`` per parameter, or None before Adam's first step (or for SGD)."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            if "exp_avg_sq" not in st:
                return None
            v_hat = st["exp_avg_sq"] / (1 - group["betas"][1] ** float(st["step"]))
            out.append((v_hat.sqrt() + group["eps"]).rsqrt())
    return out


def _measure(workload_name: str, method: Method) -> dict[str, Any]:
    models: list[torch.nn.Module] = []
    base_workload = WORKLOADS[workload_name]

    def make_model(task: Any) -> torch.nn.Module:
        models.append(base_workload.make_model(task))
        return models[-1]

    workload = dataclasses.replace(base_workload, make_model=make_model)
    task = workload.task()
    gen = torch.Generator().manual_seed(12345)
    probe = task.batch(PROBE, gen)
    rows: list[dict[str, Any]] = []
    count = {"t": 0}

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if isinstance(opt, SelfTuned):  # the inner optimizer's step follows, at the real rate
            return
        count["t"] += 1
        if count["t"] % EVERY[workload_name] and count["t"] != 1:
            return
        lr = opt.param_groups[0]["lr"]
        adam = "betas" in opt.param_groups[0]
        scale = _adam_scale(opt) if adam else None
        if adam and scale is None:
            return
        start = time.perf_counter()
        lam = _top_eigenvalue(models[-1], task, probe, scale)
        ms = (time.perf_counter() - start) * 1000.0
        limit = (2 + 2 * BETA) / (1 - BETA) if adam else 2 * (1 + BETA)
        edge = lr * lam / limit
        rows.append({"step": count["t"], "lr": lr, "lambda": lam, "edge": edge, "probe_ms": ms})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        with runner.one_thread():
            record = runner.train(workload, method, 0)
    finally:
        handle.remove()
    return {"workload": workload_name, "method": method.name, "base": method.base,
            "steps_to_target": record["steps_to_target"],
            "ms_per_step": record["ms_per_step"], "probes": rows}  # fmt: skip


def _runs() -> list[tuple[str, Method]]:
    registry = methods()
    out = []
    for (name, base), best in BEST.items():
        for lr in (best / 3, best, best * 3):
            out.append((name, Method(f"{base}-const-{lr:.3g}", "grid", base,
                                     _plain(base, lr, "const"), 1, lr)))  # fmt: skip
        out.append((name, registry[f"selftune-auto-{base}"]))
    return out


def main() -> None:
    out = [_measure(name, method) for name, method in _runs()]
    path = Path(__file__).with_name("curvature.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    for run in out:
        edges = " ".join(f"{r['edge']:.2f}" for r in run["probes"][:12])
        hit = run["steps_to_target"]
        probe = sum(r["probe_ms"] for r in run["probes"]) / max(len(run["probes"]), 1)
        print(f"{run['workload']} {run['method']}: target at {hit}; edge {edges}")
        print(f"  a probe {probe:.0f} ms, a training step (median) {run['ms_per_step']:.2f} ms")


if __name__ == "__main__":
    main()
