"""Where the transformer's wrapped step spends its extra time: selftune's own work, or the model.

Run from the repository root: ``python bench-results/overhead-split/split.py``.  As in the
overhead suite (``selftune.bench.overhead``), a plain and a wrapped copy of the same model train
in alternating blocks of 25 steps, but the forward and backward passes and the optimizer step
are timed apart, for ``controller="auto"`` (which changes the rate, so the two models' weights
drift apart) and ``"off"`` (same rate, same trajectory), each with and without
``torch.set_flush_denormal`` (denormal floats make CPU arithmetic slow).  Writes ``split.json``
next to this file: mean milliseconds per step for each part and side.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

import selftune
from selftune.bench.runner import one_thread
from selftune.bench.workloads import WORKLOADS

WORKLOAD, BASE, ROUNDS, BLOCK = "shakespeare-char", "sgd", 16, 25


def measure(controller: str, flush_denormal: bool) -> dict[str, float | str | bool]:
    workload = WORKLOADS[WORKLOAD]
    task = workload.task()
    torch.manual_seed(0)
    models = {"plain": workload.make_model(task)}
    models["selftune"] = copy.deepcopy(models["plain"])
    opts = {
        "plain": torch.optim.SGD(models["plain"].parameters(), lr=0.01, momentum=0.9),
        "selftune": selftune.wrap(
            torch.optim.SGD(models["selftune"].parameters(), lr=0.01, momentum=0.9),
            controller=controller,
            seed=0,
        ),
    }
    gens = {name: torch.Generator().manual_seed(0) for name in models}
    parts: dict[str, list[float]] = {f"{n}_{p}": [] for n in models for p in ("fwd_bwd", "step")}

    def one_step(name: str) -> None:
        start = time.perf_counter()
        loss = task.loss(models[name], task.batch(workload.batch_size, gens[name]))
        opts[name].zero_grad()
        loss.backward()
        middle = time.perf_counter()
        if name == "selftune":
            opts[name].step(loss=loss.detach())
        else:
            opts[name].step()
        loss.item()
        parts[f"{name}_fwd_bwd"].append((middle - start) * 1000.0)
        parts[f"{name}_step"].append((time.perf_counter() - middle) * 1000.0)

    if not torch.set_flush_denormal(flush_denormal):  # False where the CPU lacks the mode
        raise RuntimeError("this CPU cannot flush denormal floats to zero")
    with one_thread():
        for name in models:
            for _ in range(BLOCK):
                one_step(name)
        for values in parts.values():
            values.clear()
        for round_ in range(ROUNDS):
            for name in ("plain", "selftune") if round_ % 2 == 0 else ("selftune", "plain"):
                for _ in range(BLOCK):
                    one_step(name)
    torch.set_flush_denormal(False)  # torch's default
    return {
        "controller": controller,
        "flush_denormal": flush_denormal,
        **{key: statistics.fmean(values) for key, values in parts.items()},
        "final_lr": opts["selftune"].hyperparams()[0]["lr"],
    }


def main() -> None:
    rows = [measure(c, f) for c in ("auto", "off") for f in (False, True)]
    path = Path(__file__).with_name("split.json")
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    for r in rows:
        print(
            f"{r['controller']:>4} flush_denormal={r['flush_denormal']!s:5}  forward+backward "
            f"{r['plain_fwd_bwd']:.2f} -> {r['selftune_fwd_bwd']:.2f} ms, step "
            f"{r['plain_step']:.2f} -> {r['selftune_step']:.2f} ms"
        )


if __name__ == "__main__":
    main()
