"""selftune's per-step cost: the same training step unwrapped and wrapped, interleaved.

Two identical models train side by side in one process, one with the plain optimizer and one with
``selftune.wrap(..., controller="auto")``; blocks of steps alternate between them (and which goes
first alternates too), so a change in machine load hits both alike.  The overhead is the median
over rounds of the ratio of a round's two block means.  A step here is what a user pays:
batch, forward, backward, step.

A block is as long as the guard's snapshot interval, so every selftune block holds exactly one
snapshot and its mean counts that step's extra cost; a median over a block's steps would drop it
as an outlier and understate what a run pays.

On an accelerator a block is timed whole and ends with a device synchronize, so its time counts
the work it queued.  There the loop's own per-step read of the loss matters: without it the plain
side queues steps ahead of the device, while selftune's one read per step waits for each backward
pass to finish.  ``sync=False`` measures that loop, the one where the cost shows.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from selftune.bench.fields import NUMBER, TEXT, WHOLE, Damaged, Kind, fault, read_text
from selftune.bench.runner import one_thread
from selftune.bench.workloads import WORKLOADS, Task, Workload
from selftune.files import write_whole
from selftune.guard import GuardConfig

OVERHEAD = "overhead.json"
#: The CNN and the transformer: the two architectures whose step costs differ most.
OVERHEAD_WORKLOADS = ("mnist1d-cnn", "shakespeare-char")


def make_optimizer(base: str, params: Any) -> torch.optim.Optimizer:
    """The base optimizer at the benchmark's default settings (SGD with momentum 0.9, or AdamW)."""
    if base == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3)


