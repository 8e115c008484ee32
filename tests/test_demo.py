"""``selftune demo`` end to end, on a short budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import selftune
from selftune import cli, demo

pytest.importorskip("mnist1d")
pytest.importorskip("rich")


def test_demo_runs_prints_the_table_and_writes_a_verifiable_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "100", "--out", str(out), "--eval-every", "25", "--no-live"]
    assert cli.main([*argv, "--target", "0.3"]) == 0
    text = capsys.readouterr().out
    assert "steps to target" in text and "selftune(AdamW lr=1e-3)" in text
    assert "speed-up" in text

    summary = json.loads((out / "summary.json").read_text())
    plain, tuned = summary["results"]
    assert plain["curve"] != tuned["curve"]  # same start and batches, different optimizers
    assert [s for s, _ in tuned["curve"]] == [25, 50, 75, 100]
    assert 0.0 < tuned["final_accuracy"] <= 1.0
    result = selftune.verify(out / "selftune")  # raises on a damaged log
    assert f"{out / 'selftune'}: OK" in text
    assert result.records >= 1  # the tuned run changed something and logged why
    trace = (out / "selftune" / "trace.jsonl").read_text().splitlines()
    assert len(trace) == 100

    # A second demo into the same folder replaces the run it made, rather than appending to it.
    assert cli.main([*argv, "--steps", "50", "--optimizer", "sgd"]) == 0
    assert len((out / "selftune" / "trace.jsonl").read_text().splitlines()) == 50
    assert "SGD" in capsys.readouterr().out


@pytest.mark.parametrize(
    "files", [("selftune/",), ("notes.txt", "summary.json"), ("demo.json",), ("a", "b", "c")]
)
def test_demo_refuses_a_folder_of_files_it_did_not_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: tuple[str, ...]
) -> None:
    """Only a folder named ``selftune`` in it was refused: the demo wrote its summary.json and
    demo.json into any other folder, over a user's own files of those names (a demo.json of
    the user's is no marker of a demo's)."""
    out = tmp_path / "mine"
    out.mkdir()
    for name in files:
        if name.endswith("/"):
            (out / name).mkdir()
        else:
            (out / name).write_text("kept")
    before = {path: path.is_dir() or path.read_text() for path in out.iterdir()}
    assert cli.main(["demo", "--steps", "5", "--out", str(out), "--no-live"]) == 2
    err = capsys.readouterr().err
    names = ", ".join(sorted(name.rstrip("/") for name in files))
    assert err == (
        f"selftune demo: --out {out} holds files no demo made ({names}): pass a new or empty "
        "folder, or the folder of an earlier demo, which this one replaces\n"
    )
    assert {path: path.is_dir() or path.read_text() for path in out.iterdir()} == before


def test_a_damaged_data_cache_is_named_and_the_previous_run_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged MNIST-1D cache file ended the demo in numpy's traceback, which named neither
    the file nor what to do, after the previous demo's run had been deleted."""
    from selftune.bench import data

    out = tmp_path / "demo"
    argv = ["demo", "--steps", "5", "--out", str(out), "--no-live"]
    assert cli.main(argv) == 0
    trace = (out / "selftune" / "trace.jsonl").read_bytes()
    cached = tmp_path / "cache" / "mnist1d-10000-seed42.npz"
    cached.parent.mkdir()
    cached.write_bytes(b"junk\n")
    monkeypatch.setenv("SELFTUNE_CACHE", str(cached.parent))
    data.mnist1d.cache_clear()  # read the file, not the copy an earlier test loaded
    capsys.readouterr()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"selftune demo: the cached MNIST-1D data {cached} cannot be read (")
    assert err.endswith("delete it, and the next run generates it again\n")
    assert (out / "selftune" / "trace.jsonl").read_bytes() == trace


ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  #: whom a folder's permissions do not stop


@pytest.mark.parametrize(
    "where",
    [
        "under a file",
        pytest.param("read-only", marks=pytest.mark.skipif(ROOT, reason="root writes anywhere")),
        pytest.param("earlier run", marks=pytest.mark.skipif(ROOT, reason="root writes anywhere")),
    ],
)
def test_a_folder_the_demo_cannot_write_in_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """``--out`` in a folder of another user's, a read-only one, or one under a file ended in a
    traceback of PermissionError, LogError or NotADirectoryError."""
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "5", "--out", str(out), "--no-live"]
    if where == "under a file":
        (tmp_path / "afile").touch()
        out = tmp_path / "afile" / "demo"
        argv[4], said = str(out), f"cannot write {out} (Not a directory)"
    elif where == "read-only":
        out.mkdir(mode=0o555)
        said = f"cannot write {out / 'demo.json'} (Permission denied)"
    else:  # an earlier demo's, whose run folder another user made
        assert cli.main(argv) == 0
        capsys.readouterr()
        (out / "selftune").chmod(0o555)
        said = f"cannot write {out / 'selftune'}"
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"selftune demo: {said}") and err.count("\n") == 1
    assert err.endswith(": pass --out a folder you can write to\n")


