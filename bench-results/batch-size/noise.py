"""The gradient-noise scale of three of the benchmark's workloads, measured from two batch sizes
at one point, against how their best constant rate moved with the batch (``batch.py``).

McCandlish et al. (2018) put the best rate at a batch ``B`` at ``ε_max / (1 + B_noise / B)``,
with ``B_noise = tr(Σ) / |G|²`` (the per-example gradient's variance over the squared true
gradient), so that the best rate at 4x the batch is ``(1 + B_noise / B) / (1 + B_noise / 4B)``
times that at ``B``: near 4 where the batch is small against the noise scale, near 1 where it is
large.  ``batch.py`` measured the ratio: 3 (one step of the grid) on the digits MLP and the CNN,
1 on the Friedman regression, with SGD and AdamW alike.  A wrapper sees one minibatch gradient a
step and cannot make this estimate; one that saw two batch sizes at one point (per-rank
gradients before DDP's all-reduce) could.  This script makes it, to say whether it would have
told those workloads apart.

For each workload and seed 0-2, SGD with momentum 0.9 at the grid's best rate for the
benchmark's batch (read off ``results.json``, as the best rate at 4x the batch is) trains from
the benchmark's initialisation on its batches; after 25 steps (where `auto`'s range test ends),
100 and 300, the weights are held and ``DRAWS`` pairs of gradients are taken, of a batch of the
benchmark's size ``b`` and of one 16 times larger ``B``, drawn with a generator of their own
(BatchNorm's buffers restored after). With ``E|g_b|² = |G|² + tr(Σ)/b``, the unbiased estimates
are ``|G|² = (B E|g_B|² - b E|g_b|²) / (B - b)`` and ``tr(Σ) = (E|g_b|² - E|g_B|²) / (1/b -
1/B)``, averaged over the draws before the ratio is taken, as McCandlish et al. advise. Run from
the repository root (a few minutes): ``SELFTUNE_CACHE=.cache PYTHONPATH=src python
bench-results/batch-size/noise.py``; writes ``noise.json`` and ``noise.md`` next to this file.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from batch import best_rate  # noqa: E402
from probe_grid import train_steps  # noqa: E402

WORKLOADS = ("digits-mlp", "friedman-mlp", "mnist1d-cnn")
POINTS = (25, 100, 300)
SEEDS = range(3)
DRAWS = 256
BIG = 16


def squared_norm(model: torch.nn.Module, loss: torch.Tensor) -> float:
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return float(sum(g.pow(2).sum() for g in grads))


@contextmanager
def buffers_kept(model: torch.nn.Module) -> Iterator[None]:
    """Restore the model's BatchNorm running statistics after the block: a reading's forward
    passes in training mode would otherwise move them, and the run read would differ."""
    kept = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    try:
        yield
    finally:
        model.load_state_dict(kept, strict=False)


def noise_scale(
    task: Any, model: torch.nn.Module, b: int, gen: torch.Generator, draws: int = DRAWS
) -> float:
    """``B_noise`` at the model's weights, from ``draws`` pairs of batches of ``b`` and
    ``BIG * b`` examples."""
    small = statistics.fmean(
        squared_norm(model, task.loss(model, task.batch(b, gen))) for _ in range(draws)
    )
    big = statistics.fmean(
        squared_norm(model, task.loss(model, task.batch(BIG * b, gen))) for _ in range(draws)
    )
    true = (BIG * b * big - b * small) / (BIG * b - b)
    trace = (small - big) / (1 / b - 1 / (BIG * b))
    return trace / true


def along(
    name: str,
    seed: int,
    rate: float,
    base: str,
    points: tuple[int, ...],
    read: Callable[[Any, torch.nn.Module, torch.optim.Optimizer, int, torch.Generator], Any],
    tuned: bool = False,
    build: Callable[[Any], torch.optim.Optimizer] | None = None,
) -> dict[int, Any]:
    """``read(task, model, optimizer, batch, generator)`` at each of ``points`` along a run of
    the benchmark's ``base`` optimizer (SGD with momentum 0.9, or AdamW) at ``rate`` on the
    workload ``name`` from ``seed`` (``tuned``: wrapped by ``selftune.wrap`` from that rate and
    given each loss, the wrapper passed to ``read``; ``build``: an optimizer of the model's
    parameters built so instead, ``base`` and ``rate`` then naming it only); the generator (its
    own, seeded from ``seed``) draws the reading's batches, so that they leave the run's own
    untouched, and BatchNorm's running statistics are restored after each reading."""
    import selftune
    from selftune.bench import workloads
    from selftune.bench.methods import _base
    from selftune.bench.runner import fresh_run, one_thread

    (workload,) = workloads.select([name])
    task, model, gen = fresh_run(workload, seed)
    draws = torch.Generator().manual_seed(1000 + seed)
    opt = (build or _base(base, rate))(model.parameters())
    if tuned:
        opt = selftune.wrap(opt, seed=seed)
    readings, done = {}, 0
    with one_thread():
        for point in sorted(points):
            train_steps(task, model, opt, gen, workload.batch_size, point - done)
            done = point
            with buffers_kept(model):
                readings[point] = read(task, model, opt, workload.batch_size, draws)
    return readings


