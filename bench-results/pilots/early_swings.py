"""How far healthy starts swing above their early levels: the figures behind the guard's early test.

Run from the repository root: ``python bench-results/pilots/early_swings.py``.  Plain SGD
(momentum 0.9) and AdamW train each of the six tuning workloads for their first 25 steps (the
guard's warm-up is 20 healthy steps) at two rates each, and ``friedman-mlp`` also with SGD at the
grid's best constant rate (3e-3); for the minibatch loss and the gradient norm it records the
largest ratio of a step's value to the lowest value before it and to the median of the five
before it, and whether the start diverged by the benchmark's rule (a loss over 10x the first).
Writes ``early_swings.json`` next to this file and prints it as a table.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from selftune.bench import runner
from selftune.bench.workloads import WORKLOADS

STEPS = 25
WORKLOADS_READ = [
    "mnist1d-cnn", "digits-mlp", "shakespeare-char", "digits-autoencoder", "mnist1d-gru",
    "friedman-mlp",
]  # fmt: skip
RATES = {"sgd": (1e-2, 1e-1), "adamw": (1e-3, 1e-2)}


def swings(values: list[float]) -> tuple[float, float]:
    """The largest ratio of a value to the lowest before it and to the median of the 5 before."""
    lowest = max(values[i] / min(values[:i]) for i in range(1, len(values)))
    median = max(
        values[i] / statistics.median(values[max(0, i - 5) : i]) for i in range(1, len(values))
    )
    return lowest, median


def start(name: str, base: str, lr: float) -> dict[str, object]:
    workload = WORKLOADS[name]
    task = workload.task()
    torch.manual_seed(0)
    model = workload.make_model(task)
    gen = torch.Generator().manual_seed(0)
    params = model.parameters()
    opt = (
        torch.optim.SGD(params, lr=lr, momentum=0.9)
        if base == "sgd"
        else torch.optim.AdamW(params, lr=lr)
    )
    losses, norms = [], []
    for _ in range(STEPS):
        loss = task.loss(model, task.batch(workload.batch_size, gen))
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
        losses.append(loss.item())
        opt.step()
    loss_low, loss_median = swings(losses)
    grad_low, grad_median = swings(norms)
    return {
        "workload": name, "base": base, "lr": lr,
        "diverged": any(not math.isfinite(x) or x > 10 * losses[0] for x in losses),
        "loss_vs_lowest": loss_low, "loss_vs_median": loss_median,
        "grad_vs_lowest": grad_low, "grad_vs_median": grad_median,
    }  # fmt: skip


def main() -> None:
    runs = [(name, base, lr) for name in WORKLOADS_READ for base in RATES for lr in RATES[base]]
    runs.append(("friedman-mlp", "sgd", 3e-3))
    with runner.one_thread():
        rows = [start(*run) for run in runs]
    (Path(__file__).parent / "early_swings.json").write_text(json.dumps(rows, indent=1) + "\n")
    ratios = "loss/lowest loss/median grad/lowest grad/median"
    print(f"{'workload':19s} {'base':6s} {'lr':7s} diverged  {ratios}")
    for r in rows:
        print(
            f"{r['workload']:19s} {r['base']:6s} {r['lr']:<7g} {r['diverged']!s:9s} "
            f"{r['loss_vs_lowest']:11.1f} {r['loss_vs_median']:11.1f} "
            f"{r['grad_vs_lowest']:11.1f} {r['grad_vs_median']:11.1f}"
        )


if __name__ == "__main__":
    main()
