"""Shared by every test module: the fault-injection tally shown at the end of a test run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

#: Counts that any test may add to (``fault_counts["faults injected"] += n``); summed over the
#: whole session and printed as one line in the terminal summary, ``-s`` or not.
FAULT_COUNTS: dict[str, int] = {"faults injected": 0, "runs survived": 0, "records lost": 0}


@pytest.fixture
def fault_counts() -> dict[str, int]:
    """The session's fault-injection tally; add what this test injected, survived and lost."""
    return FAULT_COUNTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FAULT_COUNTS["faults injected"]:
        terminalreporter.write_line(
            "fault-injection: " + ", ".join(f"{k} {v}" for k, v in FAULT_COUNTS.items())
        )


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the runs are tiny, the cores are shared, and results then do not
    depend on how many cores the machine has (float reductions split across threads differ)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
