"""Print what ``auto`` decided in one benchmark run: the traces the pilots README quotes.

Run from the repository root: ``python bench-results/pilots/trace.py WORKLOAD METHOD SEED``
(e.g. ``digits-mlp selftune-auto-sgd 0``).  The run is the runner's own (same seed, data and
budget); its audit log goes to a temporary folder, and every guard event and knob decision is
printed with its step, the rate before and after, and its reason (a range-test step's reason
carries the averaged cosine it read).  To trace a rejected pilot, apply its ``candidate.patch``
first.
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import selftune
from selftune.audit import read_log
from selftune.bench import runner
from selftune.bench.methods import methods
from selftune.bench.workloads import WORKLOADS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("method", help="a selftune-* method of the registry")
    parser.add_argument("seed", type=int)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
