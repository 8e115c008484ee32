"""Does the noisy quadratic model, run over the run's own horizon, place the grid's best constant
rate?

``optimal_step.py`` found McCandlish et al.'s best step ``ε_max / (1 + B_noise / b)`` about
twelve times short of the best constant rate ``lr*`` on the tuned workloads, a factor that moved
on the held-out ones. That step is greedy: it is best for the next step alone, and the gap is
the short-horizon bias Wu et al. (2018) describe. Their model, the noisy quadratic model (NQM;
Zhang et al., 2019), also gives the best constant rate over a horizon of ``T`` steps, from the
curvature spectrum, the gradient's share in each direction and the gradient noise: a larger
rate gains progress along the flat directions until the sharp ones grow unstable or the noise
floor it raises outweighs the gain. If that rate, with ``T`` the oracle's own steps, lands near
``lr*``, the factor is the horizon and a controller could compute it from measurements it can
make; if it lands near only with a horizon fitted pair by pair, the model does not place
``lr*`` either.

Measured, for each pair (the 18 of ``run.py`` and the 7 held-out ones) and seeds 0-2, at steps
25 and 200 of the plain base optimizer's run at ``lr*`` (``along``), in the coordinates of the
optimizer's preconditioner ``P`` (Adam's ``1 / (√v̂ + eps)``, 1 for SGD; ``optimal_step.py``)
so that both optimizers are heavy-ball on ``H' = √P H √P``:

- the gradient's spectral measure: ``K`` Lanczos steps on ``H'`` (Hessian-vector products on one
  batch of ``BIG`` times the benchmark's) from ``√P G``, ``G`` that batch's gradient; the Ritz
  values and the gradient's squared norm in each (its noise ``1/BIG`` of the minibatch's taken
  off);
- the spectral density of ``H'``: ``K`` Lanczos steps from a random sign vector (stochastic
  Lanczos quadrature), the Ritz values and their weights;
- the minibatch's noise ``tr(Σ'_b) = E|√P (g_b - G)|² / (1 + 1/BIG)`` from ``NOISE_DRAWS``
  minibatch gradients ``g_b``.

The model then runs in closed form per eigen-direction (:func:`nqm_loss`): heavy-ball with
PyTorch's SGD momentum 0.9 at rate ``α`` (AdamW: ``β1`` and ``α (1 - β1)``, its step being an
average of the gradients), from zero momentum; the noise in each direction proportional to its
curvature (``Σ' ∝ H'``, the NQM's assumption), directions of negative curvature left out. The
predicted rate is the ``α`` on a grid of quarter-octaves whose expected loss, averaged over the
last tenth of ``T`` steps (to smooth momentum's oscillation), is least. No rule of ``auto`` is
made from it.

The single step from rest (``T`` one) is the greedy step taken as heavy-ball's first step. To
tell whether the factor between it and ``lr*`` is momentum's, the same measures are made along
momentum-free SGD at its own ``lr*`` (``bases.py``'s grid, on its four workloads), where the step
from rest is the steady step. And since read along ``auto``'s own run the greedy step followed
the rate the run held (``optimal_step.py``), it is read also along the plain optimizer at its
default rate at steps ``EARLY``: what a controller could read before it first moves the rate.
And since the model over a horizon turns on the flat end of the spectrum, which ``K`` Lanczos
steps may not resolve, five pairs (``CHECK``) are measured again with each of ``LANCZOS`` steps.

Run from the repository root (about twenty minutes on two cores):
``SELFTUNE_CACHE=.cache python bench-results/gap-decomposition/horizon.py``; writes
``horizon.json``, ``horizon_sgd0.json``, ``horizon_default.json`` and ``horizon_lanczos.json``
(rows as runs end; those already there are kept) and ``horizon.md`` next to this file;
``--table`` remakes the tables only.
"""

from __future__ import annotations

import json
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "src"), str(HERE), str(HERE.parent), str(HERE.parent / "batch-size")]

from noise import along  # noqa: E402
from noise_share import POINTS, Job, cells_of, command_line, run_pairs, within  # noqa: E402
from optimal_step import BIG, preconditioner  # noqa: E402
from probe_grid import fastest  # noqa: E402
from run import SEEDS, best_of, page  # noqa: E402

