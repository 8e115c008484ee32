"""The audit log of a run: ``manifest.json`` plus a hash-chained ``decisions.jsonl``.

Every change selftune makes to a hyperparameter, and every guard event, becomes one line of
``decisions.jsonl``. Each line carries ``seq`` (its position), ``prev`` (the hash of the line
before) and ``hash`` (sha256 of its own canonical JSON), so changing, deleting, inserting or
reordering any record breaks the chain at that record and :func:`verify` names the line.
A crash can tear the final line; readers accept and report that, writers cut it away and go on.
The format is described in ``docs/audit-log.md``.

The module is plain Python: ``selftune verify`` imports it to build its parser, so torch is only
imported inside the two helpers that need it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import hashlib
import json
import math
import numbers
import os
import platform
import re
import sys
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from selftune.errors import SelfTuneError
from selftune.files import write_whole
from selftune.terminal import printable

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
DECISIONS = "decisions.jsonl"
#: the file whose lock a run folder's writer holds while its log is open (see _lock_folder)
WRITER_LOCK = "writer.lock"
#: ``prev`` of the first record: there is nothing before it.
GENESIS = "0" * 64
#: Written into every manifest so that a later reader can tell which rules the log follows.
FORMAT = "selftune-audit/1"
REQUIRED_MANIFEST_KEYS = (
    "selftune",
    "torch",
    "python",
    "controller",
    "config",
    "param_count",
    "param_groups",
    "initial_params_sha256",
)
#: Manifest keys that identify a run: equal ones mean "the same run, resumed".
RUN_IDENTITY_KEYS = ("param_groups", "param_count", "initial_params_sha256")
#: Fields each kind of record must have (besides seq, prev and hash, which the log fills).
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "decision": ("step", "group", "knob", "old", "new", "value", "signals", "reason", "clipped"),
    "guard": ("step", "event", "signal", "value", "reason"),
    "group": ("step", "group", "knobs", "num_params", "reason"),
    "note": ("reason",),
}
GUARD_EVENTS = ("hold", "skip", "rollback", "escalate", "restart", "relevel", "forward")
CHAIN_FIELDS = ("seq", "prev", "hash")
#: how the reason of a ``groups="joint"`` decision that makes another group's change on its own
#: group ends (before any note of the policy's); a log of tens of groups holds one per group
#: for each change, and the watch and the report fold them into the change they follow
FOLLOWS = " (joint: as group {})"
_FOLLOWS = re.compile(re.escape(FOLLOWS).replace(re.escape("{}"), r"(\d+)"))


def is_joint(manifest: Mapping[str, Any]) -> bool:
    """Whether the run of ``manifest`` tuned its groups as one (``groups="joint"``)."""
    config = manifest.get("config")
    options = config.get("controller_options") if isinstance(config, Mapping) else None
    return isinstance(options, Mapping) and options.get("groups") == "joint"


def follows(record: Mapping[str, Any]) -> int | None:
    """The group whose change the decision ``record`` of a joint run makes alike on its own
    group (a follower), else None."""
    reason = record.get("reason")
    if record.get("kind") != "decision" or not isinstance(reason, str):
        return None
    found = _FOLLOWS.search(reason)
    return None if found is None else int(found.group(1))


def leader_row(
    record: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], joint: bool
) -> int | None:
    """The index in ``rows`` (the records as shown, each folded into the row it repeats) of the
    row the decision ``record`` repeats on another group, else None: a joint run's follower
    (``joint``), the change it makes alike; a guard's decision, the same restore with the same
    reason on an earlier group (a rollback writes one per group and knob).

    A step writes its decisions together, a joint change before its followers; the rows since
    the change may be followers the policy clipped, to which a reader gives rows of their own
    (their values are not the change's), and a rollback's rows alternate the knobs.
    """
    group = follows(record) if joint else None
    guard = record.get("kind") == "decision" and record.get("source") == "guard"
    if group is None and not guard:
        return None
    for index in range(len(rows) - 1, -1, -1):
        row = rows[index]
        if row.get("kind") != "decision" or row.get("step") != record.get("step"):
            return None
        same_knob = row.get("knob") == record.get("knob")
        if guard:
            if row.get("source") != "guard":
                return None
            if same_knob and row.get("reason") == record.get("reason"):
                return index
        elif not same_knob:
            return None
        elif follows(row) is None:
            return index if row.get("group") == group else None
    return None


class LogError(SelfTuneError):
    """A run folder or its audit log is missing, damaged or does not belong to this run."""

    #: where the folder holds another run's log, from other weights or open in this process:
    #: what clashed, for an integration to follow with its framework's way (the advice of a
    #: plain loop, to wrap before loading any weights, is a step a framework takes itself)
    another_run: str | None = None


# --------------------------------------------------------------------------- canonical JSON


def _finite_or_name(value: float) -> float | str:
    """JSON has no NaN or infinity, and signals can be either: store them as names."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON data (dict, list, str, int, float, bool, None).

    Non-finite floats become "nan"/"inf"/"-inf"; numpy-style scalars become int/float. Anything
    else is refused here, naming where it sits, rather than deep inside ``json.dumps``.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _finite_or_name(float(value))
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise LogError(
                    f"cannot store key {key!r} in {where or 'a record'}: "
                    "audit records need string keys"
                )
            out[key] = _plain(item, f"{where}.{key}" if where else key)
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _finite_or_name(float(value))
    raise LogError(
        f"cannot store a {type(value).__name__} ({value!r:.60}) at {where or 'the top level'} "
        "of an audit record: convert it to a number or string first (float(x) or x.item())"
    )


def _dumps(plain: Any) -> bytes:
    """The one serialisation that hashes and lines are made of; floats round-trip exactly."""
    text = json.dumps(
        plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LogError(
            f"cannot store text that is not valid Unicode in an audit record: {exc}"
        ) from None


def canonical(record: Mapping[str, Any]) -> bytes:
    """Return the canonical UTF-8 JSON of ``record``: sorted keys, no spaces, NaN as "nan"."""
    return _dumps(_plain(record, ""))


def record_hash(record: Mapping[str, Any]) -> str:
    """Return the sha256 hex digest of ``record`` without its own ``hash`` field."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Scan:
    """What one pass over ``decisions.jsonl`` found; the chain of ``records`` is intact."""

    records: list[dict[str, Any]]
    #: byte offset just past the newline of each record, for checkpoints and truncation
    ends: list[int]
    #: length of a torn final line (no newline: a crash mid-write), 0 when there is none
    torn_bytes: int

    @property
    def valid_bytes(self) -> int:
        return self.ends[-1] if self.ends else 0


def _looks_torn(tail: bytes) -> bool:
    """A final line without its newline is a torn write if it starts like a record.

    The writer puts a whole line, newline included, in one ``write()``, so a crash can leave a
    prefix of a record (or, after a power cut on some file systems, NUL bytes) but nothing else.
    """
    return tail.startswith(b"{") or not tail.strip(b"\0")


def _is_hex64(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _parse_line(line: bytes, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LogError(
            f"{where}: not valid UTF-8 at byte {exc.start} — the line was damaged"
        ) from None
    except json.JSONDecodeError as exc:
        raise LogError(
            f"{where}: not valid JSON ({exc.msg} at column {exc.colno}) — the line was damaged, "
            "or the file is not a selftune audit log"
        ) from None
    except (ValueError, RecursionError) as exc:  # a number of thousands of digits, deep nesting
        raise LogError(
            f"{where}: not a record ({type(exc).__name__}) — the line was damaged"
        ) from None
    if not isinstance(record, dict):
        raise LogError(f"{where}: a JSON {type(record).__name__}, not a record (an object)")
    return record


def _check_link(record: dict[str, Any], line: bytes, lineno: int, prev: str, where: str) -> None:
    """Check one record against its own hash and against the record before it."""
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise LogError(f"{where}: no integer 'seq' field — this is not a selftune audit record")
    where = f"{where} (seq {seq})"
    for name in ("prev", "hash"):
        if not _is_hex64(record.get(name)):
            raise LogError(f"{where}: '{name}' is not a 64-digit sha256 hex digest")
    if record_hash(record) != record["hash"]:
        raise LogError(
            f"{where}: hash does not match its content — the record was changed after it was "
            "written"
        )
    if canonical(record) != line:
        raise LogError(
            f"{where}: not in canonical form — the line was rewritten after it was written"
        )
    if seq != lineno - 1:
        raise LogError(
            f"{where}: seq should be {lineno - 1} on this line — a record was deleted, inserted "
            "or reordered here"
        )
    if record["prev"] != prev:
        before = f"the hash of line {lineno - 1}" if lineno > 1 else "64 zeros (the first record)"
        raise LogError(
            f"{where}: prev does not match {before} — a record was deleted, inserted or "
            "reordered before it"
        )


class _Chain:
    """The records of ``decisions.jsonl`` one at a time, each checked against its own hash and
    the record before it, with the byte offset just past its newline.

    The file is read a line at a time, so :func:`verify` holds one record whatever the log's
    length (it had read the whole file and parsed every record into memory first: a long run's
    log took some nine times its size). After the iteration, ``torn_bytes`` is the length of a
    torn final line, the only damage a reader accepts.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.torn_bytes = 0

    def __iter__(self) -> Iterator[tuple[dict[str, Any], int]]:
        path = self.path
        try:
            with path.open("rb") as handle:
                prev, offset = GENESIS, 0
                for lineno, line in enumerate(handle, start=1):
                    where = f"{path} line {lineno}"
                    if not line.endswith(b"\n"):
                        if not _looks_torn(line):
                            raise LogError(
                                f"{where}: not a record (it does not start with '{{') — the "
                                "file is damaged or is not a selftune audit log"
                            )
                        self.torn_bytes = len(line)
                        return
                    record = _parse_line(line[:-1], where)
                    _check_link(record, line[:-1], lineno, prev, where)
                    prev = record["hash"]
                    offset += len(line)
                    yield record, offset
        except FileNotFoundError:
            raise LogError(
                f"no {DECISIONS} in {path.parent}: the folder is not a selftune run folder (a "
                f"run with no decisions still has an empty {DECISIONS})"
            ) from None
        except OSError as exc:
            raise LogError(f"cannot read {path}: {exc.strerror or exc}") from None


def _scan(path: Path) -> _Scan:
    """Read ``decisions.jsonl`` and check its chain, accepting only a torn final line."""
    chain = _Chain(path)
    records: list[dict[str, Any]] = []
    ends: list[int] = []
    for record, end in chain:
        records.append(record)
        ends.append(end)
    return _Scan(records, ends, chain.torn_bytes)


def _run_folder(log_dir: str | os.PathLike[str]) -> Path:
    """``log_dir`` as a folder that exists, else a :class:`LogError` that says why it is none.

    A folder above it that may not be searched (a run of another user's, ``chmod 700``) makes
    ``Path.exists`` raise PermissionError, not answer: said as a folder that cannot be read, as
    a log that cannot be read is (it ended ``verify`` and ``report`` in a traceback).
    """
    folder = Path(log_dir).expanduser()
    try:
        exists, is_dir = folder.exists(), folder.is_dir()
    except OSError as exc:
        raise LogError(f"cannot read {folder}: {exc.strerror or exc}") from None
    if not exists:
        raise LogError(f"no run folder at {folder}: pass the log_dir the run was started with")
    if not is_dir:
        raise LogError(f"{folder} is a file, not a run folder: pass the run's log_dir")
    return folder


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        runs = sorted(p.parent.name for p in folder.glob(f"*/{MANIFEST}"))
        inside = (
            f"; it holds the run folders {', '.join(runs)} (one per optimizer): name one"
            if runs
            else ""
        )
        raise LogError(
            f"no {MANIFEST} in {folder}: the folder is not a selftune run folder, or its "
            f"manifest was deleted{inside}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LogError(f"cannot read {path}: {exc}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LogError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): the file was damaged"
        ) from None
    except (ValueError, RecursionError) as exc:  # a number of thousands of digits, deep nesting
        raise LogError(
            f"{path} is no manifest ({type(exc).__name__}): the file was damaged"
        ) from None
    if not isinstance(manifest, dict):
        raise LogError(f"{path} holds a JSON {type(manifest).__name__}, not an object")
    return manifest


@dataclass(frozen=True)
class RunLog:
    """A run folder as read back: its manifest and the records of an intact chain."""

    manifest: dict[str, Any]
    records: list[dict[str, Any]]
    #: True when the final line was torn by a crash mid-write; it is not in ``records``
    torn_tail: bool = False
    torn_bytes: int = 0


class LogStream:
    """A run folder's records one at a time, in log order, each checked as :func:`verify` checks
    it; made by :func:`iter_log`.

    A reader that needs a little of each record (the report's plots and counts, replay's
    proposals) keeps that and not the record: the records of a long run, held all at once
    as :func:`read_log` holds them, take some 2 KB of memory a decision.  The manifest is read
    and checked when the stream is made; ``torn_bytes`` is known once the records have all
    been read.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.folder = _run_folder(log_dir)
        self.manifest = _read_manifest(self.folder)
        self._check = _RecordCheck(self.folder, self.manifest)  # the manifest's check, now
        #: the length of a torn final line (a crash mid-write; not among the records), 0 for none
        self.torn_bytes = 0

    @property
    def torn_tail(self) -> bool:
        """Whether the final line was torn by a crash mid-write."""
        return self.torn_bytes > 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # each pass checks the records from the manifest's groups again
        check = self._check = _RecordCheck(self.folder, self.manifest)
        chain = _Chain(self.folder / DECISIONS)
        for record, _ in chain:
            yield check(record)
        self.torn_bytes = chain.torn_bytes


def iter_log(log_dir: str | os.PathLike[str]) -> LogStream:
    """A run folder's records as a :class:`LogStream`: read a line at a time and checked as
    :func:`read_log` checks them, raising :class:`LogError` at the first damage, so a log of any
    length is read in the memory of one record and of what the reader keeps of each."""
    return LogStream(log_dir)


def read_log(log_dir: str | os.PathLike[str]) -> RunLog:
    """Read a run folder, checking the whole chain and every record's fields, as :func:`verify`
    does; raise :class:`LogError` naming any damage.

    One pass over the file, holding every record (:func:`iter_log` gives them one at a time).
    """
    log = iter_log(log_dir)
    records = list(log)
    return RunLog(log.manifest, records, log.torn_tail, log.torn_bytes)


# --------------------------------------------------------------------------- verify


#: the largest step a record or a trace row may hold: readers keep steps in signed 64-bit
#: columns, and a larger one (which no run reaches) ended report and replay in an OverflowError
MAX_STEP = 2**63 - 1


def is_step(value: Any) -> bool:
    """Whether ``value`` is a step as the log and the trace store one: a whole number from 0 to
    :data:`MAX_STEP` (JSON's ``true`` is none)."""
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and 0 <= int(value) <= MAX_STEP
    )


def _is_number(value: Any) -> bool:
    """A number as the log stores one: NaN and the infinities by name (see ``_finite_or_name``),
    and no whole number past a float's range (the writer writes floats; JSON reads such an
    integer exactly, and report and replay ended in float()'s OverflowError)."""
    if isinstance(value, str):
        return value in ("nan", "inf", "-inf")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _schema_problem(record: Mapping[str, Any]) -> str | None:
    """Say what is wrong with a record's kind or fields, or return None when it is complete.

    Besides the fields' presence it checks the types that readers index, sort and compare by
    (``kind``, ``step``, ``signals``): a record whose chain is intact but whose step is text
    must be named here, not end ``verify`` or ``selftune report`` in a TypeError. A reason that
    is not text and a decision's values that are not numbers are named too: the wrapper writes
    neither, and the report and the watch showed them as found (an object as its ``repr``, a
    rate as "—").
    """
    kind = record.get("kind")
    if not isinstance(kind, str) or kind not in RECORD_FIELDS:
        return f"kind is {kind!r}; expected one of {', '.join(sorted(RECORD_FIELDS))}"
    missing = [name for name in RECORD_FIELDS[kind] if name not in record]
    if missing:
        return f"the {kind} record lacks {', '.join(missing)}"
    step = record.get("step", 0)
    if not is_step(step):
        return f"step is {step!r}, not a whole number from 0 to {MAX_STEP}"
    if not isinstance(record["reason"], str):
        return f"reason is {record['reason']!r}, not text"
    if kind == "decision":
        if not isinstance(record["signals"], Mapping):
            return f"signals is {record['signals']!r}, not an object"
        for name in ("old", "new", "value"):
            if not _is_number(record[name]):
                return f"{name} is {record[name]!r:.60}, not a number a float holds"
        if not isinstance(record["clipped"], bool):
            return f"clipped is {record['clipped']!r}, not true or false"
    if kind == "guard" and record["event"] not in GUARD_EVENTS:
        return f"guard event is {record['event']!r}; expected one of {', '.join(GUARD_EVENTS)}"
    return None


def _group_knobs(manifest: Mapping[str, Any], path: Path) -> list[set[str]]:
    """Check the manifest's required keys and return each param group's knob names."""
    for key in REQUIRED_MANIFEST_KEYS:
        if key not in manifest:
            raise LogError(f"{path} lacks the required key {key!r}: the manifest is incomplete")
    if manifest.get("format", FORMAT) != FORMAT:  # (a manifest written by hand may lack it)
        raise LogError(
            f"{path}: the log's format is {manifest.get('format')!r}, and this selftune reads "
            f"{FORMAT!r}: read it with the version that wrote it"
        )
    if not isinstance(manifest["config"], dict):
        kind = type(manifest["config"]).__name__
        raise LogError(f"{path}: 'config' is a {kind}, not an object: the manifest was damaged")
    groups = manifest["param_groups"]
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("knobs"), list) for g in groups
    ):
        raise LogError(f"{path}: 'param_groups' must be a list of objects with a 'knobs' list")
    return [{str(knob) for knob in group["knobs"]} for group in groups]


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found in a run folder whose log and manifest are intact."""

    path: str
    records: int
    #: sorted names of the knobs that decisions changed
    knobs: list[str] = field(default_factory=list)
    guard_events: int = 0
    torn_tail: bool = False
    torn_bytes: int = 0

    def summary(self) -> str:
        """One line for a terminal or a CI log, :func:`~selftune.terminal.printable`: the knobs'
        names and the path are the log's, and a control character among them is shown escaped
        (``\\x1b``), not obeyed."""
        knobs = " ".join(self.knobs) if self.knobs else "none"
        tail = (
            f"torn tail of {self.torn_bytes} bytes (a crash mid-write; dropped)"
            if self.torn_tail
            else "no torn tail"
        )
        return printable(
            f"{self.path}: OK, {self.records} records, knobs {knobs}, "
            f"{self.guard_events} guard events, {tail}"
        )


def _is_index(value: Any) -> bool:
    """Whether ``value`` is a whole number as JSON writes one (``true`` is no group index)."""
    return isinstance(value, int) and not isinstance(value, bool)


class _RecordCheck:
    """Checks each record of a log against the manifest and the records before it: its kind and
    fields, each decision's group and knob (a group record adds a group at the next index).

    Called on the records in log order, it returns each and keeps only what the checks need
    and :class:`VerifyResult` reports, so :func:`verify` holds one record at a time.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.group_knobs = _group_knobs(manifest, folder / MANIFEST)
        self.where = folder / DECISIONS
        self.records = 0
        self.knobs: set[str] = set()
        self.guard_events = 0

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        self.records += 1
        problem = _schema_problem(record)
        group_knobs = self.group_knobs
        if problem is None and record["kind"] == "group":
            added, knobs = record["group"], record["knobs"]
            # an index is a whole number, not a bool or a float equal to one (a decision's
            # group false passed as group 0, and the watch showed it as "gFalse")
            if (
                not _is_index(added)
                or added != len(group_knobs)
                or not isinstance(knobs, list)
                or not all(isinstance(knob, str) for knob in knobs)
            ):
                problem = (
                    f"group {added!r} added, but the run had {len(group_knobs)} groups "
                    "(a group is added at the next index, with a list of knob names)"
                )
            else:
                group_knobs.append(set(knobs))
        if problem is None and record["kind"] == "decision":
            group, knob = record["group"], record["knob"]
            if not _is_index(group) or not 0 <= group < len(group_knobs):
                problem = f"group {group!r} is not one of the manifest's {len(group_knobs)} groups"
            elif not isinstance(knob, str) or knob not in group_knobs[group]:
                problem = f"knob {knob!r} is not a knob of group {group} in the manifest"
            self.knobs.add(str(knob))
        if problem is not None:
            raise LogError(f"{self.where} line {self.records} (seq {record['seq']}): {problem}")
        self.guard_events += record["kind"] == "guard"
        return record


