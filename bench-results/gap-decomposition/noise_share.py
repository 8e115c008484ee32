"""Does the gradient's noise share say where the best rate lies against the range test's crossing?

The range test's crossing lands from 0.1x to 7.4x the grid's best constant rate ``lr*``
(``later.md``, "auto after 0"), and the bar needs it within half a grid step. McCandlish et al.
(2018) put the best rate at a batch ``b`` at ``ε_max / (1 + B_noise / b)``: if the crossing read
``ε_max`` (or a fixed multiple of it), the pairs whose batch is small against their noise scale
would be those whose crossing stands far above ``lr*``, and ``crossing / (1 + B_noise / b)``
would be a fixed multiple of ``lr*``. This script measures ``B_noise`` on the eighteen pairs of
``run.py`` to say whether that holds: a settle that read the noise scale in the run (it would
need two batch sizes at one point: per-rank gradients before DDP's all-reduce, or the
micro-batches of gradient accumulation) is worth building only if it does.

For each pair and seed 0-2, the plain base optimizer at ``lr*`` trains from the benchmark's
initialisation on its batches, and at steps 25 (where the range test ends) and 200 (the run's
middle stretch) ``B_noise`` is measured as ``../batch-size/noise.py`` measures it (``DRAWS``
pairs of gradients of the benchmark's batch and of one 16x larger, at the held weights). The
crossing is ``auto``'s rate after 50 steps from the default rate, read off ``later.json``. No
rule of ``auto`` is made from it.

Run from the repository root (about 17 minutes on two cores):
``SELFTUNE_CACHE=.cache python bench-results/gap-decomposition/noise_share.py``; writes
``noise_share.json`` (rows as runs end; those already there are kept) and ``noise_share.md``
next to this file; ``--table`` remakes the table only.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "src"), str(HERE), str(HERE.parent), str(HERE.parent / "batch-size")]

from finder import HALF_STEP  # noqa: E402
from noise import measure  # noqa: E402
from probe_grid import run_rows  # noqa: E402
from run import SEEDS, pairs  # noqa: E402

from selftune.bench.report import summarise  # noqa: E402
from selftune.bench.runner import read_results  # noqa: E402

POINTS = (25, 200)
DRAWS = 128  #: half ``noise.py``'s: the transformer's 16x batch takes most of the time
OUT = HERE / "noise_share.json"


def one(job: tuple[str, str, float, int]) -> dict[str, Any]:
    name, base, rate, seed = job
    return {"base": base, **measure(name, seed, rate, base, POINTS, DRAWS)}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties given their mean rank)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        for i in order:
            tied = [j for j in order if v[j] == v[i]]
            out[i] = statistics.fmean(order.index(j) for j in tied)
        return out

    return statistics.correlation(ranks(xs), ranks(ys))


def table(rows: list[dict[str, Any]], found: list[tuple[str, str, float]]) -> str:
    """Per pair: ``B_noise`` at each point (median over seeds), the crossing as a multiple of
    ``lr*``, and the crossing over ``1 + B_noise / b`` (``B_noise`` below zero read as zero) as
    a multiple of ``lr*`` over its median across pairs, the fixed factor a settle would need (an
    in-sample choice: the most this reading could give); then the counts, with a second
    in-sample reading that also fits the power of the share (a least-squares line of
    log(crossing / lr*) on log(1 + B_noise / b))."""
    later = json.loads((HERE / "later.json").read_text(encoding="utf-8"))
    crossing = {
        (r["workload"], r["base"]): statistics.median(r["rates"])
        for r in later
        if r["warm"] == 0 and r["kind"] == "auto"
    }
    cells: list[tuple[str, str, float, int, dict[int, float], float]] = []
    for name, base, best in found:
        mine = [r for r in rows if (r["workload"], r["base"]) == (name, base)]
        if not mine:
            continue
        scale = {p: statistics.median(r["noise_scale"][str(p)] for r in mine) for p in POINTS}
        cells.append((name, base, best, mine[0]["batch"], scale, crossing[name, base] / best))
    heads = " | ".join(f"`B_noise` at {p}" for p in POINTS)
    fixed = " | ".join(f"crossing / (1 + B_noise/b) at {p}, over its median" for p in POINTS)
    lines = [
        f"| workload | base | lr* | b | {heads} | crossing / lr* | {fixed} |",
        "|---|---|---|---|" + "---|" * (2 * len(POINTS) + 1),
    ]
    share = {p: [1 + max(c[4][p], 0.0) / c[3] for c in cells] for p in POINTS}
    read = {p: [c[5] / s for c, s in zip(cells, share[p], strict=True)] for p in POINTS}
    centre = {p: statistics.median(read[p]) for p in POINTS}
    for i, (name, base, best, b, scale, ratio) in enumerate(cells):
        noise = " | ".join(f"{scale[p]:.0f}" for p in POINTS)
        placed = " | ".join(f"{read[p][i] / centre[p]:.2g}x" for p in POINTS)
        lines.append(f"| {name} | {base} | {best:g} | {b} | {noise} | {ratio:.2g}x | {placed} |")

    def within(values: list[float]) -> int:
        return sum(1 / HALF_STEP <= v <= HALF_STEP for v in values)

    def spread(values: list[float]) -> float:
        return max(values) / min(values)

    ratios = [c[5] for c in cells]
    raw = statistics.median(ratios)
    ys = [math.log(r) for r in ratios]
    xs = {p: [math.log(s) for s in share[p]] for p in POINTS}
    rho = {p: spearman(ys, xs[p]) for p in POINTS}
    fit = {p: statistics.linear_regression(xs[p], ys) for p in POINTS}
    line = {  # the crossing over the least-squares power of the share, over lr*
        p: [
            math.exp(y - fit[p].slope * x - fit[p].intercept)
            for x, y in zip(xs[p], ys, strict=True)
        ]
        for p in POINTS
    }
    lines += [
        "",
        f"Of {len(cells)} pairs, the crossing over its own median across pairs lands within half"
        f" a grid step of lr* on {within([r / raw for r in ratios])} (spread {spread(ratios):.0f}x,"
        " the most to the least)."
        + "".join(
            f" Divided by the noise share at step {p}: {within([v / centre[p] for v in read[p]])}"
            f" (spread {spread(read[p]):.0f}x); Spearman's correlation of log(crossing / lr*)"
            f" with log(1 + B_noise/b) {rho[p]:+.2f}; by the least-squares power of the share"
            f" (fitted here: {fit[p].slope:.2f}, where McCandlish et al.'s form gives 1):"
            f" {within(line[p])}."
            for p in POINTS
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    found = pairs(summarise(read_results(ROOT / "bench-results" / "results.jsonl")))
    if sys.argv[1:] not in ([], ["--table"]):
        raise SystemExit(f"usage: {sys.argv[0]} [--table]")
    if not sys.argv[1:]:
        kept = json.loads(OUT.read_text(encoding="utf-8")) if OUT.exists() else []
        done = {(r["workload"], r["base"], r["seed"]) for r in kept}
        jobs = [(n, b, lr, s) for n, b, lr in found for s in SEEDS if (n, b, s) not in done]
        run_rows(one, jobs, OUT, kept=kept)
    text = table(json.loads(OUT.read_text(encoding="utf-8")), found)
    (HERE / "noise_share.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
