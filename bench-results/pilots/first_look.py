"""What does the range test's first look read on a flat start: the rate, or the batch order?

Run from the repository root: ``python bench-results/pilots/first_look.py`` (about 15 seconds
on two cores); it writes ``first_look.json`` next to itself and prints the table the pilots README
quotes (``--table`` prints it from the committed ``first_look.json`` without running).

``auto`` decides at its first look (the fourth step) whether the start is past the crossing, on
the sign of the averaged cosine of the gradient with the last update.  That cosine measures the
step's effect on the gradient only if the step moves the gradient more than the minibatch noise
does.  On the GRU's flat start it did not look so: the shrink from 1e-3 (seed 1) went 25x deep
before the cosines turned, and from 1e-2 and 1e-1 about as deep.  This script runs the first
six steps of every ``selftune-auto-*`` start of the benchmark on the GRU and, for contrast, on the
residual CNN and the Friedman regression (seeds 0-2, the runner's own model, data and batch
order), and records each step's cosine, minibatch loss and the range test's phase.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from horizon import run_or_read

from selftune.bench.methods import methods
from selftune.bench.runner import Setting, one_thread
from selftune.bench.workloads import WORKLOADS

OUT = Path(__file__).with_name("first_look.json")
WORKLOAD_NAMES = ("mnist1d-gru", "digits-resnet", "friedman-mlp")
SEEDS = (0, 1, 2)
STEPS = 6


def first_steps(workload: str, method: str, seed: int) -> dict[str, Any]:
    """The first ``STEPS`` steps of one benchmark run: per step the cosine, loss and phase."""
    w = WORKLOADS[workload]
    task = w.task()
    torch.manual_seed(seed)
    model = w.make_model(task)
    gen = torch.Generator().manual_seed(seed)
    handle = methods()[method].build(model, Setting(w.steps, w.higher_is_better, seed))
    opt = handle.optimizer
    cosines, losses, phases = [], [], []
    with one_thread():
        for _ in range(STEPS):
            loss = task.loss(model, task.batch(w.batch_size, gen))
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
            cosines.append(opt.last_signals.groups[0].cos_update)
            losses.append(loss.item())
            phases.append(opt.controller.state_dict()["phase"][0])
    return {"workload": workload, "method": method, "seed": seed, "cos": cosines,
            "loss": losses, "phase": phases}  # fmt: skip


def table(records: list[dict[str, Any]]) -> str:
    """Per run: the cosines of steps 2-4 (the first look's), the losses of steps 1-4 and their
    spread (largest less smallest, over their mean: how far the first steps moved the loss),
    and the phase after the first look."""
    head = "| workload | start | seed | cosines, steps 2-4 | losses, steps 1-4 | spread | phase |"
    lines = [head, "|---|---|---|---|---|---:|---|"]
    for r in records:
        start = r["method"].removeprefix("selftune-auto-")
        cos = " ".join(f"{c:+.3f}" for c in r["cos"][1:4])
        first = r["loss"][:4]
        loss = " ".join(f"{v:.4g}" for v in first)
        spread = (max(first) - min(first)) / (sum(first) / len(first))
        lines.append(
            f"| {r['workload']} | {start} | {r['seed']} | {cos} | {loss} | {spread:.1%} "
            f"| {r['phase'][3]} |"
        )
    return "\n".join(lines)


def main() -> None:
    starts = sorted(m for m in methods() if m.startswith("selftune-auto-"))
    runs = [(w, m, s) for w in WORKLOAD_NAMES for m in starts for s in SEEDS]
    print(table(run_or_read(__doc__, OUT, first_steps, runs)))


if __name__ == "__main__":
    main()
