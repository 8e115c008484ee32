"""What plain SGD does to `poisson-pinn`'s network: the figures of the held-out choice's notes.

Run from the repository root: ``python bench-results/held-out-choice/pinn_sgd.py``.  Plain SGD at
its default rate (0.01, momentum 0.9), the workload's batch and its network, started as the
runner starts seed 0 (``runner.fresh_run``), for 500 steps; at the steps printed, the minibatch
loss, the largest output on the evaluation grid, the share of the first layer's tanh units
saturated there (|tanh| > 0.99), and the norms of the four weight matrices.
"""

from __future__ import annotations

import torch

from selftune.bench.methods import DEFAULT_LR, _base
from selftune.bench.runner import fresh_run
from selftune.bench.workloads import WORKLOADS

PRINTED = (1, 5, 10, 20, 50, 100, 300, 500)


def main() -> None:
    workload = WORKLOADS["poisson-pinn"]
    task, model, gen = fresh_run(workload, 0)
    opt = _base("sgd", DEFAULT_LR["sgd"])(model.parameters())
    for step in range(1, max(PRINTED) + 1):
        loss = task.loss(model, task.batch(workload.batch_size, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step not in PRINTED:
            continue
        with torch.no_grad():
            points = task.points
            saturated = (torch.tanh(model[0](points)).abs() > 0.99).float().mean()
            largest = model(points).abs().max()
        norms = ", ".join(f"{p.norm():.1f}" for p in model.parameters() if p.dim() == 2)
        print(
            f"step {step}: loss {loss.item():.1f}, largest output {largest:.4f}, "
            f"saturated {saturated:.3f}, weight norms {norms}"
        )


if __name__ == "__main__":
    main()
