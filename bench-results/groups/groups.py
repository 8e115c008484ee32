"""`auto` on the two param groups that Hugging Face's ``Trainer`` builds: does it matter that
each group is tuned on its own?

The ``Trainer`` (and most fine-tuning scripts) split a model's parameters into a group with weight
decay (the weight matrices) and one without (biases and normalisation layers), at one learning
rate.  selftune tunes each group from its own signals.  Arms, on the benchmark's workloads whose
models have biases or normalisation layers, wrapping AdamW at its defaults and SGD at 0.01 with
momentum 0.9 (the benchmark's default settings):

- ``one``: every parameter in one group (the benchmark's ``selftune-auto`` row);
- ``split``: the ``Trainer``'s two groups, at the same settings (the same weight decay in both, so
  that the arms differ by the split alone);
- ``layer``: a group per parameter tensor, at the same settings: the finest of the layer-wise
  rates that fine-tuning scripts set (a rate per layer), where every group runs its own range
  test on the one loss of the run;
- ``joint``: the same groups, tuned together (``wrap(..., groups="joint")``);
- ``decay-each`` and ``decay-joint``: a group per tensor at layer-wise decayed rates (the base
  rate on the output layer, times 0.8 per layer below it: a fine-tuning script's layer-wise
  decay), tuned each on its own and jointly.

Measured per run: steps to the workload's target, the groups' final effective rates, and the
guard's events by kind (a range test's restart is one).  Run from the repository root:
``SELFTUNE_CACHE=.cache PYTHONPATH=src python bench-results/groups/groups.py OUT
[--arms one,layer] WORKLOAD...`` writes ``OUT.json`` (rows appended as runs end; the arms
default to ``one,split``); ``groups.py --table OUT.json`` prints the tables made from it.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selftune.bench.methods import ADAMW_DEFAULT, SGD_DEFAULT, Handle, Method, Setting

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from probe_grid import count_guard_events, run_rows, train_row, tuned_handle  # noqa: E402

SEEDS = range(3)
ARMS = ("one", "split", "layer", "joint", "decay-each", "decay-joint")
PER_TENSOR = ("layer", "joint", "decay-each", "decay-joint")
DECAY = 0.8  #: the layer-wise decay of the ``decay-*`` arms' rates, per layer down from the top
#: the guard's events of the runs of this process, one counter per wrap (a job wraps once)
EVENTS: list[Counter[str]] = []
NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


def split(model: nn.Module) -> list[list[nn.Parameter]]:
    """The Trainer's rule: no decay for biases and the parameters of normalisation layers."""
    plain = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters()}
    plain |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    decay = [p for p in model.parameters() if id(p) not in plain]
    return [decay, [p for p in model.parameters() if id(p) in plain]]


def layer_rates(model: nn.Module, top: float) -> list[float]:
    """Each parameter tensor's rate under a layer-wise decay: ``top`` on the parameters of the
    last module that holds any, times ``DECAY`` per module above it."""
    holders = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    depth = {id(p): len(holders) - 1 - k for k, m in enumerate(holders) for p in m.parameters()}
    return [top * DECAY ** depth[id(p)] for p in model.parameters()]


def build(base: str, arm: str) -> Callable[[nn.Module, Setting], Handle]:
    def make(model: nn.Module, s: Setting) -> Handle:
        import selftune

        settings = SGD_DEFAULT if base == "sgd" else ADAMW_DEFAULT
        groups: Any = model.parameters()
        if arm == "split":
            groups = [{"params": g} for g in split(model) if g]
        elif arm in ("layer", "joint"):
            groups = [{"params": [p]} for p in model.parameters()]
        elif arm in ("decay-each", "decay-joint"):
            rates = zip(model.parameters(), layer_rates(model, settings["lr"]), strict=True)
            groups = [{"params": [p], "lr": lr} for p, lr in rates]
        if base == "sgd":
            inner: torch.optim.Optimizer = torch.optim.SGD(groups, **settings)
        else:
            inner = torch.optim.AdamW(groups, **settings)
        mode = "joint" if arm.endswith("joint") else "each"
        opt = selftune.wrap(inner, seed=s.seed, groups=mode)
        EVENTS.append(count_guard_events(opt))
        return tuned_handle(opt, s)

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
    EVENTS.clear()
    row = train_row(name, method, seed, key, ("steps_to_target", "steps_run", "diverged"))
    return {**row, "final_rates": rates, "events": dict(sum(EVENTS, Counter()))}


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