def measure(
    workload_name: str | Workload,
    base: str,
    steps: int = 400,
    block: int | None = None,
    small: bool = False,
    controller: str = "auto",
    device: str | torch.device = "cpu",
    sync: bool = True,
    average: bool = False,
) -> dict[str, Any]:
    """Mean per-step milliseconds plain and wrapped, and their ratio, over ``steps`` each.

    ``workload_name``: a benchmark workload's name, or a :class:`Workload` (a larger model, say).
    ``block`` defaults to the guard's snapshot interval (fewer when ``steps`` is short).
    ``small``: the smoke suite's tiny data (same models, so the same per-step cost).
    ``controller``: what the wrapped side runs (``"off"`` keeps the plain side's trajectory).
    ``device``: where the models train; off the CPU the minibatches are drawn and moved there
    before the clock starts (a data loader's copy is neither side's cost).
    ``sync``: whether the loop reads the loss every step, as a loop that logs it does.
    ``average``: the wrapped side also keeps a weight average (``wrap(..., average=True)``).
    """
    import selftune

    if block is None:
        block = min(GuardConfig().interval, max(1, steps // 2))
    if steps < 2 * block or block < 1:
        raise ValueError(f"steps={steps!r}, block={block!r}: use block >= 1 and steps >= 2*block")
    workload = WORKLOADS[workload_name] if isinstance(workload_name, str) else workload_name
    if small:
        workload = workload.smoke()
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    task = workload.task()
    torch.manual_seed(0)
    models = {"plain": workload.make_model(task).to(device)}
    models["selftune"] = copy.deepcopy(models["plain"])
    opts: dict[str, Any] = {
        "plain": make_optimizer(base, models["plain"].parameters()),
        "selftune": selftune.wrap(
            make_optimizer(base, models["selftune"].parameters()),
            controller=controller,
            seed=0,
            average=average,
        ),
    }
    rounds = steps // block
    gens = {name: torch.Generator().manual_seed(0) for name in models}
    draw = {
        name: _batches(task, workload.batch_size, gens[name], device, block * (rounds + 1))
        for name in models
    }
    block_ms: dict[str, list[float]] = {name: [] for name in models}
    step_ms: dict[str, list[float]] = {name: [] for name in models}

    def one_block(name: str) -> None:
        start = time.perf_counter()
        for _ in range(block):
            loss = task.loss(models[name], next(draw[name]))
            opts[name].zero_grad()
            loss.backward()
            stepping = time.perf_counter()
            if name == "selftune":
                opts[name].step(loss=loss.detach())
            else:
                opts[name].step()
            if sync:
                loss.item()  # the host sync a logging loop has; both sides pay it
            step_ms[name].append((time.perf_counter() - stepping) * 1000.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        block_ms[name].append((time.perf_counter() - start) * 1000.0 / block)

    with one_thread():
        for name in models:  # warm-up: first-call allocations and lazy state, not timed
            one_block(name)
        block_ms = {name: [] for name in models}
        step_ms = {name: [] for name in models}
        for round_ in range(rounds):
            order = ["plain", "selftune"] if round_ % 2 == 0 else ["selftune", "plain"]
            for name in order:
                one_block(name)
    # paired: each round's two blocks ran back to back, so load that drifts between rounds
    # cancels in their ratio, where it shifts the two whole-run means apart
    pairs = [s / p for s, p in zip(block_ms["selftune"], block_ms["plain"], strict=True)]
    row: dict[str, Any] = {
        "workload": workload.name,
        "base": base,
        "steps": rounds * block,
        "plain_ms": statistics.fmean(block_ms["plain"]),
        "selftune_ms": statistics.fmean(block_ms["selftune"]),
        "ratio": statistics.median(pairs),
    }
    if on_cpu and sync:
        # the optimizer step alone (no asynchronous work left outside it): selftune's own
        # cost, steadier than the whole step, whose forward and backward passes differ by a few
        # percent between two identical sides on the transformer (bench-results/overhead-split)
        row["plain_step_ms"] = statistics.fmean(step_ms["plain"])
        row["selftune_step_ms"] = statistics.fmean(step_ms["selftune"])
    else:
        row.update(device=str(device), sync=sync)
    row.update(selftune_version=selftune.__version__, torch_version=torch.__version__)
    return row


def _batches(
    task: Task, size: int, gen: torch.Generator, device: torch.device, count: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches drawn with ``gen``: on the CPU as the step asks (a step's real cost), on a
    device all ``count`` of them drawn and moved there now, before the clock starts."""
    if device.type == "cpu":
        return iter(lambda: task.batch(size, gen), None)
    drawn = (task.batch(size, gen) for _ in range(count))
    return iter([(x.to(device), y.to(device)) for x, y in drawn])


def run_overhead(
    out: Path, steps: int = 400, workloads: list[str] | None = None, small: bool = False
) -> Path:
    """Measure each overhead workload with SGD and AdamW; write ``out/overhead.json``.

    The rows of workloads not measured now stay as the file held them: measuring one workload
    again once rewrote the file with its rows alone, and the others' were lost.  They are read
    first, so that a damaged file is refused before the minutes of measuring, not after.  The
    file is replaced whole (:func:`~selftune.files.write_whole`): written over in place, one
    cut off by a crash or Ctrl-C lost them all.
    """
    names = workloads if workloads is not None else list(OVERHEAD_WORKLOADS)
    path = out / OVERHEAD
    kept = [r for r in read_overhead(path) if r["workload"] not in names]
    rows = [measure(name, base, steps, small=small) for name in names for base in ("sgd", "adamw")]
    out.mkdir(parents=True, exist_ok=True)
    order = {name: i for i, name in enumerate(OVERHEAD_WORKLOADS)}
    rows = sorted(kept + rows, key=lambda r: order.get(r["workload"], len(order)))
    write_whole(path, (json.dumps(rows, indent=2) + "\n").encode("utf-8"))
    return path


#: every field of an overhead row that the report and a new measurement read, and what it must be
_ROW: dict[str, Kind] = {
    "workload": TEXT,
    "base": TEXT,
    "steps": WHOLE,
    "plain_ms": NUMBER,
    "selftune_ms": NUMBER,
    "ratio": NUMBER,
}
#: the optimizer step timed apart, which rows measured before it was lack
_ROW_OPTIONAL: dict[str, Kind] = {"plain_step_ms": NUMBER, "selftune_step_ms": NUMBER}


def read_overhead(path: Path) -> list[dict[str, Any]]:
    """The rows of an overhead file, none where there is no file; a file that is not a list of
    :data:`_ROW` is an error naming it (it was a traceback, or JSON's own message naming no
    file)."""
    if not path.exists():
        return []
    fix = "fix it, or remove it and measure again (selftune bench --suite overhead)"
    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise Damaged(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(rows, list):
        raise Damaged(f"{path} holds no list of measurements; {fix}")
    for number, row in enumerate(rows, start=1):
        problem = fault(row, _ROW, _ROW_OPTIONAL)
        if problem is not None:
            raise Damaged(f"{path}: measurement {number} is no overhead row ({problem}); {fix}")
    return rows
