"""What the weight average (``wrap(..., average=True)``) adds to a wrapped step.

Run from the repository root, on an otherwise idle machine:
``python bench-results/overhead-split/average.py``.  For the overhead suite's two workloads and
both bases it runs the suite's paired measurement (``selftune.bench.overhead.measure``: plain and
wrapped steps interleaved in blocks, the optimizer step also timed alone) twice, with the wrapped
side keeping no average and keeping one, and writes ``average.json`` next to this file: each
measurement's row, and per pair the optimizer step's extra milliseconds over the plain step
without and with the average (one fused ``lerp`` per parameter group per step).
"""

from __future__ import annotations

import json
from pathlib import Path

from selftune.bench.overhead import OVERHEAD_WORKLOADS, measure

STEPS = 400


def main() -> None:
    rows, summary = [], []
    for workload in OVERHEAD_WORKLOADS:
        for base in ("sgd", "adamw"):
            off = measure(workload, base, STEPS)
            on = measure(workload, base, STEPS, average=True)
            rows += [{**off, "average": False}, {**on, "average": True}]
            extra = {
                label: row["selftune_step_ms"] - row["plain_step_ms"]
                for label, row in (("without", off), ("with", on))
            }
            summary.append(
                {
                    "workload": workload,
                    "base": base,
                    "step_extra_ms_without_average": round(extra["without"], 4),
                    "step_extra_ms_with_average": round(extra["with"], 4),
                    "ratio_without_average": round(off["ratio"], 4),
                    "ratio_with_average": round(on["ratio"], 4),
                }
            )
            print(summary[-1])
    out = Path(__file__).with_name("average.json")
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
