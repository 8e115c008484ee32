"""``selftune watch RUN``: follow a run in progress in the terminal.

It tails ``decisions.jsonl`` and ``trace.jsonl`` as the run appends to them and redraws one frame:
the step, the loss (and the last evaluation metric given to ``observe``, at the step that read
it), each param group's knobs, sparklines of the recent loss and learning rate, and the latest
decisions, guard events and notes with their reasons. Only complete lines are read: the run may
be halfway through writing the last one, and that part is kept until its newline arrives.

Watching is read-only and cheap: each refresh reads only the bytes appended since the last one and
does not check the hash chain (``selftune verify`` does that). The first read of a long run starts
near the end of each file, at the rows the frame shows (the decisions before them are counted,
not parsed): parsing a long run's files whole took seconds and a memory the size of several
copies of them before the first frame. rich is imported only to draw.

A folder not made yet, or one that holds no run yet, is waited for, with a line that says so: a
live view is often started beside the training script, before the script gets that far. A
folder whose ``manifest.json`` is another program's is refused: no run will come to it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selftune.audit import (
    DECISIONS,
    FOLLOWS,
    FORMAT,
    MANIFEST,
    LogError,
    follows,
    is_joint,
    leader_row,
)
from selftune.cli import UsageError
from selftune.report import TRACE, as_float, blocks_back, lines_back
from selftune.terminal import printable

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.live import Live
    from rich.measure import Measurement

SPARK = "▁▂▃▄▅▆▇█"
#: how many recent steps the sparklines cover
HISTORY = 60
#: how many recent decisions, guard events and notes the frame lists
RECENT = 8
#: the longest ``--interval`` taken, in seconds (a day): a longer one is no live view, and is
#: most likely a slip (``1e10`` for ``1e-1``); ``time.sleep`` raises OverflowError past its limit
MAX_INTERVAL = 86400.0
#: the files of a run folder: a folder with none of them holds no run (yet)
RUN_FILES = (MANIFEST, DECISIONS, TRACE)
#: how far a backward scan reads at a time
BLOCK = 1 << 16
#: the records a first read counts in the part of ``decisions.jsonl`` it skips (the log's
#: canonical form has no spaces, and a quote inside a string value is escaped), and the
#: decisions among them that follow another group's change (``groups="joint"``)
KINDS = (b'"kind":"decision"', b'"kind":"guard"', FOLLOWS.split("{")[0].encode())


class LineTail:
    """Follow a file that another process appends to, returning only its complete lines.

    ``lines``: a first read (and the first after a restart) starts at the last ``lines`` complete
    lines; the last line before them that holds ``keep`` is set aside in ``kept``, and the
    occurrences of each of ``count`` before them are counted into ``skipped`` (both reset by
    every read).
    """

    def __init__(
        self,
        path: Path,
        lines: int | None = None,
        keep: bytes | None = None,
        count: Sequence[bytes] = (),
    ) -> None:
        self.path = path
        self.lines, self.keep, self.count = lines, keep, tuple(count)
        self.offset = 0  # bytes of the file consumed so far, the partial line included
        self.partial = b""  # the start of a line whose newline has not been written yet
        self.last = b""  # the last bytes consumed: still there, or the file was rewritten
        self.skipped: Counter[bytes] = Counter()
        self.kept: bytes | None = None

    def read(self) -> tuple[list[bytes], bool]:
        """Return the complete lines appended since the last call, and whether the file restarted.

        A file that was cut back (a run resumed from a checkpoint truncates both files) is read
        again from the start, and the caller drops what it had from it: one that got shorter,
        or one that has grown back past the point read to by the next poll, whose last bytes
        read are no longer those (a resume writes a note where the cut was).

        A file that is there but cannot be read (its permissions) raises LogError, which the
        command says in one line, as ``verify`` and ``report`` do, instead of a traceback.
        """
        try:
            return self._read()
        except FileNotFoundError:
            return [], False  # not written yet, or removed between its stat and its open
        except OSError as exc:
            raise LogError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def _read(self) -> tuple[list[bytes], bool]:
        """``read``, which turns the errors of reaching the file into its answers."""
        size = self.path.stat().st_size
        with open(self.path, "rb") as file:
            restarted = size < self.offset
            if not restarted and self.last:
                file.seek(self.offset - len(self.last))
                restarted = file.read(len(self.last)) != self.last
            if restarted:
                self.offset, self.partial, self.last = 0, b"", b""
            self.skipped, self.kept = Counter(), None
            if self.offset == 0 and self.lines is not None:
                self._skip_to_tail(file, size)
            if size == self.offset:
                return [], restarted
            file.seek(self.offset)
            data = file.read(size - self.offset)  # not past size: the writer may be mid-line
        self.offset += len(data)
        self.last = (self.last + data)[-64:]
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line for line in lines if line.strip()], restarted

    def _skip_to_tail(self, file: Any, size: int) -> None:
        """Start at the last ``lines`` complete lines; set the last line before them that holds
        ``keep`` aside, and count ``count`` in what comes before them."""
        assert self.lines is not None
        start = 0  # the file's start, if it holds no more lines than that
        for n, (offset, _) in enumerate(lines_back(file, size, BLOCK), start=1):
            if n == self.lines:
                start = offset
                break
        at = None if self.keep is None else _last_match(file, size, self.keep)
        if at is not None and at < start:
            file.seek(_line_start(file, at))
            self.kept = file.readline().rstrip(b"\n")
        for pattern in self.count:
            self.skipped[pattern] = _count(file, start, pattern)
        if start > 0:
            file.seek(start - min(start, 64))
            self.last = file.read(min(start, 64))
        self.offset = start


def _line_start(file: Any, position: int) -> int:
    """The offset where the line holding ``position`` begins."""
    for lo, block in blocks_back(file, position, BLOCK):
        at = block.rfind(b"\n")
        if at >= 0:
            return lo + at + 1
    return 0


def _last_match(file: Any, end: int, pattern: bytes) -> int | None:
    """The offset of the last ``pattern`` that ends by ``end``, or None (the whole file read,
    one block at a time)."""
    after = b""  # the next block's first bytes: a match may straddle the boundary
    for lo, block in blocks_back(file, end, BLOCK):
        at = (block + after).rfind(pattern)
        if at >= 0:
            return lo + at
        after = block[: len(pattern) - 1]
    return None


def _count(file: Any, end: int, pattern: bytes) -> int:
    """How often ``pattern`` occurs in the bytes before ``end``."""
    total, after = 0, b""
    for _, block in blocks_back(file, end, BLOCK):
        # a match inside ``after`` alone is too short to exist: none is counted twice
        total += (block + after).count(pattern)
        after = block[: len(pattern) - 1]
    return total


@dataclass
class WatchState:
    """What the frame shows, updated from the lines the run appended since the last poll."""

    folder: Path
    manifest: dict[str, Any] | None = None
    step: int | None = None
    loss: float | None = None
    #: the last metric given to ``observe`` and the step that read it
    metric: float | None = None
    metric_step: int | None = None
    hp: list[dict[str, Any]] = field(default_factory=list)
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    #: recent learning rates of each param group
    rates: list[deque[float]] = field(default_factory=list)
    #: each decision shown carries ``alike``: on how many other groups it was made alike (a
    #: joint run's followers, a rollback's restores), and ``clipped_alike``: how many of those
    #: the policy clipped
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    #: the controller's changes: a joint run's change made alike on the other groups is one
    decisions: int = 0
    #: a joint run's decisions that make another group's change alike on their own group
    followers: int = 0
    guards: int = 0
    #: complete lines that were not JSON objects (damage; ``selftune verify`` names them)
    bad_lines: int = 0
    #: what the frame says of a manifest that could not be used (damaged, unreadable), while so
    manifest_problem: str | None = None

    def __post_init__(self) -> None:
        self._joint = False  # whether the manifest says the groups were tuned as one
        # enough lines for the recent decisions among notes, and the rows of the sparklines
        # back to the last metric (json.dumps writes its key as below)
        self._decisions = LineTail(self.folder / DECISIONS, lines=8 * RECENT, count=KINDS)
        self._trace = LineTail(self.folder / TRACE, lines=HISTORY, keep=b'"metric": ')

    def poll(self) -> None:
        """Read what the run appended since the last poll."""
        if self.manifest is None:
            self.manifest, self.manifest_problem = _read_manifest(self.folder / MANIFEST)
            self._joint = self.manifest is not None and is_joint(self.manifest)
            tail = self._decisions  # a joint run writes a change on every group: as many
            if self._joint and tail.offset == 0 and tail.lines is not None:  # changes shown
                tail.lines *= max(1, len((self.manifest or {}).get("param_groups") or ()))
        lines, restarted = self._decisions.read()
        if restarted:
            self.recent.clear()
            self.decisions = self.guards = self.followers = 0
        skipped = self._decisions.skipped
        followers = skipped[KINDS[2]] if self._joint else 0
        self.decisions += skipped[KINDS[0]] - followers
        self.guards += skipped[KINDS[1]]
        self.followers += followers
        for record in self._parse(lines):
            kind = record.get("kind")
            follower = self._joint and follows(record) is not None
            self.decisions += kind == "decision" and not follower
            self.followers += follower
            self.guards += kind == "guard"
            at = leader_row(record, self.recent, self._joint)
            if at is not None:  # one the policy clipped too: eight rows are few (it pushed
                self.recent[at]["alike"] += 1  # the change itself out of them)
                self.recent[at]["clipped_alike"] += bool(record.get("clipped"))
            elif kind in ("decision", "guard", "note"):
                self.recent.append({**record, "alike": 0, "clipped_alike": 0})
        lines, restarted = self._trace.read()
        if restarted:
            self.losses.clear()
            self.rates.clear()
            self.metric = self.metric_step = None
        kept = self._trace.kept  # the last evaluation, from before the rows read
        for row in self._parse([] if kept is None else [kept]):
            self.metric, self.metric_step = as_float(row.get("metric")), row.get("step")
        for row in self._parse(lines):
            self._add_row(row)

    def _parse(self, lines: Iterable[bytes]) -> list[dict[str, Any]]:
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # (a number of thousands of digits, deep
                row = None  # nesting: as damaged as no JSON, and they ended the watch)
            if isinstance(row, dict):
                rows.append(row)
            else:
                self.bad_lines += 1
        return rows

    def _add_row(self, row: dict[str, Any]) -> None:
        hp = row.get("hp")
        if not isinstance(hp, list):
            self.bad_lines += 1
            return
        self.step = row.get("step")
        self.loss = as_float(row.get("loss"))
        if "metric" in row:
            self.metric, self.metric_step = as_float(row["metric"]), self.step
        self.hp = [group for group in hp if isinstance(group, dict)]
        self.losses.append(math.nan if self.loss is None else self.loss)
        while len(self.rates) < len(self.hp):
            self.rates.append(deque(maxlen=HISTORY))
        for rates, group in zip(self.rates, self.hp, strict=False):
            rate = as_float(group.get("lr"))
            rates.append(math.nan if rate is None else rate)


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest, or None and what the frame says of it (None when it is not there yet: it
    is written whole, by a rename, so one that is no JSON is damaged, not being written).

    A damaged manifest must not stop the watch (the trace and decisions are still worth seeing),
    nor reach ``render`` in a shape it cannot read: it is set aside, and the frame says so.
    One this user may not read is not called damaged: a copy would not mend it.
    """
    try:
        manifest, damage = _parse_manifest(path)
    except OSError as exc:
        why = exc.strerror or exc
        return None, f"cannot read {path} ({why}), so the run's settings are not shown"
    if damage is None:
        return manifest, None
    return None, (
        f"{path} is damaged ({damage}), so the run's settings are not shown: restore it from a "
        "copy of the run folder, or start the run again in a new log_dir"
    )


