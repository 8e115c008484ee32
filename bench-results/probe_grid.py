"""What the probes of kinds of run selftune was not built for share (``gan/gan.py``,
``policy-gradient/cartpole.py``, ``full-batch/fit.py``, ``small-batch/digits.py``,
``multi-task/alternate.py``, ``label-noise/digits.py``; ``groups/groups.py`` and
``schedules/schedules.py`` run their jobs with :func:`run_rows` and :func:`train_row`, and
``muon/muon.py``, ``rmsprop/rmsprop.py``, ``bases/bases.py`` and ``clipping/clipping.py`` race a
grid with :func:`steps_row`, :func:`tuned_handle` and :func:`oracle_table`, as
``batch-size/batch.py`` races the benchmark's own, the last three from :func:`command`'s command
line, and trace a run with :func:`trace`; ``momentum-factor/grid.py`` races several grids so,
its rows and ``bases.py``'s built by :func:`optimizer_method`, each grid's best read by
:func:`fastest`): every variant on every seed, on two processes, the
results written next to the probe's script as ``results.json`` and ``table.md``, and the pieces
of a run's row and of the table that more than one of them has."""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

Row = dict[str, Any]
#: a column of a probe's table: its header, its alignment rule (``---`` or ``---:``), and its
#: cell from one variant's rows
Column = tuple[str, str, Callable[[list[Row]], str]]


def train_steps(task: Any, model: Any, opt: Any, gen: Any, batch: int, n: int) -> list[float]:
    """``n`` training steps on batches of ``batch`` drawn with ``gen``; the minibatch losses.
    selftune's wrapper is given each loss, as a loop that has it would give it
    (``gap-decomposition/later.py``, ``batch-size/noise.py``)."""
    import selftune

    losses = []
    for _ in range(n):
        loss = task.loss(model, task.batch(batch, gen))
        opt.zero_grad()
        loss.backward()
        if isinstance(opt, selftune.SelfTuned):
            opt.step(loss=loss.detach())
        else:
            opt.step()
        losses.append(loss.item())
    return losses


