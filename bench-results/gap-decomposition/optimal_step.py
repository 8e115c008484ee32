"""Does McCandlish et al.'s model of the best step, measured from curvature and noise, predict
the grid's best constant rate?

McCandlish et al. (2018) derive the best step along the expected gradient ``G`` from a
quadratic model of the loss: ``ε_max = GᵀG / GᵀHG`` without noise, and ``ε_max / (1 + B_noise /
b)`` at a batch ``b`` (``B_noise`` measured by ``noise_share.py``). Each half was tried alone
here and failed: the sharpest curvature (``../pilots/curvature.py``: ``lr·λ_max`` at the best
rate was 0.09-0.22 of the limit, and barely moved at a rate 3x too high) and the noise scale
(``noise_share.md``: it ranks the range test's error but leaves a 30x spread). Together, with
the curvature taken along the gradient rather than at its sharpest, they make a prediction
with no constant to fit: with heavy-ball momentum ``μ`` the steady step is ``lr / (1 - μ)``
times the gradient, so SGD's predicted rate is ``(1 - μ) ε_max / (1 + B_noise / b)``; Adam's
step is its preconditioner ``P = 1 / (√v̂ + eps)`` times the gradient's average, so its
``ε_max`` is ``GᵀPG / (PG)ᵀH(PG)`` and its predicted rate that over ``1 + B_noise / b`` (the
noise scale left unweighted by ``P``: an approximation). If the prediction lands within half a
grid step of ``lr*`` on most pairs, a settle read from two such measurements in the run (a
Hessian-vector product, two batch sizes) would be worth building; if not, the model itself does
not place the best constant rate on these workloads.

For each pair (the 18 of ``run.py`` and the 7 held-out ones) and seed 0-2, the plain base
optimizer trains at ``lr*`` as ``noise_share.py`` has it do, and at steps 25 and 200 ``G`` is
the gradient of a batch ``BIG`` times the benchmark's (its noise ``1/BIG`` of the minibatch's),
``HG`` (or ``H PG``) a Hessian-vector product on the same batch; the two quotients' terms are
averaged over ``DRAWS`` such batches before the ratio is taken. ``B_noise`` is the median over
seeds of ``noise_share.json``'s at the same step. No rule of ``auto`` is made from it.

The weights of a run at ``lr*`` are not those a run still looking for its rate holds, so the
same reading is then made along ``auto``'s own run from the default rate (``B_noise`` from
``TUNED_DRAWS`` pairs there), set over the factor chosen at ``lr*``'s weights, beside the rate
``auto`` held at that step: what a reading made inside the run would have given.

Run from the repository root (about half an hour on two cores):
``SELFTUNE_CACHE=.cache python bench-results/gap-decomposition/optimal_step.py``; writes
``optimal_step.json`` and ``optimal_step_auto.json`` (rows as runs end; those already there are
kept) and ``optimal_step.md`` next to this file; ``--table`` remakes the table only.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "src"), str(HERE), str(HERE.parent), str(HERE.parent / "batch-size")]

from noise import along, noise_scale  # noqa: E402
from noise_share import POINTS, Job, cells_of, command_line, run_pairs, within  # noqa: E402

from selftune.bench.methods import DEFAULT_LR, SGD_DEFAULT  # noqa: E402

BIG = 16  #: the measuring batch over the benchmark's
DRAWS = 4
TUNED_DRAWS = 64  #: pairs of batches for ``B_noise`` along ``auto``'s runs (``noise_share``: 128)
OUT = HERE / "optimal_step.json"
TUNED_OUT = HERE / "optimal_step_auto.json"


def preconditioner(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor | float:
    """Adam's ``1 / (√v̂ + eps)`` for ``p`` (bias-corrected as AdamW's step is); 1 for SGD.
    ``opt`` may be selftune's wrapper, whose wrapped optimizer holds the state."""
    opt = getattr(opt, "optimizer", opt)
    if not isinstance(opt, torch.optim.AdamW):
        return 1.0
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    state = opt.state[p]
    second = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
    return 1.0 / (second.sqrt() + group["eps"])