def _parse_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """:func:`_read_manifest`'s read: the manifest, or None and the damage found (None when
    it is not there yet); raises OSError where it cannot be read."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None  # not written yet: try again next time
    except UnicodeDecodeError:
        return None, "it is not UTF-8 text"
    except json.JSONDecodeError as exc:  # damage: the manifest is written whole, by a rename
        return None, f"it is not valid JSON ({exc.msg} at line {exc.lineno})"
    except (ValueError, RecursionError) as exc:  # a number of thousands of digits, deep nesting
        return None, f"it is no manifest ({type(exc).__name__})"
    if not isinstance(manifest, dict):
        return None, f"it holds a JSON {type(manifest).__name__}, not an object"
    config = manifest.get("config")
    if config is not None and not isinstance(config, dict):
        return None, f"its 'config' is a {type(config).__name__}, not an object"
    return manifest, None


def sparkline(values: Iterable[float], log: bool = False) -> str:
    """One character per value, from ▁ (lowest shown) to █ (highest); a gap for non-finite ones.

    ``log`` scales by the logarithm, for learning rates that move by factors.
    """
    points = [(math.log10(v) if v > 0 else math.nan) if log else v for v in values]
    finite = [p for p in points if math.isfinite(p)]
    if not finite:
        return " " * len(points)
    low, high = min(finite), max(finite)
    scale = (len(SPARK) - 1) / (high - low) if high > low else 0.0
    floor = 0 if high > low else len(SPARK) // 2  # a flat line sits mid-height, not at the bottom
    return "".join(
        SPARK[floor + round((p - low) * scale)] if math.isfinite(p) else " " for p in points
    )


class Sparkline:
    """The :func:`sparkline` of the newest ``values`` that fit the width rich gives it.

    A table cell's text too wide for its column is cut at its end, with "…": at 80 columns,
    with Adam's three knobs beside it, the lr column lost its newest steps, the ones a live
    view is for (a rate halved at the last steps did not show). This drops the oldest instead.
    """

    def __init__(self, values: Iterable[float], log: bool = False, style: str = "") -> None:
        self.values, self.log, self.style = list(values), log, style

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        from rich.measure import Measurement

        return Measurement(min(1, len(self.values)), len(self.values))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.text import Text

        newest = self.values[max(0, len(self.values) - options.max_width) :]
        yield Text(sparkline(newest, log=self.log), style=self.style)


def _fmt(value: Any) -> str:
    number = as_float(value)
    return "—" if number is None else f"{number:.4g}"


def render(state: WatchState) -> RenderableType:
    """One frame: a header, the knobs table, sparklines and the recent decisions."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    manifest = state.manifest or {}
    optimizer = (manifest.get("config") or {}).get("optimizer", "")
    header = Text.assemble(
        (f"{printable(state.folder)} ", "bold"),
        printable(f"{optimizer} · controller {manifest.get('controller', '?')}") + "   ",
        ("step ", "dim"),
        (printable(state.step) if state.step is not None else "—", "bold"),
        ("   loss ", "dim"),
        (_fmt(state.loss), "bold"),
        *(
            (
                ("   metric ", "dim"),
                (_fmt(state.metric), "bold"),
                f" (step {printable(state.metric_step)})",
            )
            if state.metric_step is not None
            else ()
        ),
        ("   decisions ", "dim"),
        str(state.decisions),
        *(
            ((f" (+{state.followers} made alike on other groups)", "dim"),)
            if state.followers
            else ()
        ),
        ("   guard events ", "dim"),
        (str(state.guards), "bold red" if state.guards else ""),
    )
    parts: list[RenderableType] = [header]
    if state.step is None:
        parts.append(Text("waiting for the first step…", style="dim"))
    else:
        knobs = Table(box=None, padding=(0, 2), header_style="bold")
        names = [
            name
            for name in ("lr", "momentum", "beta1", "beta2")
            if any(name in group for group in state.hp)
        ]
        for column in ("group", *names, "lr, recent steps"):
            knobs.add_column(column)
        # a group added mid-run has fewer rates: padded before them with gaps, its newest
        # rate stands under the others' (it stood at the start of the line, as if older)
        longest = max(map(len, state.rates), default=0)
        for index, group in enumerate(state.hp):
            rates = list(state.rates[index]) if index < len(state.rates) else []
            knobs.add_row(
                str(index),
                *(_fmt(group.get(name)) for name in names),
                Sparkline([math.nan] * (longest - len(rates)) + rates, log=True, style="cyan"),
            )
        parts.append(knobs)
        parts.append(
            Text.assemble(("loss, recent steps  ", "dim"), (sparkline(state.losses), "green"))
        )
    parts.append(
        Panel(
            _recent_table(state),
            title="latest decisions, guard events and notes",
            title_align="left",
        )
    )
    if state.manifest_problem:
        parts.append(Text(printable(state.manifest_problem), style="yellow"))
    if state.bad_lines:
        parts.append(
            Text(
                printable(
                    f"{state.bad_lines} damaged lines skipped (`selftune verify {state.folder}` "
                    "checks the decision log; trace.jsonl, the per-step rows, has no chain)"
                ),
                style="yellow",
            )
        )
    return Group(*parts)


