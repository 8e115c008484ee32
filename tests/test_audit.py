"""The audit log: writer and reader agree, any damage is named, a torn tail is survived."""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from faults import make_unsearchable

import selftune
from selftune import audit, cli
from selftune.audit import AuditLog, LogError, read_log, verify

IDENTITY = {
    "param_count": 12,
    "param_groups": [
        {"index": 0, "knobs": ["lr", "momentum"], "num_params": 10},
        {"index": 1, "knobs": ["lr", "momentum"], "num_params": 2},
    ],
    "initial_params_sha256": "ab" * 32,
}


def manifest(**changes: Any) -> dict[str, Any]:
    base = {
        "selftune": "0.1.0",
        "torch": "2.13.0",
        "python": "3.11.0",
        "controller": "auto",
        "config": {"max_step": 2.0},
        "seed": 0,
        **IDENTITY,
    }
    return {**base, **changes}


def decision(step: int, knob: str = "lr", **changes: Any) -> dict[str, Any]:
    record = {
        "kind": "decision",
        "step": step,
        "group": step % 2,
        "knob": knob,
        "old": 0.1 * step,
        "new": 0.1 * step + 1 / 3,
        "value": 1.0 + step / 7,
        "signals": {"cos": 0.25, "grad_norm": 1.5},
        "reason": "gradient aligned with the last update — grow",
        "clipped": False,
    }
    return {**record, **changes}


def guard(step: int) -> dict[str, Any]:
    return {
        "kind": "guard",
        "step": step,
        "event": "rollback",
        "signal": "loss",
        "value": float("inf"),
        "reason": "loss is not finite",
        "restored_step": step - 1,
    }


def write_run(folder: Path, n: int = 5) -> list[dict[str, Any]]:
    """Write a run of n records (decisions on lr and momentum, one guard event)."""
    records = [guard(i) if i == 3 else decision(i, "lr" if i % 2 else "momentum") for i in range(n)]
    with AuditLog(folder, manifest()) as log:
        return [log.append(record) for record in records]


def lines(folder: Path) -> list[bytes]:
    return (folder / audit.DECISIONS).read_bytes().splitlines(keepends=True)


def set_lines(folder: Path, new: list[bytes]) -> None:
    (folder / audit.DECISIONS).write_bytes(b"".join(new))


# --------------------------------------------------------------------------- round trips


def test_reader_returns_what_the_writer_stored(tmp_path: Path) -> None:
    stored = write_run(tmp_path)
    run = read_log(tmp_path)
    assert run.records == stored
    assert [r["seq"] for r in run.records] == list(range(5))
    assert run.records[0]["prev"] == audit.GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(run.records, run.records[1:], strict=False))
    assert run.manifest == manifest()
    assert not run.torn_tail

    result = verify(tmp_path)
    assert (result.records, result.knobs, result.guard_events) == (5, ["lr", "momentum"], 1)
    assert result.summary() == (
        f"{tmp_path}: OK, 5 records, knobs lr momentum, 1 guard events, no torn tail"
    )


def test_floats_round_trip_bit_exactly(tmp_path: Path) -> None:
    values = [0.1 + 0.2, 1 / 3, 5e-324, 1e-300, 1.7976931348623157e308, -0.0, 2.0**-1074 * 3]
    with AuditLog(tmp_path, manifest()) as log:
        for i, value in enumerate(values):
            log.append(decision(i, old=value, new=-value, value=value))
    for value, record in zip(values, read_log(tmp_path).records, strict=True):
        assert record["old"] == value and record["value"] == value
        assert math.copysign(1.0, record["old"]) == math.copysign(1.0, value)


def test_non_finite_signals_are_stored_as_names(tmp_path: Path) -> None:
    signals = {
        "cos": float("nan"),
        "up": float("inf"),
        "down": float("-inf"),
        "ok": [1.0, math.nan],
    }
    with AuditLog(tmp_path, manifest()) as log:
        stored = log.append(decision(0, signals=signals))
    expected = {"cos": "nan", "up": "inf", "down": "-inf", "ok": [1.0, "nan"]}
    assert stored["signals"] == expected
    assert read_log(tmp_path).records[0]["signals"] == expected
    assert b'"cos":"nan"' in lines(tmp_path)[0]
    assert verify(tmp_path).records == 1


def test_canonical_form_is_sorted_and_compact() -> None:
    assert audit.canonical({"b": 1, "a": [float("nan"), "é"]}) == '{"a":["nan","é"],"b":1}'.encode()
    with pytest.raises(LogError, match=r"signals\.x"):
        audit.canonical({"signals": {"x": object()}})


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    write_run(tmp_path, 3)
    with AuditLog(tmp_path, manifest()) as log:
        assert log.position()["seq"] == 3
        log.append(decision(3))
    assert [r["seq"] for r in read_log(tmp_path).records] == [0, 1, 2, 3]
    assert verify(tmp_path).records == 4


# --------------------------------------------------------------------------- tampering


