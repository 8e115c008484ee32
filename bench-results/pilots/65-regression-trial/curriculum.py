"""The curriculum of ``tests/test_guard.py`` (a regression MLP whose batches mix in harder
examples until its loss has risen about 500x), plain AdamW against the same AdamW through
selftune's guard (controller ``off``), seeds 0-2: the error on the hard examples at the end,
their ratio, and the guard's events.

Run from the repository root, once per version of the package to compare::

    PYTHONPATH=src python bench-results/pilots/65-regression-trial/curriculum.py after
    PYTHONPATH=<the package before the trial> python .../curriculum.py before

Writes ``curriculum-<label>.json`` next to this file; the test's own run function is used,
so the figures are those of the run the test asserts on.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "tests"))

from test_guard import _curriculum_run  # noqa: E402

import selftune  # noqa: E402
from selftune.audit import read_log  # noqa: E402


def main(label: str) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(3):
            plain = _curriculum_run(seed, lambda o, d: o)
            folder = Path(tmp) / str(seed)
            guarded = _curriculum_run(seed, lambda o, d: selftune.wrap(o, "off", log_dir=d), folder)
            events = [
                [r["step"], r["event"], r["signal"]]
                for r in read_log(folder).records
                if r["kind"] == "guard"
            ]
            rows.append(
                {"seed": seed, "plain": plain, "guarded": guarded, "ratio": guarded / plain,
                 "events": events}
            )  # fmt: skip
            print(f"seed {seed}: plain {plain:.3f}, guarded {guarded:.3f} ({guarded / plain:.2f}x)")
    (HERE / f"curriculum-{label}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