from selftune.bench.methods import DEFAULT_LR, SGD_DEFAULT  # noqa: E402

K = 12  #: Lanczos steps per measure
#: the check of the measures' resolution: more Lanczos steps on five pairs of kinds apart
#: (workload, base, lr*, taken from the pairs above), seeds 0-2
LANCZOS = (12, 30, 60, 100)
CHECK = (
    ("digits-mlp", "sgd"),
    ("friedman-mlp", "sgd"),
    ("mnist1d-cnn", "adamw"),
    ("digits-autoencoder", "adamw"),
    ("hypercube-logreg", "sgd"),
)
LANCZOS_OUT = HERE / "horizon_lanczos.json"
NOISE_DRAWS = 32
OUT = HERE / "horizon.json"
#: ``bases.py``'s workloads, whose grid of momentum-free SGD (``sgd0``) gives its ``lr*``
FREE = ("digits-mlp", "friedman-mlp", "mnist1d-cnn", "moons-deep-tanh")
FREE_OUT = HERE / "horizon_sgd0.json"
#: where the step from rest is read along the plain optimizer at its default rate
EARLY = (5, 25, 50)
DEFAULT_OUT = HERE / "horizon_default.json"
#: the rates the model is solved over, as multiples of ``lr*``: quarter-octaves from 1/1024 to 64
RATES = 2.0 ** (np.arange(-40, 25) / 4)
#: the horizons the model is run over, as multiples of the oracle's steps to the target
HORIZONS = (0.25, 1.0, 4.0)