def step_size(
    task: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, b: int, gen: torch.Generator
) -> dict[str, float]:
    """The terms of ``ε_max`` at the model's weights: ``GᵀPG`` and ``(PG)ᵀH(PG)``, each the mean
    over ``DRAWS`` batches of ``BIG * b`` examples."""
    params = [p for p in model.parameters() if p.requires_grad]
    slope, curve = [], []
    for _ in range(DRAWS):
        # the fused attention kernels have no second derivative on the CPU
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            loss = task.loss(model, task.batch(BIG * b, gen))
            grads = torch.autograd.grad(loss, params, create_graph=True)
        direction = [
            (preconditioner(opt, p) * g).detach() for p, g in zip(params, grads, strict=True)
        ]
        along_dir = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
        hvp = torch.autograd.grad(along_dir, params, allow_unused=True)
        slope.append(float(along_dir.detach()))
        curve.append(
            float(sum((h * d).sum() for h, d in zip(hvp, direction, strict=True) if h is not None))
        )
    return {"slope": statistics.fmean(slope), "curve": statistics.fmean(curve)}


def one(job: Job) -> dict[str, Any]:
    """The terms along the plain optimizer's run at ``lr*``."""
    name, base, rate, seed = job
    terms = along(name, seed, rate, base, POINTS, step_size)
    return {"workload": name, "base": base, "seed": seed, "terms": terms}


def tuned(job: Job) -> dict[str, Any]:
    """The terms, ``B_noise`` (from ``TUNED_DRAWS`` pairs) and the rate held, along ``auto``'s
    run from the default rate: what a reading inside that run would see."""
    name, base, _, seed = job

    def read(task: Any, model: Any, opt: Any, b: int, gen: torch.Generator) -> dict[str, float]:
        terms = step_size(task, model, opt, b, gen)
        scale = noise_scale(task, model, b, gen, TUNED_DRAWS)
        return {**terms, "noise_scale": scale, "lr": opt.hyperparams()[0]["lr"]}

    terms = along(name, seed, DEFAULT_LR[base], base, POINTS, read, tuned=True)
    return {"workload": name, "base": base, "seed": seed, "terms": terms, "walk": "auto"}


def rate_of(terms: list[dict[str, float]], scale: float | None, base: str, b: int) -> float | None:
    """The model's rate from the seeds' terms (median ``ε_max``) and ``B_noise`` ``scale``
    (None: without the noise term); None where the curvature along the step was not positive
    in the median seed."""
    eps_max = statistics.median(
        t["slope"] / t["curve"] if t["curve"] > 0 else math.inf for t in terms
    )
    if eps_max == math.inf:
        return None
    momentum = 1 - SGD_DEFAULT["momentum"] if base == "sgd" else 1.0
    return momentum * eps_max / (1.0 if scale is None else 1 + max(scale, 0.0) / b)


def predicted(rows: list[dict[str, Any]], cell: Any, p: int, noisy: bool) -> float | None:
    """The predicted rate over ``lr*`` at step ``p`` at the weights of the run at ``lr*``, with
    the noise term or (``noisy`` False) without it."""
    name, base, best, b, scale = cell[:5]
    terms = [r["terms"][str(p)] for r in rows if (r["workload"], r["base"]) == (name, base)]
    rate = rate_of(terms, scale[p] if noisy else None, base, b)
    return None if rate is None else rate / best


