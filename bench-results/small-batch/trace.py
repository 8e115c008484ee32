"""What ``auto`` decided in the three runs of ``digits.py`` it wrecked: every decision of the
first 100 steps (the rate it set and why), every guard event, and the mean minibatch loss of
each 250 steps.  Run from the repository root:
``PYTHONPATH=src python bench-results/small-batch/trace.py``; writes ``trace.json`` next to
this file."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
from digits import STEPS, run  # noqa: E402

from selftune.tuner import StepEvent  # noqa: E402

WRECKED = (("sgd-b4-auto", 4), ("sgd-b1-auto", 4), ("sgd-b1-auto-10x", 4), ("adamw-b1-auto", 3))
EARLY, WINDOW = 100, 250


def trace(variant: str, seed: int) -> dict[str, Any]:
    decisions: list[dict[str, Any]] = []
    losses: list[float] = []

    def listen(e: StepEvent) -> None:
        if e.loss is not None:
            losses.append(e.loss)
        for d in e.decisions if e.step <= EARLY else ():
            decisions.append({"step": e.step, "lr": e.hyperparams[0]["lr"], "why": d.reason})
        if e.guard:
            decisions.append({"step": e.step, "guard": e.guard["event"], "why": e.guard["reason"]})

    row = run(variant, seed, listen)
    windows = [statistics.fmean(losses[i : i + WINDOW]) for i in range(0, STEPS, WINDOW)]
    return {**row, "decisions": decisions, "mean_loss_per_250_steps": windows}


def main() -> None:
    runs = [trace(v, s) for v, s in WRECKED]
    (HERE / "trace.json").write_text(json.dumps(runs, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
