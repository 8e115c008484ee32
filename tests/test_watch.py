"""``selftune watch``: follows a run that is being written, and never shows a half-written line."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from browser import FakeRun, decision_record, guard_record
from faults import make_unsearchable

import selftune
from selftune import cli, watch
from selftune.watch import LineTail, WatchState, sparkline

HP = [{"lr": 0.1, "momentum": 0.9}]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich sizes its output to COLUMNS: wide enough that a reason is never folded in two."""
    monkeypatch.setenv("COLUMNS", "200")


def watch_once(folder: Path, capsys: pytest.CaptureFixture) -> str:
    assert cli.main(["watch", str(folder), "--once"]) == 0
    return capsys.readouterr().out


def shown_count(frame: str, what: str) -> int:
    match = re.search(rf"{what} (\d+)", frame)
    assert match, frame
    return int(match.group(1))


def test_tail_returns_only_complete_lines_and_restarts_after_a_cut(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    tail = LineTail(path)
    assert tail.read() == ([], False)  # not created yet
    path.write_bytes(b'{"a": 1}\n{"b"')
    assert tail.read() == ([b'{"a": 1}'], False)
    assert tail.read() == ([], False)
    with open(path, "ab") as file:
        file.write(b': 2}\n\n{"c": 3}\n')
    assert tail.read() == ([b'{"b": 2}', b'{"c": 3}'], False)
    path.write_bytes(b'{"a": 1}\n')  # cut back, as a resumed run does
    assert tail.read() == ([b'{"a": 1}'], True)


def test_tail_restarts_after_a_cut_the_file_has_grown_back_past(tmp_path: Path) -> None:
    """A resumed run may append past the point read to before the next poll: only the size
    was checked, so the cut went unseen and the tail read on from the middle of a line."""
    path = tmp_path / "log.jsonl"
    tail = LineTail(path)
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    assert tail.read() == ([b'{"a": 1}', b'{"b": 2}'], False)
    path.write_bytes(b'{"a": 1}\n{"note": "resumed"}\n{"b": 2}\n')  # cut, then longer
    assert tail.read() == ([b'{"a": 1}', b'{"note": "resumed"}', b'{"b": 2}'], True)


def test_half_written_record_is_read_once_when_its_newline_arrives(tmp_path: Path) -> None:
    run = FakeRun(tmp_path / "run")
    run.decision(1, 0, "lr", 0.1, 0.2, "first")
    line = run.record_line(guard_record(2, "skip", "loss", "nan", "second, σ above"))
    cut = line.index("σ".encode()) + 1  # inside the two bytes of σ
    with open(run.folder / "decisions.jsonl", "ab") as file:
        file.write(line[:cut])
    state = WatchState(run.folder)
    state.poll()
    assert [r["reason"] for r in state.recent] == ["first"]
    with open(run.folder / "decisions.jsonl", "ab") as file:
        file.write(line[cut:])
    state.poll()
    state.poll()
    assert [r["reason"] for r in state.recent] == ["first", "second, σ above"]
    assert (state.decisions, state.guards, state.bad_lines) == (1, 1, 0)


def test_watch_once_shows_what_a_background_writer_has_completed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The writer stops halfway through each line; each frame must show exactly what is complete."""
    run = FakeRun(tmp_path / "run")
    half_written, go_on = threading.Event(), threading.Event()
    lines: list[tuple[str, bytes]] = []
    for step in range(1, 5):
        lines.append(("trace", json.dumps({"step": step, "loss": 1 / step, "hp": HP}).encode()))
        decision = decision_record(step, 0, "lr", 0.1, 0.1, f"reason-{step}")
        lines.append(("decisions", run.record_line(decision)))
    guard = guard_record(4, "rollback", "grad_norm", "inf", "guard-reason")
    lines.append(("decisions", run.record_line(guard)))

    def writer() -> None:
        for name, line in lines:
            path = run.folder / f"{name}.jsonl"
            with open(path, "ab") as file:
                file.write(line[: len(line) // 2])
            half_written.set()
            go_on.wait(timeout=30)
            go_on.clear()
            with open(path, "ab") as file:
                file.write(line[len(line) // 2 :].rstrip(b"\n") + b"\n")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    for done in range(len(lines)):
        assert half_written.wait(timeout=30)
        half_written.clear()
        frame = watch_once(run.folder, capsys)
        complete = lines[:done]
        steps = [json.loads(line)["step"] for name, line in complete if name == "trace"]
        assert (f"step {steps[-1]} " if steps else "step — ") in frame
        if steps:
            assert f"loss {1 / steps[-1]:.4g}" in frame
        reasons = [json.loads(line)["reason"] for name, line in complete if name == "decisions"]
        assert shown_count(frame, "decisions") == sum(r.startswith("reason") for r in reasons)
        for step in range(1, 5):  # only completed records, and all of them
            assert (f"reason-{step}" in frame) == (f"reason-{step}" in reasons)
        assert "guard-reason" not in frame and "damaged" not in frame
        go_on.set()
    thread.join(timeout=30)
    frame = watch_once(run.folder, capsys)
    assert "guard events 1" in frame and "GUARD rollback" in frame and "guard-reason" in frame
    assert "grad_norm = inf" in frame


def test_frames_never_run_ahead_of_a_fast_writer(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Lines arrive in random pieces, cut anywhere (even inside a character), while frames show."""
    run = FakeRun(tmp_path / "run")
    total = 120
    data = b"".join(
        run.record_line(decision_record(i, 0, "lr", 0.1, 0.1, f"σ step {i}", grad_norm=1.0))
        for i in range(total)
    )
    completed = [0]

    def writer() -> None:
        rng = random.Random(0)
        start = 0
        with open(run.folder / "decisions.jsonl", "ab", buffering=0) as file:
            while start < len(data):
                piece = data[start : start + rng.randint(1, 300)]
                start += len(piece)
                # counted before the write: a frame read just after it may already show them
                completed[0] = data[:start].count(b"\n")
                file.write(piece)
                time.sleep(0.001)  # let frames be drawn between pieces

    live = WatchState(run.folder)  # one state polled all along, as the live view does
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    seen, frames = 0, 0
    while thread.is_alive():
        frames += 1
        live.poll()
        frame = watch_once(run.folder, capsys)
        shown = shown_count(frame, "decisions")
        assert seen <= shown <= completed[0] and live.decisions <= completed[0]
        assert "damaged" not in frame
        seen = shown
    thread.join()
    assert frames > 1, "the writer finished before a frame was drawn mid-write"
    live.poll()
    assert shown_count(watch_once(run.folder, capsys), "decisions") == live.decisions == total
    assert [r["step"] for r in live.recent] == list(range(total - len(live.recent), total))
    assert live.bad_lines == 0


def test_a_run_cut_back_on_resume_is_read_again(tmp_path: Path) -> None:
    run = FakeRun(tmp_path / "run")
    for step in range(3):
        run.trace(step, 1.0, HP)
        run.decision(step, 0, "lr", 0.1, 0.1, f"r{step}")
    state = WatchState(run.folder)
    state.poll()
    assert (state.step, state.decisions, len(state.losses)) == (2, 3, 3)
    for name in ("decisions", "trace"):  # keep the first line, as a resume from step 0 would
        path = run.folder / f"{name}.jsonl"
        path.write_text(path.read_text().splitlines(keepends=True)[0])
    state.poll()
    assert (state.step, state.decisions, len(state.losses)) == (0, 1, 1)
    assert [r["reason"] for r in state.recent] == ["r0"]


def test_damaged_lines_are_counted_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = FakeRun(tmp_path / "run")
    run.trace(0, "nan", HP)
    with open(run.folder / "decisions.jsonl", "a") as file:
        file.write("not json\n[1, 2]\n")
        # a number of thousands of digits and deep nesting: json.loads raised ValueError and
        # RecursionError, not JSONDecodeError, past the watch
        file.write('{"step": ' + "9" * 5000 + "}\n" + "[" * 100_000 + "\n")
    with open(run.folder / "trace.jsonl", "a") as file:
        file.write('{"step": ' + "9" * 5000 + "}\n")
    frame = watch_once(run.folder, capsys)
    assert "5 damaged lines skipped" in frame and "selftune verify" in frame
    assert "loss nan" in frame and "step 0 " in frame


def test_sparkline_scales_to_the_range_shown() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([1e-4, 1e-3, 1e-2], log=True) == "▁▅█"
    assert sparkline([2.0, float("nan"), 2.0]) == "▅ ▅"
    assert sparkline([0.0, -1.0], log=True) == "  "  # no log of a rate that is not positive
    assert sparkline([]) == ""


def test_the_lr_sparkline_shows_the_newest_steps_at_80_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rich cut the lr column's sparkline at its end ("…") at 80 columns: with Adam's three
    knobs beside it, the newest 20 of its 60 steps were hidden, a rate halved at the last
    steps with them. It now drops the oldest steps that do not fit."""
    monkeypatch.setenv("COLUMNS", "80")
    run = FakeRun(tmp_path / "run", knobs=[("lr", "beta1", "beta2")] * 2)
    for step in range(1, 71):
        lr = 1e-3 if step <= 67 else 5e-4  # halved at the last three steps
        run.trace(step, 1.0, [{"lr": lr, "beta1": 0.9, "beta2": 0.999}] * 2)
    frame = watch_once(run.folder, capsys)
    assert "…" not in frame, frame
    rows = re.findall(r"^ +[01] +0\.0005 +0\.9 +0\.999 +(\S+) *$", frame, re.MULTILINE)
    assert len(rows) == 2, frame
    for spark in rows:  # as many steps as fit, the newest last
        assert re.fullmatch("█{30,}▁▁▁", spark), frame


def _three_steps(model: torch.nn.Module, opt: selftune.SelfTuned) -> None:
    """Train ``model`` three real steps with the wrapped ``opt``, then close its run folder."""
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.ones(4, 3)).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
    opt.close()


def test_a_group_added_mid_run_has_its_newest_rate_under_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The sparkline of a group added mid-run (gradual unfreezing) was drawn from the start of
    its column, its newest rate under the others' rates of steps before."""
    body, head = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    opt = selftune.wrap(torch.optim.SGD(body.parameters(), lr=0.1), log_dir=tmp_path / "run")
    for step in range(12):
        if step == 6:
            opt.add_param_group({"params": head.parameters(), "lr": 0.01})
        opt.zero_grad()
        (body(torch.ones(4, 3)) + head(torch.ones(4, 3))).pow(2).mean().backward()
        opt.step()
    opt.close()
    frame = watch_once(tmp_path / "run", capsys)
    rows = [line.rstrip() for line in frame.splitlines() if re.match(r"\s+[01]\s+0\.", line)]
    assert len(rows) == 2
    sparks = [re.findall(r"[▁-█]+", row) for row in rows]
    assert [len(spark[0]) for spark in sparks] == [12, 6], rows
    assert len(rows[0]) == len(rows[1])  # each line ends at its newest rate: one column


def test_a_folder_of_run_folders_names_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two optimizers log to ``log_dir/opt0`` and ``log_dir/opt1`` (the Lightning callback):
    watching ``log_dir`` itself waited for a first step that never came, with exit 0."""
    model = torch.nn.Linear(3, 1)
    for index in range(2):
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        _three_steps(model, selftune.wrap(inner, log_dir=tmp_path / "gan" / f"opt{index}"))
    assert cli.main(["watch", str(tmp_path / "gan"), "--once"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("selftune watch: ") and "opt0, opt1" in err
    assert watch_once(tmp_path / "gan" / "opt0", capsys).count("step 3 ") == 1


def _training_script(monkeypatch: pytest.MonkeyPatch, *acts: Any) -> None:
    """Do ``acts`` one at a time between the live view's refreshes, then press Ctrl-C; draw
    every refresh (rich draws only the last one where the output is no terminal)."""
    from rich.console import Console

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    monkeypatch.setenv("COLUMNS", "1000")  # a message is never folded in two
    pending = iter(acts)

    def sleep(_: float) -> None:
        act = next(pending, None)
        if act is None:
            raise KeyboardInterrupt
        act()

    monkeypatch.setattr(watch.time, "sleep", sleep)


def test_a_run_folder_not_made_yet_is_waited_for(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live view started before the training script made its folder exited at once ("no run
    folder"), backwards for a live view; it now waits, and says what for, as the script makes
    the folder and then writes the run in it."""
    folder = tmp_path / "runs" / "live"
    _training_script(
        monkeypatch,
        lambda: folder.mkdir(parents=True),
        lambda: FakeRun(folder).trace(1, 0.5, HP),
        lambda: None,
    )
    assert cli.main(["watch", str(folder)]) == 0
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().out)  # a terminal's codes
    missing = out.index(f"no run folder at {folder} (yet); waiting for it to be made…")
    empty = out.index(f"no selftune run in {folder} (yet): none of manifest.json, ", missing)
    assert out.index("waiting for the run to start…", empty) < out.index("step 1 ", empty)


