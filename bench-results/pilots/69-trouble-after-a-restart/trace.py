"""The two runs pilot 69 was read from, each traced under two forms of the guard's rule.

Run from the repository root (``SELFTUNE_CACHE=.cache PYTHONPATH=src python`` and this file's
path); writes ``trace.json`` next to this file.  Each run is the benchmark's own (``runner.train``
on one thread: its model, data order, evaluations and stop at the target), and records every
guard event with the effective rate after it, the range test's decisions of the first 60 steps,
and the run's steps to target and final metric.  The rule that sends trouble after a restart
back to the restart point (``Guard._restart_instead_of``) is taken in three forms:

- ``none``: never (the guard before pilot 69);
- ``committed``: only after a controller's restart, as committed;
- ``first``: the first form, after a restart or not.

Runs: the small CNN from SGD at 1.0, seed 1 (``none`` against ``committed``), the committed
suite's one lost run outside the GRU; the GRU from AdamW at 1e-4, seed 0 (``committed``
against ``first``), which the first form lost.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from selftune.bench.methods import methods
from selftune.bench.runner import one_thread, train
from selftune.bench.workloads import WORKLOADS
from selftune.guard import Guard, Snapshot
from selftune.tuner import SelfTuned

EARLY = 60
RUNS = (
    ("mnist1d-cnn", "selftune-auto-sgd-lr1e0", 1, ("none", "committed")),
    ("mnist1d-gru", "selftune-auto-adamw-lr1e-4", 0, ("committed", "first")),
)


def _first_form(self: Guard, snap: Snapshot) -> Snapshot | None:
    """The rule with no restart asked for: any trouble before progress on the first snapshot."""
    start = self.initial
    if start is None or start.step < self.loss_since or not math.isfinite(start.level):
        return None
    return start if snap.level >= start.level else None


FORMS = {
    "none": lambda self, snap: None,
    "committed": Guard._restart_instead_of,
    "first": _first_form,
}


def trace(workload: str, method: str, seed: int, form: str) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    after = SelfTuned._after

    def record(self: SelfTuned, t: int, signals: Any, decisions: list[Any], guard: Any) -> None:
        lr = self.hyperparams()[0]["lr"]
        if guard is not None:
            events.append({"step": t, "guard": guard["event"], "lr": lr, "why": guard["reason"]})
        for d in decisions if t <= EARLY else ():
            events.append({"step": t, "lr": lr, "why": d.reason})
        after(self, t, signals, decisions, guard)

    SelfTuned._after = record  # type: ignore[method-assign]
    Guard._restart_instead_of = FORMS[form]  # type: ignore[method-assign]
    try:
        with one_thread():  # as the suite runs it: float sums on more threads round otherwise
            run = train(WORKLOADS[workload], methods()[method], seed)
    finally:
        SelfTuned._after, Guard._restart_instead_of = after, FORMS["committed"]  # type: ignore[method-assign]
    return {
        "workload": workload,
        "method": method,
        "seed": seed,
        "form": form,
        "steps_to_target": run["steps_to_target"],
        "steps_run": run["steps_run"],
        "final_metric": run["final_metric"],
        "events": events,
    }


def main() -> None:
    rows = [trace(w, m, s, form) for w, m, s, forms in RUNS for form in forms]
    path = Path(__file__).with_name("trace.json")
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    for r in rows:
        guard = [(e["step"], e["guard"], f"{e['lr']:.3g}") for e in r["events"] if "guard" in e]
        print(r["workload"], r["method"], r["seed"], r["form"], r["steps_to_target"],
              f"{r['final_metric']:.3f}", guard[:6])  # fmt: skip


if __name__ == "__main__":
    main()