def _recent_table(state: WatchState) -> RenderableType:
    """The latest records, a row each; every cell is a ``Text`` of :func:`printable` text.

    rich reads a ``str`` cell as markup (and ``:name:`` as an emoji): a reason, signal or knob a
    controller logged as ``"cut [/] per recipe"`` raised MarkupError, and ``"lr [x0.5] cut"``
    or ``"[bold]x"`` lost their brackets; and it passes a control character on to the terminal,
    which obeys it (``"\\x1b[2J"`` cleared the screen). The frame must show what the log holds,
    as it is.
    """
    from rich.table import Table
    from rich.text import Text

    def cell(value: object) -> Text:
        return Text(printable(value))

    table = Table(box=None, padding=(0, 1), header_style="bold", expand=True)
    for column, kwargs in (
        ("step", {"justify": "right"}),
        ("what", {}),
        ("change", {}),
        ("reason", {"ratio": 1}),
    ):
        table.add_column(column, **kwargs)
    if not state.recent:
        table.add_row("", "none yet", "", "")
    for record in state.recent:
        if record.get("kind") == "guard":
            table.add_row(
                cell(record.get("step")),
                cell(f"GUARD {record.get('event')}"),
                cell(f"{record.get('signal')} = {_fmt(record.get('value'))}"),
                cell(record.get("reason")),
                style="bold red",
            )
        elif record.get("kind") == "note":  # a resume's cut, a knob a scheduler took over
            table.add_row(cell(record.get("step", "")), "note", "", cell(record.get("reason")))
        else:
            clipped = " (clipped)" if record.get("clipped") else ""
            alike = f", +{record['alike']} groups" if record.get("alike") else ""
            if record.get("clipped_alike"):
                alike += f" ({record['clipped_alike']} clipped)"
            table.add_row(
                cell(record.get("step")),
                cell(f"g{record.get('group')} {record.get('knob')}{alike}"),
                cell(f"{_fmt(record.get('old'))} → {_fmt(record.get('new'))}{clipped}"),
                cell(record.get("reason")),
            )
    return table


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``selftune watch``."""
    parser.add_argument("run", metavar="RUN", help="the run folder (the log_dir of the run)")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 1)",
    )


def _no_run(folder: Path) -> tuple[str, str | None] | None:
    """None when ``folder`` shows a run; else why it does not, and what the live view waits for
    (None where waiting would not mend it).

    A live view is often started beside the training script, before the script has made its
    log_dir or written a file in it: it waits, and says what for (a folder not made yet was
    refused, and one that holds no run, ``/etc`` too, waited for a first step without a word).
    Waiting mends neither a file nor a folder of run folders: with several optimizers each logs
    to a folder of its own inside ``log_dir`` (``opt0``, ``opt1``, ...), to be watched one by one;
    nor a folder whose ``manifest.json`` is another program's.  Nor does it mend a folder that
    may not be read, or one inside a folder that may not be searched: ``Path.exists`` raises
    PermissionError there, not answers, and the watch ended in a traceback.
    """
    try:
        return _why_no_run(folder)
    except OSError as exc:
        return f"cannot read {exc.filename or folder}: {exc.strerror or exc}", None


def _why_no_run(folder: Path) -> tuple[str, str | None] | None:
    """:func:`_no_run`'s look at ``folder``, which raises OSError where it cannot look."""
    if not folder.exists():
        return f"no run folder at {folder} (yet)", "it to be made"
    if not folder.is_dir():
        return f"{folder} is a file, not a run folder: pass the run's log_dir", None
    manifest, _ = _read_manifest(folder / MANIFEST)
    if manifest is not None and not _selftune_s(manifest):  # a web app's, a package's
        return (
            f"{folder} is not a selftune run folder: its {MANIFEST} is another program's (it "
            f'has no "format": "{FORMAT}"); pass the run\'s log_dir'
        ), None
    if any((folder / name).exists() for name in RUN_FILES):
        return None
    if runs := sorted(path.parent.name for path in folder.glob(f"*/{MANIFEST}")):
        return (
            f"no {MANIFEST} in {folder}: it holds the run folders {', '.join(runs)} (one per "
            f"optimizer): watch one of them, e.g. {folder / runs[0]}"
        ), None
    none_of = ", ".join(RUN_FILES)
    return f"no selftune run in {folder} (yet): none of {none_of} is in it", "the run to start"