def test_a_demo_stopped_before_it_starts_keeps_the_previous_demo_s_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The previous demo's run was deleted before the data loaded: Ctrl-C while MNIST-1D was
    generated (minutes, the first time) lost it, with no new run in its place."""
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "5", "--out", str(out), "--no-live"]
    assert cli.main(argv) == 0
    kept = {name: (out / name).read_bytes() for name in ("summary.json", "selftune/trace.jsonl")}

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "load_data", interrupted)
    assert cli.main(argv) == 130
    assert selftune.verify(out / "selftune").records >= 1
    assert {name: (out / name).read_bytes() for name in kept} == kept


def test_demo_refuses_a_file_for_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It failed with a FileExistsError from deep inside pathlib."""
    (tmp_path / "notes.txt").write_text("kept")
    argv = ["demo", "--steps", "5", "--out", str(tmp_path / "notes.txt"), "--no-live"]
    assert cli.main(argv) == 2
    assert "notes.txt is a file: pass a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--steps", "0", "--steps 0: pass at least 1"),
        ("--target", "1.5", "--target 1.5: pass an accuracy in (0, 1]"),
        ("--eval-every", "0", "--eval-every 0: pass at least 1"),
        ("--batch-size", "-1", "--batch-size -1: pass at least 1"),
        # a batch larger than the data set, drawn with replacement, trained on repeats
        (
            "--batch-size",
            "8001",
            "--batch-size 8001: pass at most 8000, the size of MNIST-1D's training set",
        ),
        # it failed after wrap had made the run folder and before the demo's marker: every
        # later demo into that folder was refused as "not written by a demo"
        (
            "--seed",
            str(2**64 - 1),
            "--seed 18446744073709551615: pass one from -2**63 to 2**64 - 2",
        ),
    ],
)
def test_demo_refuses_a_bad_option_value_as_a_usage_error_before_it_writes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, expected: str
) -> None:
    """A bad value exited 1, as a failed run does, where argparse's own refusals exit 2; the
    last two were refused together, "--eval-every and --batch-size", whichever was wrong."""
    argv = ["demo", "--steps", "5", "--out", str(tmp_path / "d"), "--no-live"]
    assert cli.main([*argv, option, value]) == 2
    assert capsys.readouterr().err == f"selftune demo: {expected}\n"
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("module", ["matplotlib", "rich"])
def test_demo_without_an_extra_says_so_before_it_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    """It trained both runs, and only then failed on the report's plots (matplotlib) or, with
    ``--no-live``, on the closing table (rich)."""
    for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if never installed
    monkeypatch.setitem(sys.modules, module, None)
    argv = ["demo", "--steps", "5", "--out", str(tmp_path / "demo"), "--no-live"]
    assert cli.main(argv) == 2
    assert f"needs the module '{module}'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_into_a_folder_under_the_home_folder_writes_all_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out '~/d'``: the run went to the home folder (wrap expands ``~``) and the summary
    and the report, drawn without the trace, to ``./~/d``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--steps", "5", "--out", "~/d", "--no-live"]) == 0
    assert not (tmp_path / "~").exists()
    out = tmp_path / "home" / "d"
    assert (out / "summary.json").exists() and (out / "selftune" / "report.html").exists()


def test_ctrl_c_stops_the_demo_in_one_line(tmp_path: Path) -> None:
    """Ctrl-C, the way to stop a demo early, printed a traceback from inside torch; the run's
    log is closed as it stands, and the exit status is the shell's for SIGINT."""
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "100000", "--out", str(out), "--no-live"]
    # a shell runs a background job with SIGINT ignored, and the child would inherit that
    demo = subprocess.Popen(
        [sys.executable, "-m", "selftune", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    trace = out / "selftune" / "trace.jsonl"
    deadline = time.monotonic() + 120
    while not (trace.exists() and trace.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    demo.send_signal(signal.SIGINT)
    _, err = demo.communicate(timeout=60)
    assert (demo.returncode, err.decode()) == (130, "selftune demo: interrupted\n")
    assert selftune.verify(out / "selftune").records >= 0  # the log as it stood, intact
