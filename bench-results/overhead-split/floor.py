"""How low the small CNN's per-step cost could go: the signals' tensor work alone, no logic.

Run from the repository root: ``python bench-results/overhead-split/floor.py``.  It runs the
overhead suite's own measurement (``selftune.bench.overhead.measure``: plain and wrapped copies of
the model in alternating blocks of 25 steps, the optimizer step also timed alone) on
``mnist1d-cnn`` with SGD and AdamW, three times each way:

- ``auto`` and ``off``: ``selftune.wrap`` as shipped;
- ``ops``: in ``wrap``'s place, an optimizer that does the tensor work of one step's signal read
  and nothing else: the fused gradient norms, the previous update's norm and its dot product
  with the gradient over the flat buffer that holds it, one stack of those scalars and the loss,
  one host sync, and the copy and subtraction around the wrapped step that measure the update
  (what ``SignalTracker`` dispatches for a dense model in one param group when the controller
  reads no momentum buffer, as ``auto``'s does not).  No controller, guard, log or Python
  bookkeeping: the cost of reading these signals every step, whatever reads them.

Writes ``floor.json`` next to this file.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

import selftune
from selftune.bench.overhead import measure

WORKLOAD, STEPS, REPEATS = "mnist1d-cnn", 1000, 3


class SignalOps(torch.optim.Optimizer):
    """The wrapped optimizer's step with the signal read's tensor work around it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.flat = torch.zeros(sum(p.numel() for p in self.params))
        chunks = self.flat.split([p.numel() for p in self.params])
        self.prev = [c.view(p.shape) for c, p in zip(chunks, self.params, strict=True)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None, *, loss: torch.Tensor) -> None:  # type: ignore[override]
        grads = [p.grad for p in self.params]
        parts = list(torch._foreach_norm(grads))
        parts.append(torch.linalg.vector_norm(self.flat))
        torch._foreach_mul_(self.prev, grads)
        parts.append(self.flat.sum())
        parts.append(loss)
        torch.stack(parts).tolist()
        torch._foreach_copy_(self.prev, self.params)
        self.optimizer.step()
        torch._foreach_sub_(self.prev, self.params)


def _row(base: str, side: str) -> dict[str, Any]:
    if side != "ops":
        return measure(WORKLOAD, base, STEPS, controller=side)
    shipped = selftune.wrap
    selftune.wrap = lambda optimizer, **_: SignalOps(optimizer)
    try:
        return measure(WORKLOAD, base, STEPS)
    finally:
        selftune.wrap = shipped


def main() -> None:
    rows = [
        {**_row(base, side), "side": side, "repeat": r}
        for r in range(REPEATS)
        for base in ("sgd", "adamw")
        for side in ("ops", "off", "auto")
    ]
    path = Path(__file__).with_name("floor.json")
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    for base in ("sgd", "adamw"):
        for side in ("ops", "off", "auto"):
            mine = [r for r in rows if r["base"] == base and r["side"] == side]
            extra = [r["selftune_step_ms"] - r["plain_step_ms"] for r in mine]
            runs = ", ".join(f"{r['ratio']:.3f}" for r in mine)
            ratio = statistics.median(r["ratio"] for r in mine)
            print(
                f"{base:>5} {side:>4}: whole step x{ratio:.3f}"
                f" (runs: {runs}); optimizer step "
                f"+{statistics.median(extra):.3f} ms over plain "
                f"{statistics.median(r['plain_step_ms'] for r in mine):.3f} ms; plain whole step "
                f"{statistics.median(r['plain_ms'] for r in mine):.3f} ms"
            )


if __name__ == "__main__":
    main()
