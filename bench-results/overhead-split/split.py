"""Where the transformer's wrapped step spends its extra time: selftune's own work, or the model.

Run from the repository root: ``python bench-results/overhead-split/split.py``.  It runs the
overhead suite's measurement (``selftune.bench.overhead.measure``: a plain and a wrapped copy of
the same model in alternating blocks of 25 steps, the optimizer step also timed alone) for
``controller="auto"`` (which changes the rate, so the two models' weights drift apart) and
``"off"`` (same rate, same trajectory), each with and without ``torch.set_flush_denormal``
(denormal floats make CPU arithmetic slow).  The forward and backward passes are the whole step
less the optimizer step.  Writes ``split.json`` next to this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from selftune.bench.overhead import measure

WORKLOAD, BASE, STEPS = "shakespeare-char", "sgd", 400


def split(controller: str, flush_denormal: bool) -> dict[str, float | str | bool]:
    if not torch.set_flush_denormal(flush_denormal):  # False where the CPU lacks the mode
        raise RuntimeError("this CPU cannot flush denormal floats to zero")
    try:
        r = measure(WORKLOAD, BASE, STEPS, controller=controller)
    finally:
        torch.set_flush_denormal(False)  # torch's default
    return {
        "controller": controller,
        "flush_denormal": flush_denormal,
        **{
            f"{side}_{part}": value
            for side in ("plain", "selftune")
            for part, value in (
                ("fwd_bwd", r[f"{side}_ms"] - r[f"{side}_step_ms"]),
                ("step", r[f"{side}_step_ms"]),
            )
        },
    }


def main() -> None:
    rows = [split(c, f) for c in ("auto", "off") for f in (False, True)]
    path = Path(__file__).with_name("split.json")
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    for r in rows:
        change = (r["selftune_fwd_bwd"] / r["plain_fwd_bwd"] - 1) * 100
        print(
            f"{r['controller']:>4} flush_denormal={r['flush_denormal']!s:5}  forward+backward "
            f"{r['plain_fwd_bwd']:.2f} -> {r['selftune_fwd_bwd']:.2f} ms ({change:+.1f}%), step "
            f"{r['plain_step']:.2f} -> {r['selftune_step']:.2f} ms"
        )


if __name__ == "__main__":
    main()
