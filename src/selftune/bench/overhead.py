"""selftune's per-step cost: the same training step unwrapped and wrapped, interleaved.

Two identical models train side by side in one process, one with the plain optimizer and one with
``selftune.wrap(..., controller="auto")``; blocks of steps alternate between them (and which goes
first alternates too), so a change in machine load hits both alike.  The overhead is the median
over rounds of the ratio of a round's two block means.  A step here is what a user pays:
batch, forward, backward, step.

A block is as long as the guard's snapshot interval, so every selftune block holds exactly one
snapshot and its mean counts that step's extra cost; a median over a block's steps would drop it
as an outlier and understate what a run pays.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from selftune.bench.runner import one_thread
from selftune.bench.workloads import WORKLOADS
from selftune.guard import GuardConfig

OVERHEAD = "overhead.json"
#: The CNN and the transformer: the two architectures whose step costs differ most.
OVERHEAD_WORKLOADS = ("mnist1d-cnn", "shakespeare-char")


def _optimizer(base: str, params: Any) -> torch.optim.Optimizer:
    if base == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3)


def measure(
    workload_name: str,
    base: str,
    steps: int = 400,
    block: int | None = None,
    small: bool = False,
    controller: str = "auto",
) -> dict[str, Any]:
    """Mean per-step milliseconds plain and wrapped, and their ratio, over ``steps`` each.

    ``block`` defaults to the guard's snapshot interval (fewer when ``steps`` is short).
    ``small``: the smoke suite's tiny data (same models, so the same per-step cost).
    ``controller``: what the wrapped side runs (``"off"`` keeps the plain side's trajectory).
    """
    import selftune

    if block is None:
        block = min(GuardConfig().interval, max(1, steps // 2))
    if steps < 2 * block or block < 1:
        raise ValueError(f"steps={steps!r}, block={block!r}: use block >= 1 and steps >= 2*block")
    workload = WORKLOADS[workload_name].smoke() if small else WORKLOADS[workload_name]
    task = workload.task()
    torch.manual_seed(0)
    models = {"plain": workload.make_model(task)}
    models["selftune"] = copy.deepcopy(models["plain"])
    opts: dict[str, Any] = {
        "plain": _optimizer(base, models["plain"].parameters()),
        "selftune": selftune.wrap(
            _optimizer(base, models["selftune"].parameters()), controller=controller, seed=0
        ),
    }
    gens = {name: torch.Generator().manual_seed(0) for name in models}
    times: dict[str, list[float]] = {name: [] for name in models}
    step_times: dict[str, list[float]] = {name: [] for name in models}

    def one_step(name: str) -> None:
        start = time.perf_counter()
        loss = task.loss(models[name], task.batch(workload.batch_size, gens[name]))
        opts[name].zero_grad()
        loss.backward()
        stepping = time.perf_counter()
        if name == "selftune":
            opts[name].step(loss=loss.detach())
        else:
            opts[name].step()
        loss.item()  # the host sync a logging loop has; both sides pay it
        end = time.perf_counter()
        times[name].append((end - start) * 1000.0)
        step_times[name].append((end - stepping) * 1000.0)

    with one_thread():
        for name in models:  # warm-up: first-call allocations and lazy state, not timed
            for _ in range(block):
                one_step(name)
        times = {name: [] for name in models}
        step_times = {name: [] for name in models}
        for round_ in range(steps // block):
            order = ["plain", "selftune"] if round_ % 2 == 0 else ["selftune", "plain"]
            for name in order:
                for _ in range(block):
                    one_step(name)
    plain = statistics.fmean(times["plain"])
    tuned = statistics.fmean(times["selftune"])
    # paired: each round's two blocks ran back to back, so load that drifts between rounds
    # cancels in their ratio, where it shifts the two whole-run means apart
    pairs = [
        statistics.fmean(times["selftune"][i : i + block])
        / statistics.fmean(times["plain"][i : i + block])
        for i in range(0, len(times["plain"]), block)
    ]
    return {
        "workload": workload_name,
        "base": base,
        "steps": len(times["plain"]),
        "plain_ms": plain,
        "selftune_ms": tuned,
        "ratio": statistics.median(pairs),
        # the optimizer step alone (CPU: no asynchronous work left outside it): selftune's own
        # cost, steadier than the whole step, whose forward and backward passes differ by a few
        # percent between two identical sides on the transformer (bench-results/overhead-split)
        "plain_step_ms": statistics.fmean(step_times["plain"]),
        "selftune_step_ms": statistics.fmean(step_times["selftune"]),
        "selftune_version": selftune.__version__,
        "torch_version": torch.__version__,
    }


def run_overhead(
    out: Path, steps: int = 400, workloads: list[str] | None = None, small: bool = False
) -> Path:
    """Measure each overhead workload with SGD and AdamW; write ``out/overhead.json``."""
    names = workloads if workloads is not None else list(OVERHEAD_WORKLOADS)
    rows = [measure(name, base, steps, small=small) for name in names for base in ("sgd", "adamw")]
    out.mkdir(parents=True, exist_ok=True)
    path = out / OVERHEAD
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return path
