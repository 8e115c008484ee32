"""The decisions of one `selftune-auto-muon` run of ``muon.py``: where its rates went, and why.

Run from the repository root: ``SELFTUNE_CACHE=.cache PYTHONPATH=src python
bench-results/muon/trace.py WORKLOAD SEED``; prints the steps to target and every decision of
the run's log (the range test's growth folded into its first and last step), and writes the
same to ``trace-WORKLOAD-SEED.txt`` next to this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import muon  # noqa: E402
from probe_grid import trace  # noqa: E402


def main(workload: str, seed: int) -> None:
    method = muon.build("selftune-auto-muon")
    trace(workload, method, seed, HERE / f"trace-{workload}-{seed}.txt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
