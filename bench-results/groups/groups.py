"""`auto` on the two param groups that Hugging Face's ``Trainer`` builds: does it matter that
each group is tuned on its own?

The ``Trainer`` (and most fine-tuning scripts) split a model's parameters into a group with weight
decay (the weight matrices) and one without (biases and normalisation layers), at one learning
rate.  selftune tunes each group from its own signals.  Arms, on the benchmark's workloads whose
models have biases or normalisation layers, wrapping AdamW at its defaults and SGD at 0.01 with
momentum 0.9 (the benchmark's default settings):

- ``one``: every parameter in one group (the benchmark's ``selftune-auto`` row);
- ``split``: the ``Trainer``'s two groups, at the same settings (the same weight decay in both, so
  that the arms differ by the split alone).

Measured per run: steps to the workload's target, and the two groups' final effective rates.
Run from the repository root: ``SELFTUNE_CACHE=.cache PYTHONPATH=src python
bench-results/groups/groups.py OUT WORKLOAD...`` writes ``OUT.json`` (rows appended as runs end);
``groups.py --table OUT.json`` prints the table made from it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selftune.bench.methods import ADAMW_DEFAULT, SGD_DEFAULT, Handle, Method, Setting, _selftune_lr

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from probe_grid import run_rows, train_row  # noqa: E402

SEEDS = range(3)
NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


def split(model: nn.Module) -> list[list[nn.Parameter]]:
    """The Trainer's rule: no decay for biases and the parameters of normalisation layers."""
    plain = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters()}
    plain |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    decay = [p for p in model.parameters() if id(p) not in plain]
    return [decay, [p for p in model.parameters() if id(p) in plain]]


def build(base: str, arm: str) -> Callable[[nn.Module, Setting], Handle]:
    def make(model: nn.Module, s: Setting) -> Handle:
        import selftune

        groups: Any = (
            [{"params": g} for g in split(model) if g] if arm == "split" else model.parameters()
        )
        if base == "sgd":
            inner: torch.optim.Optimizer = torch.optim.SGD(groups, **SGD_DEFAULT)
        else:
            inner = torch.optim.AdamW(groups, **ADAMW_DEFAULT)
        opt = selftune.wrap(inner, seed=s.seed)
        mode = "max" if s.higher_is_better else "min"
        return Handle(
            opt, pass_loss=True, lr_of=_selftune_lr, metric_to=lambda v: opt.observe(v, mode=mode)
        )

    return make


def one(job: tuple[str, str, str, int]) -> dict[str, Any]:
    name, base, arm, seed = job
    method = Method(f"{arm}-{base}", "probe", base, build(base, arm), 3)
    rates: list[float] = []
    orig = Handle.step

    def step(self: Handle, loss: torch.Tensor) -> None:
        orig(self, loss)
        rates[:] = [h["lr"] for h in self.optimizer.hyperparams()]  # type: ignore[attr-defined]

    Handle.step = step  # type: ignore[method-assign]
    key = {"workload": name, "base": base, "arm": arm, "seed": seed}
    row = train_row(name, method, seed, key, ("steps_to_target", "steps_run", "diverged"))
    return {**row, "final_rates": rates}


def table(rows: list[dict[str, Any]]) -> str:
    """Per workload and base: steps to target per seed in each arm, and the split's rate ratio."""
    runs = {(r["workload"], r["base"], r["arm"], r["seed"]): r for r in rows}
    lines = [
        "| workload | base | one group: steps | split: steps | split: no-decay / decay rate |",
        "|---|---|---|---|---|",
    ]
    ratios: list[float] = []
    misses = {"one": 0, "split": 0}
    for w, base in dict.fromkeys((r["workload"], r["base"]) for r in rows):
        cells: dict[str, list[str]] = {"one": [], "split": []}
        rates = []
        for seed in SEEDS:
            one, two = (runs[(w, base, arm, seed)] for arm in ("one", "split"))
            for arm, r in (("one", one), ("split", two)):
                hit = r["steps_to_target"]
                misses[arm] += hit is None
                cells[arm].append("-" if hit is None else str(hit))
            if one["steps_to_target"] and two["steps_to_target"]:
                ratios.append(two["steps_to_target"] / one["steps_to_target"])
            decay, plain = two["final_rates"]
            rates.append(f"{plain / decay:.2g}")
        lines.append(
            f"| {w} | {base} | {' '.join(cells['one'])} | {' '.join(cells['split'])} "
            f"| {' '.join(rates)} |"
        )
    gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
    lines.append("")
    lines.append(
        f"Split / one group, steps to target, geometric mean over the {len(ratios)} runs that both "
        f"arms finished: {gm:.3f} (range {min(ratios):.2f}-{max(ratios):.2f}; faster "
        f"{sum(r < 1 for r in ratios)}, equal {ratios.count(1.0)}, slower "
        f"{sum(r > 1 for r in ratios)}); target missed: "
        f"one group {misses['one']}, split {misses['split']} of {len(rows) // 2} runs each."
    )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1] == "--table":
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        return
    out = Path(sys.argv[1] + ".json")
    jobs = [
        (w, base, arm, seed)
        for w in sys.argv[2:]
        for base in ("adamw", "sgd")
        for arm in ("one", "split")
        for seed in SEEDS
    ]
    run_rows(one, jobs, out)


if __name__ == "__main__":
    main()
