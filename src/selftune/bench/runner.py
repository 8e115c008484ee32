"""Runs workload x method x seed, one JSON line per finished run, resumable, one torch thread each.

A run is a function of its seed: the model is initialised after ``torch.manual_seed(seed)`` and
every minibatch comes from a generator seeded the same way, on one intra-op thread (more threads
make float reductions order-dependent).  Runs go to worker processes (``jobs``) and only the parent
writes ``results.jsonl``, one line per run, flushed as each finishes; on start, runs already in
the file are skipped, so an interrupted suite resumes where it stopped.

A run is a race to the workload's target: it ends at the first evaluation that meets it (as in
time-to-target benchmarks), or at the step budget.  ``final_metric`` is the metric where it ended.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selftune.bench.fields import (
    FLAG,
    NUMBER,
    TEXT,
    WHOLE,
    Damaged,
    Kind,
    fault,
    or_null,
    read_text,
)
from selftune.bench.methods import Method, Setting, methods
from selftune.bench.provenance import SOURCE_KIND, source
from selftune.bench.workloads import WORKLOADS, Task, Workload
from selftune.errors import RateFloorWarning

RESULTS = "results.jsonl"
#: A loss above this multiple of the first step's loss counts as a divergence.
DIVERGE_FACTOR = 10.0
#: A run whose last this-many losses were all bad cannot recover; stop it to save the budget.
HOPELESS_STEPS = 20
#: Weight of the newest loss in the training-loss EMA recorded in the curves.
EMA_WEIGHT = 0.05


@dataclass(frozen=True)
class RunSpec:
    """One run to do; plain values only, so it crosses to a worker process by pickling."""

    workload: str
    method: str
    seed: int
    smoke_steps: int | None = None  #: the smoke suite's tiny budget (tiny data too); None: full

    @property
    def key(self) -> tuple[str, str, int, int]:
        """What identifies a run in the results file: the budget too, so suites never mix."""
        steps = self.smoke_steps if self.smoke_steps is not None else WORKLOADS[self.workload].steps
        return (self.workload, self.method, self.seed, steps)

    def resolve(self) -> tuple[Workload, Method]:
        workload = WORKLOADS[self.workload]
        if self.smoke_steps is not None:
            workload = workload.smoke(self.smoke_steps)
        return workload, methods()[self.method]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fresh_run(workload: Workload, seed: int) -> tuple[Task, torch.nn.Module, torch.Generator]:
    """A run's start: the task, the model initialised under ``seed``, and the generator its
    batches are drawn with; the same for every method, so that runs differ by method alone."""
    task = workload.task()
    torch.manual_seed(seed)
    model = workload.make_model(task)
    return task, model, torch.Generator().manual_seed(seed)


def train(workload: Workload, method: Method, seed: int) -> dict[str, Any]:
    """Train once and return the run's record, one line of ``results.jsonl``.

    Fields: the run (``workload``, ``method``, ``seed``, ``family``, ``base``, ``lr0``) and the
    race's rules (``metric_name``, ``higher_is_better``, ``target``, ``steps_budget``,
    ``eval_every``, ``held_out``); ``steps_to_target`` and ``seconds_to_target`` (training time
    only, evaluation excluded; null when never reached); ``final_metric``, ``best_metric``;
    ``diverged`` (a non-finite loss, a loss above 10x the first, or the guard giving up);
    ``error`` (what stopped a run early, if anything); ``steps_run``, ``train_seconds``,
    ``ms_per_step`` (median); ``curves`` (at every evaluation: ``step``, ``metric``, the
    training-loss EMA ``loss_ema`` and the effective ``lr``); ``versions``; ``source`` (the
    commit and CPU kernels that made it, :mod:`selftune.bench.provenance`).
    """
    import selftune

    task, model, gen = fresh_run(workload, seed)
    handle = method.build(model, Setting(workload.steps, workload.higher_is_better, seed))
    curves: dict[str, list[float | None]] = {"step": [], "metric": [], "loss_ema": [], "lr": []}
    step_ms: list[float] = []
    train_seconds = 0.0
    ema: float | None = None
    initial: float | None = None
    hit_step: int | None = None
    hit_seconds: float | None = None
    diverged = False
    bad_streak = 0
    error: str | None = None
    step = 0

    def evaluate() -> float:
        model.eval()
        with handle.evaluating(), torch.no_grad():
            value = task.evaluate(model)
        model.train()
        handle.observe(value)
        curves["step"].append(step)
        curves["metric"].append(_finite_or_none(value))
        curves["loss_ema"].append(ema)
        curves["lr"].append(_finite_or_none(handle.lr()))
        return value

    evaluate()  # the starting point; also leaves Schedule-Free in train mode for the first step
    for step in range(1, workload.steps + 1):
        start = time.perf_counter()
        try:
            loss = task.loss(model, task.batch(workload.batch_size, gen))
            handle.zero_grad()
            loss.backward()
            handle.step(loss)
        except Exception as exc:  # a method that breaks is a result, not a crash of the suite
            error = f"step {step}: {type(exc).__name__}: {exc}"
            diverged = diverged or isinstance(exc, selftune.GuardError)  # keep an earlier one
            break
        value = loss.item()  # host sync, as every real loop that logs its loss has
        elapsed = time.perf_counter() - start
        train_seconds += elapsed
        step_ms.append(elapsed * 1000.0)
        if initial is None:
            initial = value
        bad = not math.isfinite(value) or value > DIVERGE_FACTOR * abs(initial)
        diverged = diverged or bad
        bad_streak = bad_streak + 1 if bad else 0
        if math.isfinite(value):
            ema = value if ema is None else (1 - EMA_WEIGHT) * ema + EMA_WEIGHT * value
        if step % workload.eval_every == 0 or step == workload.steps:
            metric = evaluate()
            if hit_step is None and math.isfinite(metric) and workload.met(metric):
                hit_step, hit_seconds = step, train_seconds
                break  # a race to the target: the run ends where it is reached
        if bad_streak >= HOPELESS_STEPS:
            break

    metrics = [m for m in curves["metric"] if m is not None]
    best = (max if workload.higher_is_better else min)(metrics) if metrics else None
    return {
        "workload": workload.name,
        "method": method.name,
        "seed": seed,
        "family": method.family,
        "base": method.base,
        "lr0": method.lr0,
        "held_out": workload.held_out,
        "metric_name": workload.metric,
        "higher_is_better": workload.higher_is_better,
        "target": workload.target,
        "steps_budget": workload.steps,
        "steps_run": step,
        "eval_every": workload.eval_every,
        "steps_to_target": hit_step,
        "seconds_to_target": hit_seconds,
        "final_metric": curves["metric"][-1],
        "best_metric": best,
        "diverged": diverged,
        "error": error,
        "train_seconds": train_seconds,
        "ms_per_step": statistics.median(step_ms) if step_ms else None,
        "curves": curves,
        "versions": {"selftune": selftune.__version__, "torch": torch.__version__},
        "source": source(),
    }


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_spec(spec: RunSpec) -> dict[str, Any]:
    """Resolve and train one spec on one thread (the worker processes' entry point).

    A rate cut to its floor is not warned of here: a suite of hundreds of runs printed one
    warning for each, and the record's ``lr`` curve holds the same (``floor_runs.py`` in the
    pilots counts them)."""
    workload, method = spec.resolve()
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RateFloorWarning)
        record = train(workload, method, spec.seed)
    record["suite"] = "smoke" if spec.smoke_steps is not None else "full"
    return record


def read_results(path: Path) -> list[dict[str, Any]]:
    """The records in a results file; a torn last line (an interrupted write) is skipped.

    A damaged line anywhere else, or a record whose fields are not what the runner writes (see
    :data:`_RECORD`), is an error naming the line: silently dropping a run would bias the
    medians, and a field of another type made a traceback in the report or the resume.
    """
    if not path.exists():
        return []
    lines = read_text(path).split("\n")
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == last:  # the last non-empty line: a torn tail
                print(f"{path}:{number}: skipping a torn last line", file=sys.stderr)
                continue
            raise Damaged(
                f"{path}:{number} is not valid JSON ({exc}); remove or fix that line and rerun"
            ) from exc
        problem = fault(record, _RECORD, _RECORD_OPTIONAL) or _contradiction(record)
        if problem is not None:
            raise Damaged(
                f"{path}:{number} is no run's record ({problem}); remove or fix that line and rerun"
            )
        records.append(record)
    return records


def _contradiction(record: dict[str, Any]) -> str | None:
    """What in a record of well-typed fields no run writes, in words; None when nothing is.

    A run reaches its target at a step from 1 to its budget and records both its steps and its
    seconds to it, or, when it misses, neither: a steps to target of 0 stopped the report with a
    ZeroDivisionError, and one without its seconds with "max() arg is an empty sequence"."""
    steps, seconds = record["steps_to_target"], record["seconds_to_target"]
    if (steps is None) != (seconds is None):
        null, other = ("steps", seconds) if steps is None else ("seconds", steps)
        return (
            f"its {null}_to_target is null, and the other {json.dumps(other)}: a run that "
            "reached its target records both, one that missed neither"
        )
    budget = record["steps_budget"]
    if steps is not None and not (isinstance(steps, int) and 1 <= steps <= budget):
        return f"its steps_to_target is {steps}, not a whole number from 1 to its budget {budget}"
    return None


def _curves(value: object) -> bool:
    """Whether ``value`` is a run's curves: a step and three finite values at each evaluation (a
    shorter list made the report's plots stop with "zip() argument 2 is shorter"; the runner
    records a value that is not finite as null, so NaN or infinity is damage, as in a field)."""
    if not isinstance(value, dict) or not all(isinstance(value.get(k), list) for k in CURVES):
        return False
    steps = value["step"]
    # json.loads makes exactly these types (true is a bool, no int): a set of them is quick to
    # take over the committed results' million values
    return (
        {type(x) for x in steps} <= {int, float}
        and all(
            len(value[k]) == len(steps) and {type(x) for x in value[k]} <= {int, float, type(None)}
            for k in CURVES[1:]
        )
        and all(math.isfinite(x) for k in CURVES for x in value[k] if x is not None)
    )


#: the lists of a run's ``curves``, one entry per evaluation
CURVES = ("step", "metric", "loss_ema", "lr")
#: every field of a run's record that resuming and the report read, and what it must be
_RECORD: dict[str, Kind] = {
    "workload": TEXT,
    "method": TEXT,
    "seed": WHOLE,
    "steps_budget": WHOLE,
    "target": NUMBER,
    "eval_every": WHOLE,
    "metric_name": TEXT,
    "higher_is_better": FLAG,
    "family": TEXT,
    "base": TEXT,
    "steps_to_target": or_null(NUMBER),
    "seconds_to_target": or_null(NUMBER),
    "final_metric": or_null(NUMBER),
    "ms_per_step": or_null(NUMBER),
    "diverged": FLAG,
    "curves": (
        "four lists of one length (step, metric, loss_ema, lr) of finite numbers, null but in step",
        _curves,
    ),
    "versions": (
        "the selftune and torch versions",
        lambda v: (
            isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("selftune", "torch"))
        ),
    ),
}
#: the fields the report reads with a default where a record lacks them
_RECORD_OPTIONAL: dict[str, Kind] = {
    "lr0": or_null(NUMBER),
    "held_out": FLAG,
    "error": or_null(TEXT),
    "suite": TEXT,
    "source": SOURCE_KIND,
}


def check_budgets(specs: list[RunSpec], out: Path) -> None:
    """Refuse, before any run, runs whose budget differs from the runs of the same workload
    already in ``out`` (the smoke suite's into the full suite's folder): the report refused the
    folder only after they were written into it."""
    budgets = {(r["workload"], r["steps_budget"]) for r in read_results(out / RESULTS)}
    for spec in specs:
        other = next((b for w, b in budgets if w == spec.workload and b != spec.key[3]), None)
        if other is not None:
            raise ValueError(
                f"{out / RESULTS} holds {spec.workload} runs with a budget of {other} steps, and "
                f"these have {spec.key[3]} (smoke and full mixed?): give each suite its own --out"
            )


def done_keys(path: Path) -> set[tuple[str, str, int, int]]:
    """The keys (see :attr:`RunSpec.key`) of the runs already in a results file."""
    return {(r["workload"], r["method"], r["seed"], r["steps_budget"]) for r in read_results(path)}


def _append(path: Path, record: dict[str, Any]) -> None:
    """Append one line; a torn tail left by an interrupted write is cut off first.

    The torn run is not in the file as far as :func:`read_results` is concerned, so it runs again;
    cutting it keeps it from ending up mid-file, where it would count as damage.
    """
    with path.open("ab+") as f:
        size = f.seek(0, 2)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":  # rare: read the whole file once to find the last full line
                f.seek(0)
                data = f.read()
                cut = data.rfind(b"\n") + 1
                if _whole(data[cut:]):  # a record whose newline went (an edit): it counted as
                    f.write(b"\n")  # done, and was cut and never run again
                else:
                    f.truncate(cut)
        f.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        f.flush()


def _whole(line: bytes) -> bool:
    """Whether ``line`` is a whole record (JSON), not a write cut off."""
    try:
        return isinstance(json.loads(line), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


@dataclass
class Outcome:
    """What a call of :func:`run_all` did."""

    ran: int = 0
    skipped: int = 0
    unavailable: dict[str, str] | None = None  #: workload -> why its data could not be had


def run_all(specs: list[RunSpec], out: Path, jobs: int = 1, progress: bool = True) -> Outcome:
    """Run every spec not already in ``out/results.jsonl`` and append each record as it finishes.

    ``jobs`` > 1 runs that many worker processes (spawned, so no thread pool is inherited).  A
    workload whose data cannot be had (no network and no cache) is skipped with its reason.
    """
    from selftune.bench.data import DataUnavailable

    if jobs < 1:
        raise ValueError(f"jobs={jobs!r}: use 1 or more worker processes")
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = done_keys(path)
    unique = list({s.key: s for s in specs}.values())  # a seed given twice runs once
    todo = [s for s in unique if s.key not in done]
    outcome = Outcome(skipped=len(unique) - len(todo), unavailable={})
    todo = _drop_unavailable(todo, outcome)
    with _progress(len(todo), progress) as advance:
        if jobs == 1 or len(todo) <= 1:
            for spec in todo:
                try:
                    _append(path, run_spec(spec))
                except DataUnavailable as exc:  # found only when the task is first built
                    _mark_unavailable(outcome, spec.workload, str(exc))
                    continue
                outcome.ran += 1
                advance(spec)
            return outcome
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures: dict[Future[dict[str, Any]], RunSpec] = {
                pool.submit(run_spec, s): s for s in todo
            }
            kept: set[Future[dict[str, Any]]] = set()
            # around the wait too: Ctrl-C lands there, mostly, and leaving the pool then ran
            # every queued run to its end (a terminal's Ctrl-C reaches the workers, which go on
            # to the next run) before the results of all of them were thrown away
            try:
                for future in as_completed(futures):
                    spec = futures[future]
                    try:
                        record = future.result()
                    except DataUnavailable as exc:
                        _mark_unavailable(outcome, spec.workload, str(exc))
                        continue
                    _append(path, record)
                    kept.add(future)
                    outcome.ran += 1
                    advance(spec)
            except BaseException:
                _keep_finished(pool, futures, kept, path)
                raise
    return outcome


def _keep_finished(
    pool: ProcessPoolExecutor,
    futures: dict[Future[dict[str, Any]], RunSpec],
    kept: set[Future[dict[str, Any]]],
    path: Path,
) -> None:
    """A run failed, or the suite was interrupted: start no more, let those under way finish,
    and record every run that did, as a resume expects.  Leaving the pool ran every queued run
    to its end and then threw all their results away with the error; so did a second Ctrl-C
    during the wait, which is held until the finished runs are recorded."""
    with _ctrl_c_held():
        pool.shutdown(wait=True, cancel_futures=True)
        for future in futures:
            if future in kept or future.cancelled() or future.exception() is not None:
                continue
            _append(path, future.result())


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C back until the block ends, then raise it (a KeyboardInterrupt).

    For a block that must not be cut short: raised in the wait for the workers, it left the
    finished runs unrecorded; caught there and the wait begun again, it broke the pool on Python
    3.11 (an interrupted join marks the thread it waits for as ended, though it runs on, and the
    pool closed its queues under it).  A terminal's Ctrl-C still reaches the workers and ends
    the runs under way, so the wait is short.  Held only where it would raise (the main thread,
    Python's own handler)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pressed: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def _drop_unavailable(todo: list[RunSpec], outcome: Outcome) -> list[RunSpec]:
    """Build each workload's task once up front, so missing data is reported before any run."""
    from selftune.bench.data import DataUnavailable

    assert outcome.unavailable is not None
    for name in sorted({(s.workload, s.smoke_steps is not None) for s in todo}):
        workload = WORKLOADS[name[0]].smoke() if name[1] else WORKLOADS[name[0]]
        try:
            workload.task()
        except DataUnavailable as exc:
            _mark_unavailable(outcome, name[0], str(exc))
    return [s for s in todo if s.workload not in outcome.unavailable]


def _mark_unavailable(outcome: Outcome, workload: str, why: str) -> None:
    assert outcome.unavailable is not None
    if workload not in outcome.unavailable:
        print(f"skipping {workload}: {why}", file=sys.stderr)
    outcome.unavailable[workload] = why


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    """A rich progress bar over runs (a no-op when disabled or when there is nothing to run)."""
    if not enabled or total == 0:
        yield lambda spec: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress("[progress.description]{task.description}", *columns) as bar:
        task = bar.add_task("bench", total=total)

        def advance(spec: RunSpec) -> None:
            bar.update(task, advance=1, description=f"{spec.workload} {spec.method} s{spec.seed}")

        yield advance