def measure(
    name: str,
    seed: int,
    rate: float,
    base: str = "sgd",
    points: tuple[int, ...] = POINTS,
    draws: int = DRAWS,
) -> dict[str, Any]:
    """``B_noise`` at each of ``points`` along a run of ``base`` at ``rate`` (:func:`along`)."""
    from selftune.bench import workloads

    def read(task: Any, model: torch.nn.Module, _: Any, b: int, gen: torch.Generator) -> float:
        return noise_scale(task, model, b, gen, draws)

    scales = along(name, seed, rate, base, points, read)
    batch = workloads.select([name])[0].batch_size
    return {"workload": name, "seed": seed, "batch": batch, "noise_scale": scales}


def predicted(scale: float, b: int) -> float:
    """The best rate at ``4b`` over that at ``b`` that the noise scale predicts."""
    return (1 + scale / b) / (1 + scale / (4 * b))


def main() -> None:
    """Measure at the SGD grid's best rate at the benchmark's batch, and set the prediction
    beside the best rate's move at 4x the batch, both read off ``batch.py``'s runs."""
    grid = json.loads((HERE / "results.json").read_text(encoding="utf-8"))
    rates = {
        w: [best_rate(grid, f"{w} x{f}", "sgd") or math.nan for f in (1, 4)] for w in WORKLOADS
    }
    runs = [measure(name, seed, rates[name][0]) for name in WORKLOADS for seed in SEEDS]
    (HERE / "noise.json").write_text(json.dumps(runs, indent=1) + "\n", encoding="utf-8")
    head = " | ".join(f"`B_noise` at step {p} (seeds 0-2)" for p in POINTS)
    lines = [
        f"| workload (batch) | {head} | predicted best-rate ratio at 4x the batch, median "
        "(steps " + ", ".join(map(str, POINTS)) + ") | measured (`table.md`) |",
        "|---|" + "---:|" * (len(POINTS) + 2),
    ]
    for name in WORKLOADS:
        mine = [r for r in runs if r["workload"] == name]
        b = mine[0]["batch"]
        cells = [", ".join(f"{r['noise_scale'][p]:.0f}" for r in mine) for p in POINTS]
        ratio = [predicted(statistics.median(r["noise_scale"][p] for r in mine), b) for p in POINTS]
        lines.append(
            f"| {name} ({b}) | "
            + " | ".join(cells)
            + f" | {', '.join(f'{x:.2f}' for x in ratio)} | {rates[name][1] / rates[name][0]:g} |"
        )
    text = "\n".join(lines) + "\n"
    (HERE / "noise.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
