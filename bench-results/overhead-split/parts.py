"""Where the small CNN's wrapped optimizer step spends its extra time: the controller, or the rest.

Run from the repository root: ``python bench-results/overhead-split/parts.py``.  It runs the
overhead suite's measurement (``selftune.bench.overhead.measure``, the optimizer step also timed
alone) on ``mnist1d-cnn`` with SGD for ``controller="auto"`` and ``"off"`` (no decisions: what
is left is reading the signals, the guard and the wrapper), and for ``"off"`` also times
``SignalTracker.measure``, the signals' read, inside the wrapped steps.  Writes ``parts.json``
next to this file.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from selftune.bench.overhead import measure
from selftune.signals import SignalTracker

WORKLOAD, BASE, STEPS = "mnist1d-cnn", "sgd", 400


def _timed_signals(controller: str) -> dict[str, Any]:
    """The measurement, with the mean milliseconds of each ``SignalTracker.measure`` call."""
    original = SignalTracker.measure
    spent: list[float] = []

    def timed(self: SignalTracker, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent.append((time.perf_counter() - start) * 1000.0)

    SignalTracker.measure = timed  # type: ignore[method-assign]
    try:
        row = measure(WORKLOAD, BASE, STEPS, controller=controller)
    finally:
        SignalTracker.measure = original  # type: ignore[method-assign]
    return {**row, "controller": controller, "signals_ms": statistics.fmean(spent)}


def main() -> None:
    rows = [_timed_signals(c) for c in ("off", "auto")]
    path = Path(__file__).with_name("parts.json")
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    for r in rows:
        extra = r["selftune_step_ms"] - r["plain_step_ms"]
        print(
            f"{r['controller']:>4}: optimizer step {r['plain_step_ms']:.3f} -> "
            f"{r['selftune_step_ms']:.3f} ms (+{extra:.3f}), of which reading the signals "
            f"{r['signals_ms']:.3f} ms; whole step ratio {r['ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