def layer_table(rows: list[dict[str, Any]]) -> str:
    """Per workload and base: steps to target per seed with one group and with a group per
    tensor, tuned each on its own (its restarts and the spread of its final rates) and
    jointly, where measured; then each per-tensor arm against one group."""
    runs = {(r["workload"], r["base"], r["arm"], r["seed"]): r for r in rows}
    arms = [a for a in PER_TENSOR if any(r["arm"] == a for r in rows)]
    heads = {
        "layer": "per tensor, each: steps | restarts | rates max / min",
        "joint": "joint: steps",
        "decay-each": "decayed rates, each: steps",
        "decay-joint": "decayed rates, joint: steps",
    }
    lines = [
        "| workload | base | groups | one group: steps | "
        + " | ".join(heads[a] for a in arms)
        + " |",
        "|---|---|---:|---|"
        + "|".join("---|---|---" if a == "layer" else "---" for a in arms)
        + "|",
    ]
    ratios: dict[str, list[float]] = {a: [] for a in arms}
    misses = {a: 0 for a in ("one", *arms)}
    pairs = dict.fromkeys((r["workload"], r["base"]) for r in rows if r["arm"] in arms)
    for w, base in pairs:
        cells: dict[str, list[str]] = {a: [] for a in ("one", *arms)}
        restarts, spread, count = [], [], 0
        for seed in SEEDS:
            one = runs[(w, base, "one", seed)]
            for arm in ("one", *arms):
                r = runs[(w, base, arm, seed)]
                hit = r["steps_to_target"]
                misses[arm] += hit is None
                cells[arm].append("-" if hit is None else str(hit))
                if arm != "one" and one["steps_to_target"] and hit:
                    ratios[arm].append(hit / one["steps_to_target"])
                if arm == "layer":
                    restarts.append(str(r["events"].get("restart", 0)))
                    spread.append(f"{max(r['final_rates']) / min(r['final_rates']):.2g}")
                count = len(r["final_rates"])
        row = [w, base, str(count), " ".join(cells["one"])]
        for arm in arms:
            row.append(" ".join(cells[arm]))
            if arm == "layer":
                row += [" ".join(restarts), " ".join(spread)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for arm in arms:
        rs = ratios[arm]
        gm = math.exp(sum(map(math.log, rs)) / len(rs))
        mine = [r for r in rows if r["arm"] == arm]
        events = sum((Counter(r["events"]) for r in mine), Counter())
        apart = max(max(r["final_rates"]) / min(r["final_rates"]) for r in mine)
        what = {
            "layer": "each",
            "joint": "joint",
            "decay-each": "decayed rates, each",
            "decay-joint": "decayed rates, joint",
        }[arm]
        lines.append(
            f"A group per tensor ({what}) / one group, steps to "
            f"target, geometric mean over the {len(rs)} runs that both finished: {gm:.3f} (range "
            f"{min(rs):.2f}-{max(rs):.2f}; faster {sum(r < 1 for r in rs)}, equal "
            f"{rs.count(1.0)}, slower {sum(r > 1 for r in rs)}); target missed: one group "
            f"{misses['one']}, this arm {misses[arm]} of {len(pairs) * len(SEEDS)} runs each; "
            f"range-test restarts {events['restart']}, rollbacks {events['rollback']}, final "
            f"rates at most {apart:.2g}x apart."
        )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1] == "--table":
        rows = json.loads(Path(sys.argv[2]).read_text())
        if any(r["arm"] == "split" for r in rows):
            print(table(rows))
        if any(r["arm"] in PER_TENSOR for r in rows):
            print(layer_table(rows))
        return
    out = Path(sys.argv[1] + ".json")
    arms, names = ("one", "split"), sys.argv[2:]
    if names[0] == "--arms":
        arms, names = tuple(names[1].split(",")), names[2:]
    if not set(arms) <= set(ARMS):
        raise SystemExit(f"--arms: give some of {', '.join(ARMS)}, comma-separated")
    jobs = [
        (w, base, arm, seed)
        for w in names
        for base in ("adamw", "sgd")
        for arm in arms
        for seed in SEEDS
    ]
    run_rows(one, jobs, out)


if __name__ == "__main__":
    main()
