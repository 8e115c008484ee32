"""selftune on a ``DataLoader`` that keeps the ragged last batch of each epoch.

``DataLoader(drop_last=False)``, torch's default, ends each epoch on the examples left over: with
1,438 training examples of scikit-learn's digits (``selftune.bench.data.digits``) and batches of
110, 179 or 205, that last batch holds 8, 6 or 3 examples, and its mean loss strays from the
others' about four to eight times as far (the square root of the ratio of their sizes).
This trains the benchmark's digits MLP shape (64-64-10, ReLU) for 100 epochs, shuffled, with
SGD (momentum 0.9, 0.01) and AdamW (1e-3) at fixed rates, seeds 0-4, each batch size with the
ragged batch kept and dropped (``-drop``), under:

- ``guard-only``: ``controller="off"`` with the default guard (a spike held for the next step
  to confirm: ``GuardConfig(confirm=True)``);
- ``guard-only-at-once``: the same with ``GuardConfig(confirm=False)``, the guard of the
  releases before the hold, which rolls back at the first spike;
- ``auto`` and ``auto-at-once``: ``selftune.wrap(optimizer)`` with the same two guards.

Measured: test accuracy at the end, whether the run stopped with ``GuardError``, the rate at
the end and the guard's events.  Run from the repository root:
``PYTHONPATH=src python bench-results/ragged-batch/epochs.py`` (about ten minutes on two
cores); writes ``results.json`` and ``table.md`` next to this file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selftune
from selftune.bench.data import digits

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import accuracy_columns, count_guard_events, run_grid  # noqa: E402

BASES = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
}
BATCHES = (110, 179, 205)
KINDS = ("guard-only", "guard-only-at-once", "auto", "auto-at-once")
VARIANTS = tuple(
    f"{base}-b{batch}{drop}-{kind}"
    for base in BASES
    for batch in BATCHES
    for drop in ("", "-drop")
    for kind in KINDS
)
SEEDS, EPOCHS = range(5), 100


def run(variant: str, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    base, batch, rest = variant.split("-", 2)
    drop = rest.startswith("drop-")
    kind = rest.removeprefix("drop-")
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    guard = selftune.GuardConfig(confirm=not kind.endswith("-at-once"))
    controller = "off" if kind.startswith("guard-only") else "auto"
    opt = selftune.wrap(BASES[base](net.parameters()), controller=controller, guard=guard)
    events = count_guard_events(opt)
    data = digits()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x_train, data.y_train),
        batch_size=int(batch[1:]),
        shuffle=True,
        drop_last=drop,
        generator=torch.Generator().manual_seed(seed),
    )
    stopped = None
    for _ in range(EPOCHS):
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            try:
                opt.step(loss=loss.detach())
            except selftune.GuardError:
                stopped = opt.step_count
                break
        if stopped is not None:
            break
    with torch.no_grad():
        accuracy = float((net(data.x_test).argmax(1) == data.y_test).float().mean())
    return {
        "variant": variant,
        "seed": seed,
        "examples": len(data.y_train),
        "accuracy": accuracy,
        "stopped": stopped,
        "rate": opt.hyperparams()[0]["lr"],
        "events": dict(events),
    }


COLUMNS = accuracy_columns()


def main() -> None:
    run_grid(run, VARIANTS, SEEDS, COLUMNS, HERE)


if __name__ == "__main__":
    main()
