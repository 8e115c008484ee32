"""What a run folder holds reaches a terminal shown, never obeyed."""

from __future__ import annotations

import pytest

from selftune.terminal import printable


@pytest.mark.parametrize(
    ("logged", "shown"),
    [
        ("cut\x1b[2J", "cut\\x1b[2J"),  # ESC: clears the screen
        ("a\rb", "a\\rb"),  # writes over the start of the line
        ("one\ntwo\tthree", "one\\ntwo\\tthree"),
        ("\x07\x00\x7f", "\\x07\\x00\\x7f"),  # the bell, NUL, DEL
        ("\x9b31m\x85", "\\x9b31m\\x85"),  # C1: CSI, next line
        ("a\u202eb", "a\\u202eb"),  # a bidi override reorders what the line shows
        ("lone \ud800", "lone \\ud800"),  # a surrogate json.loads lets through
    ],
)
def test_control_characters_are_escaped_as_repr_writes_them(logged: str, shown: str) -> None:
    assert printable(logged) == shown


def test_printable_text_is_kept_as_it_is() -> None:
    text = r"grow ×1.5 [x] σ above: é, 日本語, ✓, a \x1b typed as text"
    assert printable(text) == text
    assert printable(3) == "3" and printable(None) == "None"
