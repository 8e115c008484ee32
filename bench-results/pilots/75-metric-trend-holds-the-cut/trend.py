"""Print, at every evaluation past the metric's patience in one benchmark run, the trend pilot
75's rule read: the least-squares slope of the last eight values, its standard error and their
ratio (a diagnostic for ``candidate.patch``: apply it first, since it reads
``MetricPlateau.recent``).  Run from the repository root: ``PYTHONPATH=src python
bench-results/pilots/75-metric-trend-holds-the-cut/trend.py WORKLOAD METHOD SEED``; its output
for ``ratings-factorization selftune-auto-sgd 1`` is ``trend-seed1.txt``.
"""

from __future__ import annotations

import math
import statistics
import sys
from typing import Any

from selftune.bench import runner
from selftune.bench.methods import methods
from selftune.bench.workloads import WORKLOADS
from selftune.controllers.evidence import MetricPlateau

_update = MetricPlateau.update


def _reading(self: MetricPlateau, value: float, higher_is_better: bool) -> Any:
    stalled = _update(self, value, higher_is_better)
    if self.bad > self.patience:
        values = self.recent  # type: ignore[attr-defined]
        n, mean_y = len(values), statistics.fmean(values)
        mean_x = (n - 1) / 2
        sxx = sum((x - mean_x) ** 2 for x in range(n))
        slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sxx
        res = [y - mean_y - slope * (x - mean_x) for x, y in enumerate(values)]
        error = math.sqrt(sum(r * r for r in res) / (n - 2) / sxx)
        ratio = slope / error if error else 0.0
        print(
            f"stall? {stalled} best {self.best:.4f} slope {slope:+.5f} se {error:.5f}"
            f" t {ratio:+.2f} recent {[round(v, 4) for v in values]}"
        )
    return stalled


if __name__ == "__main__":
    MetricPlateau.update = _reading  # type: ignore[method-assign]
    with runner.one_thread():
        record = runner.train(WORKLOADS[sys.argv[1]], methods()[sys.argv[2]], int(sys.argv[3]))
    print(record["steps_to_target"])