def tuned_table(
    auto: list[dict[str, Any]], rows: list[dict[str, Any]], tuning: list[Any], others: list[Any]
) -> str:
    """The same reading at ``auto``'s own weights (its run from the default rate), over the
    factor chosen at ``lr*``'s weights on the pairs not held out, beside ``auto``'s own rate at
    that step: what a reading made inside the run would have given."""
    lines = [
        "| workload | base | lr* | "
        + " | ".join(
            f"`auto`'s rate at {p} / lr* | the reading at {p}, over the factor" for p in POINTS
        )
        + " |",
        "|---|---|---|" + "---|" * (2 * len(POINTS)),
    ]
    factor = {
        p: statistics.median(v for c in tuning if (v := predicted(rows, c, p, True)) is not None)
        for p in POINTS
    }
    got: dict[tuple[int, str], list[float | None]] = {}
    for c in tuning + others:
        name, base, best, b = c[:4]
        mine = [r["terms"] for r in auto if (r["workload"], r["base"]) == (name, base)]
        cells = []
        for p in POINTS:
            scale = statistics.median(t[str(p)]["noise_scale"] for t in mine)
            rate = rate_of([t[str(p)] for t in mine], scale, base, b)
            held = statistics.median(t[str(p)]["lr"] for t in mine) / best
            reading = None if rate is None else rate / best / factor[p]
            got.setdefault((p, "held"), []).append(held)
            got.setdefault((p, "reading"), []).append(reading)
            cells += [f"{held:.2g}x", "–" if reading is None else f"{reading:.2g}x"]
        label = f"{name} (held out)" if c in others else name
        lines.append(f"| {label} | {base} | {best:g} | " + " | ".join(cells) + " |")
    lines.append("")
    for p in POINTS:
        for kind, what in (("held", "`auto`'s rate"), ("reading", "the reading over the factor")):
            values = got[p, kind]
            near = [
                within([v for v in part if v is not None])
                for part in (values[: len(tuning)], values[len(tuning) :])
            ]
            lines.append(
                f"At step {p}, {what} within half a grid step of lr*: {near[0]} of"
                f" {len(tuning)} pairs not held out, {near[1]} of {len(others)} held out."
            )
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]], noise: list[dict[str, Any]], found: Any, held: Any) -> str:
    """Per pair: the predicted rate over ``lr*`` at each step without and with the noise term,
    beside the crossing's; then, per reading, how many land within half a grid step of ``lr*``
    as they are and over a fixed factor (the median over the pairs not held out, chosen on them:
    on them the most a constant could give), the held-out pairs read with that same factor."""
    tuning, others = cells_of(noise, found), cells_of(noise, held)
    readings = [(p, noisy) for p in POINTS for noisy in (False, True)]
    got = {
        (p, noisy): [predicted(rows, c, p, noisy) for c in tuning + others] for p, noisy in readings
    }

    def show(value: float | None) -> str:
        return "–" if value is None else f"{value:.2g}x"

    def name(p: int, noisy: bool) -> str:
        return f"the model's rate from ε_max{' / (1 + B_noise/b)' if noisy else ''} at {p}"

    lines = [
        "| workload | base | lr* | crossing / lr* | "
        + " | ".join(f"{name(p, n)}, over lr*" for p, n in readings)
        + " |",
        "|---|---|---|---|" + "---|" * len(readings),
    ]
    for i, c in enumerate(tuning + others):
        label = f"{c[0]} (held out)" if i >= len(tuning) else c[0]
        cells = " | ".join(show(got[r][i]) for r in readings)
        lines.append(f"| {label} | {c[1]} | {c[2]:g} | {c[5]:.2g}x | {cells} |")
    lines += [
        "",
        f"Within half a grid step of lr*, of the {len(tuning)} pairs not held out and (after the"
        f" slash) the {len(others)} held-out ones: the crossing {within([c[5] for c in tuning])}"
        f" / {within([c[5] for c in others])}.",
    ]
    for r in readings:
        mine = [v for v in got[r][: len(tuning)] if v is not None]
        theirs = [v for v in got[r][len(tuning) :] if v is not None]
        factor = statistics.median(mine)
        lines.append(
            f"- {name(*r)}: as it is {within(mine)} / {within(theirs)}; over its median on the"
            f" pairs not held out ({factor:.3g}) {within([v / factor for v in mine])} /"
            f" {within([v / factor for v in theirs])}; spread on those {max(mine) / min(mine):.0f}x"
            f" ({len(tuning) - len(mine) + len(others) - len(theirs)} pairs with no positive"
            " curvature along the step left out)."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    found, held, jobs = command_line()
    run_pairs(one, OUT, jobs)
    run_pairs(tuned, TUNED_OUT, jobs)
    noise = json.loads((HERE / "noise_share.json").read_text(encoding="utf-8"))
    rows = json.loads(OUT.read_text(encoding="utf-8"))
    text = table(rows, noise, found, held)
    if TUNED_OUT.exists():
        auto = json.loads(TUNED_OUT.read_text(encoding="utf-8"))
        text += "\n" + tuned_table(auto, rows, cells_of(noise, found), cells_of(noise, held))
    (HERE / "optimal_step.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
