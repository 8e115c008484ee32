"""Print what ``auto`` decided in one benchmark run: the traces the pilots README quotes.

Run from the repository root: ``python bench-results/pilots/trace.py WORKLOAD METHOD SEED``
(e.g. ``digits-mlp selftune-auto-sgd 0``).  The run is the runner's own (same seed, data and
budget); its audit log goes to a temporary folder, and every guard event and knob decision is
printed with its step, the rate before and after, and its reason (a range-test step's reason
carries the averaged cosine it read).  To trace a rejected pilot, apply its ``candidate.patch``
first.

``--range-test`` also prints what the range test read at each of its steps, before its decision
(the minibatch and smoothed loss, the start level and its error, the ``_left_start`` verdict, the
averaged cosine and the phase): the figures of pilots 39-41, some of whose steps end the test
without a decision and so leave no record in the log.  ``--signals`` prints under each rate
decision the loss statistics it read (the smoothed loss, its deviation, the slope of the fast EMA
against the slow one): the figures of pilot 61.  ``--metric-cuts`` prints at each cut of the
metric's plateau rule the mean of the last eight per-step cosines, its standard error and the
sign the range test's ``SignTest`` reads from them (0: no clear sign): the figures of pilot 74.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from typing import Any

import selftune
from selftune.audit import read_log
from selftune.bench import runner
from selftune.bench.methods import methods
from selftune.bench.workloads import WORKLOADS
from selftune.controllers.auto import AutoController
from selftune.signals import FAST_DECAY, Signals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("method", help="a selftune-* method of the registry")
    parser.add_argument("seed", type=int)
    parser.add_argument("--range-test", action="store_true", help="print the test's reads")
    parser.add_argument(
        "--signals", action="store_true", help="print the loss statistics each decision read"
    )
    parser.add_argument(
        "--metric-cuts", action="store_true", help="print the cosines at each metric cut"
    )
    args = parser.parse_args()
    if args.range_test:
        _print_range_test_reads()
    if args.metric_cuts:
        _print_metric_cut_reads()
    log_dir = tempfile.mkdtemp(prefix="selftune-trace-")
    wrap = selftune.wrap

    def wrap_with_log(*a: Any, **k: Any) -> selftune.SelfTuned:
        return wrap(*a, **{**k, "log_dir": log_dir})

    selftune.wrap = wrap_with_log  # the method's builder wraps through this name
    with runner.one_thread():
        record = runner.train(WORKLOADS[args.workload], methods()[args.method], args.seed)
    print(f"steps to target: {record['steps_to_target']}, diverged: {record['diverged']}")
    for r in read_log(log_dir).records:
        if r["kind"] == "guard":
            print(f"{r['step']:5d}  guard {r['event']}: {r['reason']}")
        elif r["kind"] == "decision" and r["knob"] == "lr":
            print(f"{r['step']:5d}  lr {r['old']:.4g} -> {r['new']:.4g}: {r['reason']}")
            if args.signals:
                print("       " + _loss_read(r.get("signals") or {}))


def _loss_read(signals: dict[str, float]) -> str:
    """The smoothed loss, its deviation and its slope ((fast - slow) / |slow|) a decision read."""
    keys = ("loss_ema", "loss_std", "loss_slope", "cos_update")
    return ", ".join(f"{k} {signals[k]:+.4f}" for k in keys if k in signals)


def _print_range_test_reads() -> None:
    """Wrap ``AutoController._range_test`` (a diagnostic: the controller is not changed)."""
    test = AutoController._range_test

    def reading(ctl: AutoController, s: Signals, i: int, k: dict, rho: float) -> Any:
        level = ctl._start_level
        n = len(level.samples)
        error = level.deviation * math.sqrt((1 - FAST_DECAY) / (1 + FAST_DECAY) + 1 / max(n, 1))
        print(
            f"{s.step:5d}  read at lr {k['lr']:.3g}: loss {s.loss:.3f}, smoothed {s.loss_ema:.3f},"
            f" start {level.mean:.3f} (error {error:.3f}), left start {ctl._left_start(s):+d},"
            f" cos {rho:+.3f}, phase {ctl._phase[i]}"
        )
        return test(ctl, s, i, k, rho)

    AutoController._range_test = reading  # type: ignore[method-assign]


def _print_metric_cut_reads() -> None:
    """Wrap ``AutoController._metric_cut`` (a diagnostic: the controller is not changed)."""
    cut = AutoController._metric_cut

    def reading(ctl: AutoController, s: Signals, i: int, lr: float) -> Any:
        ev = ctl._evidence[i]
        print(
            f"{s.step:5d}  metric cut at lr {lr:.3g}: cosines' mean {ev.mean:+.3f}, error"
            f" {ev.error:.3f}, sign {ev.sign(ctl.clear):+d}"
        )
        return cut(ctl, s, i, lr)

    AutoController._metric_cut = reading  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
