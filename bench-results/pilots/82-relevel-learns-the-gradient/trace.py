"""The guard's events in ``../../multi-task/``'s guard-alone runs in turns of 100 steps, seeds 0-4:
where each rollback came and on which signal.  Run from the repository root with the code to
trace on the path: ``PYTHONPATH=src python bench-results/pilots/82-relevel-learns-the-gradient/
trace.py`` (about a minute); ``trace-before.txt`` is its output at the code before this pilot
(2badcf2), ``trace-after.txt`` with it."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1] / "multi-task"), str(HERE.parents[1].parent / "tests")]
import alternate  # noqa: E402
from faults import guard_records  # noqa: E402


def main() -> None:
    for seed in alternate.SEEDS:
        folder = Path(tempfile.mkdtemp()) / "run"
        row = alternate.run("block100-guard-only", seed, log_dir=folder)
        events = [f"{r['step']} {r['event']} ({r['signal']})" for r in guard_records(folder)]
        head = f"seed {seed}: task B MSE {row['mse_b']:.4g}, rate {row['rate']:g}"
        print(f"{head}; " + ", ".join(events))


if __name__ == "__main__":
    main()
