"""``selftune report``: a self-contained page that shows every guard event and the decisions."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sys
import tempfile
import tracemalloc
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from browser import (
    IMAGES_JS,
    FakeRun,
    chromium,
    chromium_missing,
    decision_record,
    guard_record,
    realistic_run,
)
from faults import make_unsearchable

import selftune
from selftune import cli
from selftune.report import (
    MOST_POINTS,
    ema,
    knob_series,
    read_run,
    thinned,
    trace_cut,
    trace_size_through,
    write_report,
)

HP = [{"lr": 0.1, "momentum": 0.9}]


class Page(HTMLParser):
    """What the tests look at in a page: links to resources, images, and table rows by table id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.links: list[str] = []  # every src and href
        self.images: list[str] = []
        self.rows: dict[str, list[tuple[str, str]]] = {}  # table id -> [(row class, row text)]
        self._table: str | None = None
        self._row: list[str] | None = None
        self._row_class = ""
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag == "img":
            self.images.append(found.get("src") or "")
        elif tag == "table":
            self._table = found.get("id") or ""
        elif tag == "tr" and self._table is not None:
            self._row, self._row_class = [], found.get("class") or ""
        elif tag in ("td", "th") and self._row is not None:
            self._row.append(" ")  # cells read as words apart

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None and self._table is not None:
            text = " ".join("".join(self._row).split())
            self.rows.setdefault(self._table, []).append((self._row_class, text))
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._row is not None:
            self._row.append(data)

    def of_class(self, table: str, cls: str) -> list[str]:
        return [text for row_class, text in self.rows.get(table, []) if row_class == cls]


def records(folder: Path, kind: str) -> list[dict]:
    lines = (folder / "decisions.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A realistic run folder and its report, written once for the tests that only read them."""
    folder = tmp_path_factory.mktemp("runs") / "sgd"
    realistic_run(folder)
    return folder, write_report(folder)


def test_page_is_self_contained_and_embeds_every_plot(realistic: tuple[Path, Path]) -> None:
    folder, page_path = realistic
    assert page_path == folder / "report.html"
    text = page_path.read_text()
    page = Page(text)
    assert not [link for link in page.links if not link.startswith("data:")]
    assert "http://" not in text and "https://" not in text and "<script" not in text
    plots = sorted(path.name for path in (folder / "plots").iterdir())
    assert plots == ["loss.png", "lr.png", "momentum.png"]
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert embedded == [
        (folder / "plots" / name).read_bytes() for name in ("loss.png", "lr.png", "momentum.png")
    ]
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in embedded)


def test_page_lists_every_guard_event_with_its_reason(realistic: tuple[Path, Path]) -> None:
    folder, page_path = realistic
    page = Page(page_path.read_text())
    guards = records(folder, "guard")
    assert len(guards) == 2
    listed = page.of_class("guards", "guard")
    in_decisions = page.of_class("decisions", "guard")
    assert len(listed) == len(in_decisions) == len(guards)
    for n, (guard, row, inline) in enumerate(zip(guards, listed, in_decisions, strict=True), 1):
        assert row.startswith(f"G{n} {guard['step']} {guard['event']} {guard['signal']}")
        assert guard["reason"] in row and guard["reason"] in inline


def test_decisions_table_has_one_row_per_decision(realistic: tuple[Path, Path]) -> None:
    folder, page_path = realistic
    page = Page(page_path.read_text())
    decisions = records(folder, "decision")
    rows = page.of_class("decisions", "decision")
    assert 20 < len(decisions) <= 100  # all shown at the default of 50 from each end
    assert len(rows) == len(decisions)
    first = decisions[0]
    assert rows[0].startswith(f"{first['step']} {first['group']} {first['knob']} ")
    assert first["reason"] in rows[0]
    clipped = [row for row in rows if row.endswith("clipped")]
    assert len(clipped) == sum(d["clipped"] for d in decisions) > 0


def test_long_log_shows_both_ends_every_guard_event_and_a_count(tmp_path: Path) -> None:
    run = FakeRun(tmp_path / "long")
    lr = 0.1
    for step in range(300):
        run.decision(step, 0, "lr", lr, lr * 0.99, f"decision at step {step}")
        lr *= 0.99
        if step in (7, 150):  # among the decisions left out: shown in place, splitting the gap
            run.guard(step, "skip", "loss", "nan", f"loss is nan at step {step}")
    page = Page(write_report(run.folder, rows=5).read_text())
    rows = page.of_class("decisions", "decision")
    assert [row.split()[0] for row in rows] == [str(s) for s in (0, 1, 2, 3, 4, *range(295, 300))]
    gaps = [f"… {n} decisions not shown …" for n in (3, 143, 144)]  # 5-7, 8-150, 151-294
    assert page.of_class("decisions", "gap") == gaps
    assert "300 decisions, first and last 5 shown" in page.text
    guards = page.of_class("decisions", "guard")
    assert [g.split()[0] for g in guards] == ["7", "150"]
    assert "loss is nan at step 150" in guards[1]