def test_a_folder_of_run_folders_made_while_waited_for_names_them(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting will not mend a log_dir that holds a run folder per optimizer: it is said, as
    it is when the folder is there from the start."""
    folder = tmp_path / "gan"
    _training_script(monkeypatch, lambda: FakeRun(folder / "opt0"))
    assert cli.main(["watch", str(folder)]) == 1
    assert "it holds the run folders opt0 (one per optimizer)" in capsys.readouterr().err


@pytest.mark.parametrize("contents", [(), ("pyproject.toml", "README.md")])
def test_watch_once_of_a_folder_without_a_run_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture, contents: tuple[str, ...]
) -> None:
    """``--once`` on /etc, a project root or an empty folder printed "waiting for the first
    step…" and exited 0: there is no run to show, and nothing to wait for under --once."""
    folder = tmp_path / "project"
    folder.mkdir()
    for name in contents:
        (folder / name).write_text("x")
    assert cli.main(["watch", str(folder), "--once"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"selftune watch: no selftune run in {folder} (yet): none of ")
    assert "leave out --once to wait for the run to start" in err


@pytest.mark.parametrize(
    ("args", "status", "expected"),
    [
        (["missing", "--once"], 1, "no run folder at"),
        (["file"], 1, "is a file, not a run folder"),
        # a usage error: 2, as argparse's own (it was 1, as for a folder that holds no run)
        (["run", "--interval", "0"], 2, "--interval 0.0: pass a number of seconds above 0"),
        (["run", "--interval", "-1"], 2, "--interval -1.0: pass a number of seconds above 0"),
        # time.sleep raised OverflowError: refused, as 0 is, not clamped to a view that never
        # refreshes (--once: were one taken, the test would not sleep on it)
        (["run", "--once", "--interval", "1e10"], 2, "--interval 10000000000.0: pass a number"),
        (["run", "--once", "--interval", "86400.5"], 2, "above 0 and at most 86400 (a day)"),
        (["run", "--once", "--interval", "inf"], 2, "--interval inf: pass a number of seconds"),
        (["run", "--once", "--interval", "nan"], 2, "--interval nan: pass a number of seconds"),
    ],
)
def test_bad_input_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], status: int, expected: str
) -> None:
    FakeRun(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    assert cli.main(["watch", str(tmp_path / args[0]), *args[1:]]) == status
    err = capsys.readouterr().err
    assert err.startswith("selftune watch: ") and expected in err


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (b"\xff\xfe not text", "it is not UTF-8 text"),
        (b"[1, 2]", "it holds a JSON list, not an object"),
        (
            b'{"format": "selftune-audit/1", "controller": "auto", "config": "SGD"}',
            "its 'config' is a str, not an object",
        ),
        # taken for a manifest being written, and shown as "controller ?" with no word: the
        # manifest is written whole, by a rename, as verify, which calls it damage, knows
        (b'{"controller": "auto", "con', "it is not valid JSON (Unterminated string"),
    ],
)
def test_a_damaged_manifest_is_explained_not_fatal(
    tmp_path: Path, capsys: pytest.CaptureFixture, damage: bytes, expected: str
) -> None:
    """Bytes that are not UTF-8 raised UnicodeDecodeError, and a manifest (or its 'config')
    that is not an object raised AttributeError in render: a traceback instead of a frame."""
    model = torch.nn.Linear(3, 1)
    _three_steps(
        model, selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path / "run")
    )
    (tmp_path / "run" / "manifest.json").write_bytes(damage)
    frame = " ".join(watch_once(tmp_path / "run", capsys).split())  # unfold wrapped lines
    assert "manifest.json is damaged" in frame and expected in frame
    assert "restore it from a copy of the run folder" in frame
    assert frame.count("step 3 ") == 1  # the trace is still shown


