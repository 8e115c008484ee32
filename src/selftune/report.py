"""``selftune report RUN``: one self-contained HTML page that shows what a run tuned, and why.

The page holds plots of the loss, the learning rate and momentum/β per param group, with every
decision and guard event marked, a table of the decisions with their reasons, and the manifest.
Plots are PNGs embedded as base64 data URIs and the CSS is inline, so the file can be mailed,
attached to a CI run or opened offline; the same PNGs are also written to ``RUN/plots/``.

Decisions come from the audit log (:func:`selftune.audit.iter_log`, which checks the hash chain);
the per-step loss and knobs come from ``trace.jsonl`` when the run wrote one. Without a trace the
knob curves are rebuilt from the decisions as step functions and no loss is drawn.

matplotlib is imported only inside the plotting helpers: ``selftune report --help`` and
``selftune watch`` (which reuses the readers here) must not pay for it.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
import warnings
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from selftune.audit import LogError, follows, is_joint, is_step, iter_log, leader_row
from selftune.cli import UsageError
from selftune.files import write_whole
from selftune.terminal import printable

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TRACE = "trace.jsonl"
PLOTS = "plots"
#: the Software text every plot's PNG carries: a later report writes over a file of its plots'
#: names in ``RUN/plots`` only when it bears this, and so is one of its own
PLOT_MARK = "selftune report"
#: knobs drawn on the second knob plot, in legend order; "lr" has a plot of its own
MOMENTUM_KNOBS = ("momentum", "beta1", "beta2")
GUARD_RED = "#d62728"
#: one colour per param group (matplotlib's tab10, so groups look the same in every plot)
GROUP_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


# --------------------------------------------------------------------------- reading a run


def as_float(value: Any) -> float | None:
    """A logged number as a float: the log writes NaN and infinities as "nan", "inf", "-inf".

    A whole number past a float's range (JSON reads one exactly; the writers write none) is
    the infinity of its sign, as JSON's own ``1e400`` reads: float() raised OverflowError,
    which ended the report and the watch in a traceback on a trace row or a signal.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def parse_trace_line(line: bytes, where: str) -> dict[str, Any]:
    """Parse one ``trace.jsonl`` row: ``{"step": int, "loss": float|null, "hp": [{...}, ...]}``."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # (no UTF-8 or JSON; thousands of digits, deep nesting)
        raise LogError(
            f"{where}: not a JSON line — the trace was damaged (it has no hash chain: the "
            "decision log, which verify checks, is the record)"
        ) from None
    if not (
        isinstance(row, dict)
        and is_step(row.get("step"))  # (one past a signed 64-bit column ended the report)
        and isinstance(row.get("hp"), list)
        and all(isinstance(group, dict) for group in row["hp"])
    ):
        raise LogError(
            f"{where}: expected {{'step': int, 'loss': ..., 'hp': [...]}}, got {row!r:.80}"
        )
    return row


def iter_trace(folder: Path) -> Iterator[dict[str, Any]]:
    """The complete rows of ``trace.jsonl`` in order, each read as it is asked for (a replay
    follows a long run's trace without holding it); none when the run wrote none.

    A torn final line (a crash mid-write, or a run still writing) is left out, as in the audit log.
    """
    path = folder / TRACE
    try:
        with path.open("rb") as trace:
            for number, line in enumerate(trace, start=1):
                if not line.endswith(b"\n"):
                    return  # the piece after the last newline is torn
                if line.strip():
                    yield parse_trace_line(line, f"{path} line {number}")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LogError(f"cannot read {path}: {exc.strerror or exc}") from None


def blocks_back(file: BinaryIO, end: int, block: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
    """The bytes of ``file`` before ``end`` as (offset, bytes) blocks, the last block first."""
    while end > 0:
        lo = max(0, end - block)
        file.seek(lo)
        yield lo, file.read(end - lo)
        end = lo


def lines_back(file: BinaryIO, end: int, block: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
    """The complete lines of ``file`` before ``end`` as (offset, line without its newline), the
    last line first; what follows the last newline is torn (a writer mid-line), not a line."""
    carry, torn = b"", True  # carry: the start of a line that may begin in an earlier block
    for lo, data in blocks_back(file, end, block):
        *pieces, last = (data + carry).split(b"\n")
        if not pieces:  # no newline in this block: the line goes on before it
            carry = last
            continue
        at = lo + len(data) + len(carry) - len(last)  # where ``last`` begins
        if not torn:
            yield at, last
        torn = False
        for piece in reversed(pieces[1:]):
            at -= len(piece) + 1
            yield at, piece
        carry = pieces[0]
    if carry and not torn:  # the file's first line
        yield 0, carry


def trace_size_through(path: Path, step: int, block: int = 1 << 16) -> int:
    """The size ``trace.jsonl`` has when it holds its rows up to ``step`` and no later one.

    A resumed run cuts its trace there, so that no step appears twice. Steps only grow along a
    trace (a step the guard rolled back is traced too), so the rows are read from the end: a
    resume after a crash reads only the rows it drops. The step, not a size saved with the
    checkpoint, marks the cut, since a folder that continues another run's checkpoint holds none
    of that run's rows (a retried continuation kept its first attempt's steps).
    """
    return trace_cut(path, step, block)[0]


def trace_cut(path: Path, step: int, block: int = 1 << 16) -> tuple[int, int | None, int]:
    """:func:`trace_size_through`, the step of the last row it keeps (None: no row), and how
    many rows that do not parse it passed over on the way there.

    Such rows (blocks a power cut left as NULs, an edit) lie past the row kept and go with the
    rows the cut drops: a resume refused over them had cut the log back and loaded the
    optimizer already, and every later resume from that checkpoint met them again.
    """
    damaged = 0
    with open(path, "rb") as f:
        for start, line in lines_back(f, f.seek(0, io.SEEK_END), block):
            try:
                row = parse_trace_line(line, f"{path} at byte {start}")
            except LogError:
                damaged += 1
                continue
            if row["step"] <= step:
                return start + len(line) + 1, row["step"], damaged
    return 0, None, damaged


@dataclass(frozen=True)
class Series:
    """One curve: x are optimizer steps; ``stepwise`` curves hold their value until the next x."""

    steps: MutableSequence[int]
    values: MutableSequence[float]
    stepwise: bool = False


@dataclass(frozen=True)
class Trace:
    """The trace's rows as columns of numbers: a long run's rows, held as parsed JSON, took
    a dict per step and one per group in it, where columns take a few numbers a step."""

    steps: array[int] = field(default_factory=lambda: array("q"))
    #: each step's loss; NaN where none was given or it was not finite
    loss: array[float] = field(default_factory=lambda: array("d"))
    #: the steps whose loss was given and was not finite
    not_finite: list[int] = field(default_factory=list)
    metric: Series = field(default_factory=lambda: Series(array("q"), array("d")))
    #: each (group, knob)'s value after each step that held it
    knobs: dict[tuple[int, str], Series] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, row: dict[str, Any]) -> None:
        """Add one row of ``trace.jsonl``, as :func:`parse_trace_line` returns it."""
        step = row["step"]
        self.steps.append(step)
        loss = as_float(row.get("loss"))
        self.loss.append(math.nan if loss is None else loss)
        if loss is not None and not math.isfinite(loss):
            self.not_finite.append(step)
        if "metric" in row:
            value = as_float(row["metric"])
            self.metric.steps.append(step)
            self.metric.values.append(math.nan if value is None else value)
        for group, knobs in enumerate(row["hp"]):
            for knob, value in knobs.items():
                number = as_float(value)
                curve = self.knobs.get((group, knob))
                if curve is None:
                    curve = self.knobs[(group, knob)] = Series(array("q"), array("d"))
                curve.steps.append(step)
                curve.values.append(math.nan if number is None else number)


@dataclass(frozen=True)
class Decisions:
    """Every decision as the plots draw it, in log order, in columns of numbers: its curve (an
    index in ``curves``), its step, its new value, whether the policy clipped it.  A record
    held whole took some 2 KB, where these take some 20 bytes."""

    #: each (group, knob) decided on, by index, in the order of its first decision
    curves: dict[tuple[int, str], int] = field(default_factory=dict)
    #: each curve's value before its first decision, by index
    olds: list[float] = field(default_factory=list)
    curve: array[int] = field(default_factory=lambda: array("I"))
    steps: array[int] = field(default_factory=lambda: array("q"))
    new: array[float] = field(default_factory=lambda: array("d"))
    clipped: array[int] = field(default_factory=lambda: array("b"))
    #: the steps of the decisions that read the metric given to ``observe``
    metric_steps: array[int] = field(default_factory=lambda: array("q"))

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, record: dict[str, Any]) -> None:
        """Add one decision record (checked as :func:`~selftune.audit.read_log` checks them)."""
        index = self.curves.setdefault((int(record["group"]), str(record["knob"])), len(self.olds))
        if index == len(self.olds):
            self.olds.append(_nan_if_none(as_float(record["old"])))
        self.curve.append(index)
        self.steps.append(int(record["step"]))
        self.new.append(_nan_if_none(as_float(record["new"])))
        self.clipped.append(bool(record["clipped"]))
        if "metric" in record.get("signals", {}):
            self.metric_steps.append(int(record["step"]))

    def where(self, curves: Iterable[int], clipped: bool | None = None) -> Any:
        """A mask of the decisions on ``curves``, those the policy clipped or not (None: both)."""
        import numpy as np

        mask = np.isin(as_numpy(self.curve), list(curves))
        if clipped is not None:
            mask &= as_numpy(self.clipped) == clipped
        return mask

    def points(self, mask: Any) -> tuple[Any, Any]:
        """The steps and new values of the decisions in ``mask``, as numpy arrays."""
        return as_numpy(self.steps)[mask], as_numpy(self.new)[mask]


def as_numpy(column: array[Any]) -> Any:
    """``column`` as a numpy array over its memory (numpy reads the array's type code)."""
    import numpy as np

    return np.frombuffer(column, column.typecode)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


class LogSummary:
    """What the page shows of the audit log, gathered record by record in one pass over it: the
    guard events whole, each decision as a few numbers (:class:`Decisions`), the rows of the
    decisions table (:class:`DecisionRows`), counts and the first and last step.

    The report had held every record of the log, some 2 KB a decision: a run of a million
    steps could not be reported on an ordinary machine.
    """

    def __init__(self, joint: bool, rows: int) -> None:
        self.joint = joint
        self.guards: list[dict[str, Any]] = []
        self.decisions = Decisions()
        self.table = DecisionRows(joint, rows)
        #: a joint run's decisions that made the change of another group alike on their own
        self.followers = 0
        #: the param groups added mid-run (``add_param_group``), which the manifest lacks
        self.groups_added = 0
        self.first_step: int | None = None
        self.last_step: int | None = None

    def add(self, record: dict[str, Any]) -> None:
        """Take in the log's next record."""
        step = record.get("step")
        if isinstance(step, int):
            self.first_step = step if self.first_step is None else min(self.first_step, step)
            self.last_step = step if self.last_step is None else max(self.last_step, step)
        if record.get("kind") == "guard":
            self.guards.append(record)
        elif record.get("kind") == "decision":
            self.decisions.add(record)
            self.followers += self.joint and follows(record) is not None
        elif record.get("kind") == "group":
            self.groups_added += 1
        self.table.add(record)

    @property
    def changes(self) -> int:
        """The controller's changes: the decisions but a joint run's followers."""
        return len(self.decisions) - self.followers


@dataclass(frozen=True)
class Run:
    """A run folder as the report sees it."""

    folder: Path
    manifest: dict[str, Any]
    #: what the page shows of the audit log's records
    log: LogSummary
    #: the audit log's last line was torn by a crash and is not shown
    torn_tail: bool
    trace: Trace
    #: why the trace's rows end before its end (a damaged or unreadable line), if they do
    trace_damage: str | None = None

    @property
    def groups(self) -> int:
        """The param groups the run ended with: the manifest's, and those added mid-run (the
        page said the manifest's alone, 1 beside the plots of 2 groups)."""
        return len(self.manifest.get("param_groups") or []) + self.log.groups_added

    @property
    def last_step(self) -> int | None:
        steps = list(self.trace.steps[-1:])
        steps += [] if self.log.last_step is None else [self.log.last_step]
        return max(steps) if steps else None


def _no_rows(path: Path) -> str:
    """Why a run has no trace rows: no file, an empty one, or bytes with no line's end, which
    the page had called no file at all (the trace has no hash chain: ``verify`` never reads
    it, and this is where its damage shows)."""
    size = path.stat().st_size if path.is_file() else None
    if size is None:
        return f"No {path.name} in this run folder"
    if size == 0:
        return f"{path.name} holds no row yet"
    return (
        f"{path.name} holds {size} bytes and no complete row (a run stopped while writing its "
        "first, or damage)"
    )


def read_run(run_dir: str | Path, rows: int = 50) -> Run:
    """Read and check a run folder; raise :class:`LogError` saying what is missing or damaged.

    ``rows`` (at least 1): how many decisions the table lists from each end of the log; the
    others are counted as the log is read, and let go.
    """
    folder = Path(run_dir).expanduser()
    # iter_log checks every record's fields besides the chain, as verify does: a record with
    # an intact chain but a field missing or of the wrong type is named by its line, not left
    # to end the report in a KeyError
    records = iter_log(folder)
    log = LogSummary(is_joint(records.manifest), rows)
    for record in records:
        log.add(record)
    trace = Trace()
    try:  # the trace has no chain: the log is the record, and the page shows what it has
        for row in iter_trace(folder):
            trace.add(row)
        damage = None
    except LogError as err:
        damage = str(err)
    return Run(folder, records.manifest, log, records.torn_tail, trace, damage)


# --------------------------------------------------------------------------- series to plot


def loss_series(run: Run) -> Series:
    """The loss of every traced step; NaN where the loss was missing or not finite."""
    return Series(run.trace.steps, run.trace.loss)


def metric_series(run: Run) -> Series:
    """The metric given to ``observe``, at the steps that read it; NaN where it was not finite."""
    return run.trace.metric


def loss_span(finite: int) -> float:
    """The span of the loss's moving average, from the number of its ``finite`` values: the
    plot's line and the page's "final loss" card read the same average (the card's span of 10
    stood beside a line of span 200 on a long run)."""
    return min(max(finite / 30, 10), 200)


def ema(values: Sequence[float], span: float) -> list[float]:
    """Bias-corrected exponential moving average that steps over NaN and infinities.

    Bias correction (as in Adam) keeps the first points at the data's level instead of near zero;
    non-finite points repeat the last average so that one blown-up step does not poison the rest.
    """
    alpha = 2.0 / (span + 1.0)
    average, weight, out = 0.0, 0.0, []
    for value in values:
        if math.isfinite(value):
            average = (1 - alpha) * average + alpha * value
            weight = (1 - alpha) * weight + alpha
        out.append(average / weight if weight else math.nan)
    return out


def knob_series(run: Run) -> dict[tuple[int, str], Series]:
    """Each (group, knob)'s value over the steps, from the trace or, without one, the decisions."""
    if run.trace:
        return run.trace.knobs
    series: dict[tuple[int, str], Series] = {}
    first = 0 if run.log.first_step is None else run.log.first_step
    decided = run.log.decisions
    for key, index in decided.curves.items():
        steps, values = decided.points(decided.where([index]))
        # the value before the first change held from the first step
        series[key] = Series(
            array("q", [first]) + array("q", steps.tobytes()),
            array("d", [decided.olds[index]]) + array("d", values.tobytes()),
            stepwise=True,
        )
    last = run.last_step
    for curve in series.values():  # hold the last value to the end of the run
        if last is not None and curve.steps[-1] < last:
            curve.steps.append(last)
            curve.values.append(curve.values[-1])
    return series


# --------------------------------------------------------------------------- plots


def _figure(height: float) -> Figure:
    # A bare Figure renders with Agg and leaves pyplot's global state (and a user's interactive
    # backend) alone, which matters when write_report is called from a notebook or a training job.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height), dpi=110, layout="constrained")
    fig.patch.set_facecolor("white")
    return fig


def _style(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _mark_guards(ax: Axes, guards: Sequence[dict[str, Any]]) -> None:
    """Red dashed lines at guard events, labelled G1, G2, ... as in the page's guard table."""
    for number, guard in enumerate(guards, start=1):
        ax.axvline(guard["step"], color=GUARD_RED, linestyle="--", linewidth=1.2, alpha=0.8)
        if len(guards) <= 30:  # beyond that the labels only overlap
            ax.annotate(
                f"G{number}",
                (guard["step"], 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                color=GUARD_RED,
                fontsize=8,
                fontweight="bold",
            )
    if guards:
        ax.plot([], [], color=GUARD_RED, linestyle="--", label="guard event")


#: the most points a curve is drawn with: a plot is about a thousand pixels wide
MOST_POINTS = 4000


def thinned(steps: Sequence[int], values: Sequence[float]) -> tuple[Any, Any]:
    """``steps`` and ``values`` as drawn: past :data:`MOST_POINTS`, each of ``MOST_POINTS / 2``
    runs of consecutive points keeps its lowest and its highest, in step order, so that a
    spike or a dip survives where every k-th point would drop it (a run of hundreds of
    thousands of steps took seconds a curve to draw, each point below a pixel), and the last
    point is kept, where the line ends; a run with no finite value keeps one NaN, its gap in
    the line (a shorter gap is narrower than a pixel, and is not drawn)."""
    import numpy as np

    x, y = np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
    if len(x) <= MOST_POINTS:
        return x, y
    width = -(-len(x) // ((MOST_POINTS - 1) // 2))  # (and the last point)
    runs = -(-len(x) // width)  # the last one holds a point at least
    pad = runs * width - len(x)
    ys = np.concatenate([y, np.full(pad, np.nan)]).reshape(runs, width)
    empty = np.isnan(ys).all(axis=1)
    safe = np.where(empty[:, None], 0.0, ys)  # (nanargmin refuses a row of NaN alone)
    low = np.where(np.isnan(safe), np.inf, safe).argmin(axis=1)
    high = np.where(np.isnan(safe), -np.inf, safe).argmax(axis=1)
    first, second = np.minimum(low, high), np.maximum(low, high)
    starts = np.arange(runs) * width
    index = np.stack([starts + first, starts + second], axis=1).ravel()
    keep = np.stack([np.ones(runs, bool), ~empty & (second != first)], axis=1).ravel()
    gap = np.repeat(empty, 2)[keep]
    index = index[keep]
    if index[-1] != len(x) - 1:  # the last point, where the line ends
        index, gap = np.append(index, len(x) - 1), np.append(gap, False)
    out = y[index].copy()
    out[gap] = np.nan
    return x[index], out


def _loss_plot(run: Run, guards: Sequence[dict[str, Any]]) -> Figure | None:
    import numpy as np

    loss = loss_series(run)
    finite = [v for v in loss.values if math.isfinite(v)]
    if not finite:
        return None
    fig = _figure(3.4)
    ax = fig.add_subplot()
    span = loss_span(len(finite))
    ax.plot(
        *thinned(loss.steps, loss.values), color="#1f77b4", alpha=0.3, linewidth=0.8, label="loss"
    )
    ax.plot(
        *thinned(loss.steps, ema(loss.values, span)),
        color="#1f77b4",
        linewidth=2,
        label=f"EMA (span {span:.0f})",
    )
    _log_scale_if_wide(ax, finite)
    # Steps whose loss was given but not finite (a step without a loss is just left blank).
    bad = run.trace.not_finite
    if bad:
        ax.plot(
            bad,
            [0.9] * len(bad),
            "x",
            color=GUARD_RED,
            transform=ax.get_xaxis_transform(),
            label="loss not finite",
        )
    decision_steps = np.unique(as_numpy(run.log.decisions.steps))
    if len(decision_steps):  # a rug along the bottom: where the controller acted
        ax.plot(
            decision_steps,
            [0.02] * len(decision_steps),
            "|",
            color="#555",
            markersize=8,
            alpha=0.6,
            transform=ax.get_xaxis_transform(),
            label="decision",
        )
    _mark_guards(ax, guards)
    _style(ax, "Loss", "loss")
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return fig


def _log_scale_if_wide(ax: Axes, finite: Sequence[float]) -> None:
    """A log axis for positive values spanning more than 30x: a spike before a rollback, or a
    validation loss falling by orders of magnitude, would flatten the rest on a linear one."""
    if min(finite) > 0 and max(finite) / min(finite) > 30:
        ax.set_yscale("log")


def _metric_plot(run: Run, guards: Sequence[dict[str, Any]]) -> Figure | None:
    """The evaluation metric, one point per evaluation, and the steps that decided on one."""
    metric = metric_series(run)
    if not any(math.isfinite(v) for v in metric.values):
        return None
    fig = _figure(3.0)
    ax = fig.add_subplot()
    ax.plot(metric.steps, metric.values, "o-", color="#2ca02c", markersize=3, label="metric")
    _log_scale_if_wide(ax, [v for v in metric.values if math.isfinite(v)])
    read = sorted(set(run.log.decisions.metric_steps))
    for step in read:
        ax.axvline(step, color="#555", alpha=0.4, linewidth=1)
    if read:
        ax.plot([], [], color="#555", alpha=0.4, label="decision on reading it")
    _mark_guards(ax, guards)
    _style(ax, "Evaluation metric", "metric")
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return fig


def _knob_plot(
    run: Run,
    series: dict[tuple[int, str], Series],
    knobs: Sequence[str],
    title: str,
    log_y: bool,
    guards: Sequence[dict[str, Any]],
) -> Figure | None:
    curves = {key: s for key, s in series.items() if key[1] in knobs}
    if not curves:
        return None
    fig = _figure(3.0)
    ax = fig.add_subplot()
    groups = sorted({group for group, _ in curves})
    colour_of = _group_colours(fig, ax, groups)
    many = len(groups) > len(GROUP_COLOURS)
    styles = dict(zip(knobs, ("-", "--", ":"), strict=False))
    for (group, knob), curve in sorted(curves.items()):
        colour = colour_of(group)
        label = f"group {group}" if len(knobs) == 1 else f"{knob}, group {group}"
        if many:  # the colour bar names the groups; a knob's line style, one entry each
            label = knob if group == groups[0] and len(knobs) > 1 else "_nolegend_"
        ax.plot(
            *thinned(curve.steps, curve.values),
            color=colour,
            linestyle=styles[knob],
            linewidth=1.6,
            label=label,
            drawstyle="steps-post" if curve.stepwise else "default",
        )
    decided = run.log.decisions
    for clipped in (False, True):  # decisions on their curves; the policy's clips drawn hollow
        for group in groups:
            on = [i for (g, knob), i in decided.curves.items() if g == group and knob in knobs]
            steps, values = decided.points(decided.where(on, clipped))
            if len(steps):
                colour = colour_of(group)
                ax.plot(
                    steps,
                    values,
                    "o",
                    markersize=3.5,
                    color=colour,
                    markerfacecolor="white" if clipped else colour,
                    linestyle="none",
                )
    on = [i for (_, knob), i in decided.curves.items() if knob in knobs]
    if decided.where(on, False).any():  # (a legend of dots where none is drawn: a run
        ax.plot([], [], "o", color="#555", markersize=3.5, label="decision")  # under off)
    if decided.where(on, True).any():
        ax.plot(
            [],
            [],
            "o",
            color="#555",
            markerfacecolor="white",
            markersize=3.5,
            label="decision (clipped by policy)",
        )
    if log_y:
        ax.set_yscale("log")
    _mark_guards(ax, guards)
    _style(ax, title, " / ".join(knobs) if len(knobs) > 1 else knobs[0])
    ncols = 2 if len(ax.get_legend_handles_labels()[1]) > 4 else 1
    ax.legend(loc="best", fontsize=8, framealpha=0.9, ncols=ncols)
    return fig


def _group_colours(fig: Figure, ax: Axes, groups: Sequence[int]) -> Callable[[int], Any]:
    """Each group's colour: the palette's, one legend entry per group, up to as many groups as
    it has colours; past that (a rate per layer, tens to hundreds of groups) a colour map over
    the group index with a colour bar, where a legend entry per group had covered the plot and
    the palette's colours repeated."""
    if len(groups) <= len(GROUP_COLOURS):
        return lambda group: GROUP_COLOURS[group % len(GROUP_COLOURS)]
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    norm, cmap = Normalize(groups[0], groups[-1]), colormaps["viridis"]
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label="group", pad=0.01)
    return lambda group: cmap(float(norm(group)))


@dataclass(frozen=True)
class Plot:
    name: str
    caption: str
    png: bytes


def make_plots(run: Run) -> list[Plot]:
    """Render the run's plots as PNG bytes (a plot with nothing to draw is left out)."""
    guards = run.log.guards
    series = knob_series(run)
    momentum_knobs = [k for k in MOMENTUM_KNOBS if any(k == key[1] for key in series)]
    figures = [
        (
            "loss",
            "Loss per step (faint) and its moving average; red dashes: guard events.",
            _loss_plot(run, guards),
        ),
        (
            "metric",
            "The evaluation metric given to observe(), at the step that read it; grey lines: "
            "decisions taken at those steps.",
            _metric_plot(run, guards),
        ),
        (
            "lr",
            "Effective learning rate per param group (log scale); dots: decisions.",
            _knob_plot(run, series, ["lr"], "Learning rate", True, guards),
        ),
        (
            "momentum",
            "Momentum / β per param group; dots: decisions.",
            _knob_plot(run, series, momentum_knobs, "Momentum / β", False, guards)
            if momentum_knobs
            else None,
        ),
    ]
    plots = []
    for name, caption, fig in figures:
        if fig is not None:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", metadata={"Software": PLOT_MARK})
            plots.append(Plot(name, caption, buffer.getvalue()))
    return plots


# --------------------------------------------------------------------------- HTML

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#1d2327;background:#f4f5f7;margin:0}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:0 0 2px}h2{font-size:19px;margin:32px 0 10px}
.sub{color:#5f6b76;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:#5f6b76;font-size:13px}
.card.alert{border-color:#e8a7a7;background:#fff5f5}.card.alert b{color:#b42318}
.banner{background:#fff4e5;border:1px solid #f0c36d;border-radius:8px;padding:8px 14px;
 margin:14px 0}
figure{background:#fff;border:1px solid #dde1e6;border-radius:8px;margin:0 0 14px;padding:8px}
figure img{width:100%;height:auto;display:block}
figcaption{color:#5f6b76;font-size:13px;padding:2px 8px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e6;font-size:13.5px}
th,td{padding:5px 10px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
th{background:#eef0f3;font-weight:600}
td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
tr.guard td{background:#fdecec;color:#8a1c1c}tr.guard td:first-child{border-left:4px solid #d62728}
tr.note td{color:#5f6b76;font-style:italic}
tr.gap td{text-align:center;color:#5f6b76;background:#fafbfc}
.tag{display:inline-block;border-radius:4px;padding:0 6px;font-size:12px;font-weight:600}
.tag.guard{background:#d62728;color:#fff}.tag.clip{background:#f0c36d;color:#5a3d00}.tag.bound{background:#9467bd;color:#fff}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _shown(value: Any) -> str:
    """A logged value as text: a number to four digits, anything else as it is."""
    number = as_float(value)
    return str(value) if number is None else f"{number:.4g}"


def _num(value: Any) -> str:
    return _e(_shown(value))


def _change(record: dict[str, Any]) -> str:
    old, new = as_float(record["old"]), as_float(record["new"])
    text = f"{_num(record['old'])} → {_num(record['new'])}"
    if old and new is not None and math.isfinite(old) and math.isfinite(new):
        text += f" <span class=sub>(×{new / old:.3g})</span>"
    return text


def _signals(record: dict[str, Any]) -> str:
    signals = record.get("signals") or {}
    # plain text: the title attribute it goes into escapes it (a text escaped here too showed
    # "&lt;b&gt;" where the log held "<b>")
    return ", ".join(f"{key} {_shown(value)}" for key, value in sorted(signals.items()))


def _record_row(record: dict[str, Any], alike: Sequence[int], guard_numbers: dict[int, int]) -> str:
    """One row of the table: ``alike``, the other groups a decision was made alike on."""
    kind = record.get("kind")
    if kind == "decision":
        clipped = "<span class='tag clip'>clipped</span>" if record["clipped"] else ""
        source = record.get("source", "controller")  # who decided, where not the controller
        if source != "controller":
            clipped = f"<span class='tag {_e(source)}'>{_e(source)}</span> {clipped}"
        group = _e(record["group"]) + (
            f" <span class=sub title='also on groups {_e(', '.join(map(str, alike)))}'>"
            f"+{len(alike)}</span>"
            if alike
            else ""
        )
        return (
            f"<tr class=decision><td class=num>{_e(record['step'])}</td>"
            f"<td class=num>{group}</td><td>{_e(record['knob'])}</td>"
            f"<td class=num>{_change(record)}</td>"
            f"<td title='{_e(_signals(record))}'>{_e(record['reason'])}</td><td>{clipped}</td></tr>"
        )
    if kind == "guard":
        number = guard_numbers[record["seq"]]
        return (
            f"<tr class=guard><td class=num>{_e(record['step'])}</td><td colspan=3>"
            f"<span class='tag guard'>G{number} {_e(record['event'])}</span> "
            f"{_e(record['signal'])} = {_num(record['value'])}</td>"
            f"<td colspan=2>{_e(record['reason'])}</td></tr>"
        )
    if kind == "group":
        return (
            f"<tr class=note><td class=num>{_e(record['step'])}</td>"
            f"<td class=num>{_e(record['group'])}</td><td colspan=2>group added</td>"
            f"<td colspan=2>{_e(record['reason'])}</td></tr>"
        )
    return (
        f"<tr class=note><td class=num>{_e(record.get('step', ''))}</td><td colspan=3>note</td>"
        f"<td colspan=2>{_e(record.get('reason'))}</td></tr>"
    )


class DecisionRows:
    """The rows of the decisions table, chosen as the log is read: every guard event, note and
    group record, and the first and last ``rows`` decisions, with the number of those left out
    between them.  A joint run's followers and a rollback's restores are folded into the row
    they repeat (a change on tens of groups was tens of rows alike), which keeps the other
    groups folded into it.

    :func:`~selftune.audit.leader_row` looks back over the rows of the step being read alone,
    so those are all kept to fold into, and a decision is let go once ``rows`` later ones show
    it is neither among the first nor among the last (the table had held every record).
    """

    def __init__(self, joint: bool, rows: int) -> None:
        self.joint, self.rows = joint, rows
        #: the decisions' rows, all of them (the table's count)
        self.decisions = 0
        #: the rows settled as shown, each with the groups folded into it, and before a row
        #: the number of decisions left out there
        self._settled: list[tuple[dict[str, Any], list[int]] | int] = []
        #: the rows after them: the last ``rows`` decisions and the other rows among them
        self._pending: deque[tuple[dict[str, Any], list[int]]] = deque()
        self._waiting = 0  # the decisions among them
        self._passed = 0  # the decisions settled
        self._skipped = 0  # the decisions left out since the last row settled as shown
        #: the decision rows of the step being read, and the groups folded into each
        self._step: list[dict[str, Any]] = []
        self._alike: list[list[int]] = []

    def add(self, record: dict[str, Any]) -> None:
        """Take in the log's next record."""
        # a follower the policy clipped keeps a row of its own: its value is not the change's
        at = None if record.get("clipped") else leader_row(record, self._step, self.joint)
        if at is not None:
            self._alike[at].append(record["group"])
            return
        row: tuple[dict[str, Any], list[int]] = (record, [])
        decision = record.get("kind") == "decision"
        if decision and self._step and self._step[-1].get("step") == record.get("step"):
            self._step.append(record)
            self._alike.append(row[1])
        else:
            self._step, self._alike = ([record], [row[1]]) if decision else ([], [])
        self._pending.append(row)
        self.decisions += decision
        self._waiting += decision
        self._settle(len(self._step))

    def _settle(self, keep: int) -> None:
        """Settle the rows up to a decision that is not among the last, but the last ``keep``
        (the rows of the step being read, which a guard's restore may yet fold into): a row
        left out counts the decisions folded into it, a rollback's restores on other groups
        (a joint run's followers are counted apart), which the gaps' counts had left out."""
        while self._waiting > self.rows and len(self._pending) > keep:
            settled = self._pending.popleft()
            record, alike = settled
            if record.get("kind") == "decision":
                self._waiting -= 1
                self._passed += 1
                if self._passed > self.rows:  # not among the first either
                    self._skipped += 1 + (len(alike) if record.get("source") == "guard" else 0)
                    continue
            if self._skipped:
                self._settled.append(self._skipped)
                self._skipped = 0
            self._settled.append(settled)

    def shown(self) -> Iterator[tuple[dict[str, Any], list[int]] | int]:
        """The rows shown, in log order, each with the groups folded into it, and where
        decisions were left out, their number (once the log is read: the rows of its last
        step are settled here)."""
        self._settle(0)
        yield from self._settled
        if self._skipped:
            yield self._skipped
        yield from self._pending


def _decisions_table(run: Run) -> str:
    numbers = {g["seq"]: n for n, g in enumerate(run.log.guards, start=1)}
    table = run.log.table
    body = []
    for row in table.shown():
        if isinstance(row, int):
            body.append(f"<tr class=gap><td colspan=6>… {row} decisions not shown …</td></tr>")
        else:
            body.append(_record_row(*row, numbers))
    total, rows = table.decisions, table.rows  # the rows
    shown = min(total, 2 * rows)
    changes, followers = run.log.changes, run.log.followers
    count = f"{changes} decisions" + (
        f" and {followers} that made one alike on another group (joint groups: shown as +N "
        "on the change they follow, or in a row of their own where the policy clipped them)"
        if followers
        else ""
    )
    count += f", first and last {rows} shown" if shown < total else ""
    return (
        f"<p class=sub id=decision-count>{count}; guard events in red. "
        "Hover over a reason to see the signals behind it.</p>"
        "<table id=decisions><thead><tr><th>step</th><th>group</th><th>knob</th>"
        "<th>old → new</th><th>reason</th><th></th></tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
    )


def _guard_table(run: Run) -> str:
    guards = run.log.guards
    if not guards:
        return "<p class=sub>No guard events: no step was held, skipped or rolled back.</p>"
    rows = "".join(
        f"<tr class=guard><td><span class='tag guard'>G{n}</span></td>"
        f"<td class=num>{_e(g['step'])}</td><td>{_e(g['event'])}</td><td>{_e(g['signal'])}</td>"
        f"<td class=num>{_num(g['value'])}</td><td>{_e(g['reason'])}</td>"
        f"<td class=num>{_e(g.get('restored_step', ''))}</td></tr>"
        for n, g in enumerate(guards, start=1)
    )
    return (
        "<table id=guards><thead><tr><th></th><th>step</th><th>event</th><th>signal</th>"
        "<th>value</th><th>reason</th><th>restored step</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested manifest entries as (dotted key, leaf) pairs, so one table can show them all."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        for index, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{index}]")
    else:
        yield prefix, value


def _manifest_table(manifest: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{_e(key)}</th><td><code>{_e(json.dumps(value))}</code></td></tr>"
        for key, value in _flatten(manifest)
    )
    return f"<table id=manifest><tbody>{rows}</tbody></table>"


def _cards(run: Run) -> str:
    losses = [v for v in loss_series(run).values if math.isfinite(v)]
    span = loss_span(len(losses))
    guards = len(run.log.guards)
    cards = [
        ("last step", "—" if run.last_step is None else f"{run.last_step:,}", ""),
        (f"final loss (EMA, span {span:.0f})", f"{ema(losses, span)[-1]:.4g}", "")
        if losses
        else ("final loss (EMA)", "—", ""),
        ("decisions", f"{run.log.changes:,}", ""),
        ("guard events", f"{guards:,}", " alert" if guards else ""),
        ("param groups", str(run.groups), ""),
    ]
    return (
        "<div class=cards>"
        + "".join(
            f"<div class='card{extra}'><b>{value}</b><span>{label}</span></div>"
            for label, value, extra in cards
        )
        + "</div>"
    )


def render_html(run: Run, plots: Sequence[Plot]) -> str:
    """The whole page as one string: inline CSS, plots as data URIs, no external resources; the
    decisions table lists the rows :func:`read_run` was asked for."""
    m = run.manifest
    config = m.get("config") or {}
    optimizer = config.get("optimizer", "optimizer")
    options = config.get("controller_options") or {}
    given = ", ".join(f"{k}={v}" for k, v in options.items()) if isinstance(options, dict) else ""
    subtitle = (
        f"{_e(run.folder.resolve().name)} · {_e(optimizer)} with controller "
        f"<b>{_e(m.get('controller', '?'))}</b>{f' ({_e(given)})' if given else ''} · "
        f"selftune {_e(m.get('selftune', '?'))}, "
        f"torch {_e(m.get('torch', '?'))} · started {_e(m.get('created', '?'))}"
    )
    banners = []
    if run.torn_tail:
        banners.append("The audit log's last line was torn (a crash mid-write); it is not shown.")
    if (cut := _trace_cut(run)) is not None:
        banners.append(cut)
    if not run.trace:
        banners.append(
            f"{_no_rows(run.folder / TRACE)}: knob curves are rebuilt from the "
            "decisions and the loss is not drawn."
        )
    figures = (
        "".join(
            f"<figure id=plot-{p.name}><img alt='{_e(p.caption)}' "
            f"src='data:image/png;base64,{base64.b64encode(p.png).decode('ascii')}'>"
            f"<figcaption>{_e(p.caption)}</figcaption></figure>"
            for p in plots
        )
        or "<p class=sub>Nothing to plot yet: the run has recorded no steps.</p>"
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>selftune report: {_e(run.folder.resolve().name)}</title>"
        f"<style>{CSS}</style></head><body><main>"
        f"<h1>selftune run report</h1><p class=sub>{subtitle}</p>{_cards(run)}"
        + "".join(f"<div class=banner>{_e(text)}</div>" for text in banners)
        + f"<h2>Guard events</h2>{_guard_table(run)}"
        f"<h2>Trajectories</h2>{figures}"
        f"<h2>Decisions</h2>{_decisions_table(run)}"
        f"<h2>Manifest</h2>{_manifest_table(m)}"
        "</main></body></html>\n"
    )


#: the endings of a file ``write_report`` may write over
HTML = (".html", ".htm")


def _head(path: Path) -> bytes:
    """The first bytes of ``path``, where a file :func:`write_report` wrote says so; none when
    it cannot be read (a folder, a link to nothing)."""
    try:
        with path.open("rb") as handle:
            return handle.read(4096)
    except OSError:
        return b""


def _is_report(path: Path) -> bool:
    """Whether ``path`` holds a page :func:`write_report` wrote (its title says so)."""
    return path.suffix.lower() in HTML and b"<title>selftune report: " in _head(path)


def _is_plot(path: Path) -> bool:
    """Whether ``path`` holds a plot :func:`write_report` wrote: a PNG whose Software text, in
    the chunks before its pixels, is :data:`PLOT_MARK`."""
    head = _head(path)
    mark = b"tEXtSoftware\x00" + PLOT_MARK.encode()
    return head.startswith(b"\x89PNG\r\n\x1a\n") and mark in head


def _foreign_plot(plot_dir: Path, plots: Sequence[Plot]) -> Path | None:
    """The first file in ``plot_dir`` that a plot would be written over and that is no plot of a
    report's: a file of the user's own (``RUN/plots`` is a name a user may well have used)."""
    for plot in plots:
        path = plot_dir / f"{plot.name}.png"
        if os.path.lexists(path) and not _is_plot(path):  # (a link to nothing would be followed)
            return path
    return None


def _trace_cut(run: Run) -> str | None:
    """Where the trace's damage cuts the curves short, if it does: said on the page, and warned
    of by :func:`write_report` (the command printed nothing, with exit status 0)."""
    if run.trace_damage is None:
        return None
    shown = f"after step {run.trace.steps[-1]}" if run.trace else "at its first row"
    return f"{run.trace_damage}. The loss and knob curves end {shown}."


def write_report(run_dir: str | Path, out: str | Path | None = None, *, rows: int = 50) -> Path:
    """Write ``RUN/report.html`` (or ``out``, a name ending .html or .htm) and
    ``RUN/plots/*.png``; return the page's path.

    PNGs that cannot be written (the run folder is read-only), and a damaged trace whose rows
    the page draws only up to the damage, are only warned about. Neither the page nor a plot is
    written over a file that an earlier report did not write (a plot's PNG carries
    :data:`PLOT_MARK`): ValueError names the file, and nothing is written.

    ``rows``: how many decisions to list from each end of a long log (guard events are all shown).
    Raises :class:`selftune.audit.LogError` when the folder is not a readable run folder.
    """
    if rows < 1:
        raise ValueError(f"rows={rows!r}: pass at least 1 decision to show from each end")
    out = None if out is None else Path(out).expanduser()
    if out is not None and out.is_dir():  # before the plots: they take seconds
        raise ValueError(
            f"{out} is a folder: give the page's file, e.g. {Path(out) / 'report.html'}"
        )
    if out is not None and Path(out).exists() and not _is_report(Path(out)):
        # a slip of the command line wrote the page over the run's manifest or decisions.jsonl,
        # or over a page of the user's own
        raise ValueError(
            f"{out} exists and is no selftune report: the page is not written over it; give "
            "a file of its own, e.g. report.html"
        )
    if out is not None and out.suffix.lower() not in HTML:
        # a later report writes over a page only where its name says it is one: a page
        # written to "report.txt" was refused as "no selftune report" by the next run
        raise ValueError(
            f"{out}: give the page a file name ending {' or '.join(HTML)}, e.g. "
            f"{out.with_suffix('.html').name}"
        )
    run = read_run(run_dir, rows)
    page = Path(out) if out is not None else run.folder / "report.html"
    if out is None and page.exists() and not _is_report(page):
        raise ValueError(
            f"{page} exists and is no selftune report: the page is not written over it; give "
            "--out a file of its own"
        )
    plots = make_plots(run)
    plot_dir = run.folder / PLOTS
    foreign = _foreign_plot(plot_dir, plots)
    if foreign is not None:  # before the page: nothing written, the command can be run again
        raise ValueError(
            f"{foreign} exists and is no plot of selftune report's: it is not written over; "
            f"move it out of {plot_dir}, where the report writes its plots "
            f"({', '.join(f'{plot.name}.png' for plot in plots)}), and run the report again "
            "(a plot by a selftune from before its plots were marked bears no mark: delete it)"
        )
    if (cut := _trace_cut(run)) is not None:
        warnings.warn(cut, stacklevel=2)
    page.parent.mkdir(parents=True, exist_ok=True)
    # (a folder name of bytes that are no UTF-8 is shown escaped, not refused)
    write_whole(page, render_html(run, plots).encode("utf-8", "backslashreplace"))
    # The page holds the plots itself; the PNGs are a copy, so a run folder they cannot be
    # written to (a read-only copy of a CI artefact, with --out elsewhere) costs only them.
    try:
        plot_dir.mkdir(exist_ok=True)
        for plot in plots:
            (plot_dir / f"{plot.name}.png").write_bytes(plot.png)
    except OSError as exc:
        warnings.warn(
            f"the plots were not written to {plot_dir} ({exc.strerror or exc}); the page {page} "
            "holds them",
            stacklevel=2,
        )
    return page


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``selftune report``."""
    parser.add_argument("run", metavar="RUN", help="the run folder (the log_dir of the run)")
    parser.add_argument(
        "--out", metavar="FILE.html", help="where to write the page (default: RUN/report.html)"
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=50,
        metavar="N",
        help="list the first and last N decisions of a long log (default 50; guard events: all)",
    )


def run(args: argparse.Namespace) -> int:
    """``selftune report RUN``: write the page and print its path; 1 with the problem on error.
    What the page's writing warns of (plots it could not write) is said as the errors are, not
    as a Python warning that quotes a line of this module; every line printed is
    :func:`~selftune.terminal.printable` (a message names the log's folders and records).
    ``--rows`` out of range is a UsageError (exit 2), named as the option, before the run is
    read."""
    if args.rows < 1:
        raise UsageError(f"--rows {args.rows}: pass at least 1 decision to show from each end")
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.filterwarnings("always", category=UserWarning, module=r"selftune\.")
            page = write_report(args.run, args.out, rows=args.rows)
    except OSError as exc:  # the page's folder (reading the run raises LogError)
        where = f"{exc.filename} " if exc.filename else "the page "
        problem = (
            f"cannot write {where}({exc.strerror or exc}): pass --out a file in a folder you "
            "can write to"
        )
        print(f"selftune report: {printable(problem)}", file=sys.stderr)
        return 1
    except (LogError, ValueError) as exc:
        print(f"selftune report: {printable(exc)}", file=sys.stderr)
        return 1
    for warning in said:
        print(f"selftune report: {printable(warning.message)}", file=sys.stderr)
    print(printable(page))
    return 0