def test_the_gaps_count_the_restores_folded_into_the_rows_they_leave_out(
    tmp_path: Path, one_thread: None
) -> None:
    """A rollback restores each group's knobs, and the page folds a restore on another group
    into the row it repeats; where that row was left out, its gap counted it as one decision:
    the page's counts fell short of the log's (144 of 148 here)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.003}]
    opt = selftune.wrap(
        torch.optim.SGD(groups, lr=0.01, momentum=0.9), "hypergradient", log_dir=tmp_path / "run"
    )
    x = torch.linspace(-1, 1, 64).reshape(16, 4)
    for step in range(40):
        opt.zero_grad()
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        loss.backward()
        opt.step(loss=loss.detach() * (math.nan if step in (20, 30) else 1.0))
    opt.close()
    page = Page(write_report(tmp_path / "run", rows=5).read_text())
    gaps = [int(text.split()[1]) for text in page.of_class("decisions", "gap")]
    rows = page.of_class("decisions", "decision")
    folded = [int(found) for row in rows for found in re.findall(r"^\d+ \d+ \+(\d+) ", row)]
    assert len(rows) == 10 and len(gaps) == 3  # split by the two guard events
    assert sum(gaps) + len(rows) + sum(folded) == len(records(tmp_path / "run", "decision"))


def test_the_report_holds_what_its_page_shows_not_the_log(tmp_path: Path) -> None:
    """The report reads the log in one pass and keeps what its page shows: the guard events,
    the rows it lists, a few numbers a decision for the plots. It had held every record, some
    2 KB a decision (a 300,000-record log's report took 1.2 GB). Counted by tracemalloc, which
    sees every allocation and no other process."""
    run = FakeRun(tmp_path / "long")
    with open(run.folder / "decisions.jsonl", "ab") as log:
        for step in range(12_000):
            knob = "lr" if step % 2 else "momentum"
            signals = {"loss": 1 / (step + 1), "grad_norm": 2.5, "cos_update": 0.25}
            record = decision_record(step, 0, knob, 0.1, 0.1, f"at step {step}", **signals)
            log.write(run.record_line(record))
        log.write(run.record_line(guard_record(12_000, "skip", "loss", "nan", "loss is nan")))
    size = (run.folder / "decisions.jsonl").stat().st_size
    tracemalloc.start()
    try:
        read = read_run(run.folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 5, (peak, size)
    assert (read.last_step, len(read.log.guards), read.log.table.decisions) == (12_000, 1, 12_000)


def test_the_decision_table_says_who_decided_where_not_the_controller(tmp_path: Path) -> None:
    """A bound's cut showed as a decision "clipped by policy" and a guard's as a controller's:
    the table had no word of the source the log holds."""
    run = FakeRun(tmp_path / "run")
    run.decision(10, 0, "lr", 0.001, 0.002, "grow")
    run.append({**decision_record(20, 0, "lr", 0.0021, 0.002, "held", True), "source": "bound"})
    run.append({**decision_record(30, 0, "lr", 0.002, 0.001, "guard: x", False), "source": "guard"})
    rows = [r for r in write_report(run.folder).read_text().split("<tr") if "class=decision" in r]
    assert len(rows) == 3
    assert "tag bound" not in rows[0] and "tag guard" not in rows[0]
    assert "<span class='tag bound'>bound</span>" in rows[1]
    assert "<span class='tag guard'>guard</span>" in rows[2]


def test_without_a_trace_knobs_are_rebuilt_from_the_decisions(tmp_path: Path) -> None:
    run = FakeRun(tmp_path / "no-trace", knobs=(("lr", "beta1", "beta2"),))
    run.decision(10, 0, "lr", 0.001, 0.002, "grow")
    run.decision(20, 0, "beta1", 0.9, 0.85, "less momentum")
    run.decision(30, 0, "lr", 0.002, 0.0015, "shrink")
    run.guard(40, "skip", "grad_norm", 1e4, "gradient spike")
    series = knob_series(read_run(run.folder))
    lr = series[(0, "lr")]
    assert lr.stepwise
    assert (list(lr.steps), list(lr.values)) == ([10, 10, 30, 40], [0.001, 0.002, 0.0015, 0.0015])
    assert list(series[(0, "beta1")].values) == [0.9, 0.85, 0.85]
    text = write_report(run.folder).read_text()
    page = Page(text)
    assert len(page.images) == 2  # the knob plots; no loss without a trace
    assert not (run.folder / "plots" / "loss.png").exists()
    assert "No trace.jsonl" in text


def test_a_trace_with_no_complete_row_is_not_called_missing(tmp_path: Path) -> None:
    """A trace of damaged bytes with no line's end was reported as no trace.jsonl at all; the
    trace has no chain, so the page is where its damage shows."""
    run = FakeRun(tmp_path / "torn-trace")
    run.decision(10, 0, "lr", 0.1, 0.2, "grow")
    (run.folder / "trace.jsonl").write_bytes(b'{"step": 1, "lo')
    text = write_report(run.folder).read_text()
    assert "trace.jsonl holds 15 bytes and no complete row" in text
    assert "No trace.jsonl" not in text
    (run.folder / "trace.jsonl").write_bytes(b"")
    assert "trace.jsonl holds no row yet" in write_report(run.folder).read_text()


def test_torn_final_line_is_reported_not_shown(tmp_path: Path) -> None:
    run = FakeRun(tmp_path / "torn")
    run.trace(0, 1.0, HP)
    run.decision(0, 0, "lr", 0.1, 0.2, "grow")
    line = run.record_line(guard_record(1, "skip", "loss", "inf", "torn away"))
    with open(run.folder / "decisions.jsonl", "ab") as file:
        file.write(line[: len(line) // 2])
    with open(run.folder / "trace.jsonl", "a") as file:
        file.write('{"step": 1, "lo')
    text = write_report(run.folder).read_text()
    assert "last line was torn" in text and "torn away" not in text
    assert len(Page(text).of_class("decisions", "decision")) == 1
    assert len(read_run(run.folder).trace) == 1


def test_ema_is_bias_corrected_and_steps_over_non_finite_values() -> None:
    assert ema([2.0, 2.0, 2.0], span=10) == pytest.approx([2.0, 2.0, 2.0])
    smoothed = ema([1.0, math.inf, math.nan, 3.0], span=3)  # alpha 0.5
    assert smoothed[:3] == pytest.approx([1.0, 1.0, 1.0])
    assert smoothed[3] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert math.isnan(ema([math.nan], span=3)[0])


def test_cli_writes_the_page_where_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "run"
    run = FakeRun(folder)
    run.trace(0, 0.5, HP)
    out = tmp_path / "pages" / "mine.html"
    assert cli.main(["report", str(folder), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.exists() and not (folder / "report.html").exists()
    assert (folder / "plots" / "lr.png").exists()


def test_a_run_folder_the_plots_cannot_be_written_to_still_gets_its_page(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The command says it as it says an error (a Python warning quoted the line of the
    report module that warned)."""
    folder = tmp_path / "run"
    run = FakeRun(folder)
    run.trace(0, 0.5, HP)
    (folder / "plots").write_text("not a folder")  # as a read-only folder refuses it
    out = tmp_path / "pages" / "mine.html"
    with pytest.warns(UserWarning, match="the plots were not written to"):
        write_report(folder, out)
    assert cli.main(["report", str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("selftune report: the plots were not written to") and "(" in err
    assert "write_report(" not in err and "UserWarning" not in err
    assert "data:image/png;base64," in out.read_text(encoding="utf-8")


def test_a_page_its_folder_refuses_says_to_write_it_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A read-only run folder: the error was the bare ``[Errno 13]``, naming no way out."""
    run = FakeRun(tmp_path / "run")
    run.trace(0, 0.5, HP)

    def refused(self: Path, data: bytes) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refused)
    assert cli.main(["report", str(run.folder)]) == 1
    err = capsys.readouterr().err
    page = run.folder / "report.html"
    assert err.startswith(f"selftune report: cannot write {page} (Permission denied): pass --out")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, "no run folder at"),
        (lambda p: p.mkdir(), "no manifest.json in"),
        (lambda p: p.write_text("x"), "is a file, not a run folder"),
    ],
    ids=["missing", "empty", "file"],
)
def test_cli_explains_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, make, expected: str
) -> None:
    path = tmp_path / "runs" / "x"
    path.parent.mkdir()
    make(path)
    assert cli.main(["report", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("selftune report: ") and expected in err and str(path) in err
    assert not (path / "report.html").exists()


def test_cli_says_a_run_folder_it_may_not_reach_cannot_be_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run folder inside one of another user's: Path.exists raised PermissionError, said as
    "cannot write" the run folder with advice to pass --out (or a traceback past it)."""
    run = FakeRun(tmp_path / "locked" / "run")
    run.trace(1, 1.0, HP)
    make_unsearchable(run.folder.parent, monkeypatch)
    assert cli.main(["report", str(run.folder), "--out", str(tmp_path / "page.html")]) == 1
    said = f"selftune report: cannot read {run.folder}: Permission denied\n"
    assert capsys.readouterr().err == said


@pytest.mark.parametrize(("command", "module"), [("report", "matplotlib"), ("watch", "rich")])
def test_a_command_whose_extra_is_missing_says_which_to_install(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    module: str,
) -> None:
    """``pip install selftune`` brings torch alone; the commands import their optional
    dependencies when they first need them, which ended in a traceback from deep inside."""
    folder = tmp_path / "run"
    FakeRun(folder).trace(0, 0.5, HP)
    for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if never installed
    monkeypatch.setitem(sys.modules, module, None)
    argv = [command, str(folder), *(["--once"] if command == "watch" else [])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"selftune {command} needs the module '{module}', which is not")
    assert "pip install 'selftune[cli]'" in err
    assert "from a checkout, pip install '.[cli]'" in err  # the README installs from one


def test_cli_refuses_rows_below_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """It exited 1, as a damaged run does, where argparse's refusals exit 2, and named the
    option as the function's argument, ``rows=0``."""
    FakeRun(tmp_path / "run")
    assert cli.main(["report", str(tmp_path / "run"), "--rows", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "selftune report: --rows 0: pass at least 1 decision to show from each end\n"


def test_cli_refuses_a_folder_for_the_page(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--out`` naming a folder failed with a bare "[Errno 21] Is a directory"."""
    FakeRun(tmp_path / "run")
    assert cli.main(["report", str(tmp_path / "run"), "--out", str(tmp_path)]) == 1
    assert f"{tmp_path} is a folder: give the page's file, e.g." in capsys.readouterr().err


@pytest.mark.parametrize("name", ["report.txt", "report"])
def test_cli_refuses_a_page_name_it_would_not_write_over_again(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    """``--out report.txt`` wrote the page, and the same command again refused it as a file
    that "exists and is no selftune report": the page's name must say it is one."""
    FakeRun(tmp_path / "run")
    assert cli.main(["report", str(tmp_path / "run"), "--out", str(tmp_path / name)]) == 1
    assert capsys.readouterr().err == (
        f"selftune report: {tmp_path / name}: give the page a file name ending .html or .htm, "
        "e.g. report.html\n"
    )
    assert not (tmp_path / name).exists() and not (tmp_path / "run" / "plots").exists()


@pytest.mark.parametrize(
    "name", ["manifest.json", "decisions.jsonl", "checkpoint.pt", "index.html"]
)
def test_cli_writes_no_page_over_a_file_of_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    """``--out run/decisions.jsonl``, a slip of the command line, wrote the page over the audit
    log, and any page of the user's own was replaced; a report over an earlier report is still
    written."""
    FakeRun(tmp_path / "run")
    target = tmp_path / "run" / name
    if not target.exists():
        target.write_bytes(b"<html>a page of the user's own</html>")
    kept = target.read_bytes()
    assert cli.main(["report", str(tmp_path / "run"), "--out", str(target)]) == 1
    assert "exists and is no selftune report" in capsys.readouterr().err
    assert target.read_bytes() == kept
    own = tmp_path / "run" / "report.html"  # and where no --out is given
    own.write_text("<html>a page of the user's own</html>")
    assert cli.main(["report", str(tmp_path / "run")]) == 1
    assert own.read_text() == "<html>a page of the user's own</html>"
    own.unlink()
    page = tmp_path / "old.html"
    assert cli.main(["report", str(tmp_path / "run"), "--out", str(page)]) == 0
    first = page.read_text()
    page.write_text(first + "<!-- an older report -->")
    assert cli.main(["report", str(tmp_path / "run"), "--out", str(page)]) == 0
    assert page.read_text() == first


def test_page_renders_in_chromium(realistic: tuple[Path, Path], tmp_path: Path) -> None:
    """Open the page in a real headless browser: no console errors, every plot decoded, pixels."""
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    _, page_path = realistic
    shot = tmp_path / "page.png"
    with tempfile.TemporaryDirectory() as profile, chromium(Path(profile)) as driver:
        driver.get(page_path.resolve().as_uri())
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        images = driver.execute_script(IMAGES_JS)
        assert driver.save_screenshot(str(shot))
    assert severe == []
    assert len(images) == 3
    assert all(image["complete"] and image["width"] > 0 for image in images), images
    from PIL import Image

    with Image.open(shot) as screenshot:
        assert screenshot.format == "PNG" and screenshot.width >= 1000
        colours = screenshot.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # None: more distinct colours than that


@pytest.mark.parametrize(
    "damage",
    [
        '{"step": 2, "loss": 1.0}',  # no "hp": not a trace row
        # json.loads raised ValueError and RecursionError, not JSONDecodeError: the command
        # said "Exceeds the limit (4300 digits) ..." alone, or ended in a traceback
        '{"step": ' + "9" * 5000 + "}",
        "[" * 100_000,
    ],
    ids=["no hp", "thousands of digits", "deep nesting"],
)
def test_a_damaged_trace_line_is_named_on_a_page_of_the_rows_before_it(
    tmp_path: Path, damage: str
) -> None:
    """The trace has no chain (the log, which verify passes, is the record): a damaged row
    refused the whole page, which now draws the rows before it and names it."""
    run = FakeRun(tmp_path / "run")
    run.trace(0, 1.0, HP)
    run.trace(1, 0.5, HP)
    with open(run.folder / "trace.jsonl", "a") as file:
        file.write(damage + "\n")
    run.trace(3, 1.0, HP)
    assert cli.main(["report", str(run.folder)]) == 0
    text = (run.folder / "report.html").read_text()
    named = f"{run.folder / 'trace.jsonl'} line 3: "
    assert named in text and "The loss and knob curves end after step 1." in text
    assert list(read_run(run.folder).trace.steps) == [0, 1]


def test_numbers_past_what_the_page_holds_are_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The trace has no chain, and JSON reads a whole number of any size exactly: a row's step
    past a signed 64-bit column, a loss, metric or rate past a float's range, or a chained
    decision's signal of that size, ended the report in an OverflowError.  The step is a
    damaged row, named; the others are the infinity of their sign, as JSON's 1e400 reads."""
    run = FakeRun(tmp_path / "run")
    run.trace(1, 1.0, HP)
    with open(run.folder / "trace.jsonl", "a") as file:
        huge = {"step": 2, "loss": 10**400, "metric": -(10**400), "hp": [{"lr": 10**400}]}
        file.write(json.dumps(huge) + "\n")
        file.write(json.dumps({"step": 2**64, "loss": 1.0, "hp": HP}) + "\n")
    run.append({**decision_record(2, 0, "lr", 0.1, 0.2, "grow"), "signals": {"g": 10**400}})
    assert cli.main(["report", str(run.folder)]) == 0
    assert "trace.jsonl line 3: expected" in capsys.readouterr().err
    trace = read_run(run.folder).trace
    assert list(trace.steps) == [1, 2] and trace.loss[1] == math.inf


def test_the_command_says_where_a_damaged_trace_cuts_the_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A trace damaged mid-file was said on the page alone: the command printed the page's
    path, and nothing else, with exit status 0, for curves that end early."""
    run = FakeRun(tmp_path / "run")
    run.trace(0, 1.0, HP)
    with open(run.folder / "trace.jsonl", "a") as file:
        file.write("not json {\n")
    run.trace(2, 1.0, HP)
    assert cli.main(["report", str(run.folder)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{run.folder / 'report.html'}\n"
    assert err == (
        f"selftune report: {run.folder / 'trace.jsonl'} line 2: not a JSON line — the trace was "
        "damaged (it has no hash chain: the decision log, which verify checks, is the record). "
        "The loss and knob curves end after step 0.\n"
    )


def test_a_run_folder_under_the_home_folder_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``~`` was taken as a folder's name: the page and its plots went to ``./~/run`` under
    the current folder, drawn without the trace."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = FakeRun(tmp_path / "home" / "run")
    run.trace(0, 1.0, HP)
    run.trace(1, 0.5, HP)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "~/run", "--out", "~/pages/run.html"]) == 0
    assert not (tmp_path / "~").exists()
    text = (tmp_path / "home" / "pages" / "run.html").read_text()
    assert "No trace" not in text and (run.folder / "plots" / "loss.png").exists()


def test_a_page_that_fails_part_way_leaves_the_one_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A write that failed part-way (a full disk) left a cut page, which every later report
    then refused to write over as no report of selftune's."""
    run = FakeRun(tmp_path / "run")
    run.trace(0, 1.0, HP)
    before = write_report(run.folder).read_bytes()
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:  # half the bytes, then the disk is full
        real(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    run.trace(1, 0.5, HP)
    monkeypatch.setattr(Path, "write_bytes", full)
    assert cli.main(["report", str(run.folder)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    assert (run.folder / "report.html").read_bytes() == before
    assert sorted(p.name for p in run.folder.iterdir() if p.name.endswith(".tmp")) == []
    assert cli.main(["report", str(run.folder)]) == 0


def test_a_folder_name_of_bytes_that_are_no_utf8_gets_its_page(tmp_path: Path) -> None:
    """The name went into the page as it was, whose encoding failed (``surrogates not
    allowed``) and left an empty page behind."""
    import os

    run = FakeRun(tmp_path / os.fsdecode(b"bad\xffname"))
    run.trace(0, 1.0, HP)
    text = write_report(run.folder).read_text(encoding="utf-8")
    assert "bad\\udcffname" in text


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"clipped": None}, "the decision record lacks clipped"),
        ({"signals": [0.5]}, r"signals is \[0.5\], not an object"),
        ({"step": "12"}, "step is '12', not a whole number from 0 to"),
        # past the page's signed 64-bit columns and a float's range: OverflowError tracebacks
        ({"step": 2**63}, f"step is {2**63}, not a whole number from 0 to"),
        ({"new": 10**400}, "new is 1000.*, not a number a float holds"),
    ],
)
def test_a_chained_record_the_page_cannot_show_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, words: str
) -> None:
    """A record with an intact chain but a field missing or of the wrong type (written by
    another tool, or edited and rehashed) ended the report in a KeyError or TypeError."""
    run = FakeRun(tmp_path / "run")
    run.trace(0, 1.0, HP)
    run.decision(0, 0, "lr", 0.1, 0.2, "grow")
    record = {**decision_record(1, 0, "lr", 0.2, 0.3, "grow again"), **change}
    run.append({key: value for key, value in record.items() if value is not None})
    assert cli.main(["report", str(run.folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("selftune report: ")
    assert f"{run.folder / 'decisions.jsonl'} line 2 (seq 1): " in err
    assert re.search(words, err), err


def test_a_run_without_losses_or_steps_still_gets_a_page(tmp_path: Path) -> None:
    run = FakeRun(tmp_path / "run")
    assert "Nothing to plot yet" in write_report(run.folder).read_text()
    run.trace(1, None, HP)  # the loss was not passed to step()
    run.trace(2, None, HP)
    page = Page(write_report(run.folder).read_text())
    assert len(page.images) == 2
    assert sorted(p.name for p in (run.folder / "plots").iterdir()) == ["lr.png", "momentum.png"]


def card(text: str, label: str) -> str:
    """The value a card at the page's top shows under ``label``."""
    found = re.search(rf"<b>([^<]*)</b><span>{re.escape(label)}</span>", text)
    assert found is not None, label
    return found.group(1)


def test_the_final_loss_card_reads_the_moving_average_the_loss_plot_draws(
    tmp_path: Path, one_thread: None
) -> None:
    """The card read an average of span 10 whatever the run's length, beside the plot's line
    of span 30 here (200 on a long run): two final losses on one page."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = selftune.wrap(torch.optim.SGD(model.parameters(), lr=0.05), "off", log_dir=tmp_path)
    x = torch.randn(900, 8, 3)
    for batch in x:
        opt.zero_grad()
        loss = (model(batch) - batch.sum(dim=1, keepdim=True)).pow(2).mean() + batch[0, 0] ** 2
        loss.backward()
        opt.step(loss=loss.detach())
    opt.close()
    text = write_report(tmp_path).read_text()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "trace.jsonl").open()]
    assert len(losses) == 900
    assert card(text, "final loss (EMA, span 30)") == f"{ema(losses, 30)[-1]:.4g}"
    assert f"{ema(losses, 10)[-1]:.4g}" != f"{ema(losses, 30)[-1]:.4g}"


def test_the_groups_card_counts_a_group_added_mid_run(tmp_path: Path, one_thread: None) -> None:
    """A run that added a param group (gradual unfreezing) was said to have the manifest's
    one group, above plots and a table of two."""
    body, head = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    opt = selftune.wrap(torch.optim.SGD(body.parameters(), lr=0.1), log_dir=tmp_path / "run")
    for step in range(6):
        if step == 3:
            opt.add_param_group({"params": head.parameters(), "lr": 0.01})
        opt.zero_grad()
        loss = (body(torch.ones(4, 3)) + head(torch.ones(4, 3))).pow(2).mean()
        loss.backward()
        opt.step(loss=loss.detach())
    opt.close()
    text = write_report(tmp_path / "run").read_text()
    assert len(records(tmp_path / "run", "group")) == 1
    assert card(text, "param groups") == "2"
    assert "group added" in text


@pytest.mark.parametrize("block", [7, 64, 1 << 16])
def test_the_trace_is_cut_after_the_last_row_through_a_step(tmp_path: Path, block: int) -> None:
    """A resume cuts ``trace.jsonl`` after its checkpoint's step, reading rows from the end in
    blocks (a row may straddle them); a torn final line is cut with the rows after the step."""
    rows = [
        json.dumps({"step": t, "loss": 1.0 / t, "hp": [{"lr": 0.1}]}) + "\n" for t in range(1, 9)
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(rows) + '{"step": 9, "lo', encoding="utf-8")
    ends = [len("".join(rows[:t]).encode()) for t in range(len(rows) + 1)]
    for step in (0, 1, 4, 8, 20):
        assert trace_size_through(path, step, block) == ends[min(step, 8)], step
    path.write_text("", encoding="utf-8")
    assert trace_size_through(path, 3, block) == 0
    # a damaged row past the step goes with the cut (a power cut's NULs, here too)
    for damage in ("not json\n", "\0" * 20 + "\n"):
        path.write_text(rows[0] + damage + rows[2], encoding="utf-8")
        assert trace_cut(path, 1, block) == (ends[1], 1, 1)


@pytest.mark.parametrize(("groups", "bar"), [(3, False), (40, True)])
def test_many_groups_get_a_colour_bar_not_a_legend_entry_each(
    tmp_path: Path, groups: int, bar: bool
) -> None:
    """A rate per layer (tens to hundreds of groups): one legend entry per group covered the
    plot, and the palette's colours repeated every nine groups."""
    from selftune.report import _knob_plot

    run = FakeRun(tmp_path / "run", knobs=[("lr", "momentum")] * groups)
    for group in range(groups):
        run.decision(10, group, "lr", 0.1, 0.1 * 0.9**group, "a rate per layer")
    read = read_run(run.folder)
    fig = _knob_plot(read, knob_series(read), ["lr"], "Learning rate", True, [])
    assert fig is not None
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert sum(label.startswith("group") for label in labels) == (0 if bar else groups)
    assert len(fig.axes) == (2 if bar else 1)  # the colour bar's own axes
    assert "decision" in labels
    fig.savefig(io.BytesIO(), format="png")  # it renders


def test_a_knob_plot_without_decisions_has_no_legend_for_their_dots(
    tmp_path: Path, one_thread: None
) -> None:
    """Under ``off`` (and on the momentum plot of a run that tunes only the rate) the legend
    named dots for decisions where none were drawn."""
    from selftune.report import _knob_plot

    model = torch.nn.Linear(3, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = selftune.wrap(inner, "off", log_dir=tmp_path)
    for _ in range(5):
        opt.zero_grad()
        model(torch.ones(4, 3)).pow(2).mean().backward()
        opt.step()
    opt.close()
    run = read_run(tmp_path)
    for knob in ("lr", "momentum"):
        fig = _knob_plot(run, knob_series(run), [knob], knob, False, [])
        assert fig is not None
        assert fig.axes[0].get_legend_handles_labels()[1] == ["group 0"]


def test_a_long_curve_is_drawn_thinned_keeping_its_spikes_dips_and_gaps() -> None:
    """A run of hundreds of thousands of steps drew every point, each below a pixel: the curve
    is drawn with at most ``MOST_POINTS``, each run of points keeping its lowest and highest
    (a spike before a rollback must show), and a run without a finite value its gap."""
    np = pytest.importorskip("numpy")
    n = 100_003
    steps = list(range(1, n + 1))
    values = [1.0 + 0.001 * (t % 7) for t in steps]
    values[50_001], values[70_000] = 1e6, -5.0
    values[20_000:20_400] = [math.nan] * 400
    x, y = thinned(steps, values)
    assert len(x) <= MOST_POINTS and list(x) == sorted(x) and set(x) <= set(steps)
    assert x[-1] == n  # the line ends where the run does
    assert np.nanmax(y) == 1e6 and np.nanmin(y) == -5.0 and {50_002, 70_001} <= set(x)
    gap = [s for s, v in zip(x, y, strict=True) if math.isnan(v)]
    assert gap and all(20_000 < s <= 20_400 for s in gap)
    assert all(values[s - 1] == v for s, v in zip(x, y, strict=True) if not math.isnan(v))
    short_x, short_y = thinned(steps[:MOST_POINTS], values[:MOST_POINTS])
    assert list(short_x) == steps[:MOST_POINTS] and list(short_y) == values[:MOST_POINTS]


def test_two_reports_at_once_and_a_linked_page_are_written_whole(tmp_path: Path) -> None:
    """The temporary file had one name for every writer: two reports of a run at once took
    each other's file away (one failed with "No such file or directory"); and a page that is a
    link to a file elsewhere became a file of its own, the file it linked left as it was."""
    import threading

    from selftune.files import write_whole

    page = tmp_path / "report.html"
    bodies = [bytes([65 + i]) * (4 << 20) for i in range(2)]
    errors: list[BaseException] = []

    def write(body: bytes) -> None:
        try:
            for _ in range(5):
                write_whole(page, body)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(b,)) for b in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and page.read_bytes() in bodies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    elsewhere = tmp_path / "pages" / "kept.html"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"old")
    elsewhere.chmod(0o640)
    link = tmp_path / "linked.html"
    link.symlink_to(elsewhere)
    write_whole(link, b"new")
    assert link.is_symlink() and elsewhere.read_bytes() == b"new"
    assert elsewhere.stat().st_mode & 0o777 == 0o640


def test_the_command_s_help_speaks_to_its_user(capsys: pytest.CaptureFixture) -> None:
    """``selftune --help`` showed the module's docstring, reStructuredText marks and all."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "tunes its own learning rate" in out
    assert all(name in out for name in ("demo", "bench", "report", "watch", "verify"))


def test_a_decision_s_text_signal_is_shown_once_escaped(tmp_path: Path) -> None:
    """The signals a decision was made on show in its row's tooltip, escaped once by the
    attribute: a text signal escaped before it too showed "&lt;b&gt;" where the log held
    "<b>", and the page held no markup of the log's either way."""
    run = FakeRun(tmp_path / "run")
    run.trace(1, 1.0, HP)
    run.decision(1, 0, "lr", 0.1, 0.05, "cut", cos_update=-0.25, note="<i>x & y</i>")
    page = write_report(run.folder).read_text()
    assert "title='cos_update -0.25, note &lt;i&gt;x &amp; y&lt;/i&gt;'" in page
    assert "<i>x" not in page


def test_control_characters_in_what_the_command_prints_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The page's path and the errors name the run's folders, which a log handed to you names:
    a folder ``"run\\x1b[2J"`` cleared the screen when the command printed it."""
    folder = tmp_path / "run\x1b]0;title\x07"
    run = FakeRun(folder)
    run.trace(0, 0.5, HP)
    assert cli.main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out == f"{tmp_path}/run\\x1b]0;title\\x07/report.html\n"
    (folder / "manifest.json").write_text("[]")
    assert cli.main(["report", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"selftune report: {tmp_path}/run\\x1b]0;title\\x07/manifest.json ")
    assert "\x1b" not in err and "\x07" not in err


def _png_of_the_user_s_own() -> bytes:
    """A plot the user drew with matplotlib and saved as ``RUN/plots/loss.png``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([1, 2, 3])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["matplotlib", "text", "link to nothing"])
def test_cli_writes_no_plot_over_a_file_of_the_user_s_own(
    tmp_path: Path, capsys: pytest.CaptureFixture, kind: str
) -> None:
    """The PNGs were written over whatever ``RUN/plots`` held by their names, the user's own
    files included; a report's own plots (it marks them) are still written over."""
    run = FakeRun(tmp_path / "run")
    run.trace(0, 0.5, HP)
    plots = run.folder / "plots"
    plots.mkdir()
    mine = plots / "loss.png"
    if kind == "link to nothing":  # writing through it would create the file it names
        mine.symlink_to(tmp_path / "elsewhere.png")
    else:
        mine.write_bytes(_png_of_the_user_s_own() if kind == "matplotlib" else b"my notes")
    kept = mine.read_bytes() if mine.exists() else None
    for out in ([], ["--out", str(tmp_path / "page.html")]):  # the plots go to RUN/plots alike
        assert cli.main(["report", str(run.folder), *out]) == 1
        err = capsys.readouterr().err
        assert err.startswith(
            f"selftune report: {mine} exists and is no plot of selftune report's: it is not "
            f"written over; move it out of {plots}, where the report writes its plots (loss.png,"
        ), err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert (mine.read_bytes() if mine.exists() else None) == kept
    assert not (tmp_path / "elsewhere.png").exists()
    assert not (run.folder / "report.html").exists() and not (tmp_path / "page.html").exists()
    assert sorted(path.name for path in plots.iterdir()) == ["loss.png"]
    mine.unlink()
    assert cli.main(["report", str(run.folder)]) == 0  # and again, over its own plots
    first = {path.name: path.read_bytes() for path in plots.iterdir()}
    (plots / "lr.png").write_bytes(first["lr.png"][:-100])  # cut short: still its own
    assert cli.main(["report", str(run.folder)]) == 0
    assert {path.name: path.read_bytes() for path in plots.iterdir()} == first