def verify(log_dir: str | os.PathLike[str]) -> VerifyResult:
    """Check a run folder's manifest, hash chain and records; raise :class:`LogError` on damage.

    A torn final line is accepted and reported (``torn_tail``); anything else that is wrong is an
    error naming the file, the line and the record. The log is read a line at a time and no
    record is kept, so a log of any length is checked in the memory of one line.
    """
    log = iter_log(log_dir)
    for _ in log:
        pass
    check = log._check
    return VerifyResult(
        path=str(log_dir),
        records=check.records,
        knobs=sorted(check.knobs),
        guard_events=check.guard_events,
        torn_tail=log.torn_tail,
        torn_bytes=log.torn_bytes,
    )


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old one or the whole new one."""
    try:
        write_whole(path, data)
    except OSError as exc:  # a full disk, a read-only folder: no temporary left behind
        raise LogError(f"cannot write {path}: {exc.strerror or exc}") from None


#: how the notes about the log itself begin, which a later cut past them carries forward
_RESUMED, _TORN = "resumed: dropped", "dropped a torn final line"
#: the start of the note a run resumed with other settings gets (the manifest keeps the first)
CHANGED_MANIFEST = "resumed with a changed manifest"
#: manifest keys of the start alone, which a resume may change with no note of a changed
#: manifest: when it began, and on how many ranks (the load of a checkpoint saved on another
#: number notes that at its own step, which a manifest of the start cannot tell: a run resumed
#: on other ranks and back again has the start's number, and one begun before it was kept none)
_UNCOMPARED = ("created", "world_size")

#: the run folders whose logs this process holds open: a clash with one of them is a second
#: optimizer pointed at the folder (a GAN's other player), not a run to resume or start over
_OPEN_LOGS: weakref.WeakValueDictionary[Path, AuditLog] = weakref.WeakValueDictionary()


def _holder(folder: Path) -> AuditLog | None:
    """The log this process holds open on ``folder``, if any.  A writer dropped without
    ``close()`` (a notebook cell run again) stays open until it is collected: it is collected
    first, and only one still held counts."""
    key = folder.resolve()
    if key in _OPEN_LOGS:
        gc.collect()  # a dropped wrapper in a reference cycle goes only with the collector
    found = _OPEN_LOGS.get(key)
    # a child forked while its parent held the folder holds neither its log nor its lock (it
    # closes its copy of the lock's descriptor at the fork): it found the parent's writer in its
    # copy of this table, took the folder over with no lock, and wrote it while the parent went
    # on writing
    return found if found is not None and found._pid == os.getpid() else None


def _cut_before(records: Sequence[Mapping[str, Any]], seq: int) -> str:
    """What else a checkpoint this log does not hold may be: one of this run's, saved in steps
    that a resume from an older checkpoint cut away, where the log notes such a cut before it."""
    cuts = [
        r["seq"]
        for r in records[:seq]
        if r.get("kind") == "note" and str(r.get("reason", "")).startswith(_RESUMED)
    ]
    if not cuts:
        return ""
    return (
        f", or to steps of this run that a resume from an older checkpoint cut away (the log "
        f"notes that cut at seq {cuts[-1]}): resume from a checkpoint saved since that resume"
    )


def _group_list(groups: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """A run's param groups as (size, knobs) pairs, in order, comparable however they sort."""
    return [(repr(g.get("num_params")), repr(g.get("knobs"))) for g in groups]