def _change(folder: Path, index: int) -> None:
    """Edit one record's reason in place, keeping the line canonical."""
    edited = lines(folder)
    record = json.loads(edited[index])
    record["reason"] = "edited afterwards"
    edited[index] = audit.canonical(record) + b"\n"
    set_lines(folder, edited)


def _rehash(folder: Path, index: int) -> None:
    """Edit one record and give it a correct hash of its new content."""
    edited = lines(folder)
    record = json.loads(edited[index])
    record["new"] = 123.0
    record["hash"] = audit.record_hash(record)
    edited[index] = audit.canonical(record) + b"\n"
    set_lines(folder, edited)


def _reseq(folder: Path, index: int) -> None:
    """Renumber one record and rehash it: only its seq betrays it when it is the last."""
    edited = lines(folder)
    record = json.loads(edited[index])
    record["seq"] += 2
    record["hash"] = audit.record_hash(record)
    edited[index] = audit.canonical(record) + b"\n"
    set_lines(folder, edited)


def _delete(folder: Path, index: int) -> None:
    edited = lines(folder)
    del edited[index]
    set_lines(folder, edited)


def _insert(folder: Path, index: int) -> None:
    """Insert a copy of a record from elsewhere in the log."""
    edited = lines(folder)
    edited.insert(index, edited[(index + 2) % len(edited)])
    set_lines(folder, edited)


def _swap(folder: Path, index: int) -> None:
    edited = lines(folder)
    edited[index], edited[index + 1] = edited[index + 1], edited[index]
    set_lines(folder, edited)


def _reformat(folder: Path, index: int) -> None:
    """Rewrite a record with the same content but spaces: the hash still matches."""
    edited = lines(folder)
    edited[index] = json.dumps(json.loads(edited[index]), sort_keys=True).encode() + b"\n"
    set_lines(folder, edited)


# (tamper, index of the record touched, line the error must name, words it must contain)
TAMPERING = [
    *[(_change, i, i + 1, "hash does not match its content") for i in (0, 2, 4)],
    *[(_rehash, i, i + 2, "prev does not match the hash of line") for i in (0, 2, 3)],
    (_reseq, 4, 5, "seq should be 4 on this line"),
    *[(_delete, i, i + 1, "deleted, inserted or reordered") for i in (0, 2, 3)],
    *[(_insert, i, i + 1, "deleted, inserted or reordered") for i in (0, 2, 5)],
    *[(_swap, i, i + 1, "deleted, inserted or reordered") for i in (0, 2, 3)],
    *[(_reformat, i, i + 1, "not in canonical form") for i in (0, 4)],
]


@pytest.mark.parametrize(("tamper", "index", "line", "words"), TAMPERING)
def test_tampering_with_any_record_is_named(
    tmp_path: Path, tamper: Any, index: int, line: int, words: str
) -> None:
    write_run(tmp_path)
    tamper(tmp_path, index)
    with pytest.raises(LogError) as caught:
        verify(tmp_path)
    message = str(caught.value)
    assert f"{audit.DECISIONS} line {line} (seq " in message
    assert words in message
    with pytest.raises(LogError, match=f"line {line} "):
        AuditLog(tmp_path)  # a writer refuses to continue a damaged chain


def test_prev_of_the_first_record_must_be_zeros(tmp_path: Path) -> None:
    write_run(tmp_path, 2)
    edited = lines(tmp_path)
    record = json.loads(edited[0])
    record["prev"] = "1" * 64
    record["hash"] = audit.record_hash(record)
    set_lines(tmp_path, [audit.canonical(record) + b"\n", *edited[1:]])
    with pytest.raises(LogError, match=r"line 1 \(seq 0\): prev does not match 64 zeros"):
        verify(tmp_path)


# --------------------------------------------------------------------------- torn tails


def test_a_cut_at_every_byte_is_read_and_then_repaired_by_the_writer(tmp_path: Path) -> None:
    source = tmp_path / "source"
    write_run(source)
    data = (source / audit.DECISIONS).read_bytes()
    boundaries = {0} | {i + 1 for i, byte in enumerate(data) if byte == ord("\n")}
    run = tmp_path / "run"
    run.mkdir()
    (run / audit.MANIFEST).write_bytes((source / audit.MANIFEST).read_bytes())
    for cut in range(len(data) + 1):
        (run / audit.DECISIONS).write_bytes(data[:cut])
        complete = data[:cut].count(b"\n")
        result = verify(run)
        assert result.records == complete
        assert result.torn_tail == (cut not in boundaries)
        assert result.torn_bytes == cut - data[:cut].rfind(b"\n") - 1

        with AuditLog(run, manifest()) as log:
            for step in range(3):
                log.append(decision(10 + step))
        repaired = verify(run)
        assert not repaired.torn_tail
        assert repaired.records == complete + result.torn_tail + 3
        if result.torn_tail:
            note = read_log(run).records[complete]
            assert note["reason"] == f"dropped a torn final line of {result.torn_bytes} bytes"


