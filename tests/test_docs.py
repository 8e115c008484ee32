"""The API reference, ``docs/api.md``, is what the code gives (``python docs/api.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_api_reference_is_the_codes() -> None:
    """A signature, a default, a docstring or an option's range changed in the package must
    be regenerated into the page: a reference that drifts from the code misleads."""
    spec = importlib.util.spec_from_file_location("selftune_api_page", DOCS / "api.py")
    assert spec is not None and spec.loader is not None
    api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api)
    try:
        page = api.render()
    except ImportError as err:  # an integration's extra is not installed here
        pytest.skip(f"the page documents every integration: {err}")
    assert api.PAGE.read_text(encoding="utf-8") == page, "docs/api.md is stale: python docs/api.py"