def _other_groups(existing: Mapping[str, Any], given: Mapping[str, Any]) -> str | None:
    """What to do about a folder whose run had as many weights in other param groups, if its
    weights may be these (their hash agrees, or the groups are the run's in another order,
    which the hash, taken in the groups' order, reads as other weights): the optimizer
    differs, not the model, which the advice to seed the weights' initialisation said."""
    logged, now = existing.get("param_groups") or [], given.get("param_groups") or []
    same_hash = existing.get("initial_params_sha256") == given.get("initial_params_sha256")
    ordered = [_group_list(logged), _group_list(now)]
    if ordered[0] == ordered[1]:  # the optimizer is the run's: the weights differ, if anything
        return None
    reordered = sorted(ordered[0]) == sorted(ordered[1])
    if existing.get("param_count") != given.get("param_count") or not (same_hash or reordered):
        return None
    knobs = [[g.get("knobs") for g in groups] for groups in (logged, now)]
    sizes = [[g.get("num_params") for g in groups] for groups in (logged, now)]
    if len(logged) != len(now):
        what = f"it had {len(logged)} param groups, this optimizer has {len(now)}"
    elif knobs[0] != knobs[1]:
        what = f"its groups' knobs were {knobs[0]}, this optimizer's are {knobs[1]}"
    else:
        what = f"its groups held {sizes[0]} parameters, this optimizer's hold {sizes[1]}"
    return (
        f"this optimizer's param groups are not the run's ({what}): to resume that run, wrap "
        "an optimizer of the class and settings it ran with, its parameters grouped as they "
        "were, in that order; to start another, pass a new log_dir"
    )