def test_verify_holds_a_record_of_the_log_not_the_log(tmp_path: Path) -> None:
    """``verify`` reads a long log a line at a time and keeps no record: it had read the file
    whole and parsed every record first, some nine times the log's size in memory. Counted by
    tracemalloc, which sees every allocation and no other process."""
    with AuditLog(tmp_path, manifest()) as log:
        for step in range(12_000):
            log.append(decision(step, "lr" if step % 2 else "momentum"))
    size = (tmp_path / audit.DECISIONS).stat().st_size
    tracemalloc.start()
    try:
        result = verify(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.records == 12_000
    assert peak < size / 20, (peak, size)


def test_nul_bytes_after_a_power_cut_count_as_a_torn_tail(tmp_path: Path) -> None:
    write_run(tmp_path, 2)
    set_lines(tmp_path, [*lines(tmp_path), b"\0" * 40])
    result = verify(tmp_path)
    assert (result.records, result.torn_tail, result.torn_bytes) == (2, True, 40)


# --------------------------------------------------------------------------- bad input


def _manifest_only(folder: Path, text: str = "") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / audit.MANIFEST).write_text(text or json.dumps(manifest()))
    return folder


def test_a_run_without_decisions_is_valid(tmp_path: Path) -> None:
    AuditLog(tmp_path, manifest()).close()
    assert (tmp_path / audit.DECISIONS).read_bytes() == b""
    result = verify(tmp_path)
    assert (result.records, result.knobs, result.torn_tail) == (0, [], False)
    assert "0 records, knobs none" in result.summary()


@pytest.mark.parametrize(
    ("prepare", "words"),
    [
        (lambda d: d / "absent", "no run folder at"),
        (lambda d: _manifest_only(d) / audit.MANIFEST, "is a file, not a run folder"),
        (lambda d: _manifest_only(d), f"no {audit.DECISIONS} in"),
        (lambda d: _manifest_only(d, "{not json"), "manifest.json is not valid JSON"),
        (lambda d: _manifest_only(d, "[1, 2]"), "holds a JSON list, not an object"),
    ],
)
def test_bad_folders_are_named(tmp_path: Path, prepare: Any, words: str) -> None:
    with pytest.raises(LogError, match=words):
        verify(prepare(tmp_path))


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    write_run(tmp_path)
    (tmp_path / audit.MANIFEST).unlink()
    with pytest.raises(LogError, match=f"no {audit.MANIFEST} in {tmp_path}"):
        verify(tmp_path)


def test_a_run_folder_that_is_a_file_is_named(tmp_path: Path) -> None:
    """``log_dir`` given a file's path (a checkpoint's, say) said only "File exists"."""
    (tmp_path / "run.pt").write_bytes(b"a checkpoint")
    with pytest.raises(LogError, match=r"run\.pt: a file has that name; pass the path of a folder"):
        AuditLog(tmp_path / "run.pt")
    assert (tmp_path / "run.pt").read_bytes() == b"a checkpoint"


def test_a_folder_of_run_folders_names_them(tmp_path: Path) -> None:
    """Lightning's callback with several optimizers logs each to ``log_dir/opt{i}``."""
    for name in ("opt0", "opt1"):
        write_run(tmp_path / name)
    with pytest.raises(LogError, match=r"holds the run folders opt0, opt1 .*: name one"):
        verify(tmp_path)


@pytest.mark.parametrize("key", audit.REQUIRED_MANIFEST_KEYS)
def test_manifest_missing_a_key_is_named(tmp_path: Path, key: str) -> None:
    write_run(tmp_path, 1)
    incomplete = {k: v for k, v in manifest().items() if k != key}
    (tmp_path / audit.MANIFEST).write_text(json.dumps(incomplete))
    with pytest.raises(LogError, match=f"lacks the required key '{key}'"):
        verify(tmp_path)