def flat(tensors: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def lanczos(op: Any, start: torch.Tensor, k: int) -> tuple[list[float], list[float]]:
    """Ritz values of the operator ``op`` after ``k`` Lanczos steps from ``start`` (fully
    reorthogonalised), and the squared norm of ``start`` that falls on each."""
    basis = [start / start.norm()]
    diagonal: list[float] = []
    off: list[float] = []
    for j in range(k):
        w = op(basis[-1])
        diagonal.append(float(w @ basis[-1]))
        for q in basis:
            w = w - (w @ q) * q
        norm = float(w.norm())
        if j == k - 1 or norm < 1e-6 * max(abs(d) for d in diagonal):
            break
        off.append(norm)
        basis.append(w / norm)
    tri = np.diag(diagonal) + np.diag(off, 1) + np.diag(off, -1)
    values, vectors = np.linalg.eigh(tri)
    weights = vectors[0] ** 2 * float(start @ start)
    return values.tolist(), weights.tolist()


def measure(
    task: Any,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    b: int,
    gen: torch.Generator,
    k: int = K,
) -> dict[str, Any]:
    """The gradient's spectral measure, the density of ``H'`` (``k`` Lanczos steps each) and the
    minibatch noise at the model's weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    root = flat(
        torch.as_tensor(preconditioner(opt, p)).sqrt().expand_as(p).detach() for p in params
    )
    # the fused attention kernels have no second derivative on the CPU
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        loss = task.loss(model, task.batch(BIG * b, gen))
        grads = flat(torch.autograd.grad(loss, params, create_graph=True))
        big = grads.detach()

        def op(v: torch.Tensor) -> torch.Tensor:
            dot = grads @ (root * v)
            return root * flat(torch.autograd.grad(dot, params, retain_graph=True))

        gradient = lanczos(op, root * big, k)
        signs = torch.randint(0, 2, big.shape, generator=gen).to(big) * 2 - 1
        density = lanczos(op, signs, k)
    noise = []
    for _ in range(NOISE_DRAWS):
        small = torch.autograd.grad(task.loss(model, task.batch(b, gen)), params)
        noise.append(float((root * (flat(small) - big)).pow(2).sum()))
    trace = statistics.fmean(noise) / (1 + 1 / BIG)
    values, weights = gradient
    scale = max(sum(weights) - trace / BIG, 0.0) / sum(weights)
    return {
        "gradient": [values, [w * scale for w in weights]],
        "density": [density[0], [w / len(big) for w in density[1]]],
        "noise": trace,
    }


def walk(
    job: Job, rate: float, points: tuple[int, ...], build: Any = None, k: int = K
) -> dict[str, Any]:
    """The measures (``k`` Lanczos steps) at ``points`` along the job's plain optimizer (or
    ``build``'s) at ``rate``."""
    name, base, _, seed = job
    measures = along(name, seed, rate, base, points, partial(measure, k=k), build=build)
    return {"workload": name, "base": base, "seed": seed, "measures": measures}


def resolved(job: tuple[str, str, float, int, int]) -> dict[str, Any]:
    """The measures along the plain optimizer at ``lr*`` with the job's count of Lanczos steps
    (its last entry)."""
    *pair, k = job
    return {**walk(tuple(pair), pair[2], POINTS, k=k), "lanczos": k}


def one(job: Job) -> dict[str, Any]:
    """The measures along the plain optimizer's run at ``lr*``."""
    return walk(job, job[2], POINTS)


def plain(job: Job) -> dict[str, Any]:
    """The measures along the plain optimizer's run at its default rate, at ``EARLY``: what a
    controller could read before it moves the rate."""
    return walk(job, DEFAULT_LR[job[1]], EARLY)


def free(job: Job) -> dict[str, Any]:
    """The measures along momentum-free SGD's run at its own ``lr*`` (base ``sgd0``)."""
    return walk(job, job[2], POINTS, partial(torch.optim.SGD, lr=job[2]))


def free_rates() -> dict[str, float]:
    """Momentum-free SGD's ``lr*`` on each of ``FREE``: the member of ``bases.py``'s grid with
    the least median steps to the target."""
    rows = json.loads((HERE.parent / "bases" / "results.json").read_text(encoding="utf-8"))
    grid = sorted({r["row"] for r in rows if r["row"].startswith("sgd0-grid-")})
    return {name: rate for name in FREE if (rate := fastest(rows, name, grid)) is not None}


def heavy_ball(base: str) -> tuple[float, float]:
    """Momentum and the rate's factor that make ``base``'s step heavy-ball: PyTorch's SGD
    momentum as it is (none for ``sgd0``); Adam's average of gradients as ``β1`` with the rate
    times ``1 - β1``."""
    if base == "sgd":
        return SGD_DEFAULT["momentum"], 1.0
    if base == "sgd0":
        return 0.0, 1.0
    beta = 0.9
    return beta, 1 - beta


def nqm_loss(m: dict[str, Any], base: str, rates: np.ndarray, steps: int) -> np.ndarray:
    """The model's expected loss change over ``steps`` steps at each of ``rates``, averaged over
    the last tenth of them: the gradient's measure decays (or grows) under heavy-ball; the noise,
    spread over ``H'``'s density in proportion to curvature, builds up from none."""
    mu, factor = heavy_ball(base)
    eta = factor * rates[:, None]
    values, weights = (np.array(x) for x in m["gradient"])
    keep = values > 0
    curv, energy = values[keep], weights[keep]
    nu, tau = (np.array(x) for x in m["density"])
    nu, tau = nu[nu > 0], tau[nu > 0]
    c = m["noise"] * nu / float(tau @ nu)  # noise variance per unit of multiplicity
    p, q = 1 + mu - eta * curv, 1 + mu - eta * nu
    a, a_prev = np.ones_like(p), np.ones_like(p)
    c11, c12, c22 = (np.zeros_like(q) for _ in range(3))
    tail, mean_part, noise_part = max(steps // 10, 1), 0.0, 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps):
            a, a_prev = p * a - mu * a_prev, a
            c11, c12, c22 = (
                q * q * c11 - 2 * q * mu * c12 + mu * mu * c22 + eta * eta * c,
                q * c11 - mu * c12,
                c11,
            )
            if t >= steps - tail:
                mean_part = mean_part + (a * a - 1) @ (energy / (2 * curv)) / tail
                noise_part = noise_part + (c11 * nu / 2) @ tau / tail
    total = mean_part + noise_part
    return np.where(np.isfinite(total), total, np.inf)


def best_rate(m: dict[str, Any], base: str, best: float, steps: int, noisy: bool) -> float:
    """The rate, over ``lr*``, whose model loss after ``steps`` steps is least, with the
    measured noise or (``noisy`` False) none."""
    measures = m if noisy else {**m, "noise": 0.0}
    return float(RATES[int(np.argmin(nqm_loss(measures, base, best * RATES, steps)))])


def model_rate(
    rows: list[dict[str, Any]], name: str, base: str, best: float, p: int, steps: int, noisy: bool
) -> float:
    """The model's rate over ``lr*`` (``best``) for the pair at step ``p``, median over seeds."""
    mine = [r for r in rows if (r["workload"], r["base"]) == (name, base)]
    return statistics.median(
        best_rate(r["measures"][str(p)], base, best, steps, noisy) for r in mine
    )


def early_table(rows: list[dict[str, Any]], found: Any, held: Any) -> str:
    """The single step from rest over ``lr*`` read along the plain optimizer at its default
    rate, at each of ``EARLY``, and how many land within half a grid step of ``lr*``."""
    lines = [
        "| workload | base | lr* | "
        + " | ".join(f"one step at {p} of the default rate's run, over lr*" for p in EARLY)
        + " |",
        "|---|---|---|" + "---|" * len(EARLY),
    ]
    got = {p: [model_rate(rows, *c, p, 1, True) for c in found + held] for p in EARLY}
    for i, (name, base, best) in enumerate(found + held):
        label = f"{name} (held out)" if i >= len(found) else name
        cells = " | ".join(f"{got[p][i]:.2g}x" for p in EARLY)
        lines.append(f"| {label} | {base} | {best:g} | {cells} |")
    lines.append("")
    lines += [
        f"At step {p}, within half a grid step of lr*: {within(got[p][: len(found)])} of"
        f" {len(found)} pairs not held out, {within(got[p][len(found) :])} of {len(held)} held"
        " out."
        for p in EARLY
    ]
    return "\n".join(lines) + "\n"


def free_table(rows: list[dict[str, Any]], free_rows: list[dict[str, Any]], found: Any) -> str:
    """The single step from rest over ``lr*`` with momentum 0.9 (the benchmark's SGD) and with
    none (``sgd0``), each at its own ``lr*``: the step from rest is the greedy step, so if the
    greedy step's factor were momentum's, it would vanish without momentum."""
    best = {name: lr for name, base, lr in found if base == "sgd"}
    lines = [
        "| workload | lr*, momentum 0.9 | lr*, none | "
        + " | ".join(
            f"one step at {p}, momentum {m}, over its lr*" for m in ("0.9", "none") for p in POINTS
        )
        + " |",
        "|---|---|---|" + "---|" * 2 * len(POINTS),
    ]
    for name, rate in free_rates().items():
        cells = [
            f"{model_rate(mine, name, base, lr, p, 1, True):.2g}x"
            for base, mine, lr in (("sgd", rows, best[name]), ("sgd0", free_rows, rate))
            for p in POINTS
        ]
        lines.append(f"| {name} | {best[name]:g} | {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]], noise: list[dict[str, Any]], found: Any, held: Any) -> str:
    """Per pair: the model's rate over ``lr*`` (median over seeds) at each step read, for one
    step and for horizons of the oracle's steps times ``HORIZONS``, beside the crossing's; then,
    per reading, how many land within half a grid step of ``lr*`` as they are and over a fixed
    factor (the median over the pairs not held out, chosen on them), the held-out pairs read
    with that same factor."""
    workloads = page()
    tuning, others = cells_of(noise, found), cells_of(noise, held)
    horizons = [(p, h, True) for p in POINTS for h in (None, *HORIZONS)]
    horizons += [(p, 1.0, False) for p in POINTS]

    def steps(name: str, base: str, h: float | None) -> int:
        oracle = best_of(workloads[name], base, "const")
        return 1 if h is None or oracle is None else max(round(h * oracle.steps), 1)

    def rate(c: Any, p: int, h: float | None, noisy: bool) -> float:
        return model_rate(rows, *c[:3], p, steps(*c[:2], h), noisy)

    def name(p: int, h: float | None, noisy: bool) -> str:
        over = "one step" if h is None else f"{h:g} T*"
        return f"at {p}, {over}" + ("" if noisy else " without noise")

    got = {r: [rate(c, *r) for c in tuning + others] for r in horizons}
    lines = [
        "| workload | base | lr* | T* | crossing / lr* | "
        + " | ".join(f"{name(*r)}, over lr*" for r in horizons)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(horizons),
    ]
    for i, c in enumerate(tuning + others):
        label = f"{c[0]} (held out)" if i >= len(tuning) else c[0]
        cells = " | ".join(f"{got[r][i]:.2g}x" for r in horizons)
        lines.append(
            f"| {label} | {c[1]} | {c[2]:g} | {steps(c[0], c[1], 1.0)} | {c[5]:.2g}x | {cells} |"
        )
    lines += [
        "",
        f"Within half a grid step of lr*, of the {len(tuning)} pairs not held out and (after the"
        f" slash) the {len(others)} held-out ones: the crossing {within([c[5] for c in tuning])}"
        f" / {within([c[5] for c in others])}.",
    ]
    for r in horizons:
        mine, theirs = got[r][: len(tuning)], got[r][len(tuning) :]
        factor = statistics.median(mine)
        lines.append(
            f"- the model's rate {name(*r)}: as it is {within(mine)} / {within(theirs)}; over"
            f" its median on the pairs not held out ({factor:.3g}) "
            f"{within([v / factor for v in mine])} / {within([v / factor for v in theirs])};"
            f" spread on those {max(mine) / min(mine):.0f}x."
        )
    return "\n".join(lines) + "\n"


def lanczos_table(rows: list[dict[str, Any]], pairs: Any) -> str:
    """For each pair of ``CHECK``, the model's rate over ``lr*`` for one step and over the
    oracle's steps ``T*`` at each step read, with each count of Lanczos steps; then, per count,
    how many of the readings over ``T*`` land within half a grid step of ``lr*``."""
    workloads = page()
    best = {(name, base): lr for name, base, lr in pairs}
    readings = [(p, h) for p in POINTS for h in ("one step", "T*")]
    lines = [
        "| workload | base | Lanczos steps | "
        + " | ".join(f"at {p}, {h}, over lr*" for p, h in readings)
        + " |",
        "|---|---|---:|" + "---:|" * len(readings),
    ]
    over_horizon: dict[int, list[float]] = {k: [] for k in LANCZOS}
    for name, base in CHECK:
        oracle = best_of(workloads[name], base, "const")
        assert oracle is not None
        for k in LANCZOS:
            mine = [r for r in rows if r["lanczos"] == k]
            cells = []
            for p, h in readings:
                steps = 1 if h == "one step" else round(oracle.steps)
                cells.append(model_rate(mine, name, base, best[name, base], p, steps, True))
                if h == "T*":
                    over_horizon[k].append(cells[-1])
            shown = " | ".join(f"{c:.2g}x" for c in cells)
            lines.append(f"| {name} | {base} | {k} | {shown} |")
    lines.append("")
    lines += [
        f"With {k} Lanczos steps, the readings over T* within half a grid step of lr*:"
        f" {within(values)} of {len(values)}."
        for k, values in over_horizon.items()
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    found, held, jobs = command_line()
    run_pairs(one, OUT, jobs)
    rates = free_rates()
    run_pairs(
        free, FREE_OUT, [(n, "sgd0", rates[n], s) for n in FREE for s in SEEDS] if jobs else []
    )
    run_pairs(plain, DEFAULT_OUT, jobs)
    best = {(name, base): lr for name, base, lr in found + held}
    checks = [(*pair, best[pair], seed, k) for pair in CHECK for seed in SEEDS for k in LANCZOS]
    run_pairs(resolved, LANCZOS_OUT, checks if jobs else [], extra="lanczos")
    noise = json.loads((HERE / "noise_share.json").read_text(encoding="utf-8"))
    rows = json.loads(OUT.read_text(encoding="utf-8"))
    text = table(rows, noise, found, held)
    free_rows = json.loads(FREE_OUT.read_text(encoding="utf-8"))
    text += "\n" + free_table(rows, free_rows, found + held)
    early = json.loads(DEFAULT_OUT.read_text(encoding="utf-8"))
    text += "\n" + early_table(early, found, held)
    checked = json.loads(LANCZOS_OUT.read_text(encoding="utf-8"))
    text += "\n" + lanczos_table(checked, found + held)
    (HERE / "horizon.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
