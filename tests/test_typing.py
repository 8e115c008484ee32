"""selftune's type hints reach its users' type checkers (PEP 561's ``py.typed`` marker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

USER_CODE = """
import torch
import selftune

opt = selftune.wrap(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
knobs: int = opt.hyperparams()
"""


def test_a_users_type_checker_reads_selftunes_hints(tmp_path: Path) -> None:
    """Without the marker mypy skips an installed package ("missing library stubs or py.typed
    marker") and every selftune call in the user's code is unchecked: here the wrong type given
    to ``hyperparams()``'s result must be caught.  torch itself is not followed, to keep the
    check to a few seconds."""
    (tmp_path / "user.py").write_text(USER_CODE, encoding="utf-8")
    (tmp_path / "mypy.ini").write_text("[mypy]\n[mypy-torch.*]\nfollow_imports = skip\n")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "user.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "import-untyped" not in done.stdout, done.stdout
    assert 'expression has type "list[dict[str, float]]", variable has type "int"' in (
        done.stdout
    ), done.stdout