@pytest.mark.parametrize(
    "garbage",
    [b"hello world", b"\x89PNG\r\n\x1a\n\x00\x00", b"\xff\xfe{}\n", b"[1, 2]\n", b'{"a": 1}\n'],
)
def test_garbage_decisions_are_rejected_at_line_1(tmp_path: Path, garbage: bytes) -> None:
    _manifest_only(tmp_path)
    (tmp_path / audit.DECISIONS).write_bytes(garbage)
    with pytest.raises(LogError, match=f"{audit.DECISIONS} line 1"):
        verify(tmp_path)


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"kind": "surprise", "reason": "x"}, "kind is 'surprise'"),
        (decision(0, knob="beta2"), "knob 'beta2' is not a knob of group 0"),
        (decision(0, group=5), "group 5 is not one of the manifest's 2 groups"),
        # JSON's true is no index (Python's True == 1 let it through as group 1)
        (decision(0, group=True), "group True is not one of the manifest's 2 groups"),
        (
            {
                "kind": "group",
                "step": 1,
                "group": 2.0,
                "knobs": ["lr"],
                "num_params": 3,
                "reason": "x",
            },
            r"group 2\.0 added, but the run had 2 groups",
        ),
        (
            {
                "kind": "group",
                "step": 1,
                "group": 2,
                "knobs": [{"lr": 1}],
                "num_params": 3,
                "reason": "x",
            },
            "group 2 added, but the run had 2 groups .* a list of knob names",
        ),
        # a list or object where a name goes: a TypeError (unhashable) escaped verify
        ({**decision(0), "kind": ["decision"]}, r"kind is \['decision'\]; expected one of"),
        (decision(0, knob=["lr"]), r"knob \['lr'\] is not a knob of group 0"),
        ({**decision(0), "step": None}, "step is None, not a whole number from 0 to"),
        # past a signed 64-bit column, or a float's range: report and replay raised OverflowError
        (decision(2**63), f"step is {2**63}, not a whole number from 0 to {2**63 - 1}$"),
        (decision(0, old=10**400), "old is 1000.*, not a number a float holds"),
        (decision(0, new=-(10**400)), "new is -1000.*, not a number a float holds"),
        (decision(0, signals=[1.0]), r"signals is \[1.0\], not an object"),
        # what the wrapper never writes, which the report and the watch showed as found
        (decision(0, reason={"why": "up"}), r"reason is \{'why': 'up'\}, not text"),
        ({**guard(0), "reason": None}, "reason is None, not text"),
        (decision(0, old="high"), "old is 'high', not a number a float holds"),
        (decision(0, new=[1, 2]), r"new is \[1, 2\], not a number"),
        (decision(0, value=True), "value is True, not a number"),
        (decision(0, clipped="yes"), "clipped is 'yes', not true or false"),
    ],
)
def test_records_that_do_not_fit_the_manifest_are_named(
    tmp_path: Path, record: dict[str, Any], words: str
) -> None:
    """Chain intact, content wrong: written by hand, since append() refuses the first."""
    write_run(tmp_path, 2)
    stored = {**record, "seq": 2, "prev": read_log(tmp_path).records[-1]["hash"]}
    stored["hash"] = audit.record_hash(stored)
    set_lines(tmp_path, [*lines(tmp_path), audit.canonical(stored) + b"\n"])
    with pytest.raises(LogError, match=rf"line 3 \(seq 2\): {words}"):
        verify(tmp_path)
    with pytest.raises(LogError, match=rf"line 3 \(seq 2\): {words}"):
        read_log(tmp_path)  # the reader checks as verify does, in the same pass


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"kind": "decision", "step": 1}, "the decision record lacks group, knob"),
        ({**guard(2), "event": "panic"}, "guard event is 'panic'"),
        ({"reason": "no kind"}, "kind is None"),
        ({"kind": "note", "reason": "x", "seq": 4}, "the log fills seq, prev and hash"),
        (decision(1, signals={"g": object()}), r"at signals\.g of an audit record"),
        (decision(1, signals={1: 2.0}), "cannot store key 1"),
    ],
)
def test_append_refuses_incomplete_records(
    tmp_path: Path, record: dict[str, Any], words: str
) -> None:
    with AuditLog(tmp_path, manifest()) as log:
        with pytest.raises(LogError, match=words):
            log.append(record)
        assert log.position()["seq"] == 0
    assert verify(tmp_path).records == 0


def test_a_full_disk_or_read_only_folder_at_the_start_is_a_log_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk full as the manifest was written, or a run folder that cannot be written, came
    as a bare OSError from deep inside ``wrap``, and the manifest's temporary stayed."""
    real_fsync, real_open = os.fsync, os.open

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LogError, match=r"manifest.json: No space left on device"):
        AuditLog(tmp_path / "a", manifest())
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name != audit.WRITER_LOCK] == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    write_run(tmp_path / "b", 2)

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(audit.DECISIONS) and flags & os.O_WRONLY:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(LogError, match=r"decisions.jsonl to append to it: Read-only file system"):
        AuditLog(tmp_path / "b", manifest())


def test_a_folder_of_another_run_is_refused(tmp_path: Path) -> None:
    """The refusal said "delete that folder to start over", to a resume that had built the
    model with other initial weights (the run's own log) and to a second optimizer pointed at
    a folder this process logs to; each hears what it needs."""
    write_run(tmp_path, 1)
    with pytest.raises(LogError, match=r"another run .*param_count.*pass a new log_dir") as err:
        AuditLog(tmp_path, manifest(param_count=13))
    assert "to resume that run" in str(err.value) and "delete" not in str(err.value)
    open_here = "another optimizer in this process logs there"
    with AuditLog(tmp_path, manifest()), pytest.raises(LogError, match=open_here):
        AuditLog(tmp_path, manifest(param_count=13))  # the run is open: a second optimizer
    with pytest.raises(LogError, match="to resume that run"):  # closed: no longer
        AuditLog(tmp_path, manifest(param_count=13))


