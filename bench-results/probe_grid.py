"""What the probes of kinds of run selftune was not built for share (``gan/gan.py``,
``policy-gradient/cartpole.py``): every variant on every seed, on two processes, and the
results written next to the probe's script as ``results.json`` and ``table.md``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def run_grid(
    run: Callable[[str, int], Row],
    variants: Iterable[str],
    seeds: Iterable[int],
    table: Callable[[list[Row]], str],
    here: Path,
    workers: int = 2,
) -> list[Row]:
    """``run(variant, seed)`` for each seed and, within it, each variant; write and print."""
    jobs = [(v, s) for s in seeds for v in variants]
    with ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(run, *zip(*jobs, strict=True)))
    (here / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (here / "table.md").write_text(table(rows), encoding="utf-8")
    print(table(rows))
    return rows
