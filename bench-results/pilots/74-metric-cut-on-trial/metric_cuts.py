"""Print, at every cut the metric's plateau rule makes in one benchmark run, what the recent
cosines said: the figures of pilot 74 (a diagnostic: the controller is not changed).

Run from the repository root: ``PYTHONPATH=src python
bench-results/pilots/74-metric-cut-on-trial/metric_cuts.py WORKLOAD METHOD SEED`` (e.g.
``ratings-factorization selftune-auto-sgd 1``).  Each line gives the step, the rate cut, the
mean of the last eight per-step cosines, its standard error and the sign the range test's
``SignTest`` reads from them (0: no clear sign).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from selftune.bench import runner
from selftune.bench.methods import methods
from selftune.bench.workloads import WORKLOADS
from selftune.controllers.auto import AutoController
from selftune.signals import Signals

_cut = AutoController._metric_cut


def _reading(ctl: AutoController, s: Signals, i: int, lr: float) -> Any:
    ev = ctl._evidence[i]
    n = len(ev.samples)
    se = ev.deviation / math.sqrt(n) if n > 1 else math.inf
    print(
        f"{s.step:5d} metric cut at lr {lr:.3g}: cosines' mean {ev.mean:+.3f}, error {se:.3f},"
        f" sign {ev.sign(ctl.clear):+d}",
        flush=True,
    )
    return _cut(ctl, s, i, lr)


if __name__ == "__main__":
    AutoController._metric_cut = _reading  # type: ignore[method-assign]
    workload, method, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with runner.one_thread():
        record = runner.train(WORKLOADS[workload], methods()[method], seed)
    print(f"steps to target: {record['steps_to_target']}")