def test_a_folder_opened_again_in_this_process_goes_to_the_newest_writer(tmp_path: Path) -> None:
    """Two members of an ensemble, seeded alike and wrapped before either stepped, passed the
    manifest's check (the same run, to it) and wrote their records into one chain, which
    ``verify`` then failed.  Refusing the second wrapper would refuse a run resumed in a new
    one while the old is still held (a notebook, a second ``Trainer``): the folder goes to the
    newest, and the older refuses its next step before it moves any weight."""

    def member() -> tuple[torch.nn.Module, selftune.SelfTuned]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        return model, selftune.wrap(torch.optim.AdamW(model.parameters()), log_dir=tmp_path)

    def step(model: torch.nn.Module, opt: selftune.SelfTuned) -> None:
        loss = model(torch.ones(3, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())

    first_model, first = member()
    second_model, second = member()
    before = [p.detach().clone() for p in first_model.parameters()]
    with pytest.raises(selftune.ConfigError, match=r"taken over by an optimizer wrapped on the"):
        step(first_model, first)
    assert all(torch.equal(a, b) for a, b in zip(before, first_model.parameters(), strict=True))
    step(second_model, second)
    step(second_model, second)
    first.state_dict()  # read, not written: its pending records are not the folder's now
    with pytest.raises(selftune.ConfigError, match="taken over"):  # over the second's run
        selftune.save_checkpoint(
            tmp_path.parent / f"{tmp_path.name}.pt", model=first_model, optimizer=first, step=0
        )
    first.close()  # writes nothing into the folder now the second's
    first.unwrap()
    second.close()
    verify(tmp_path)  # one writer's chain
    assert len((tmp_path / "trace.jsonl").read_text().splitlines()) == 2


def test_a_rank_that_writes_nothing_hands_the_folder_over_alike(tmp_path: Path) -> None:
    """A log of a rank other than 0 (``enabled=False``) kept no account of the folder: rank 0's
    older wrapper refused its step, the others' went into the step's collectives without it."""
    first = AuditLog(tmp_path / "run", manifest(), enabled=False)
    second = AuditLog(tmp_path / "run", manifest(), enabled=False)
    assert first.superseded and not second.superseded
    second.close()
    third = AuditLog(tmp_path / "run", manifest(), enabled=False)
    assert not third.superseded and not (tmp_path / "run").exists()


def test_a_log_closed_after_a_chdir_is_no_longer_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed after a chdir, a log opened by a relative path resolved it anew and stayed
    counted open: a later clash there blamed a second optimizer."""
    monkeypatch.chdir(tmp_path)
    log = AuditLog(Path("runs/x"), manifest())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    log.close()
    with pytest.raises(LogError, match="to resume that run"):
        AuditLog(tmp_path / "runs" / "x", manifest(param_count=13))


def test_a_resumed_run_may_change_its_config_and_says_so(tmp_path: Path) -> None:
    write_run(tmp_path, 1)
    AuditLog(tmp_path, manifest(created="later")).close()
    assert verify(tmp_path).records == 1  # a new start time alone is not worth a note
    AuditLog(tmp_path, manifest(config={"max_step": 3.0})).close()
    assert verify(tmp_path).records == 1  # a run that wrote nothing continued nothing
    log = AuditLog(tmp_path, manifest(config={"max_step": 3.0}))
    log.append({"kind": "note", "reason": "the resumed run's first record"})
    log.close()
    note = read_log(tmp_path).records[-2]  # written before the run's first record
    assert note["kind"] == "note" and "(config: max_step)" in note["reason"]
    assert read_log(tmp_path).manifest == manifest()


def test_opening_notes_that_a_full_disk_refused_are_written_at_the_next_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resumed run's note of a changed manifest failed to write (a full disk); the run
    caught the error and stepped on, and its log went on without the note."""
    write_run(tmp_path, 1)
    log = AuditLog(tmp_path, manifest(config={"max_step": 3.0}))
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(LogError, match="No space left on device"):
        log.append(decision(1))
    monkeypatch.setattr(os, "write", real_write)
    log.append(decision(1))
    log.close()
    note, first = read_log(tmp_path).records[1:]
    assert note["kind"] == "note" and "(config: max_step)" in note["reason"]
    assert first["kind"] == "decision" and first["step"] == 1


def test_a_run_refused_over_another_run_s_folder_writes_nothing_into_its_log(
    tmp_path: Path,
) -> None:
    """A run started again over a finished run's folder with another rate, and no checkpoint
    loaded, is refused at its first step; it had already written a note of a resume with a
    changed manifest into the run's chain, which ``verify`` passed, and which the real run's
    resume later counted among the records it dropped."""

    def start(lr: float) -> tuple[torch.nn.Module, selftune.SelfTuned]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        return model, selftune.wrap(torch.optim.SGD(model.parameters(), lr=lr), log_dir=tmp_path)

    model, opt = start(0.05)
    for _ in range(3):
        loss = model(torch.ones(3, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
    opt.close()
    before = (tmp_path / "decisions.jsonl").read_bytes()
    model, opt = start(0.03)
    loss = model(torch.ones(3, 4)).square().mean()
    loss.backward()
    with pytest.raises(selftune.ConfigError, match="already holds steps of this run"):
        opt.step(loss=loss.detach())
    opt.close()
    assert (tmp_path / "decisions.jsonl").read_bytes() == before


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_a_run_dropped_without_close_leaves_no_file_open(tmp_path: Path) -> None:
    """The log and the trace are raw descriptors, which nothing closed when the wrapper went:
    a notebook making run after run without ``close()`` lost two per run."""

    def open_fds() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    gc.collect()
    before = open_fds()
    for k in range(5):
        w = torch.nn.Parameter(torch.ones(3))
        opt = selftune.wrap(torch.optim.SGD([w], lr=0.1), log_dir=tmp_path / f"run{k}")
        w.grad = torch.ones(3)
        opt.step()
        del opt, w
    gc.collect()
    assert open_fds() == before


def test_a_closed_or_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "run", manifest())
    log.close()
    with pytest.raises(LogError, match="is closed"):
        log.append(decision(0))

    off = AuditLog(tmp_path / "rank1", manifest(), enabled=False)
    assert off.append(decision(0)) == decision(0)
    assert off.truncate_to({"seq": 0, "head": audit.GENESIS, "bytes": 0}) == 0
    assert off.position() == {"seq": 0, "head": audit.GENESIS, "bytes": 0}
    assert not (tmp_path / "rank1").exists()


# --------------------------------------------------------------------------- checkpoints


def test_truncate_to_drops_records_after_a_checkpoint(tmp_path: Path) -> None:
    with AuditLog(tmp_path, manifest(), fsync=True) as log:
        for step in range(3):
            log.append(decision(step))
        checkpoint = log.position()
        for step in range(3, 7):
            log.append(decision(step))
    with AuditLog(tmp_path, manifest()) as log:  # a new process, resuming after a crash
        assert log.truncate_to(checkpoint) == 4
        log.append(decision(3, reason="redone"))
    records = read_log(tmp_path).records
    assert [r["kind"] for r in records] == ["decision"] * 3 + ["note", "decision"]
    assert records[3]["reason"] == "resumed: dropped 4 records written after the checkpoint"
    assert records[3]["prev"] == checkpoint["head"]
    assert records[4]["reason"] == "redone"
    assert verify(tmp_path).records == 5


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"head": "f" * 64}, "belongs to another run folder"),
        ({"bytes": 5}, "belongs to another run folder"),
        ({"seq": 9}, "the checkpoint is ahead of"),
        ({"head": "short"}, "is not a log position"),
        ({"seq": -1}, "is not a log position"),
    ],
)
def test_truncate_to_refuses_a_foreign_checkpoint(
    tmp_path: Path, change: dict[str, Any], words: str
) -> None:
    write_run(tmp_path, 3)
    with AuditLog(tmp_path) as log:
        position = {**log.position(), "seq": 2, **change}
        with pytest.raises(LogError, match=words):
            log.truncate_to(position)
    assert verify(tmp_path).records == 3