@pytest.mark.parametrize("once", [True, False])
def test_another_program_s_manifest_is_no_run_to_wait_for(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, once: bool
) -> None:
    """A web app's manifest.json made its folder a run "waiting for the first step…", forever
    in the live view and with exit status 0 under --once."""
    folder = tmp_path / "webapp"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "My App", "version": "1.0", "icons": []}')
    _training_script(monkeypatch)  # Ctrl-C at the first wait
    assert cli.main(["watch", str(folder), *(["--once"] if once else [])]) == 1
    assert capsys.readouterr().err == (
        f"selftune watch: {folder} is not a selftune run folder: its manifest.json is another "
        'program\'s (it has no "format": "selftune-audit/1"); pass the run\'s log_dir\n'
    )


def _frame_state(state: WatchState) -> tuple:
    return (
        state.step,
        state.loss,
        state.metric,
        state.metric_step,
        state.hp,
        list(state.losses),
        [list(r) for r in state.rates],
        state.decisions,
        state.guards,
        list(state.recent),
    )


def test_a_first_look_at_a_long_run_reads_its_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first poll parsed every line of both files: a million-step trace took 9 s and
    1.3 GB before the first frame.  It now starts at the rows the frame shows, counts the
    decisions before them and sets the last evaluation aside; the frame is the same."""
    monkeypatch.setattr(watch, "BLOCK", 97)  # rows straddle the blocks of the backward scans
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt = selftune.wrap(inner, "hypergradient", log_dir=tmp_path / "run")  # decides every step
    for step in range(1, 301):
        opt.zero_grad()
        loss = model(torch.randn(8, 3)).pow(2).mean() * (math.nan if step == 150 else 1.0)
        loss.backward()
        opt.step(loss=loss)
        if step == 120:
            opt.observe(0.5)  # the last evaluation, long before the rows the frame shows
    opt.close()
    parsed: list[int] = []
    parse = WatchState._parse

    def counted(self: WatchState, lines: Any) -> list[dict[str, Any]]:
        rows = parse(self, lines)
        parsed.append(len(rows))
        return rows

    monkeypatch.setattr(WatchState, "_parse", counted)
    tail = WatchState(tmp_path / "run")
    tail.poll()
    assert sum(parsed) < 200, parsed  # of 300 trace rows and some 300 records
    whole = WatchState(tmp_path / "run")
    whole._decisions, whole._trace = (LineTail(t.path) for t in (whole._decisions, whole._trace))
    whole.poll()
    assert _frame_state(tail) == _frame_state(whole)
    assert (tail.metric_step, tail.guards) == (121, 1) and tail.decisions > 250


@pytest.mark.parametrize("block", [3, 11, 1 << 16])
def test_a_tail_starts_at_its_last_lines_and_keeps_one_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(watch, "BLOCK", block)
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"k":1}\n{"m":2}\n{"k":3}\n{"x":4}\n{"x":5}\n{"x"')
    tail = LineTail(path, lines=2, keep=b'"m"', count=[b'"k"'])
    assert tail.read() == ([b'{"x":4}', b'{"x":5}'], False)
    assert (tail.kept, tail.skipped[b'"k"']) == (b'{"m":2}', 2)
    with open(path, "ab") as file:
        file.write(b":6}\n")
    assert tail.read() == ([b'{"x":6}'], False)  # then it follows as before
    assert (tail.kept, tail.skipped[b'"k"']) == (None, 0)
    short = LineTail(path, lines=9, keep=b'"m"')  # fewer lines than asked: from the start
    assert len(short.read()[0]) == 6 and short.kept is None


def test_a_note_is_listed_with_the_decisions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A scheduler that cycles momentum takes it over, with a note in the log: the frame lists
    it beside the decisions (it showed decisions and guard events only)."""
    model = torch.nn.Linear(3, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = selftune.wrap(inner, log_dir=tmp_path / "run")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    with pytest.warns(UserWarning, match="changed outside selftune"):
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(4, 3)).pow(2).mean().backward()
            opt.step()
            sched.step()
    opt.close()
    frame = watch_once(tmp_path / "run", capsys)
    assert re.search(r"2 +note +group 0's momentum was changed outside selftune", frame), frame


