"""`auto` on top of the schedule a training script already has: does wrapping still pay?

Most scripts that would wrap their optimizer already schedule its rate: the Hugging Face
``Trainer`` decays it linearly to zero over the run by default, transformer recipes warm it up
and then follow a cosine.  selftune composes with a scheduler (it keeps a scale on the rate the
scheduler writes), so `auto`'s range test and cruise act on top of the schedule.  Arms, on six
of the benchmark's workloads, wrapping AdamW at its defaults and SGD at 0.01 with momentum 0.9
(the benchmark's default settings), seeds 0-2:

- ``constant``: no schedule (the benchmark's ``*-default`` and ``selftune-auto`` rows);
- ``linear``: the Trainer's default, ``LambdaLR`` from 1 down to 0 at the workload's budget;
- ``warmup-cosine``: a linear warm-up over the first 5% of the budget, then a cosine to 0;
- ``onecycle``: torch's ``OneCycleLR`` at its defaults (up from 1/25 of the rate for 30% of the
  budget, then down to 1/25e4 of it), ``cycle_momentum=False``;

each plain and wrapped by ``selftune.wrap`` at its defaults (the scheduler built on the
wrapper, as a loop that wraps first builds it).  Measured per run: steps to the workload's
target (the race stops there, as the benchmark's does).  Run from the repository root:
``SELFTUNE_CACHE=.cache PYTHONPATH=src python bench-results/schedules/schedules.py OUT
WORKLOAD... [--schedules a,b] [--hows plain,auto]`` writes ``OUT.json``; ``schedules.py --table
OUT.json [NEWER.json]`` prints the table (a run in ``NEWER.json`` replaces the same run in
``OUT.json``); ``schedules.py --compare BEFORE.json AFTER.json`` compares the ``auto`` runs that
both hold, pair by pair.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selftune.bench.methods import ADAMW_DEFAULT, SGD_DEFAULT, Handle, Method, Setting

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from probe_grid import run_rows, train_row, tuned_handle  # noqa: E402

SEEDS = range(3)
SCHEDULES = ("constant", "linear", "warmup-cosine", "onecycle")
HOWS = ("plain", "auto")


def factor(schedule: str, steps: int) -> Callable[[int], float]:
    """The schedule's multiplier of the set rate at step ``t`` (LambdaLR's ``lr_lambda``)."""
    warmup = max(1, round(0.05 * steps))
    if schedule == "constant":
        return lambda t: 1.0
    if schedule == "linear":
        return lambda t: max(0.0, 1.0 - t / steps)

    def cosine(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup) / (steps - warmup))))

    return cosine


def scheduler(
    opt: torch.optim.Optimizer, schedule: str, steps: int, lr: float
) -> torch.optim.lr_scheduler.LRScheduler:
    if schedule == "onecycle":
        one = torch.optim.lr_scheduler.OneCycleLR
        return one(opt, max_lr=lr, total_steps=steps, cycle_momentum=False)
    return torch.optim.lr_scheduler.LambdaLR(opt, factor(schedule, steps))


def build(base: str, schedule: str, how: str) -> Callable[[nn.Module, Setting], Handle]:
    def make(model: nn.Module, s: Setting) -> Handle:
        import selftune

        if base == "sgd":
            inner: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **SGD_DEFAULT)
        else:
            inner = torch.optim.AdamW(model.parameters(), **ADAMW_DEFAULT)
        lr = inner.param_groups[0]["lr"]
        if how == "plain":
            return Handle(inner, scheduler=scheduler(inner, schedule, s.steps, lr))
        opt = selftune.wrap(inner, seed=s.seed)
        return tuned_handle(opt, s, scheduler=scheduler(opt, schedule, s.steps, lr))

    return make


def one(job: tuple[str, str, str, str, int]) -> dict[str, Any]:
    name, base, schedule, how, seed = job
    method = Method(f"{how}-{schedule}-{base}", "probe", base, build(base, schedule, how), 3)
    key = {"workload": name, "base": base, "schedule": schedule, "how": how, "seed": seed}
    fields = ("steps_to_target", "steps_budget", "diverged", "error")
    return train_row(name, method, seed, key, fields)


def table(rows: list[dict[str, Any]]) -> str:
    """Median steps to target (misses counted as the budget, and shown) per arm."""
    runs: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault((r["workload"], r["base"], r["schedule"], r["how"]), []).append(r)
    present = {r["schedule"] for r in rows}
    arms = [(s, h) for s in SCHEDULES if s in present for h in HOWS]
    head = " | ".join(f"{s} {h}" for s, h in arms)
    lines = [
        "Median steps to target over the seeds (a miss counts as the budget; `n/3`: seeds "
        "that reached it).",
        "",
        f"| workload | base | {head} |",
        "|---|---|" + "---:|" * len(arms),
    ]
    ratios: dict[str, list[float]] = {s: [] for s in SCHEDULES}
    for w, base in dict.fromkeys((r["workload"], r["base"]) for r in rows):
        cells = []
        for s, h in arms:
            got = runs.get((w, base, s, h), [])
            steps = [r["steps_to_target"] or r["steps_budget"] for r in got]
            hits = sum(r["steps_to_target"] is not None for r in got)
            cells.append(f"{statistics.median(steps):g} ({hits}/{len(got)})" if got else "")
            if h == "auto" and got and (w, base, s, "plain") in runs:
                plain = runs[(w, base, s, "plain")]
                mine = statistics.median(steps)
                theirs = statistics.median(r["steps_to_target"] or r["steps_budget"] for r in plain)
                ratios[s].append(mine / theirs)
        lines.append(f"| {w} | {base} | {' | '.join(cells)} |")
    lines.append("")
    for s in SCHEDULES:
        rs = ratios[s]
        if rs:
            gm = math.exp(sum(map(math.log, rs)) / len(rs))
            lines.append(
                f"- {s}: auto / plain, median steps, geometric mean over {len(rs)} pairs "
                f"{gm:.3f}; auto faster in {sum(r < 1 for r in rs)}, slower in "
                f"{sum(r > 1 for r in rs)}."
            )
    return "\n".join(lines)


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """Per workload, base and schedule: ``auto``'s median steps (and hits) before and after."""

    def medians(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], tuple[float, int]]:
        runs: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for r in rows:
            if r["how"] == "auto":
                runs.setdefault((r["workload"], r["base"], r["schedule"]), []).append(r)
        return {
            k: (
                statistics.median(r["steps_to_target"] or r["steps_budget"] for r in v),
                sum(r["steps_to_target"] is not None for r in v),
            )
            for k, v in runs.items()
        }

    old, new = medians(before), medians(after)
    lines = [
        "| workload | base | schedule | auto before | auto after | after / before |",
        "|---|---|---|---:|---:|---:|",
    ]
    ratios = []
    for key in [k for k in new if k in old]:
        (a, ha), (b, hb) = old[key], new[key]
        ratios.append(b / a)
        lines.append(f"| {' | '.join(key)} | {a:g} ({ha}) | {b:g} ({hb}) | {b / a:.2f} |")
    gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
    lines += [
        "",
        f"After / before, median steps (a miss counts as the budget; in brackets the seeds that "
        f"reached the target), geometric mean over {len(ratios)} pairs: {gm:.3f}; faster in "
        f"{sum(r < 1 for r in ratios)}, slower in {sum(r > 1 for r in ratios)}; hits "
        f"{sum(old[k][1] for k in new if k in old)} -> {sum(new[k][1] for k in new if k in old)}.",
    ]
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1] == "--compare":
        before, after = (json.loads(Path(p).read_text()) for p in sys.argv[2:4])
        print(compare(before, after))
        return
    if sys.argv[1] == "--table":
        key = ("workload", "base", "schedule", "how", "seed")
        runs = {}
        for path in sys.argv[2:]:
            runs.update({tuple(r[k] for k in key): r for r in json.loads(Path(path).read_text())})
        print(table(list(runs.values())))
        return
    args = sys.argv[2:]
    chosen = {"--schedules": list(SCHEDULES), "--hows": list(HOWS)}
    for flag in chosen:
        if flag in args:
            at = args.index(flag)
            chosen[flag] = args[at + 1].split(",")
            del args[at : at + 2]
    out = Path(sys.argv[1] + ".json")
    jobs = [
        (w, base, schedule, how, seed)
        for w in args
        for base in ("adamw", "sgd")
        for schedule in chosen["--schedules"]
        for how in chosen["--hows"]
        for seed in SEEDS
    ]
    run_rows(one, jobs, out)


if __name__ == "__main__":
    main()