def test_a_new_folder_may_continue_from_another_runs_checkpoint(tmp_path: Path) -> None:
    write_run(tmp_path / "a", 3)
    with AuditLog(tmp_path / "a") as log:
        checkpoint = log.position()
    with AuditLog(tmp_path / "b", manifest()) as log:
        assert log.truncate_to(checkpoint) == 0
    (note,) = read_log(tmp_path / "b").records
    assert note["reason"].endswith(f"at seq 2, hash {checkpoint['head']}")


def test_a_retried_continuation_is_cut_back_to_its_first_note(tmp_path: Path) -> None:
    """The continued run crashed in its new folder and is retried from the same checkpoint:
    its records go, the note that names the checkpoint stays, and a later record chains on."""
    write_run(tmp_path / "a", 3)
    with AuditLog(tmp_path / "a") as log:
        checkpoint = log.position()
    with AuditLog(tmp_path / "b", manifest()) as log:
        log.truncate_to(checkpoint)
        for step in range(3, 7):
            log.append(decision(step))
    with AuditLog(tmp_path / "b", manifest()) as log:
        assert log.truncate_to(checkpoint) == 4
        log.append(decision(3, reason="redone"))
    first, note, redone = read_log(tmp_path / "b").records
    assert first["reason"].endswith(f"at seq 2, hash {checkpoint['head']}")
    assert note["reason"] == "resumed: dropped 4 records written after the checkpoint"
    assert (note["prev"], redone["reason"]) == (first["hash"], "redone")
    assert verify(tmp_path / "b").records == 3
    with AuditLog(tmp_path / "b") as log, pytest.raises(LogError, match="another run folder"):
        log.truncate_to({**checkpoint, "head": "f" * 64})  # another checkpoint's continuation


# --------------------------------------------------------------------------- command line