def _selftune_s(manifest: dict[str, Any]) -> bool:
    """Whether a manifest is selftune's: its format is, or, with none (written by hand, which
    ``verify`` reads), it names a selftune version. Another program's ``manifest.json`` was
    watched as a run "waiting for the first step" that would never come."""
    form = manifest.get("format")
    if form is None:
        return "selftune" in manifest
    return isinstance(form, str) and form.startswith(FORMAT.partition("/")[0] + "/")


def _wait_for_run(folder: Path, interval: float, live: Live) -> str | None:
    """Say what the live view waits for until ``folder`` shows a run; why it never will, if so."""
    from rich.text import Text

    while (no_run := _no_run(folder)) is not None:
        problem, to_come = no_run
        if to_come is None:
            return problem
        waiting = f"{problem}; waiting for {to_come}… (Ctrl-C to stop)"
        live.update(Text(printable(waiting), style="dim"), refresh=True)
        time.sleep(interval)
    return None


def _refuse(problem: str) -> int:
    """Say why the watch cannot go on, in one line, and return the command's exit status."""
    print(f"selftune watch: {printable(problem)}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    """``selftune watch RUN``: redraw until Ctrl-C (or once, with ``--once``); 1 on a folder
    that shows no run or a file that cannot be read, UsageError (exit 2) on a bad option.

    A RUN not made yet, or that holds no run yet, is waited for; ``--once`` has nothing to wait
    for, and says so. ``~`` in RUN is expanded, as ``verify`` and ``wrap(log_dir=...)`` do: a
    quoted ``'~/run'`` (or one from a config file) reaches here unexpanded by the shell.
    """
    folder = Path(args.run).expanduser()
    if not 0 < args.interval <= MAX_INTERVAL:  # refused like 0, not clamped: said, not hidden
        raise UsageError(
            f"--interval {args.interval!r}: pass a number of seconds above 0 and at most "
            f"{MAX_INTERVAL:g} (a day), e.g. 0.5"
        )
    no_run = _no_run(folder)
    if no_run is not None and (args.once or no_run[1] is None):
        why, to_come = no_run
        if to_come is not None:
            why += f"; pass the run's log_dir, or leave out --once to wait for {to_come}"
        return _refuse(why)
    from rich.console import Console
    from rich.live import Live

    console = Console()
    state = WatchState(folder)
    problem: str | None = None  # why the watch ended, if not by Ctrl-C
    try:  # a file that cannot be read, at the first poll or a later one, ends the watch
        if args.once:
            state.poll()
            console.print(render(state))
            return 0
        with Live(console=console, auto_refresh=False) as live:
            try:
                problem = _wait_for_run(folder, args.interval, live)
                while problem is None:
                    state.poll()
                    live.update(render(state), refresh=True)
                    time.sleep(args.interval)
            except KeyboardInterrupt:
                pass
    except LogError as exc:
        problem = str(exc)
    return 0 if problem is None else _refuse(problem)
