"""Where a benchmark run's figures come from: the commit of the code that made them, whether
that code differed from it, and torch's CPU kernels (``selftune.bench.provenance``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from torch.backends.cpu import get_cpu_capability as cpu_capability

from selftune.bench.provenance import describe, source_of

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def _repo(tmp_path: Path, files: dict[str, str]) -> Path:
    """A git repository holding ``files``, committed."""
    repo = tmp_path / "repo"
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text, encoding="utf-8")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "one")
    return repo


def test_a_package_its_checkout_tracks_names_the_commit_and_whether_its_files_differ(
    tmp_path: Path,
) -> None:
    repo = _repo(tmp_path, {"pkg/__init__.py": "x = 1\n", "results.jsonl": ""})
    package = repo / "pkg"
    head = _git(repo, "rev-parse", "HEAD")
    assert source_of(package) == {"commit": head, "changed": False, "cpu": cpu_capability()}
    (package / "__init__.py").write_text("x = 2\n", encoding="utf-8")  # a pilot's patch
    assert source_of(package)["changed"] is True
    (package / "__init__.py").write_text("x = 1\n", encoding="utf-8")
    (package / "rule.py").write_text("y = 1\n", encoding="utf-8")  # a module the patch added
    assert source_of(package)["changed"] is True
    (package / "rule.py").unlink()
    # the benchmark writing its results into the checkout is no change of the code
    (repo / "results.jsonl").write_text("{}\n", encoding="utf-8")
    assert source_of(package) == {"commit": head, "changed": False, "cpu": cpu_capability()}


def test_a_copy_no_checkout_tracks_has_no_commit(tmp_path: Path) -> None:
    """An installed copy inside an ignored folder of a repository (a virtual environment in the
    checkout) would have been given the checkout's commit, which is not its code's."""
    repo = _repo(tmp_path, {".gitignore": ".venv/\n", "pkg/__init__.py": ""})
    installed = repo / ".venv" / "pkg"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("x = 3\n", encoding="utf-8")
    alone = tmp_path / "alone"
    alone.mkdir()
    for folder in (installed, alone):
        assert source_of(folder) == {"commit": None, "changed": None, "cpu": cpu_capability()}
    found = [{"source": source_of(installed)}, {"source": source_of(repo / "pkg")}, {}]
    head = _git(repo, "rev-parse", "HEAD")[:7]
    assert describe(found) == (
        f"1 run at {head} on {cpu_capability()}; 1 run not recorded; "
        f"1 run outside a git checkout on {cpu_capability()}"
    )