@pytest.fixture
def verify_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the real ``main`` to this command only, whatever other commands need to import."""
    monkeypatch.setattr(cli, "COMMANDS", {"verify": cli.COMMANDS["verify"]})


def test_cli_says_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    """What a bug report needs first, as every command line gives it."""
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"selftune {selftune.__version__}"


def test_cli_says_where_replay_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The guide's replay is a function a script calls: argparse's bare "invalid choice" left
    its reader looking for the command."""
    assert cli.main(["replay", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "selftune.replay(optimizer, RUN)" in err and "selftune verify RUN" in err


def test_python_dash_m_selftune_is_the_command() -> None:
    """``python -m selftune`` failed ("No module named selftune.__main__"): the way to reach
    the command from an environment whose scripts are not on PATH."""
    done = subprocess.run(
        [sys.executable, "-m", "selftune", "--version"], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"selftune {selftune.__version__}")


@pytest.mark.usefixtures("verify_only")
def test_cli_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path)
    assert cli.main(["verify", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == verify(tmp_path).summary() and err == ""


@pytest.mark.usefixtures("verify_only")
def test_cli_reports_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path)
    _swap(tmp_path, 1)
    assert cli.main(["verify", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("selftune verify: ") and "line 2 (seq 2)" in err
    assert cli.main(["verify", str(tmp_path / "nowhere")]) == 1
    assert "no run folder at" in capsys.readouterr().err


@pytest.mark.usefixtures("verify_only")
def test_a_run_folder_inside_one_that_may_not_be_searched_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run folder inside a folder of another user's (``chmod 700``): Path.exists raised
    PermissionError, and verify (report too) ended in its traceback, not a LogError."""
    run = tmp_path / "locked" / "run"
    write_run(run)
    make_unsearchable(run.parent, monkeypatch)
    with pytest.raises(LogError, match=f"cannot read {re.escape(str(run))}: Permission denied"):
        verify(run)
    assert cli.main(["verify", str(run)]) == 1
    assert capsys.readouterr().err == f"selftune verify: cannot read {run}: Permission denied\n"


# --------------------------------------------------------------------------- manifest helpers


def test_params_sha256_sees_values_dtype_and_shape() -> None:
    torch = pytest.importorskip("torch")
    weights = [torch.arange(6.0).reshape(2, 3), torch.ones(3)]
    base = audit.params_sha256(weights)
    assert audit.params_sha256([w.clone() for w in weights]) == base
    assert audit.params_sha256([weights[0].t().contiguous().t(), weights[1]]) == base
    nudged = weights[0].clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(100.0))
    assert audit.params_sha256([nudged, weights[1]]) != base
    assert audit.params_sha256([weights[0].reshape(3, 2), weights[1]]) != base
    assert audit.params_sha256([weights[0].double(), weights[1]]) != base
    assert audit.params_sha256(weights[::-1]) != base
    with pytest.raises(LogError, match=r"parameter 0: .* on the meta device"):
        audit.params_sha256([torch.empty(2, device="meta")])


def test_build_manifest_describes_the_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    groups = IDENTITY["param_groups"]
    built = audit.build_manifest(
        controller="auto",
        config={"bounds": (1e-5, float("inf"))},
        seed=None,
        param_groups=groups,
        initial_params_sha256="cd" * 32,
    )
    assert set(audit.REQUIRED_MANIFEST_KEYS) <= built.keys()
    assert built["param_count"] == 12 and built["param_groups"] == groups
    assert built["config"] == {"bounds": [1e-5, "inf"]}
    AuditLog(tmp_path, built).close()
    assert verify(tmp_path).records == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [audit.MANIFEST, audit.DECISIONS, audit.WRITER_LOCK]
    )
    with pytest.raises(LogError, match="param group 0 is described as"):
        audit.build_manifest(
            controller="auto",
            config={},
            seed=0,
            param_groups=[{"index": 0, "knobs": "lr", "num_params": 3}],
            initial_params_sha256=None,
        )


@pytest.mark.usefixtures("verify_only")
def test_cli_prints_control_characters_of_the_log_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The summary names the knobs the decisions changed, as the manifest spells them: a knob
    ``"lr\\x1b[2J"`` cleared the screen of whoever checked the log."""
    groups = [{"index": 0, "knobs": ["lr\x1b[2J", "momentum\r"], "num_params": 12}]
    with AuditLog(tmp_path, manifest(param_groups=groups)) as log:
        log.append(decision(0, "lr\x1b[2J", group=0))
        log.append(decision(1, "momentum\r", group=0))
    assert cli.main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "knobs lr\\x1b[2J momentum\\r, 0 guard events" in out and "\x1b" not in out


#: another process opening the run folder in argv[1] as its writer; argv[2] "hold" keeps it
_WRITER = """
import sys, time
from selftune.audit import AuditLog, LogError
try:
    log = AuditLog(sys.argv[1])
except LogError as exc:
    print(exc, flush=True)
    sys.exit(3)
print("opened", flush=True)
if sys.argv[2] == "hold":
    time.sleep(600)
"""


def _other_writer(folder: Path, hold: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(folder), "hold" if hold else "once"],
        stdout=subprocess.PIPE,
        text=True,
    )


def _opens(folder: Path) -> str:
    """What another process opening ``folder`` as its writer says."""
    out, _ = _other_writer(folder).communicate(timeout=120)
    return out.strip()


@pytest.mark.skipif(sys.platform == "win32", reason="the folder's lock is flock's")
def test_a_second_process_is_refused_the_folder_a_killed_one_is_not(tmp_path: Path) -> None:
    """Two processes writing one folder (a launcher killed and started again, resuming while
    its workers ran on) interleaved the trace's steps, and ``verify`` passed the folder. A
    killed writer must leave no stale lock behind."""
    holder = _other_writer(tmp_path, hold=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "opened"
        with pytest.raises(LogError, match=rf"another process \(pid {holder.pid} on .*Stop it"):
            AuditLog(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=60)
    AuditLog(tmp_path).close()  # the kernel dropped the killed writer's lock


@pytest.mark.skipif(sys.platform == "win32", reason="the folder's lock is flock's")
def test_the_folders_lock_passes_with_it_and_goes_with_the_writer(tmp_path: Path) -> None:
    """A writer that takes the folder over in this process takes the lock with it (released
    and taken again, another process could slip in); a child forked while it was held (a
    DataLoader's persistent worker) does not keep it after the writer closes."""
    import multiprocessing

    first = AuditLog(tmp_path)
    second = AuditLog(tmp_path)  # the run wrapped again in a notebook cell
    assert first.superseded
    assert _opens(tmp_path).startswith("another process")
    first.close()  # the superseded writer's close lets go of nothing it no longer holds
    assert _opens(tmp_path).startswith("another process")
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=time_sleep, args=(600,), daemon=True)
    child.start()
    try:
        second.close()
        assert _opens(tmp_path) == "opened"
    finally:
        child.kill()
        child.join(timeout=60)


@pytest.mark.skipif(sys.platform == "win32", reason="the folder's lock is flock's")
def test_a_copy_of_the_folder_made_by_its_writer_leaves_it_locked(tmp_path: Path) -> None:
    """A POSIX record lock is dropped when its process closes any descriptor of the file: a
    copy of the run folder made by the training process (``shutil.copytree``, an upload of
    its artifacts) left the folder unlocked for the rest of the run."""
    import shutil

    log = AuditLog(tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    assert _opens(tmp_path / "run").startswith("another process")
    log.close()
    assert _opens(tmp_path / "run") == "opened"


def time_sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def test_a_writer_refused_its_folder_lets_go_of_the_lock(tmp_path: Path) -> None:
    """Refused at the manifest (another run's folder), a writer held the folder's lock until
    it was collected, and its traceback kept it (a notebook keeps the last one): the run's own
    process was then refused its folder."""
    AuditLog(tmp_path, manifest()).close()
    with pytest.raises(LogError, match="another run") as refused:
        AuditLog(tmp_path, manifest(seed=1, initial_params_sha256="cd" * 32))
    assert refused.tb is not None  # held here as a notebook holds it
    assert _opens(tmp_path) == "opened"


@pytest.mark.skipif(sys.platform == "win32", reason="the folder's lock is flock's")
def test_a_forked_child_is_refused_the_folder_its_parent_holds(tmp_path: Path) -> None:
    """A child forked while its parent's writer held the folder (a training function started
    with multiprocessing's fork on the same ``log_dir``) found that writer in its copy of this
    process's open logs, took it over there with a lock it does not hold (it closes its copy
    of the lock's descriptor), and wrote the folder while the parent went on writing it."""
    log = AuditLog(tmp_path)
    pid = os.fork()
    if pid == 0:  # the child: 3 refused, as another process is
        code = 1
        try:
            AuditLog(tmp_path)
        except LogError as exc:
            code = 3 if f"pid {os.getppid()}" in str(exc) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 3
    assert not log.superseded
    log.close()


def test_a_read_only_run_folder_is_told_to_read_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run folder on a read-only mount, opened as a writer: the folder's lock, opened first,
    said only "cannot open writer.lock: Read-only file system", without what the log's own
    file said, that a run folder must be writable and how to read its log instead."""
    write_run(tmp_path / "b", 2)
    (tmp_path / "b" / audit.WRITER_LOCK).unlink()  # as a run of the version before left it
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if Path(path).parent == tmp_path / "b" and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(LogError, match=r"Read-only file system; a run folder must be writable"):
        AuditLog(tmp_path / "b", manifest())


@pytest.mark.skipif(sys.platform == "win32", reason="the folder's lock is flock's")
def test_a_wrap_refused_its_trace_lets_go_of_the_folder(tmp_path: Path) -> None:
    """A wrap whose log opened and whose trace could not (``trace.jsonl`` a folder, or another
    user's file) raised with the log still open: its traceback, which a notebook keeps, held
    the folder's lock and refused the run's next process."""
    torch = pytest.importorskip("torch")
    import selftune

    (tmp_path / "trace.jsonl").mkdir()
    model = torch.nn.Linear(2, 1)
    with pytest.raises(OSError) as refused:
        selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path)
    assert refused.tb is not None  # held here as a notebook holds it
    assert _opens(tmp_path) == "opened"