def run_grid(
    run: Callable[[str, int], Row],
    variants: Sequence[str],
    seeds: Iterable[int],
    columns: list[Column],
    here: Path,
    workers: int = 2,
) -> list[Row]:
    """``run(variant, seed)`` for each seed and, within it, each variant; write the rows and
    their table (:func:`table`), and print the table."""
    jobs = [(v, s) for s in seeds for v in variants]
    with ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(run, *zip(*jobs, strict=True)))
    (here / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    text = table(rows, variants, columns)
    (here / "table.md").write_text(text, encoding="utf-8")
    print(text)
    return rows


def run_rows(
    run: Callable[[Any], Row],
    jobs: list[Any],
    out: Path,
    workers: int = 2,
    kept: Sequence[Row] = (),
) -> list[Row]:
    """``run(job)`` for each job on ``workers`` processes; each row is printed and ``out``
    rewritten as it comes, after the rows ``kept`` (an earlier run's), so a probe of many
    minutes keeps the runs it finished."""
    rows: list[Row] = list(kept)
    with ProcessPoolExecutor(workers) as pool:
        for row in pool.map(run, jobs):
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return rows


def run_missing(
    run: Callable[[Any], Row], jobs: list[tuple[str, str, int]], out: Path
) -> list[Row]:
    """The rows already in ``out`` and, after them, ``run(job)`` for each job (workload, row,
    seed) not among them (:func:`run_rows`): a probe given more rows runs those alone."""
    kept = json.loads(out.read_text(encoding="utf-8")) if out.exists() else []
    done = {(r["workload"], r["row"], r["seed"]) for r in kept}
    return run_rows(run, [j for j in jobs if j not in done], out, kept=kept)


def command(
    run: Callable[[Any], Row],
    jobs: list[tuple[str, str, int]],
    here: Path,
    build: Callable[[str], Any] | None = None,
) -> list[Row] | None:
    """A probe's command line: ``--trace WORKLOAD ROW SEED`` traces one run of ``build(ROW)``
    (:func:`trace`) and returns None; ``--table`` returns the rows of ``here/results.json``;
    with no argument the jobs not yet there are run first (:func:`run_missing`)."""
    if sys.argv[1:2] == ["--trace"] and build is not None:
        workload, row, seed = sys.argv[2:]
        trace(workload, build(row), int(seed), here / f"trace-{workload}-{row}-{seed}.txt")
        return None
    out = here / "results.json"
    if sys.argv[1:] not in ([], ["--table"]):
        raise SystemExit(f"usage: {sys.argv[0]} [--table | --trace WORKLOAD ROW SEED]")
    if not sys.argv[1:]:
        run_missing(run, jobs, out)
    return json.loads(out.read_text(encoding="utf-8"))


def train_row(name: Any, method: Any, seed: int, key: Row, fields: Sequence[str]) -> Row:
    """Train ``method`` on the workload ``name`` (or a changed :class:`Workload`, given as it
    is) from ``seed`` on one thread, as the benchmark does; the row is ``key`` and the run
    record's ``fields``."""
    from selftune.bench import workloads
    from selftune.bench.runner import one_thread, train

    (workload,) = workloads.select([name]) if isinstance(name, str) else (name,)
    with one_thread():
        record = train(workload, method, seed)
    return {**key, **{field: record[field] for field in fields}}


def table(rows: list[Row], variants: Sequence[str], columns: list[Column]) -> str:
    """A markdown table, one line per variant: its name, then each column's cell of its rows."""
    lines = [
        "| variant | " + " | ".join(head for head, _, _ in columns) + " |",
        "|---|" + "|".join(rule for _, rule, _ in columns) + "|",
    ]
    for v in variants:
        mine = of_variant(rows, v)
        lines.append(f"| {v} | " + " | ".join(cell(mine) for _, _, cell in columns) + " |")
    return "\n".join(lines) + "\n"


def count_guard_events(opt: Any, key: Callable[[dict[str, Any]], str] | None = None) -> Counter:
    """A counter, kept as ``opt`` trains, of its guard's events by ``key`` (default: the
    event's name)."""
    events: Counter[str] = Counter()
    name = key or (lambda guard: guard["event"])
    opt.add_listener(lambda e: events.update([name(e.guard)]) if e.guard else None)
    return events


def accuracy_columns() -> list[Column]:
    """The columns of a probe whose runs end on a test accuracy (``accuracy``) and may stop
    with ``GuardError`` (``stopped``): the accuracy per seed and its median, the runs stopped,
    the rate at the end and the guard's events."""
    return [
        ("test accuracy per seed", "---", lambda m: per_seed(m, lambda r: f"{r['accuracy']:.3f}")),
        ("median", "---:", lambda m: f"{statistics.median(r['accuracy'] for r in m):.3f}"),
        ("stopped by GuardError", "---:", lambda m: str(sum(r["stopped"] is not None for r in m))),
        ("rate at the end", "---", rates),
        ("guard events (all seeds)", "---", events_total),
    ]


def of_variant(rows: list[Row], variant: str) -> list[Row]:
    """The rows of one variant, in seed order."""
    return [r for r in rows if r["variant"] == variant]


def per_seed(rows: list[Row], cell: Callable[[Row], str]) -> str:
    """One table cell: ``cell`` of each row, comma-separated."""
    return ", ".join(cell(r) for r in rows)


def rates(rows: list[Row]) -> str:
    """The rates at the end, ``-`` for a plain run (rate None)."""
    return per_seed(rows, lambda r: "-" if r["rate"] is None else f"{r['rate']:.2g}")


def events_total(rows: list[Row]) -> str:
    """The guard's events of all the rows, summed by kind (``-`` for none)."""
    total: Counter[str] = Counter()
    for r in rows:
        total.update(r["events"])
    return ", ".join(f"{k} {n}" for k, n in sorted(total.items())) or "-"


def median_steps(rows: list[Row], workload: str, row: str) -> tuple[float | None, int, int]:
    """The median steps to target of a row's runs on a workload (None unless more than half the
    seeds hit, a miss counting as more steps than any hit), its hits and its runs."""
    steps = [r["steps_to_target"] for r in rows if r["workload"] == workload and r["row"] == row]
    hits = sum(s is not None for s in steps)
    if hits * 2 <= len(steps) or not steps:
        return None, hits, len(steps)
    inf = float("inf")
    return statistics.median(s if s is not None else inf for s in steps), hits, len(steps)


def optimizer_method(
    row: str, base: str, make_opt: Callable[..., Any], lr: float, seeds: int
) -> Any:
    """The method of a probe's ``row`` over the optimizer ``make_opt(params, lr=lr)``: the plain
    optimizer, or, for a row named ``selftune-...``, it wrapped by ``auto`` as the benchmark's
    `auto` rows are (:func:`tuned_handle`); ``base`` names it in the run's record."""
    from selftune.bench.methods import Handle, Method

    def make(model: Any, s: Any) -> Any:
        import selftune

        opt = make_opt(model.parameters(), lr=lr)
        if not row.startswith("selftune-"):
            return Handle(opt)
        return tuned_handle(selftune.wrap(opt, "auto", seed=s.seed), s)

    return Method(row, "probe", base, make, seeds, lr)


def grid_rate(row: str) -> float:
    """The rate of a probe's grid row, named ``...-grid-<rate>``."""
    return float(row.split("-grid-")[1])


def fastest(
    rows: list[Row], workload: str, grid: Sequence[str], rate: Callable[[str], float] = grid_rate
) -> float | None:
    """The ``rate`` of the ``grid`` row with the least median steps on ``workload`` (the lower
    rate on a tie); None if none hits in more than half its seeds."""
    found = [
        (m, rate(row)) for row in grid if (m := median_steps(rows, workload, row)[0]) is not None
    ]
    return min(found)[1] if found else None


def oracle_table(
    rows: list[Row],
    workloads: Sequence[str],
    columns: Sequence[str],
    grid: Sequence[str],
    tuned: str | Sequence[str],
) -> str:
    """Median steps to target per row (``columns``) and workload, with the hits of the seeds;
    a median only where more than half the seeds hit.  The least median of the ``grid`` rows
    is the oracle, and each ``tuned`` row's median is also given against it (``muon/muon.py``,
    ``rmsprop/rmsprop.py``)."""
    tuned = [tuned] if isinstance(tuned, str) else list(tuned)

    def median(workload: str, row: str) -> tuple[float | None, int, int]:
        return median_steps(rows, workload, row)

    lines = [
        "| workload | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    ratios: dict[str, list[str]] = {row: [] for row in tuned}
    for w in workloads:
        medians = [m for row in grid if (m := median(w, row)[0]) is not None]
        oracle = min(medians) if medians else None
        cells = []
        for row in columns:
            value, hits, n = median(w, row)
            cell = "miss" if value is None else f"{value:g}"
            if value is not None and oracle is not None and row in ratios:
                ratios[row].append(f"{w}: {value / oracle:.2f}x")
                cell += f" ({value / oracle:.2f}x)"
            cells.append(f"{cell} [{hits}/{n}]")
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    for row, theirs in ratios.items():
        if theirs:
            lines += ["", f"`{row}` against the oracle: " + ", ".join(theirs)]
    return "\n".join(lines) + "\n"


def trace(workload: Any, method: Any, seed: int, out: Path) -> None:
    """Train ``method`` on ``workload`` (a name, or a changed :class:`Workload`, named in the
    output by its name and batch size) from ``seed`` as the benchmark does, its ``selftune.wrap``
    given a log folder; print the steps to target and every decision of the log (the range
    test's growth folded into its first and last step), and write the same to ``out``
    (``muon/trace.py``, ``rmsprop.py --trace``)."""
    import tempfile

    import selftune
    from selftune.bench import workloads
    from selftune.bench.runner import one_thread, train

    folder = Path(tempfile.mkdtemp()) / "run"
    wrap = selftune.wrap

    def logged(*args: Any, **kwargs: Any) -> selftune.SelfTuned:
        return wrap(*args, **kwargs, log_dir=folder)

    selftune.wrap = logged  # the probe's own row, with a log
    try:
        (chosen,) = workloads.select([workload]) if isinstance(workload, str) else (workload,)
        with one_thread():
            record = train(chosen, method, seed)
    finally:
        selftune.wrap = wrap
    label = (
        workload if isinstance(workload, str) else f"{workload.name} batch {workload.batch_size}"
    )
    lines = [f"{label} seed {seed}: steps to target {record['steps_to_target']}"]
    ramp: list[dict[str, Any]] = []
    for line in (folder / "decisions.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("kind") not in ("decision", "guard"):
            continue
        if r.get("kind") == "decision" and str(r["reason"]).startswith("range test: steps not"):
            ramp.append(r)
            continue
        lines.extend(_ramp(ramp))
        ramp = []
        what = r.get("event") if r["kind"] == "guard" else f"{r['old']:.4g} -> {r['new']:.4g}"
        lines.append(f"step {r['step']} group {r.get('group', '-')} {what}: {r.get('reason')}")
    lines.extend(_ramp(ramp))
    text = "\n".join(lines) + "\n"
    out.write_text(text, encoding="utf-8")
    print(text, end="")


def _ramp(ramp: list[dict[str, Any]]) -> list[str]:
    """The range test's growth, one line per group: from its first step to its last."""
    out = []
    for group in sorted({r["group"] for r in ramp}):
        mine = [r for r in ramp if r["group"] == group]
        out.append(
            f"steps {mine[0]['step']}-{mine[-1]['step']} group {group} "
            f"{mine[0]['old']:.4g} -> {mine[-1]['new']:.4g}: range test, growing"
        )
    return out


def tuned_handle(opt: Any, s: Any, **handle: Any) -> Any:
    """The benchmark's handle of a wrapped optimizer, as its `auto` rows have it: told the loss at
    every step and the metric after every evaluation, its rate read from ``hyperparams``;
    ``handle``: the rest of the handle (a scheduler)."""
    from selftune.bench.methods import Handle, _selftune_lr

    mode = "max" if s.higher_is_better else "min"
    return Handle(
        opt,
        pass_loss=True,
        lr_of=_selftune_lr,
        metric_to=lambda value: opt.observe(value, mode=mode),
        **handle,
    )


def steps_row(method: Any, job: tuple[str, str, int], workload: Any = None) -> Row:
    """One run of a probe raced against a grid (``job``: workload, row, seed): its steps to
    target, budget, divergence and error, and its rate at the end. ``workload``: a changed
    :class:`Workload` to train on instead of the one ``job`` names (``batch-size/batch.py``'s
    larger batches), ``job``'s name then labelling the row."""
    label, row, seed = job
    key = {"workload": label, "row": row, "seed": seed}
    fields = ("steps_to_target", "steps_budget", "diverged", "error", "curves")
    record = train_row(workload or label, method, seed, key, fields)
    record["final_lr"] = record.pop("curves")["lr"][-1]
    return record