def test_a_rollback_on_many_groups_is_a_row_per_knob(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A rollback restores every group's knobs, a decision each: with twelve groups it filled
    the panel of eight with one event's restores of the first groups and left the rest out;
    the watch and the report now fold the restores with one reason into a row per knob."""
    from problems import mlp_regression, train

    from selftune.controllers.off import OffController
    from selftune.report import write_report

    class Shorten(OffController):  # every group's momentum, after the guard's snapshot
        name = "shorten"

        def propose(self, signals: Any, knobs: Any) -> list[selftune.Proposal]:
            if signals.step != 30:
                return []
            return [selftune.Proposal(i, "momentum", 0.89, "shorter") for i in range(len(knobs))]

    problem = mlp_regression(seed=0, depth=5)  # twelve tensors, a group each
    groups = [{"params": [p]} for p in problem.model.parameters()]
    folder = tmp_path / "run"
    inner = torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
    opt = selftune.wrap(inner, Shorten(), log_dir=folder)
    batch_loss = problem.batch_loss
    problem.batch_loss = lambda t: batch_loss(t) * (math.nan if t == 40 else 1.0)
    train(problem, opt, 41)
    opt.close()
    records = [json.loads(line) for line in (folder / "decisions.jsonl").read_text().splitlines()]
    restores = [r for r in records if r["kind"] == "decision" and r["source"] == "guard"]
    assert sorted({r["group"] for r in restores}) == list(range(12))
    assert [r["knob"] for r in restores] == ["lr", "momentum"] * 12  # group by group
    assert cli.main(["watch", str(folder), "--once"]) == 0
    panel = [line for line in capsys.readouterr().out.splitlines() if re.match(r"│\s+\d+\s", line)]
    assert [line.split()[1:5] for line in panel][-3:] == [
        ["40", "GUARD", "rollback", "loss"],
        ["40", "g0", "lr,", "+11"],
        ["40", "g0", "momentum,", "+11"],
    ]
    rows = re.findall(r"<tr class=decision>.*?</tr>", write_report(folder).read_text())
    assert len(rows) == 12 + 2 and all(">+11<" in row for row in rows[-2:])


def test_a_tilde_in_the_run_folder_is_the_home_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quoted '~/run' reached watch unexpanded: "no run folder", where verify expands it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    run = FakeRun(tmp_path / "run")
    run.trace(4, 0.5, HP)
    frame = watch_once(Path("~/run"), capsys)
    assert "step 4 " in frame and str(tmp_path / "run") in frame


def _named_run(folder: Path, controller: str, optimizer: str) -> FakeRun:
    """A run of one step whose manifest names its controller and optimizer as given."""
    run = FakeRun(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["controller"] = controller
    manifest["config"]["optimizer"] = optimizer
    (folder / "manifest.json").write_text(json.dumps(manifest))
    run.trace(1, 1.0, HP)
    return run


def test_logged_strings_are_shown_as_logged_not_as_markup(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The recent table gave rich the logged strings as markup: a custom controller's reason
    "cut [/] per recipe" raised MarkupError, and "lr [x0.5] cut" or "[bold]x" lost their
    brackets. Every string from the log, the manifest or the command line is shown as it is."""
    folder = tmp_path / "[bold]run:thumbs_up:"
    run = _named_run(folder, "[red]mine[/red]", "[i]SGD")
    run.decision(1, 0, "lr", 0.1, 0.05, "lr [x0.5] cut")
    run.decision(1, 0, "[blink]lr", 0.1, 0.05, "[bold]x")
    run.guard(2, "[b]skip", "loss[/]", "nan", "cut [/] per recipe :thumbs_up:")
    run.append({"kind": "note", "step": 3, "reason": r"a \[note] [link=x]here[/link]"})
    frame = watch_once(folder, capsys)
    for shown in (
        str(folder),
        "[i]SGD · controller [red]mine[/red]",
        "lr [x0.5] cut",
        "g0 [blink]lr",
        "[bold]x",
        "GUARD [b]skip",
        "loss[/] = nan",
        "cut [/] per recipe :thumbs_up:",
        r"a \[note] [link=x]here[/link]",
    ):
        assert shown in frame, (shown, frame)


def _make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000, or where that does not stop a read (root), an open that is refused alike."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        path.chmod(0)
        return
    real_open = open

    def refuse(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(watch, "open", refuse, raising=False)


@pytest.mark.parametrize("name", ["decisions.jsonl", "trace.jsonl"])
@pytest.mark.parametrize("live", [False, True])
def test_an_unreadable_log_is_said_not_a_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    live: bool,
) -> None:
    """A log the watch may not read raised PermissionError from LineTail.read, where verify
    and report say "cannot read ...": at the first poll, or at a later one of the live view."""
    run = FakeRun(tmp_path / "run")
    run.trace(1, 1.0, HP)
    run.decision(1, 0, "lr", 0.1, 0.05, "cut")
    path = run.folder / name
    if live:  # readable for the first frame, refused at the next poll
        monkeypatch.setattr(watch.time, "sleep", lambda _: _make_unreadable(path, monkeypatch))
    else:
        _make_unreadable(path, monkeypatch)
    assert cli.main(["watch", str(run.folder), *([] if live else ["--once"])]) == 1
    err = capsys.readouterr().err
    assert err == f"selftune watch: cannot read {path}: Permission denied\n"


@pytest.mark.parametrize("locked", ["the run folder", "the folder above it"])
@pytest.mark.parametrize("once", [True, False])
def test_a_folder_that_may_not_be_searched_is_said_not_a_traceback(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    locked: str,
    once: bool,
) -> None:
    """A run folder of another user's, or one inside such a folder: Path.exists raised
    PermissionError from the look for a run, before the first frame, in a traceback."""
    run = FakeRun(tmp_path / "home" / "run")
    run.trace(1, 1.0, HP)
    folder = run.folder if locked == "the run folder" else run.folder.parent
    make_unsearchable(folder, monkeypatch)
    assert cli.main(["watch", str(run.folder), *(["--once"] if once else [])]) == 1
    refused = run.folder / "manifest.json" if folder == run.folder else run.folder
    assert capsys.readouterr().err == f"selftune watch: cannot read {refused}: Permission denied\n"


def test_a_manifest_the_watch_may_not_read_is_not_called_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest of another user's (``chmod 600``) was called damaged, with the advice to
    restore it from a copy of the run folder or to start the run again: neither mends it."""
    run = FakeRun(tmp_path / "run")
    run.trace(1, 1.0, HP)
    path = run.folder / "manifest.json"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        path.chmod(0)
    else:
        real = Path.read_text

        def refuse(self: Path, *args: Any, **kwargs: Any) -> str:
            if self == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", refuse)
    frame = " ".join(watch_once(run.folder, capsys).split())  # unfold wrapped lines
    said = f"cannot read {path} (Permission denied), so the run's settings are not shown"
    assert said in frame and "damaged" not in frame and "step 1 " in frame


def test_control_characters_in_the_log_are_shown_escaped_not_obeyed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """rich passed ESC and the C1 codes of a logged string on to the terminal, which obeyed
    them: a reason ``"\\x1b[2J"`` cleared the screen, a controller's name could set the window's
    title. A log is a file anyone may hand you: every string from it is shown, escaped."""
    folder = tmp_path / "run\x1b[1m"
    run = _named_run(folder, "mine\x1b]0;title\x07", "SGD\x9b2J")
    run.decision(1, 0, "lr\x1b[8m", 0.1, 0.05, "cut\x1b[2J\rgrow é σ")
    run.guard(2, "skip\x1b[5m", "loss\x08", "nan", "spike\u202eevil")
    run.append({"kind": "note", "step": "3\x1b[A", "reason": "one\ntwo"})
    frame = watch_once(folder, capsys)
    assert not [c for c in frame if not c.isprintable() and c != "\n"], frame
    for shown in (
        "run\\x1b[1m",
        "SGD\\x9b2J · controller mine\\x1b]0;title\\x07",
        "g0 lr\\x1b[8m",
        "cut\\x1b[2J\\rgrow é σ",
        "GUARD skip\\x1b[5m",
        "loss\\x08 = nan",
        "spike\\u202eevil",
        "3\\x1b[A",
        "one\\ntwo",
    ):
        assert shown in frame, (shown, frame)
    (folder / "manifest.json").write_text("[]")  # the lines that name the folder, and errors
    (folder / "trace.jsonl").write_text("not json\n")
    frame = watch_once(folder, capsys)
    assert "\x1b" not in frame and "run\\x1b[1m/manifest.json is damaged" in frame
    assert "(`selftune verify " in frame and "run\\x1b[1m` checks" in frame
    assert cli.main(["watch", str(folder / "gone\x1b[2J"), "--once"]) == 1
    assert "gone\\x1b[2J" in capsys.readouterr().err
