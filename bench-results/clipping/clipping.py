"""`auto` on runs that clip the gradient's norm before each step, as most transformer recipes
and the Hugging Face Trainer (``max_grad_norm=1.0``) do; no constant of selftune's was chosen
on clipped runs.

Clipping reaches selftune already done: the wrapper reads the clipped gradient, so the guard's
gradient-norm checks see a norm of at most the clip's, and the range test and the cruise read
steps whose size the clip, not the rate alone, sets.  This probe races, on five of the
benchmark's workloads (``digits-mlp``, ``friedman-mlp``, ``mnist1d-cnn``, ``shakespeare-char``
and the held-out ``moons-deep-tanh``), seeds 0-4, with the benchmark's loop, targets and
budgets (:func:`selftune.bench.runner.train`), for each base ``<opt>`` (``adamw`` at torch's
defaults, ``sgd`` with momentum 0.9), rows:

- ``<opt>-clip-grid-<lr>``: the optimizer at a constant rate on the benchmark's grid, the
  gradient clipped to norm 1 before each step: the least median steps of these is the oracle;
- ``selftune-auto-<opt>-clip``: the optimizer at the benchmark's default rate (AdamW 1e-3, SGD
  1e-2) wrapped with ``selftune.wrap(opt, "auto")`` as the benchmark's `auto` rows are, the
  gradient clipped to norm 1 before each step;
- ``selftune-auto-<opt>-clip-inside``: the same, the gradient clipped after selftune has read it
  (by a step pre-hook on the wrapped optimizer), so that its signals and its guard read the
  gradient as the loss gave it and the optimizer steps with the clipped one;
- ``selftune-auto-<opt>``: the same without clipping, for reference.

Each row also records the share of its steps whose gradient norm was above the clip's
(``clipped``; for a row that does not clip, the share that would have been).  Run from the
repository root (about half an hour on two cores):
``SELFTUNE_CACHE=.cache PYTHONPATH=src python bench-results/clipping/clipping.py``; writes
``results.json`` (rows as runs end) and ``table.md`` next to this file; ``clipping.py --table``
remakes the table, ``clipping.py --trace WORKLOAD ROW SEED`` prints one `auto` run's decisions
and writes them to ``trace-WORKLOAD-ROW-SEED.txt``.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selftune.bench.methods import ADAMW_GRID, DEFAULT_LR, SGD_GRID, Handle, Method, Setting, _base

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
from probe_grid import command, oracle_table, steps_row, tuned_handle  # noqa: E402

WORKLOADS = ("digits-mlp", "friedman-mlp", "mnist1d-cnn", "shakespeare-char", "moons-deep-tanh")
SEEDS = range(5)
MAX_NORM = 1.0
GRIDS = {"adamw": ADAMW_GRID, "sgd": SGD_GRID}
#: the norms of one run's gradients before clipping, as the run goes (one run per process)
NORMS: list[float] = []


def grid(base: str) -> list[str]:
    return [f"{base}-clip-grid-{lr:g}" for lr in GRIDS[base]]


def rows() -> Iterator[str]:
    for base in GRIDS:
        yield from grid(base)
        yield f"selftune-auto-{base}-clip"
        yield f"selftune-auto-{base}-clip-inside"
        yield f"selftune-auto-{base}"


def build(row: str) -> Method:
    """A row's method: ``<opt>-clip-grid-<lr>``, ``selftune-auto-<opt>[-clip[-inside]]``."""
    base = row.removeprefix("selftune-auto-").split("-")[0]
    lr = float(row.split("-grid-")[1]) if "-grid-" in row else DEFAULT_LR[base]
    clip = row.endswith("-clip") or "-clip-grid-" in row
    inside = row.endswith("-clip-inside")

    def make(model: nn.Module, s: Setting) -> Handle:
        import selftune

        params = list(model.parameters())
        opt = _base(base, lr)(params)
        if inside:  # after selftune's own pre-hook, which refuses steps not its own

            def clip_inside(*_: Any) -> None:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)

            opt.register_step_pre_hook(clip_inside)
        handle = (
            tuned_handle(selftune.wrap(opt, "auto", seed=s.seed), s)
            if row.startswith("selftune-")
            else Handle(opt)
        )
        step = handle.step

        def clipped_step(loss: torch.Tensor) -> None:
            norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM if clip else float("inf"))
            NORMS.append(float(norm))
            step(loss)

        handle.step = clipped_step  # type: ignore[method-assign]
        return handle

    return Method(row, "probe", base, make, len(SEEDS), lr)


def run(job: tuple[str, str, int]) -> dict[str, Any]:
    NORMS.clear()
    record = steps_row(build(job[1]), job)
    record["clipped"] = sum(n > MAX_NORM for n in NORMS) / max(len(NORMS), 1)
    record["median_norm"] = statistics.median(NORMS) if NORMS else None
    return record


def main() -> None:
    """The probe's rows (``--table``: the table alone; ``--trace``: one run's decisions)."""
    jobs = [(w, row, seed) for w in WORKLOADS for seed in SEEDS for row in rows()]
    runs = command(run, jobs, HERE, build)
    if runs is None:
        return
    tables = []
    for base in GRIDS:
        tuned = f"selftune-auto-{base}-clip"
        columns = [*grid(base), tuned, f"{tuned}-inside", f"selftune-auto-{base}"]
        tables.append(oracle_table(runs, WORKLOADS, columns, grid(base), tuned))
        tables.append(clip_shares(runs, base))
    text = "\n".join(tables)
    (HERE / "table.md").write_text(text, encoding="utf-8")
    print(text)


def clip_shares(runs: list[dict[str, Any]], base: str) -> str:
    """Per workload, the median share of steps whose gradient norm was above the clip's, and
    the median norm, of `auto` from the default rate clipped and not clipped."""
    tuned = (f"selftune-auto-{base}-clip", f"selftune-auto-{base}")
    lines = [
        f"| workload | share clipped, `{tuned[0]}` | would be, `{tuned[1]}` | median norm, each |",
        "|---|---:|---:|---:|",
    ]
    for w in WORKLOADS:
        mine = [[r for r in runs if r["workload"] == w and r["row"] == t] for t in tuned]
        if not all(mine):
            continue
        share = [statistics.median(r["clipped"] for r in m) for m in mine]
        norm = [statistics.median(r["median_norm"] for r in m) for m in mine]
        lines.append(f"| {w} | {share[0]:.2f} | {share[1]:.2f} | {norm[0]:.3g}, {norm[1]:.3g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
