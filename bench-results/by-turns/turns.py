"""`auto` on two tasks trained by turns in one optimizer: separate networks, or a shared trunk.

Each step takes a batch of 32 from one task, in turn: the digit (ten classes) or its parity, of
scikit-learn's digits (the first 1,400 images to train, the other 397 to test).  Either two
separate networks (64-64-c MLPs) or one shared trunk (64-64, ReLU) with a head per task, in one
optimizer: AdamW at its defaults or SGD at 0.01 with momentum 0.9, plain or wrapped by
`selftune.wrap` at its defaults, 600 steps, seeds 0-4.  Measured: each task's test accuracy at
the end.  Run from the repository root: ``PYTHONPATH=src python bench-results/by-turns/turns.py
OUT`` (about a minute on two cores) writes ``OUT.json`` and prints the table.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

import selftune

SEEDS, STEPS, TRAIN = range(5), 600, 1400


def run(layout: str, base: str, how: str, seed: int) -> list[float]:
    """Train once; the test accuracy of each task."""
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    labels = (torch.tensor(digits.target), torch.tensor(digits.target) % 2)
    torch.manual_seed(seed)
    if layout == "shared":
        trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        heads = nn.ModuleList([nn.Linear(64, 10), nn.Linear(64, 2)])
        model: nn.Module = nn.ModuleList([trunk, heads])

        def forward(inputs: torch.Tensor, task: int) -> torch.Tensor:
            return heads[task](trunk(inputs))
    else:
        nets = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, c)) for c in (10, 2)
        )
        model = nets

        def forward(inputs: torch.Tensor, task: int) -> torch.Tensor:
            return nets[task](inputs)

    params = list(model.parameters())
    inner = (
        torch.optim.AdamW(params)
        if base == "adamw"
        else torch.optim.SGD(params, lr=0.01, momentum=0.9)
    )
    opt = selftune.wrap(inner) if how == "auto" else inner
    step: Callable[[torch.Tensor], Any] = (
        (lambda loss: opt.step(loss=loss.detach())) if how == "auto" else (lambda _: opt.step())
    )
    gen = torch.Generator().manual_seed(seed)
    for t in range(STEPS):
        task = t % 2
        idx = torch.randint(0, TRAIN, (32,), generator=gen)
        loss = nn.functional.cross_entropy(forward(x[idx], task), labels[task][idx])
        opt.zero_grad()
        loss.backward()
        step(loss)
    with torch.no_grad():
        return [
            (forward(x[TRAIN:], k).argmax(1) == labels[k][TRAIN:]).float().mean().item()
            for k in (0, 1)
        ]


def main(out: str) -> None:
    rows = []
    for layout in ("separate", "shared"):
        for base in ("adamw", "sgd"):
            for how in ("plain", "auto"):
                accs = [run(layout, base, how, s) for s in SEEDS]
                rows.append({"layout": layout, "base": base, "how": how, "accuracy": accs})
    with open(f"{out}.json", "w") as f:
        json.dump(rows, f, indent=1)
    print("| networks | base | run | digit accuracy (median) | parity accuracy (median) |")
    print("|---|---|---|---:|---:|")
    for r in rows:
        a, b = (statistics.median(acc[k] for acc in r["accuracy"]) for k in (0, 1))
        print(f"| {r['layout']} | {r['base']} | {r['how']} | {a:.3f} | {b:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])