def _settle_manifest(folder: Path, manifest: Mapping[str, Any], open_here: bool) -> str | None:
    """Write the manifest if the folder has none; otherwise check the folder is this run's
    (``open_here``: another writer of this process holds its log open).

    Returns a note for the log when a resumed run's manifest differs in more than its start time.
    """
    given = _plain(manifest, "manifest")
    path = folder / MANIFEST
    if not path.exists():
        text = json.dumps(given, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
        _write_atomic(path, text.encode("utf-8") + b"\n")
        return None
    existing = _read_manifest(folder)
    clashes = [key for key in RUN_IDENTITY_KEYS if existing.get(key) != given.get(key)]
    if clashes:
        head = (
            f"{folder} already holds the log of another run (its {', '.join(clashes)} differ "
            "from this run's)"
        )
        groups = None if open_here else _other_groups(existing, given)
        if groups is not None:
            raise LogError(f"{head}: {groups}")
        if open_here:
            advice = "another optimizer in this process logs there: give each its own log_dir"
        else:
            advice = (
                "to resume that run, build its model with the run's initial weights (seed their "
                "initialisation) and wrap its optimizer before loading any weights; to start "
                "another, pass a new log_dir"
            )
        refusal = LogError(f"{head}: {advice}")
        refusal.another_run = head  # the groups' advice above holds for every framework
        raise refusal
    changed = sorted(
        key
        for key in existing.keys() | given.keys()
        if key not in _UNCOMPARED and existing.get(key) != given.get(key)
    )
    if not changed:
        return None
    # which settings, not just "config": a replay follows the first manifest's (README, Replay)
    was, now = existing.get("config"), given.get("config")
    if "config" in changed and isinstance(was, dict) and isinstance(now, dict):
        keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
        changed[changed.index("config")] = f"config: {', '.join(keys)}"
    return f"{CHANGED_MANIFEST} ({', '.join(changed)}); {MANIFEST} keeps the first"


def _continued_note(seq: int, head: str) -> str:
    """The note that opens a log continuing from the checkpoint at ``seq``/``head`` of another."""
    return f"continued from a checkpoint of another log at seq {seq - 1}, hash {head}"


def _parse_position(position: Mapping[str, Any]) -> tuple[int, str, int]:
    seq, head, size = position.get("seq"), position.get("head"), position.get("bytes")
    if (
        isinstance(seq, int)
        and isinstance(size, int)
        and isinstance(head, str)
        and _is_hex64(head)
        and min(seq, size) >= 0
    ):
        return seq, head, size
    raise LogError(
        f"{dict(position)!r} is not a log position: expected "
        "{'seq': int, 'head': sha256 hex, 'bytes': int} from AuditLog.position()"
    )


def append_line(
    fd: int, line: bytes, size: int, file: Path, last: str, *, fsync: bool = False
) -> None:
    """Append ``line`` to ``file`` (open on ``fd``, ``size`` bytes of whole lines so far).

    On an OSError (a full disk, a quota) the file is cut back to ``size`` before a
    :class:`LogError` names it: a partial line left in place would break the chain (or the
    trace's step order) for every later line, and a resume reads the file as it stands.
    ``last`` names the final line still in place, for the message.
    """
    try:
        view = memoryview(line)
        while view:  # one write() unless the OS returns short (a full disk, a signal)
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise LogError(
            f"could not append to {file}: {exc.strerror or exc}; it still ends with {last}. "
            "Free space, then resume from the last checkpoint"
        ) from exc


def open_append(file: Path, owner: object) -> tuple[int, weakref.finalize]:
    """Open ``file`` to append whole lines with ``os.write``; return its descriptor and the
    finalizer that closes it (call it to close the file).

    A raw descriptor, unlike a file object, is not closed when its holder is collected: a
    notebook that makes run after run without ``close()`` would leak two per run. The
    finalizer closes it when ``owner`` goes, and at most once.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    fd = os.open(file, flags, 0o644)
    return fd, weakref.finalize(owner, os.close, fd)


#: what a writer refused a folder it cannot write is told (a read-only mount, another user's)
_WRITABLE = "a run folder must be writable (to read a log, use read_log or verify)"


def _lock_folder(folder: Path, owner: object) -> weakref.finalize | None:
    """Lock ``folder`` for this process's writer; return the finalizer that releases the lock
    (call it to release), or None where the OS or the filesystem has no locks.

    Two processes writing one folder (a launcher killed and its command started again, resuming
    from the run's checkpoint while the old workers ran on) interleaved the trace's steps, and
    ``verify`` passed the folder.  ``flock``, the lock of the open file: the kernel drops it
    with a killed process, so a killed run leaves no stale lock.  Not a POSIX record lock
    (``lockf``), which the kernel drops when its process closes any descriptor of the file: a
    copy of the run folder made by the training process (``shutil.copytree``,
    ``mlflow.log_artifacts``) left the folder unlocked for the rest of the run.  A child forked
    while it is held (a DataLoader's worker) closes its copy of the descriptor at once
    (:func:`_let_go_in_child`): it kept the lock after the writer closed, and the run wrapped
    again in that process was refused while persistent workers lived.  A writer of this process
    that takes the folder over takes this lock with it (:meth:`AuditLog._take_over`).  The
    holder writes its process id into the file, for the message of the one refused.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the folder goes unlocked
        return None
    file = folder / WRITER_LOCK
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LogError(f"cannot open {file}: {exc.strerror or exc}; {_WRITABLE}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
            return None  # a filesystem without locks (some network mounts): as before, unlocked
        raise LogError(
            f"another process{_lock_holder(file)} is writing the run folder {folder} (a run "
            "still going, or the workers of a launcher stopped while they ran on): two writers "
            "would interleave one log. Stop it (or close() the optimizer it wrapped), or pass "
            "another log_dir; to follow the run while it goes, use `selftune watch`"
        ) from None
    with contextlib.suppress(OSError):  # only the message of a refused writer reads it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {platform.node()}\n".encode())
    return weakref.finalize(owner, os.close, fd)


def _let_go_in_child() -> None:
    """In a child just forked, close the copies of the folders' lock descriptors it inherited,
    leaving the locks with the parent, which still holds them: a copy the child kept (a
    DataLoader's persistent worker) held a folder's lock after its writer closed."""
    for log in list(_OPEN_LOGS.values()):
        handed = None if log._unlock is None else log._unlock.detach()
        log._unlock = None
        if handed is not None:
            with contextlib.suppress(OSError):
                os.close(handed[2][0])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


def _lock_holder(file: Path) -> str:
    """`` (pid N on host)``, as the holder of the lock on ``file`` wrote it, else nothing."""
    try:
        pid, _, host = file.read_text(encoding="utf-8", errors="replace").strip().partition(" ")
    except OSError:
        return ""
    return f" (pid {pid} on {printable(host)})" if pid.isdigit() else ""


#: how a resume's note carries the notes of earlier cuts it dropped
_AMONG = " (among them notes that said: "


def _unnested(reason: str) -> list[str]:
    """A dropped note, and the earlier notes it carried, in the order they were written: a
    retry from the same checkpoint carries them flat, not a note quoting a note quoting one."""
    head, among, carried = reason.partition(_AMONG)
    if not among or not carried.endswith(")"):
        return [reason]
    return [*carried[:-1].split("; "), head]


class AuditLog:
    """Appends hash-chained records to ``<log_dir>/decisions.jsonl``; one writer per folder.

    Opening a folder that already has a log checks its chain and continues it (a resumed run);
    a torn final line is cut away and noted. Each record goes to disk as one whole line in one
    ``write()``, so a crash can only tear the last line. ``fsync=True`` also survives a power cut,
    at the cost of one disk flush per record. ``enabled=False`` (ranks other than 0 under
    ``torch.distributed``) makes every method a no-op.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        manifest: Mapping[str, Any] | None = None,
        *,
        enabled: bool = True,
        fsync: bool = False,
    ) -> None:
        self.path = Path(log_dir).expanduser()
        self.enabled = enabled
        self.fsync = fsync
        self._file = self.path / DECISIONS
        self._fd: int | None = None
        self._closer: weakref.finalize | None = None
        #: releases the run folder's lock, which this writer holds while open (_lock_folder)
        self._unlock: weakref.finalize | None = None
        self._seq = 0
        self._head = GENESIS
        self._bytes = 0
        #: the notes written when the log was opened, and the seq of the first of them
        self._opening: list[str] = []
        self._opened_at = 0
        #: how many of the opening notes are in the log
        self._noted = 0
        #: the torn tail's size, and whether it was cut and the opening notes written
        self._torn, self._settled = 0, True
        #: the file's last scan and the (inode, size, mtime) it was of, until a record is written
        self._scanned: tuple[tuple[int, int, int], _Scan] | None = None
        #: another log was opened on this folder since, in this process: see :meth:`_supersede`
        self.superseded = False
        self._key = self.path.resolve()  # resolved now: a chdir before close moves "runs/x"
        self._pid = os.getpid()  # the process whose writer this is (a forked child's is not)
        holder = _holder(self.path)
        if not enabled:
            # a rank that writes nothing keeps the same account of which wrapper holds the
            # folder, so that every rank refuses a superseded wrapper's step alike (rank 0
            # alone refused, and the others went into the step's collectives without it)
            self._take_over(holder)
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = exc.strerror or str(exc)
            if self.path.exists() and not self.path.is_dir():
                why = "a file has that name; pass the path of a folder (new or a run's) instead"
            raise LogError(f"cannot create the run folder {self.path}: {why}") from None
        if holder is None:  # else this process holds the lock, and it comes with the folder
            self._unlock = _lock_folder(self.path, self)
        try:
            torn, note = self._open(manifest, holder is not None)
        except BaseException:
            self.close()  # a refused writer lets go of the folder's lock at once
            raise
        self._take_over(holder)
        if torn:
            self._opening.append(f"{_TORN} of {torn} bytes")
        if note is not None:
            self._opening.append(note)
        # the torn tail is cut and the notes written at the first record, cut or position the
        # run asks for, not here: a run refused at its first step (started over the folder of
        # a run it did not resume) wrote a note of a changed manifest into that run's log, a
        # resume that never was
        self._torn = torn
        self._settled = False

    def _open(self, manifest: Mapping[str, Any] | None, open_here: bool) -> tuple[int, str | None]:
        """Settle the manifest, read where the log ends and open it to append; return the torn
        tail's size and the note of a changed manifest, if any."""
        note = _settle_manifest(self.path, manifest, open_here) if manifest is not None else None
        torn = 0
        if self._file.exists():
            scan = self._scan_file()
            torn = scan.torn_bytes
            self._seq = len(scan.records)
            self._head = scan.records[-1]["hash"] if scan.records else GENESIS
            self._bytes = scan.valid_bytes
        try:
            self._fd, self._closer = open_append(self._file, self)
        except OSError as exc:  # a read-only run folder, a full disk
            raise LogError(
                f"cannot open {self._file} to append to it: {exc.strerror or exc}; {_WRITABLE}"
            ) from None
        return torn, note

    def _settle(self, fd: int) -> None:
        """Cut the torn tail and write the opening notes, once, before anything else.

        A write that fails (a full disk) leaves the notes not yet written to the next append:
        a run that caught the error, freed space and stepped on had lost them, and its log no
        longer said that its manifest had changed or that a torn line was cut.
        """
        if self._settled:
            return
        self._settled = True  # the notes' own appends come back here
        try:
            if self._torn:
                os.ftruncate(fd, self._bytes)
                self._torn = 0
            if self._noted == 0:
                self._opened_at = self._seq
            for reason in self._opening[self._noted :]:
                self.append({"kind": "note", "reason": reason})
                self._noted += 1
        except BaseException:
            self._settled = False
            raise

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Chain ``record`` to the log and write it; return it as stored (with seq, prev, hash)."""
        if not self.enabled:
            return dict(record)
        fd = self._open_fd()
        self._settle(fd)
        reserved = [name for name in CHAIN_FIELDS if name in record]
        if reserved:
            raise LogError(
                f"a record passed to append() has {', '.join(reserved)}: the log fills seq, prev "
                "and hash itself, so leave them out"
            )
        problem = _schema_problem(record)
        if problem is not None:
            raise LogError(f"cannot append to {self._file}: {problem}")
        self._scanned = None  # its records are held no longer than the resume that read them
        stored: dict[str, Any] = _plain(record, "")
        stored["seq"] = self._seq
        stored["prev"] = self._head
        stored["hash"] = hashlib.sha256(_dumps(stored)).hexdigest()
        line = _dumps(stored) + b"\n"
        self._write(fd, line)
        self._seq += 1
        self._head = stored["hash"]
        self._bytes += len(line)
        return stored

    def _write(self, fd: int, line: bytes) -> None:
        last = f"seq {self._seq - 1}" if self._seq else "no record"
        append_line(fd, line, self._bytes, self._file, last, fsync=self.fsync)

    def position(self) -> dict[str, Any]:
        """Where the log ends now, for a checkpoint: next seq, last hash, file size in bytes."""
        if not self._settled and self._fd is not None and not self.superseded:
            self._settle(self._fd)  # open and the folder's: a closed log writes nothing more
        return {"seq": self._seq, "head": self._head, "bytes": self._bytes}

    def truncate_to(self, position: Mapping[str, Any]) -> int:
        """Cut the log back to a checkpoint's :meth:`position`; return how many records went.

        Used when a run resumes from a checkpoint older than the log's end (it crashed after
        saving): the records written after the checkpoint describe steps that will be redone.
        An empty log (a new folder for a run continued from another one's checkpoint) is kept,
        with a note naming the checkpoint's place in the other log; a log that holds that note
        (the continued run crashed and is retried from the same checkpoint) is cut back to it.
        """
        if not self.enabled:
            return 0
        fd = self._open_fd()
        self._settle(fd)
        seq, head, size, scan = self._cut(position)
        if seq and not scan.records:
            # A new folder for a run that continues from another folder's checkpoint.
            self.append({"kind": "note", "reason": _continued_note(seq, head)})
            return 0
        # the notes written when this log was opened (a changed manifest, a torn line) say how
        # the rest of the run was made: they go back after the cut, not counted as dropped
        after = scan.records[seq:]
        opened = range(self._opened_at, self._opened_at + len(self._opening))
        kept = [r["reason"] for r in after if r["kind"] == "note" and r["seq"] in opened]
        dropped = len(after) - len(kept)
        # and what earlier cuts past the checkpoint said of the log (a second resume from the
        # same checkpoint cut the first one's note away, and the log no longer told of it)
        earlier = [
            note
            for r in after
            if r["kind"] == "note"
            and r["seq"] not in opened
            and str(r["reason"]).startswith((_RESUMED, _TORN))
            for note in _unnested(str(r["reason"]))
        ]
        os.ftruncate(fd, size)
        self._seq, self._head, self._bytes = seq, head, size
        if dropped:  # a log that already ends at the checkpoint stays byte-identical
            reason = f"{_RESUMED} {dropped} records written after the checkpoint"
            if earlier:
                reason += f"{_AMONG}{'; '.join(earlier)})"
            self.append({"kind": "note", "reason": reason})
        if kept:  # where they are now, for a later cut (a second resume in this process)
            self._opened_at, self._opening = self._seq, kept
        for reason in kept:
            self.append({"kind": "note", "reason": reason})
        return dropped

    def check_position(self, position: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Raise :class:`LogError` where :meth:`truncate_to` would, changing nothing: before a
        checkpoint's model loads (a refused checkpoint of another folder had replaced the
        weights, the step and the rates already).  Returns the records it would cut."""
        if not self.enabled:
            return []
        seq, _, _, scan = self._cut(position)
        return scan.records[seq:]

    def _cut(self, position: Mapping[str, Any]) -> tuple[int, str, int, _Scan]:
        """Where a checkpoint's position stands in this log, and the log's scan; refused where
        it does not stand in it (a checkpoint past the start of an empty log is another
        folder's, which a new folder may continue)."""
        seq, head, size = _parse_position(position)
        scan = self._scan_file()  # the file is the truth, and this proves its chain is intact
        if seq and not scan.records:
            return seq, head, size, scan
        continued = _continued_note(seq, head)
        notes = (r for r in scan.records if r["kind"] == "note" and r["reason"] == continued)
        note = next(notes, None)
        if seq and note is not None:
            # this log began as that checkpoint's continuation: the checkpoint stands at the note
            seq, head, size = note["seq"] + 1, note["hash"], scan.ends[note["seq"]]
        if seq > len(scan.records):
            raise LogError(
                f"the checkpoint is ahead of {self._file}: it expects {seq} records, the log has "
                f"{len(scan.records)} — the log was cut short or belongs to another run"
                f"{_cut_before(scan.records, seq)}"
            )
        end = scan.ends[seq - 1] if seq else 0
        hash_there = scan.records[seq - 1]["hash"] if seq else GENESIS
        if (size, head) != (end, hash_there):
            raise LogError(
                f"the checkpoint does not match {self._file}: record seq {seq - 1} there ends at "
                f"byte {end} with hash {hash_there[:12]}…, the checkpoint says byte {size} and "
                f"{head[:12]}… — the checkpoint belongs to another run folder"
                f"{_cut_before(scan.records, seq)}"
            )
        return seq, head, size, scan

    def _scan_file(self) -> _Scan:
        """The log file's scan, read and hashed again only where the file changed since the
        last: a resume scanned it four times (at the open, twice to check the checkpoint's
        position, at the cut), each a pass over every record of the run."""
        st = os.stat(self._file)
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._scanned is None or self._scanned[0] != key:
            self._scanned = (key, _scan(self._file))
        return self._scanned[1]

    def _open_fd(self) -> int:
        if self.superseded:
            raise LogError(
                f"the audit log at {self._file} was opened since by another writer in this "
                "process (an optimizer wrapped later on the same log_dir), which now holds it: "
                "two writers would interleave one chain"
            )
        if self._fd is None:
            raise LogError(f"the audit log at {self._file} is closed: open a new AuditLog")
        return self._fd

    def _take_over(self, holder: AuditLog | None) -> None:
        """Hold the folder in this process, from ``holder`` if it held it (:meth:`_supersede`),
        with its lock: released and taken again, another process could slip in between."""
        if holder is not None:
            handed = None if holder._unlock is None else holder._unlock.detach()
            if handed is not None:
                _, close, args, _ = handed
                self._unlock = weakref.finalize(self, close, *args)
            holder._supersede()
        _OPEN_LOGS[self._key] = self

    def _supersede(self) -> None:
        """Hand the folder to a log opened on it since in this process: the run resumed in a
        new wrapper while the old one is still held (a notebook, a second ``Trainer``), or a
        second optimizer given the same ``log_dir``.  Refusing the newcomer refused the
        resume; letting both write interleaved two writers in one chain (two members of an
        ensemble seeded alike passed the manifest's check).  The newest writes; this one
        refuses every record from now on."""
        self.close()
        self.superseded = True

    def sync(self) -> None:
        """Force the records appended so far to disk (a checkpoint that points into the log
        must not outlive, after a power cut, the records it points at)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file; records already appended are on disk (or in the OS's cache)."""
        if self._closer is not None:
            self._closer()
            self._fd = self._closer = None
        if self._unlock is not None:
            self._unlock()
            self._unlock = None
        if _OPEN_LOGS.get(self._key) is self:
            del _OPEN_LOGS[self._key]

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- manifest helpers


def params_sha256(params: Iterable[torch.Tensor]) -> str:
    """Return a sha256 over each tensor's dtype, shape and raw bytes, in order.

    Lets a replay or a resumed run prove it starts from the same weights. Copies each tensor to
    the CPU (a device sync; call it once, at the start of a run).
    """
    import ctypes

    import torch

    from selftune.shards import local

    digest = hashlib.sha256()
    for index, whole in enumerate(params):
        if not isinstance(whole, torch.Tensor):
            raise LogError(f"parameter {index} is a {type(whole).__name__}, not a torch.Tensor")
        param = local(whole)  # a DTensor's shard: each rank hashes what it holds
        if param.device.type == "meta" or param.layout != torch.strided:
            raise LogError(
                f"cannot hash parameter {index}: it is a {param.layout} tensor on the "
                f"{param.device.type} device; hash the parameters once they hold real values"
            )
        tensor = param.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|{nbytes}\n".encode())
        if nbytes:
            digest.update(ctypes.string_at(tensor.data_ptr(), nbytes))
    return digest.hexdigest()


def running_versions() -> dict[str, str]:
    """The versions of selftune, torch and Python running now, as a manifest records them."""
    import torch

    return {
        "selftune": _selftune_version(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def _selftune_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("selftune")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _checked_group(index: int, group: Mapping[str, Any]) -> dict[str, Any]:
    knobs, num_params = group.get("knobs"), group.get("num_params")
    if (
        group.get("index") != index
        or not isinstance(knobs, list | tuple)
        or not all(isinstance(knob, str) for knob in knobs)
        or not isinstance(num_params, int)
        or num_params < 0
    ):
        raise LogError(
            f"param group {index} is described as {dict(group)!r}: expected "
            f"{{'index': {index}, 'knobs': [str, ...], 'num_params': int >= 0}}"
        )
    return {"index": index, "knobs": list(knobs), "num_params": num_params}


def build_manifest(
    *,
    controller: str,
    config: Mapping[str, Any],
    seed: int | None,
    param_groups: Sequence[Mapping[str, Any]],
    initial_params_sha256: str | None,
    world_size: int = 1,
) -> dict[str, Any]:
    """Describe a run for ``manifest.json``: versions, controller, config, seed and model size.

    ``param_groups`` holds ``{"index": i, "knobs": [...], "num_params": n}`` per group, and
    ``initial_params_sha256`` comes from :func:`params_sha256` (None when the weights cannot be
    read yet); both identify the run when a folder is reopened.  ``world_size`` is how many
    ranks the run starts on (each rank's batch adds to the step's); a resume on another number
    is noted in the log where it happens, not as a changed manifest.
    """

    groups = [_checked_group(i, group) for i, group in enumerate(param_groups)]
    manifest = {
        "format": FORMAT,
        **running_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "controller": controller,
        "config": dict(config),
        "seed": seed,
        "param_count": sum(group["num_params"] for group in groups),
        "param_groups": groups,
        "initial_params_sha256": initial_params_sha256,
        "world_size": world_size,
    }
    result: dict[str, Any] = _plain(manifest, "manifest")  # refuse what JSON cannot hold, now
    return result


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``selftune verify``."""
    parser.add_argument("run", metavar="RUN", help="the run folder (the log_dir of the run)")


def run(args: argparse.Namespace) -> int:
    """``selftune verify RUN``: print a one-line summary and return 0, or the problem and 1."""
    try:
        result = verify(args.run)
    except LogError as exc:
        print(f"selftune verify: {printable(exc)}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0
