"""Where a run's figures come from: the code that made them and the CPU kernels it ran on.

A run is a function of its seed on one machine and one code, not across them: float rounding
differs between torch's CPU kernels (AVX-512, AVX2, the unvectorised ones), and a trajectory that
passes near an edge (a range test's crossing, a guard's threshold) goes another way; a change to
``selftune`` moves its runs too.  The page once mixed rows of several codes and two machines,
and only a README said so.  Each record now carries its ``source`` (:func:`source`), and the page
counts its runs by it (:func:`describe`), so a mix shows where the figures are read.
"""

from __future__ import annotations

import functools
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import selftune
from selftune.bench.fields import Kind

#: what a record's ``source`` must be, for the results file's reader
SOURCE_KIND: Kind = (
    "the commit selftune ran from (or null), whether its sources differed from it (or null), "
    "and torch's CPU kernels",
    lambda v: (
        isinstance(v, dict)
        and isinstance(v.get("cpu"), str)
        and (v.get("commit") is None or isinstance(v["commit"], str))
        and (v.get("changed") is None or isinstance(v["changed"], bool))
    ),
)


def _git(folder: Path, *args: str) -> str | None:
    """A git command's output in ``folder``, or None where git or a checkout is missing."""
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_of(package: Path) -> dict[str, Any]:
    """The ``source`` of runs made by the package in ``package``: the commit of the git checkout
    that tracks it and whether the package's files differ from that commit (a pilot's patch
    applied, an edit not committed), both None where no checkout tracks it (an installed wheel,
    or a copy inside an ignored folder of some repository, whose commit would not be its own);
    and the CPU kernels torch dispatches to."""
    cpu = torch.backends.cpu.get_cpu_capability()
    if _git(package, "ls-files", "--", "__init__.py") != "__init__.py":
        return {"commit": None, "changed": None, "cpu": cpu}
    commit = _git(package, "rev-parse", "HEAD")
    status = _git(package, "status", "--porcelain", "--", ".")
    if commit is None or status is None:
        return {"commit": None, "changed": None, "cpu": cpu}
    return {"commit": commit, "changed": status != "", "cpu": cpu}


@functools.cache
def source() -> dict[str, Any]:
    """This process's :func:`source_of` the imported ``selftune``, asked once per process."""
    return source_of(Path(selftune.__file__).resolve().parent)


def _label(found: dict[str, Any] | None) -> str:
    """One source in words: ``at 1fedcb5 (with changes) on AVX512``."""
    if found is None:
        return "not recorded"
    code = "outside a git checkout" if found["commit"] is None else f"at {found['commit'][:7]}"
    return f"{code}{' (with changes)' if found['changed'] else ''} on {found['cpu']}"


def describe(records: list[dict[str, Any]]) -> str:
    """The records counted by where they were made, the most first: ``5175 runs at 1fedcb5 on
    AVX512``, or ``1620 runs at ...; 3555 runs not recorded`` (older records have no ``source``)."""
    counts = Counter(_label(r.get("source")) for r in records)
    ordered = sorted(counts.items(), key=_most_first)
    return "; ".join(f"{n} run{'' if n == 1 else 's'} {label}" for label, n in ordered)


def _most_first(item: tuple[str, int]) -> tuple[int, str]:
    """Order the counts by size, ties by name, whatever the order of the records."""
    return -item[1], item[0]
