"""selftune on a loss that goes below zero: a heteroscedastic regression's Gaussian NLL.

The guard judges spikes and regressions of the loss on a log scale, so it learns its levels
from positive losses only (:mod:`selftune.guard`): once the loss is below zero a spike is judged
against the level it learnt before; and ``auto``'s check of the loss against its best is off
while the best is not positive.  A negative log-likelihood of a continuous density is such a loss:
it crosses zero as soon as the predicted spread is small.  This fits an MLP (1-64-64-2: a mean
and a spread through softplus) to ``sin(2x)`` with noise whose spread grows with ``|x|``, with
``torch.nn.GaussianNLLLoss``, AdamW at 1e-3, 2,000 steps of 64, seeds 0-4: plain, through
``selftune.wrap`` (``auto``), and through the guard alone (``controller="off"``).  Measured: the
NLL on 2,000 held-out points, the step of the first negative minibatch loss, and the rate at the
end.  Run from the repository root: ``PYTHONPATH=src python bench-results/negative-loss/nll.py``;
writes ``results.json`` next to this file and prints a table.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

import selftune

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "auto", "guard-only")


def data(seed: int, n: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=gen) * 6 - 3
    return x, torch.sin(2 * x) + (0.02 + 0.1 * x.abs()) * torch.randn(n, 1, generator=gen)


def run(seed: int, variant: str, steps: int = 2000) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    opt: Any = torch.optim.AdamW(net.parameters(), lr=1e-3)
    if variant != "plain":
        opt = selftune.wrap(opt, controller="off" if variant == "guard-only" else "auto")
    (x, y), held_out = data(seed), data(seed + 100)
    gen, crit = torch.Generator().manual_seed(seed), nn.GaussianNLLLoss()

    def nll(xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = net(xy[0])
        return crit(out[:, :1], xy[1], nn.functional.softplus(out[:, 1:]) + 1e-6)

    negative_at = None
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nll((x[idx], y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach()) if variant != "plain" else opt.step()
        if negative_at is None and float(loss.detach()) < 0:
            negative_at = t
    with torch.no_grad():
        test = float(nll(held_out))
    rate = opt.hyperparams()[0]["lr"] if variant != "plain" else 1e-3
    return {
        "seed": seed,
        "variant": variant,
        "test_nll": test,
        "negative_at": negative_at,
        "rate": rate,
    }


def main() -> None:
    torch.set_num_threads(1)
    rows = [run(seed, v) for seed in range(5) for v in VARIANTS]
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    head = "| variant | held-out NLL per seed | median | first negative loss (step) | final rate |"
    print(head)
    print("|---|---|---:|---|---|")
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        nlls = ", ".join(f"{r['test_nll']:.3f}" for r in mine)
        med = statistics.median(r["test_nll"] for r in mine)
        neg = ", ".join(str(r["negative_at"]) for r in mine)
        rates = ", ".join(f"{r['rate']:.2g}" for r in mine)
        print(f"| {v} | {nlls} | {med:.3f} | {neg} | {rates} |")


if __name__ == "__main__":
    main()
